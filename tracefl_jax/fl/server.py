"""The server's side of a round: its state and the server optimizer (Reddi et al., ICLR 2021).

After aggregation the server holds G_{t-1} and the round's aggregate A_t. Without a server
optimizer G_t = A_t (FedAvg). With one, the pseudo-gradient G_{t-1} - A_t (minus the mean
client update) goes through any optax transformation, whose state lives in `ServerState`:

  optax.sgd(1.0)                       FedAvg (equal to A_t up to float rounding)
  optax.sgd(lr, momentum=0.9)          FedAvgM (Hsu et al. 2019)
  optax.adam(lr, b1=0.9, b2=0.99, eps=1e-3)     FedAdam
  optax.yogi(lr, b1=0.9, b2=0.99, eps=1e-3)     FedYogi
  optax.adagrad(lr, eps=1e-3)                   FedAdagrad

(optax's Adam and Yogi correct their moments' initial bias, Reddi et al.'s Algorithm 2 does
not; `server_optimizer` builds these by name.) The optimizer updates "params" only; the other
collections (BatchNorm statistics) take the aggregate's values.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import flax.serialization
import jax
import numpy as np
import optax

from tracefl_jax.fl.types import ClientTable, OptState, Variables

SERVER_OPTIMIZERS = ("none", "sgd", "adam", "yogi", "adagrad")


class ServerState(NamedTuple):
  """What the server carries from round to round (a pytree; checkpoint all of it).

  `opt_state` is the server optimizer's state (None without one): a resumed run must restore
  it with the variables to continue exactly (`flax.serialization.to_state_dict` of the whole
  `ServerState` holds both).
  """
  variables: Variables  # the global model G_t
  round: int            # rounds completed (t)
  opt_state: OptState = None
  client_state: ClientTable = None  # the per-client table, leaves [C, ...] (`client_state.py`)


def server_optimizer(name: str, learning_rate: float = 1.0, *, momentum: float = 0.0,
                     b1: float = 0.9, b2: float = 0.99,
                     eps: float = 1e-3) -> optax.GradientTransformation | None:
  """A server optimizer by name, with Reddi et al.'s defaults (beta1 0.9, beta2 0.99,
  tau 1e-3): "none" (plain FedAvg, None), "sgd" (FedAvgM with `momentum`), "adam", "yogi",
  "adagrad". `learning_rate` (and `momentum`) may be traced (a hypergradient through
  `federation.py`); only concrete values are checked."""
  if name == "none":
    return None
  if _concrete(learning_rate) and not float(learning_rate) > 0:
    raise ValueError(f"server learning_rate={learning_rate} must be > 0")
  if name == "sgd":
    if _concrete(momentum) and not 0 <= float(momentum) < 1:
      raise ValueError(f"server momentum={momentum} must be in [0, 1)")
    return optax.sgd(learning_rate, momentum=momentum or None)
  if name == "adam":
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  if name == "yogi":
    return optax.yogi(learning_rate, b1=b1, b2=b2, eps=eps)
  if name == "adagrad":
    return optax.adagrad(learning_rate, eps=eps)
  raise ValueError(f"unknown server optimizer {name!r}; valid: {', '.join(SERVER_OPTIMIZERS)}")


def init_server(variables: Variables,
                optimizer: optax.GradientTransformation | None) -> ServerState:
  """Round 0's state: G_0 and a fresh server optimizer state over its params."""
  variables = dict(variables)
  opt_state = None if optimizer is None else optimizer.init(variables["params"])
  return ServerState(variables, 0, opt_state)


