"""Checks at `trace_clients`' Python boundary: inside the jitted kernels a bad argument is a
JAX/Flax traceback or, for values, a silent wrong answer (a target of -1 wraps around).

Each raises one ValueError naming the argument, the bad value and what is valid.
"""

from __future__ import annotations

import jax
import numpy as np

from tracefl_jax.models.base import ModelDef, Variables

# Client ids are folded into PRNG keys as int32 and -1 marks "unattributable".
MAX_CLIENT_ID = 2**31 - 1


def concrete(value) -> bool:
  return not isinstance(value, jax.core.Tracer)


def check_variables(global_vars: Variables, client_vars: Variables) -> int:
  """Client leaves must be G's leaves stacked `[K, ...]`; returns K (>= 1).

  Every collection both hold is compared; the first mismatching leaf is named.
  """
  for name, tree in (("global_vars", global_vars), ("client_vars", client_vars)):
    if not hasattr(tree, "keys") or "params" not in tree:
      raise ValueError(f"{name} must be Flax variables, a dict of collections with 'params', "
                       f"got {type(tree).__name__}"
                       + (f" with keys {sorted(tree.keys())}" if hasattr(tree, "keys") else ""))

  def named_leaves(col, tree):
    return {f"{col}/{jax.tree_util.keystr(p, simple=True, separator='/')}": leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree[col])[0]}

  num_clients, first = None, None
  for col in ["params", *sorted(k for k in global_vars if k != "params" and k in client_vars)]:
    g_names, c_names = named_leaves(col, global_vars), named_leaves(col, client_vars)
    extra = [name for name in c_names if name not in g_names]
    for name, g_leaf in g_names.items():
      if name not in c_names:
        raise ValueError(f"client_vars lacks leaf {name} of global_vars; G and the clients must "
                         f"be the same model (client leaves stacked [K, ...])")
      g_shape, c_shape = tuple(np.shape(g_leaf)), tuple(np.shape(c_names[name]))
      if c_shape[1:] != g_shape or len(c_shape) != len(g_shape) + 1:
        raise ValueError(
            f"client_vars leaf {name} has shape {c_shape}; global_vars has shape {g_shape} "
            f"there, so it must be [{', '.join(['K', *map(str, g_shape)])}] (stacked over the "
            f"round's clients)")
      if num_clients is None:
        num_clients, first = c_shape[0], name
      elif c_shape[0] != num_clients:
        raise ValueError(f"client_vars leaf {name} stacks {c_shape[0]} clients but {first} "
                         f"stacks {num_clients}; every leaf's leading axis is the round's K "
                         f"clients")
    if extra:
      raise ValueError(f"client_vars has leaf {extra[0]} that global_vars lacks; G and the "
                       f"clients must be the same model (client leaves stacked [K, ...])")
  if num_clients is None:
    raise ValueError("global_vars['params'] has no leaves; nothing to trace")
  if num_clients == 0:
    raise ValueError(f"client_vars holds K = 0 clients (leading axis of {first}); trace at "
                     f"least one client")
  return num_clients


def check_inputs(model: ModelDef, x) -> None:
  expected = f"[N, {', '.join(map(str, model.input_shape))}]"
  if x.ndim != 1 + len(model.input_shape) or tuple(x.shape[1:]) != model.input_shape:
    raise ValueError(f"x has shape {tuple(x.shape)}; model {model.name!r} takes inputs of "
                     f"shape {expected} (a batch of examples of shape {model.input_shape})")
  if x.shape[0] == 0:
    raise ValueError(f"x holds N = 0 inputs (shape {tuple(x.shape)}); trace at least one")
  tokens = np.issubdtype(np.dtype(model.input_dtype), np.integer)
  kind_ok = (np.issubdtype(x.dtype, np.integer) if tokens
             else np.issubdtype(x.dtype, np.floating))
  if not kind_ok:
    raise ValueError(f"x has dtype {np.dtype(x.dtype)}; model {model.name!r} takes "
                     f"{'integer token ids' if tokens else 'floating-point inputs'} "
                     f"({np.dtype(model.input_dtype)})")
  if tokens and concrete(x) and getattr(x, "is_fully_addressable", True):
    # A negative id indexes the embedding from its end: a silent wrong answer. (A non-finite
    # float input is allowed: its row comes back unattributable, `ProvenanceResult`.)
    v = np.asarray(x).reshape(x.shape[0], -1)
    if v.size and v.min() < 0:
      bad = int(np.flatnonzero(v.min(axis=1) < 0)[0])
      raise ValueError(f"x holds token id {v.min()} (input {bad}); token ids are >= 0")


def widened_range(input_range) -> tuple[float, float]:
  """The range float inputs may take given the `[lo, hi]` of a dataset's own inputs: widened
  by a quarter of the span on each side (new inputs may reach a little beyond; raw values
  such as pixels 0..16 or 0..255 given as floats are far beyond)."""
  lo, hi = map(float, input_range)
  slack = 0.25 * max(hi - lo, 1e-6)
  return lo - slack, hi + slack


