"""Local training for ONE client: `lax.scan` over epochs and steps, padded steps masked.

Written once for a single client; `simulation.py` adds the client axis. A client starts every
round from the global variables with a fresh optimizer state (as the original's Flower client
does), shuffles its own examples each epoch with its own key, and trains on batches of
`batch_size`. Slots past the client's example count are padding: they carry zero loss weight,
and a step whose batch is entirely padding leaves parameters, optimizer state and model state
unchanged (`jnp.where`), so a padded client trains exactly as an unpadded one would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tracefl_jax.models.base import ModelDef, Variables


class ClientOutput(NamedTuple):
  """One client's round result (leading `[K]` axis once vmapped)."""
  variables: Variables       # the client's trained variables
  loss: jax.Array            # mean training loss over its real examples and epochs
  num_examples: jax.Array    # int32, its real example count
  num_steps: jax.Array       # int32, optimizer steps actually taken


ClientUpdateFn = Callable[[Variables, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array],
                          ClientOutput]


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the examples where `mask` is True (0 if none)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  weight = mask.astype(losses.dtype)
  return jnp.sum(losses * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def shuffle_order(key: jax.Array, length: int, count: jax.Array) -> jax.Array:
  """A permutation of `range(length)`: the first `count` slots in random order, then padding.

  Each slot's sort key depends only on (key, slot), not on `length`, so a client's batches are
  the same whatever length it is padded to, i.e. whichever clients share its round.
  """
  slots = jnp.arange(length)
  u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(slots)
  return jnp.argsort(jnp.where(slots < count, u, 2.0))


def _select(pred: jax.Array, new: Any, old: Any) -> Any:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def make_client_update(
    model: ModelDef,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    local_epochs: int,
    compute_dtype: Any = jnp.float32,
) -> ClientUpdateFn:
  """Returns `client_update(variables, x, y, indices, count, key) -> ClientOutput`.

  With `compute_dtype=jnp.bfloat16` the forward and backward passes run in bfloat16 on a cast
  copy of the parameters while the optimizer updates float32 master weights (mixed precision);
  the loss is reduced in float32.

  Args of the returned function (one client):
    variables: the global variables the client starts from.
    x, y: the device-resident training set `[N, ...]`, `[N]`.
    indices: `[M]` int32 indices of the client's examples, `M` a multiple of `batch_size`.
    count: int32 scalar, how many of `indices` are real.
    key: the client's PRNG key for this round (shuffling and dropout).
  """

  def client_update(variables, x, y, indices, count, key):
    m = indices.shape[0]
    if m % batch_size:
      raise ValueError(f"padded length {m} is not a multiple of batch_size {batch_size}")
    steps = m // batch_size
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(params, state, xb, yb, mb, rng):
      if compute_dtype != jnp.float32:
        params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        if jnp.issubdtype(xb.dtype, jnp.floating):
          xb = xb.astype(compute_dtype)
      # ModelDef.apply hands `mask` on only to modules whose __call__ takes it (opt-in
      # masked batch statistics); standard modules never see it.
      logits, new_state = model.apply({"params": params, **state}, xb, train=True, rng=rng,
                                      mask=mb)
      return masked_cross_entropy(logits.astype(jnp.float32), yb, mb), new_state

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(carry, batch):
      params, opt_state, state, loss_sum, n_steps = carry
      idx, mb, rng = batch
      (loss, new_state), grads = grad_fn(params, state, x[idx], y[idx], mb, rng)
      updates, new_opt_state = optimizer.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      active = jnp.any(mb)
      carry = (_select(active, new_params, params), _select(active, new_opt_state, opt_state),
               _select(active, new_state, state),
               loss_sum + jnp.where(active, loss * jnp.sum(mb), 0.0),
               n_steps + active.astype(jnp.int32))
      return carry, None

    def epoch(carry, epoch_key):
      perm_key, step_key = jax.random.split(epoch_key)
      # Real examples first in random order, padding after: batches fill from the front and
      # the tail steps are all padding.
      order = shuffle_order(perm_key, m, count)
      valid = jnp.arange(m) < count
      batches = (indices[order].reshape(steps, batch_size),
                 valid[order].reshape(steps, batch_size),
                 jax.vmap(lambda s: jax.random.fold_in(step_key, s))(jnp.arange(steps)))
      carry, _ = jax.lax.scan(step, carry, batches)
      return carry, None

    init = (params, optimizer.init(params), state, jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.int32))
    (params, _, state, loss_sum, n_steps), _ = jax.lax.scan(
        epoch, init, jax.random.split(key, local_epochs))
    seen = jnp.maximum(count * local_epochs, 1).astype(jnp.float32)
    return ClientOutput({"params": params, **state}, loss_sum / seen,
                        count.astype(jnp.int32), n_steps)

  return client_update


OPTIMIZERS = ("adam", "adamw", "sgd")


def make_optimizer(name: str, learning_rate: float, weight_decay: float = 0.0,
                   momentum: float = 0.0) -> optax.GradientTransformation:
  """The local optimizer by name: "sgd", "adam" (CNN clients in the paper) or "adamw" (text)."""
  if name == "sgd":
    return optax.sgd(learning_rate, momentum=momentum or None)
  if name == "adam":
    return optax.adam(learning_rate)
  if name == "adamw":
    return optax.adamw(learning_rate, weight_decay=weight_decay)
  raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
