"""`trace_clients`: TraceFL's answer for a batch of inputs (spec section 2, steps 1-6).

T[n, k] = sum_l beta_l c[l, n, k], beta_l = decay ** (L - 1 - l); P = softmax_k T (float32,
temperature 1); the traced client is argmax_k P, the first in the round's order on ties.
Optional data-size factor p_k = n_k / sum_j n_j multiplies every client parameter (paper
Eq. 5); for affine units that scales client k's scores by p_k.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.models.base import TRACED_UNIT_TYPES, ModelDef, Variables
from tracefl_jax.provenance import kernels
from tracefl_jax.provenance.capture import target_logits

KERNELS = ("auto", "grad", "jvp", "reference")


class ProvenanceResult(NamedTuple):
  """TraceFL's answer for N inputs over the round's K clients.

  Columns of `scores`, `probs` and `layer_scores` are positions in the round's client order;
  `client_ids[k]` is the global id of the client at position k. `traced_client` is a global
  id (equal to the position when `trace_clients` got no `client_ids`), `traced_position` the
  column it came from.

  A non-finite score is never an attribution: an input with any NaN or infinite score (NaN
  in a client's or G's parameters, or in the input) has `attributable` False, its
  `traced_client` and `traced_position` are -1 and its `probs` row is NaN; `scores` keep the
  raw values for inspection.
  """
  scores: jax.Array               # T [N, K] float32
  probs: jax.Array                # P [N, K] softmax over clients
  traced_client: jax.Array        # [N] int32, global id of the responsible client
  traced_position: jax.Array      # [N] int32, its position (column) in the round
  client_ids: jax.Array           # [K] int32, global id of each column
  predicted: jax.Array            # [N] int32, G's eval-mode argmax
  layer_scores: jax.Array | None  # c [L, N, K] with beta applied, when requested
  attributable: jax.Array         # [N] bool, every score of the input finite


def layer_betas(num_layers: int, decay: float = 0.9, use_decay: bool = True) -> jax.Array:
  """beta_l = decay ** (L - 1 - l): the last traced layer weighs 1 (spec step 4)."""
  if not use_decay:
    return jnp.ones(num_layers, jnp.float32)
  return jnp.asarray(decay, jnp.float32) ** jnp.arange(num_layers - 1, -1, -1, dtype=jnp.float32)


def is_affine(model: ModelDef) -> bool:
  """Whether every traced unit is linear in its own parameters (grad and jvp are exact).

  True when all units are of the default `TRACED_UNIT_TYPES`; explicit whole-block units
  (a BERT layer) are not.
  """
  return all(isinstance(u.module, TRACED_UNIT_TYPES) for u in model.units())


def choose_kernel(model: ModelDef, num_inputs: int, num_clients: int) -> str:
  """The fastest exact kernel for the shapes.

  Non-affine units need "reference". Otherwise "grad": one forward/backward of G plus a
  2 N P K contraction, measured fastest at every K (benchmarks/bench_provenance.py, FedAvg
  CNN, 20 inputs, 2 CPU cores: grad 8.2 ms vs reference 10.6 ms at K = 10, 19 ms vs 149 ms
  at K = 100, 0.20 s vs 1.6 s at K = 1000; "jvp", K linearised forward passes, 3.0 s).
  """
  del num_inputs, num_clients
  return "grad" if is_affine(model) else "reference"


def _pad_clients(tree, pad: int):
  """Appends `pad` all-zero clients to every leaf `[K, ...]`: their columns are dropped before
  the softmax, so they never affect an attribution."""
  return jax.tree.map(lambda a: jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]),
                      tree)


def _score_sharded(score: kernels.Scorer, client_params, mesh: jax.sharding.Mesh) -> jax.Array:
  """`score` over the clients dealt to the devices of a 1-D `mesh`: `[L, N, K]`.

  Each device scores its `ceil(K / D)` clients (chunked within the device when the scorer
  chunks); K is padded to a multiple of D with zero clients whose columns are dropped here.
  G's share of the work, which `score` closes over, enters every device replicated.
  """
  axis = mesh.axis_names[0]
  k = jax.tree.leaves(client_params)[0].shape[0]
  pad = (-k) % mesh.size
  if pad:
    client_params = _pad_clients(client_params, pad)
  spec = jax.sharding.PartitionSpec(axis)
  # check_vma=False: the jvp scorer pushes device-varying client directions through G's
  # linearisation, whose primal point is replicated; the value checker rejects that mix.
  c = jax.shard_map(score, mesh=mesh, in_specs=(spec,),
                    out_specs=jax.sharding.PartitionSpec(None, None, axis),
                    check_vma=False)(client_params)
  return c[:, :, :k]


def _replicated(tree, mesh: jax.sharding.Mesh | None):
  """Gathers every leaf onto every device of `mesh` (every process can read the result)."""
  if mesh is None:
    return tree
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, rep), tree)


@functools.partial(jax.jit, static_argnames=("model", "kernel", "decay", "use_decay",
                                             "use_size_factor", "return_layers",
                                             "clients_per_chunk", "block_mask", "mesh"))
def _trace(model, global_vars, client_vars, x, target, client_sizes, client_ids, *, kernel,
           decay, use_decay, use_size_factor, return_layers, clients_per_chunk, block_mask,
           mesh):
  num_layers = len(model.traced_layers)
  betas = layer_betas(num_layers, decay, use_decay)
  if use_size_factor:
    p = client_sizes.astype(jnp.float32) / jnp.sum(client_sizes)
    if kernel == "reference":  # a non-affine unit: scale the parameters themselves
      client_vars = {**client_vars, "params": jax.tree.map(
          lambda a: a * p.reshape(-1, *([1] * (a.ndim - 1))).astype(a.dtype),
          client_vars["params"])}
  totals_only = kernel == "jvp" and not return_layers
  if totals_only:
    make = functools.partial(kernels.jvp_scorer, per_layer=False, betas=betas)
  else:
    make = {"grad": kernels.grad_scorer, "jvp": kernels.jvp_scorer,
            "reference": functools.partial(kernels.reference_scorer,
                                           block_mask=block_mask)}[kernel]
  if mesh is None:
    score, predicted = make(model, global_vars, x, target, clients_per_chunk)
    c = score(client_vars["params"])
  elif kernel == "jvp":
    # G's linearisation cannot be closed over by a shard_map (its residuals carry the outer
    # mesh), so each device linearises G itself: one more linear pass next to its K / D.
    _, predicted = target_logits(model.logits(global_vars, x), target)
    c = _score_sharded(lambda th: make(model, global_vars, x, target, clients_per_chunk)[0](th),
                       client_vars["params"], mesh)
  else:
    # G's forward/backward is split over the devices by input and its results gathered into
    # every device's scorer, not repeated on each device.
    x = jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(mesh.axis_names[0])))
    score, predicted = make(model, global_vars, x, target, clients_per_chunk)
    c = _score_sharded(score, client_vars["params"], mesh)
  c, predicted = _replicated((c, predicted), mesh)
  if totals_only:
    layer_scores, scores = None, c[0]
  else:
    layer_scores = c * betas[:, None, None]
    scores = jnp.sum(layer_scores, axis=0)
  if use_size_factor and kernel != "reference":
    scores = scores * p[None, :]
    layer_scores = None if layer_scores is None else layer_scores * p[None, None, :]
  scores = scores.astype(jnp.float32)
  attributable = jnp.all(jnp.isfinite(scores), axis=-1)
  probs = jax.nn.softmax(scores, axis=-1)
  # argmax takes the first on ties; a NaN row would otherwise report client 0.
  position = jnp.where(attributable, jnp.argmax(probs, axis=-1), -1).astype(jnp.int32)
  # Softmax over a row holding -inf next to finite scores would look valid; poison it too.
  probs = jnp.where(attributable[:, None], probs, jnp.nan)
  traced = jnp.where(attributable, client_ids[jnp.maximum(position, 0)], -1)
  return _replicated(ProvenanceResult(scores, probs, traced, position, client_ids, predicted,
                                      layer_scores if return_layers else None, attributable),
                     mesh)


def _concrete(value) -> bool:
  return not isinstance(value, jax.core.Tracer)


def _check_variables(global_vars: Variables, client_vars: Variables) -> int:
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


def _check_inputs(model: ModelDef, x) -> None:
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


def _check_target(model: ModelDef, target, num_inputs: int):
  if not hasattr(target, "shape"):
    target = np.asarray(target)
  if tuple(target.shape) != (num_inputs,) or not np.issubdtype(target.dtype, np.integer):
    raise ValueError(f"target has shape {tuple(target.shape)} and dtype "
                     f"{np.dtype(target.dtype)}; it must be [N] = ({num_inputs},) integer class "
                     f"ids in [0, {model.num_classes})")
  if _concrete(target):
    t = np.asarray(target)
    bad = np.flatnonzero((t < 0) | (t >= model.num_classes))
    if bad.size:
      raise ValueError(f"target={t[bad[0]]} (input {bad[0]}) is out of range; model "
                       f"{model.name!r} has classes [0, {model.num_classes})")
  return target


def _check_sizes(client_sizes, num_clients: int, use_size_factor: bool):
  if not hasattr(client_sizes, "shape"):
    client_sizes = np.asarray(client_sizes)
  if tuple(client_sizes.shape) != (num_clients,):
    raise ValueError(f"client_sizes has shape {tuple(client_sizes.shape)}; it must be [K] = "
                     f"({num_clients},), one size per client of the round")
  if _concrete(client_sizes):
    n = np.asarray(client_sizes, np.float64)
    bad = np.flatnonzero(~np.isfinite(n) | (n < 0))
    if bad.size:
      raise ValueError(f"client_sizes must be finite and >= 0, got "
                       f"{np.asarray(client_sizes).tolist()} (bad at positions {bad.tolist()})")
    if use_size_factor and n.sum() <= 0:
      raise ValueError(f"client_sizes are all 0 ({np.asarray(client_sizes).tolist()}); "
                       f"use_size_factor=True needs a positive total for p_k = n_k / sum n")
  return client_sizes


def trace_clients(
    model: ModelDef,
    global_vars: Variables,
    client_vars: Variables,
    x: jax.Array,
    *,
    target: jax.Array | None = None,
    kernel: str = "auto",
    decay: float = 0.9,
    use_decay: bool = True,
    client_sizes: jax.Array | None = None,
    use_size_factor: bool = False,
    return_layers: bool = False,
    clients_per_chunk: int | None = None,
    block_mask: str = "fixed",
    client_ids: jax.Array | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> ProvenanceResult:
  """Scores every client for every input: which client is responsible for G's prediction?

  Args:
    model: the `ModelDef` of G and the clients.
    global_vars: G's variables (eval mode: BatchNorm running statistics are used).
    client_vars: the round's client variables, every leaf stacked `[K, ...]`.
    x: `[N, ...]` inputs.
    target: optional `[N]` classes whose logit is explained (faulty-client mode explains the
      predicted wrong class, which is the default anyway); default G's prediction.
    kernel: "grad", "jvp", "reference" or "auto" (see `choose_kernel`).
    decay, use_decay: beta_l = decay ** (L - 1 - l), or all 1.
    client_sizes: `[K]` n_k for the data-size factor (the original counts batches).
    use_size_factor: multiply client parameters by p_k = n_k / sum n (off in the paper).
    return_layers: also return beta-weighted per-layer scores `[L, N, K]`.
    clients_per_chunk: bound memory by processing this many clients at a time (None or 0:
      all at once).
    block_mask: for whole-block units with an attention mask (BERT): "fixed" evaluates the
      client's block with G's mask; "parity" without it, as the original did.
    client_ids: `[K]` global ids of the round's clients; `traced_client` then holds ids
      (default: positions 0..K-1).

  Returns:
    `ProvenanceResult`; inputs with a non-finite score have `attributable` False and
    `traced_client == traced_position == -1` (see `ProvenanceResult`).

  Raises:
    ValueError, before anything is traced or compiled, with the bad value and the valid
    choices: client leaves that are not G's leaves stacked `[K, ...]` (the first mismatching
    leaf is named), K = 0, N = 0, inputs not `[N, *model.input_shape]` or of the wrong kind
    (integer inputs for a float model, float inputs for a token model), a target not `[N]`
    integers or (when concrete) outside [0, num_classes), `client_sizes` not `[K]`, negative,
    non-finite or (with `use_size_factor`) all zero, `clients_per_chunk` < 0, decay outside
    (0, 1], unknown kernel or block_mask names, a mesh that is not 1-D.
  """
  if block_mask not in ("fixed", "parity"):
    raise ValueError(f"block_mask={block_mask!r}; valid: fixed, parity")
  if kernel not in KERNELS:
    raise ValueError(f"unknown provenance kernel {kernel!r}; valid: {', '.join(KERNELS)}")
  if not 0 < decay <= 1:
    raise ValueError(f"decay={decay} must be in (0, 1]")
  if clients_per_chunk is not None and not (isinstance(clients_per_chunk, (int, np.integer))
                                            and clients_per_chunk >= 0):
    raise ValueError(f"clients_per_chunk={clients_per_chunk!r} must be None or 0 (off) or a "
                     f"positive int")
  if mesh is not None and len(mesh.axis_names) != 1:
    raise ValueError(f"mesh has axes {mesh.axis_names}; provenance shards clients over a 1-D "
                     f"mesh (tracefl_jax.fl.strategies.client_mesh())")
  # Checks at the Python boundary: inside the jitted kernels these are JAX/Flax tracebacks
  # or, for values, silent wrong answers (a target of -1 wraps around).
  num_clients = _check_variables(global_vars, client_vars)
  if not hasattr(x, "shape"):
    x = np.asarray(x)
  _check_inputs(model, x)
  if target is not None:
    target = _check_target(model, target, x.shape[0])
  if kernel == "auto":
    kernel = choose_kernel(model, x.shape[0], num_clients)
  elif kernel in ("grad", "jvp") and not is_affine(model):
    raise ValueError(f"kernel {kernel!r} is exact only for affine traced units; this model "
                     f"has whole-block units: use kernel='reference' or 'auto'")
  if use_size_factor and client_sizes is None:
    raise ValueError("use_size_factor=True needs client_sizes")
  if client_sizes is None:
    client_sizes = jnp.ones(num_clients, jnp.float32)
  else:
    client_sizes = _check_sizes(client_sizes, num_clients, use_size_factor)
  if client_ids is None:
    client_ids = jnp.arange(num_clients, dtype=jnp.int32)
  client_ids = jnp.asarray(client_ids, jnp.int32)
  if client_ids.shape != (num_clients,):
    raise ValueError(f"client_ids has shape {client_ids.shape}; the round has {num_clients} "
                     f"clients (leading axis of client_vars), so it must be ({num_clients},)")
  client_sizes = jnp.asarray(client_sizes)
  if mesh is not None:
    # Every device needs these whole. Left uncommitted, they may be given an uneven input
    # sharding by XLA's propagation (from the split of G's work over inputs) that jax cannot
    # express as a NamedSharding (IndivisibleError at compile).
    global_vars, x, target, client_sizes, client_ids = jax.device_put(
        (global_vars, x, target, client_sizes, client_ids),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return _trace(model, global_vars, client_vars, x, target,
                client_sizes, client_ids, kernel=kernel, decay=float(decay),
                use_decay=bool(use_decay), use_size_factor=bool(use_size_factor),
                return_layers=bool(return_layers),
                clients_per_chunk=int(clients_per_chunk) if clients_per_chunk else None,
                block_mask=block_mask, mesh=mesh)