def check_input_range(x, input_range, where: str = "x") -> None:
  """Float inputs within `widened_range(input_range)` (finite values; a non-finite row is
  traced as unattributable). Skipped for traced or integer inputs and without a range."""
  if input_range is None or not concrete(x) or not np.issubdtype(x.dtype, np.floating):
    return
  v = np.asarray(x)
  v = v[np.isfinite(v)]
  lo, hi = widened_range(input_range)
  if v.size and (v.min() < lo or v.max() > hi):
    raise ValueError(f"{where} has values in [{v.min():.4g}, {v.max():.4g}], outside "
                     f"[{lo:.4g}, {hi:.4g}] around the round's own inputs ([{input_range[0]:.4g}"
                     f", {input_range[1]:.4g}]): raw values? give them preprocessed as the "
                     f"round's data was")


def check_target(model: ModelDef, target, num_inputs: int):
  if not hasattr(target, "shape"):
    target = np.asarray(target)
  if tuple(target.shape) != (num_inputs,) or not np.issubdtype(target.dtype, np.integer):
    raise ValueError(f"target has shape {tuple(target.shape)} and dtype "
                     f"{np.dtype(target.dtype)}; it must be [N] = ({num_inputs},) integer class "
                     f"ids in [0, {model.num_classes})")
  if concrete(target):
    t = np.asarray(target)
    bad = np.flatnonzero((t < 0) | (t >= model.num_classes))
    if bad.size:
      raise ValueError(f"target={t[bad[0]]} (input {bad[0]}) is out of range; model "
                       f"{model.name!r} has classes [0, {model.num_classes})")
  return target


def _nonnegative_per_client(name: str, values, num_clients: int, meaning: str):
  """`values` as a `[K]` array (unchanged if it has a shape); shape always checked, finite and
  >= 0 when concrete. Returns (values, float64 copy or None when traced)."""
  if not hasattr(values, "shape"):
    values = np.asarray(values)
  if tuple(values.shape) != (num_clients,):
    raise ValueError(f"{name} has shape {tuple(values.shape)}; it must be [K] = "
                     f"({num_clients},), {meaning}")
  if not concrete(values):
    return values, None
  v = np.asarray(values, np.float64)
  bad = np.flatnonzero(~np.isfinite(v) | (v < 0))
  if bad.size:
    raise ValueError(f"{name} must be finite and >= 0, got {np.asarray(values).tolist()} "
                     f"(bad at positions {bad.tolist()})")
  return values, v


def check_sizes(client_sizes, num_clients: int, use_size_factor: bool):
  client_sizes, n = _nonnegative_per_client("client_sizes", client_sizes, num_clients,
                                            "one size per client of the round")
  if n is not None:
    if use_size_factor and n.sum() <= 0:
      raise ValueError(f"client_sizes are all 0 ({np.asarray(client_sizes).tolist()}); "
                       f"use_size_factor=True needs a positive total for p_k = n_k / sum n")
  return client_sizes


def check_client_ids(client_ids, num_clients: int):
  """`[K]` distinct integer global ids in [0, 2**31 - 1): -1 is the unattributable sentinel
  and ids are folded into PRNG keys as int32, so floats, negatives, larger ids and repeated
  ids are rejected (values checked when concrete). Returns them as int32."""
  if not hasattr(client_ids, "shape"):
    client_ids = np.asarray(client_ids)
  if tuple(client_ids.shape) != (num_clients,):
    raise ValueError(f"client_ids has shape {tuple(client_ids.shape)}; the round has "
                     f"{num_clients} clients (leading axis of client_vars), so it must be "
                     f"({num_clients},)")
  if not np.issubdtype(np.dtype(client_ids.dtype), np.integer):
    raise ValueError(f"client_ids has dtype {np.dtype(client_ids.dtype)} "
                     f"({np.asarray(client_ids).tolist() if concrete(client_ids) else '...'})"
                     f"; it must hold integer global ids in [0, {MAX_CLIENT_ID})")
  if concrete(client_ids):
    ids = np.asarray(client_ids, np.int64)
    bad = np.flatnonzero((ids < 0) | (ids >= MAX_CLIENT_ID))
    if bad.size:
      raise ValueError(f"client_ids[{bad[0]}]={ids[bad[0]]} is out of range; global ids lie "
                       f"in [0, {MAX_CLIENT_ID}) (-1 is reserved for unattributable inputs, "
                       f"and ids are int32)")
    values, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if np.any(counts > 1):
      twice = values[counts > 1]
      raise ValueError(f"client_ids {ids.tolist()} repeat id(s) {twice.tolist()}; a round's "
                       f"clients are distinct (one id per position of client_vars)")
  return jax.numpy.asarray(client_ids, jax.numpy.int32)


def check_removal_weights(weights, num_clients: int, score: str):
  """`[K]` aggregation weights for the first-order score: finite, >= 0, and no client holding
  all of it (W - w_k = 0 leaves nothing to average without k). Values checked when
  concrete."""
  if weights is None:
    raise ValueError(f"score={score!r} needs weights, the round's [K] = ({num_clients},) "
                     f"aggregation weights w_k (RoundOutput.weights)")
  weights, w = _nonnegative_per_client("weights", weights, num_clients,
                                       "one aggregation weight per client of the round")
  if w is not None:
    alone = np.flatnonzero(w.sum() - w <= 0)
    if alone.size:
      raise ValueError(f"weights={w.tolist()}: client position(s) {alone.tolist()} hold all "
                       f"the aggregation weight (W - w_k = 0), so removing one leaves nothing "
                       f"to average and score={score!r} (w_k / (W - w_k)) is undefined; use "
                       f"score='tracefl' for such a round")
  return jax.numpy.asarray(weights, jax.numpy.float32)
