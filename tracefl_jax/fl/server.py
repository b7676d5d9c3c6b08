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

from typing import Any, NamedTuple

import jax
import optax

from tracefl_jax.models.base import Variables

SERVER_OPTIMIZERS = ("none", "sgd", "adam", "yogi", "adagrad")


class ServerState(NamedTuple):
  """What the server carries from round to round (a pytree; checkpoint all of it).

  `opt_state` is the server optimizer's state (None without one): a resumed run must restore
  it with the variables to continue exactly (`flax.serialization.to_state_dict` of the whole
  `ServerState` holds both).
  """
  variables: Variables  # the global model G_t
  round: int            # rounds completed (t)
  opt_state: Any = None


def server_optimizer(name: str, learning_rate: float = 1.0, *, momentum: float = 0.0,
                     b1: float = 0.9, b2: float = 0.99,
                     eps: float = 1e-3) -> optax.GradientTransformation | None:
  """A server optimizer by name, with Reddi et al.'s defaults (beta1 0.9, beta2 0.99,
  tau 1e-3): "none" (plain FedAvg, None), "sgd" (FedAvgM with `momentum`), "adam", "yogi",
  "adagrad"."""
  if name == "none":
    return None
  if not float(learning_rate) > 0:
    raise ValueError(f"server learning_rate={learning_rate} must be > 0")
  if name == "sgd":
    if not 0 <= float(momentum) < 1:
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
                aggregate: Variables, opt_state: Any) -> tuple[Variables, Any]:
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