def server_step(optimizer: optax.GradientTransformation | None, previous: Variables,
                aggregate: Variables, opt_state: OptState) -> tuple[Variables, OptState]:
  """`(G_t, opt_state)` from G_{t-1} (`previous`) and the round's aggregate A_t.

  None: G_t = A_t, unchanged (bit for bit FedAvg). Otherwise params move by
  `optimizer.update(G_{t-1} - A_t)`; the other collections take A_t's values.
  """
  if optimizer is None:
    return aggregate, opt_state
  params = previous["params"]
  pseudo_grad = jax.tree.map(lambda g, a: g - a.astype(g.dtype), params, aggregate["params"])
  updates, opt_state = optimizer.update(pseudo_grad, opt_state, params)
  return {**aggregate, "params": optax.apply_updates(params, updates)}, opt_state


def _concrete(value) -> bool:
  """A value whose number is known now (not a tracer under jit, grad or vmap)."""
  return not isinstance(value, jax.core.Tracer)


# ------------------------------------------------------------------ save / load

_FORMAT = "tracefl_jax.ServerState/1"


def _layout(state: ServerState) -> dict[str, str]:
  """`{leaf path: "shape dtype"}` of every array, and `{node path: type}` of the optimizer
  state's containers (ScaleByAdamState, TraceState, ...): what a template must match."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    out[name] = f"{tuple(np.shape(leaf))} {getattr(leaf, 'dtype', np.asarray(leaf).dtype)}"

  def types(node, prefix):
    if node is None:
      out[f"{prefix}:type"] = "None"
    elif isinstance(node, (tuple, list)):
      out[f"{prefix}:type"] = type(node).__name__
      for i, child in enumerate(node):
        types(child, f"{prefix}/{i}")
    elif isinstance(node, dict) and prefix.startswith("opt_state"):
      for k, child in node.items():
        types(child, f"{prefix}/{k}")
  types(state.opt_state, "opt_state")
  return out


def save_server_state(path: str | os.PathLike, state: ServerState, *, label: str = "") -> None:
  """Writes `state` (G_t, the round, the server optimizer's and the client-state table) to
  `path`, with its layout and an optional `label` (e.g. "fedyogi(0.01)") that
  `load_server_state` checks. Adam's and Yogi's states have the same layout; only a label
  tells them apart."""
  blob = flax.serialization.msgpack_serialize({
      "format": _FORMAT, "label": str(label), "layout": _layout(state),
      "state": flax.serialization.to_state_dict(state)})
  tmp = f"{os.fspath(path)}.tmp"
  with open(tmp, "wb") as f:
    f.write(blob)
  os.replace(tmp, path)


def load_server_state(path: str | os.PathLike, template: ServerState, *,
                      label: str | None = None) -> ServerState:
  """The `ServerState` saved at `path`, restored into `template` (`algorithm.init(...)` of
  the algorithm that continues it).

  Raises:
    ValueError: the file's state does not fit the template (a leaf missing, extra, or of
      another shape or dtype; another server optimizer's state, e.g. FedAvgM's into FedAdam's,
      or none into one), naming what differs; or `label` differs from the saved label.
  """
  with open(path, "rb") as f:
    saved = flax.serialization.msgpack_restore(f.read())
  if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
    raise ValueError(f"{os.fspath(path)} is not a ServerState written by save_server_state")
  if label is not None and saved["label"] != label:
    raise ValueError(f"{os.fspath(path)} holds the server state of {saved['label']!r}, not "
                     f"{label!r}")
  want, got = _layout(template), saved["layout"]
  # Container types first: "ScaleByAdamState, template TraceState" says more than 14 leaves.
  keys = sorted(set(want) | set(got), key=lambda k: (not k.endswith(":type"), k))
  diffs = [f"{k}: file {got.get(k, 'absent')}, template {want.get(k, 'absent')}"
           for k in keys if want.get(k) != got.get(k)]
  if diffs:
    raise ValueError(
        f"{os.fspath(path)} does not fit the template ({len(diffs)} difference(s): "
        f"{'; '.join(diffs[:6])}{' ...' if len(diffs) > 6 else ''}): build the template with "
        f"the algorithm (server optimizer, client state) that saved it")
  return flax.serialization.from_state_dict(template, saved["state"])
