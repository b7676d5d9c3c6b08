"""Client objectives: the loss a client minimises, as a function the user passes.

A loss function has the signature

    loss_fn(model, variables, x, y, mask, rng, global_params) -> (loss, model_state)

  model:          the `ModelDef` (call `model.apply(variables, x, train=True, rng=rng,
                  mask=mask)` for the logits and the updated BatchNorm statistics).
  variables:      `{"params": theta, **model_state}`, the client's current variables (cast to
                  the compute dtype under mixed precision); differentiated w.r.t. "params".
  x, y:           the batch `[B, ...]`, `[B]` (x normalised).
  mask:           `[B]` bool, the real examples: a client's last batch of an epoch is padded,
                  and padded slots must carry no loss.
  rng:            the step's key (dropout).
  global_params:  G_{t-1}'s params, float32, the model the client started the round from
                  (FedProx's anchor); None only when a step is called by hand without it.

It returns the scalar loss and the new non-parameter collections (`model.apply`'s second
output). The client's reported `loss` is the mean of this value over its real examples.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from tracefl_jax.fl.types import Params, PyTree, Variables
from tracefl_jax.models.base import ModelDef

LossFn = Callable[..., tuple[jax.Array, PyTree]]


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the examples where `mask` is True (0 if none)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  weight = mask.astype(losses.dtype)
  return jnp.sum(losses * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def cross_entropy(model: ModelDef, variables: Variables, x: jax.Array, y: jax.Array,
                  mask: jax.Array, rng: jax.Array,
                  global_params: Params | None = None) -> tuple[jax.Array, PyTree]:
  """The default objective: masked softmax cross-entropy of the train-mode logits."""
  del global_params
  logits, state = model.apply(variables, x, train=True, rng=rng, mask=mask)
  return masked_cross_entropy(logits.astype(jnp.float32), y, mask), state


def proximal_term(params: Params, global_params: Params) -> jax.Array:
  """||theta - G||^2 over every leaf, in float32."""
  leaves = jax.tree.leaves(jax.tree.map(
      lambda p, g: jnp.sum(jnp.square(p.astype(jnp.float32) - g.astype(jnp.float32))),
      params, global_params))
  return sum(leaves, jnp.zeros((), jnp.float32))


def fedprox(mu: float, base: LossFn = cross_entropy) -> LossFn:
  """FedProx's objective (Li et al., MLSys 2020, eq. 2): `base + mu / 2 ||theta - G||^2`."""
  if not float(mu) >= 0:
    raise ValueError(f"fedprox: mu={mu} must be >= 0 (the proximal coefficient)")

  def loss(model, variables, x, y, mask, rng, global_params=None):
    if global_params is None:
      raise ValueError("fedprox needs global_params (G's params) to anchor the proximal "
                       "term; ClientUpdate passes them, a step called by hand must too")
    value, state = base(model, variables, x, y, mask, rng, global_params)
    return value + 0.5 * mu * proximal_term(variables["params"], global_params), state
  return loss


def declares_client(objective: Any) -> bool:
  """Whether an objective takes `client=` (a per-client state's `ClientContext`): a parameter
  of that name, or `**kwargs`."""
  try:
    params = inspect.signature(objective).parameters
  except (TypeError, ValueError):
    return False
  return "client" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD
                                   for p in params.values())


def check_loss_output(out: Any, objective: Any) -> None:
  """At trace time (once, before the round compiles): the objective returned
  `(scalar loss, model_state)`."""
  name = getattr(objective, "__name__", type(objective).__name__)
  if not (isinstance(out, tuple) and len(out) == 2):
    what = (f"an array of shape {tuple(out.shape)}" if hasattr(out, "shape")
            else type(out).__name__)
    raise TypeError(
        f"loss_fn {name} returned {what}; a client objective returns (loss, model_state): "
        f"the scalar loss and model.apply's updated collections, e.g. `logits, state = "
        f"model.apply(variables, x, train=True, rng=rng, mask=mask); return loss, state` "
        f"(see tracefl_jax.fl.losses)")
  if jnp.shape(out[0]) != ():
    raise TypeError(f"loss_fn {name} returned a loss of shape {jnp.shape(out[0])}; the loss "
                    f"must be a scalar (reduce over the batch with the mask)")
