"""q-FFL's aggregation, q-FedAvg (Li et al., ICLR 2020, "Fair resource allocation in federated
learning", Algorithm 2), and the clients' loss at the round's start model that it reads.

Round t from w = G_{t-1}: each client k trains as in FedAvg (plain SGD at step size lr) to
wbar_k and reports F_k = F_k(w), its objective at w over its own examples (`start_losses`,
before training). With L the Lipschitz estimate (the paper's code: L = 1 / lr):

    Delta_k = L (w - wbar_k)
    h_k     = q F_k^(q-1) ||Delta_k||^2 + L F_k^q
    w_t     = w - sum_k F_k^q Delta_k / sum_k h_k

F_k is taken as F_k + 1e-10, as the paper's code does, so q < 1 stays finite at a zero loss.
The rule weights both sums by the round's weights `[K]` (1 for a sampled client, as the paper;
0 for an absent one, which is how the leave-one-out truth removes client k; "examples"
weighting gives the weighted form). At q = 0, h_k = L and w_t is the weighted mean of the
wbar_k: FedAvg with the same weights.

The rule declares `start_loss` (a keyword parameter), and a round program computes the clients'
F_k only for a rule that declares it: one forward pass over each client's examples in batches
of the client batch size, at w, with the client's own objective (train mode: dropout draws a
key of its own), before local training. No other algorithm pays for it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tracefl_jax.data.federated import ClientSlots
from tracefl_jax.fl.client import ClientUpdate
from tracefl_jax.fl.local_loop import run_steps
from tracefl_jax.fl.robust import AggregationRule, rule_info

# The start loss's dropout key: the client's round key folded with a value no step folds in.
_START_LOSS_STREAM = 2**31 - 2
_EPS = 1e-10


def qffl(q: float = 1.0, lipschitz: float = 1.0) -> AggregationRule:
  """q-FedAvg's rule over the updates theta_k - G (module docstring): `aggregator=qffl(q,
  lipschitz=1 / client_lr)` in `federated_averaging`, clients on plain SGD at client_lr."""
  if not float(q) >= 0 or not float(lipschitz) > 0:
    raise ValueError(f"qffl: q={q} must be >= 0 and lipschitz={lipschitz} > 0 (the paper: "
                     f"1 / the client learning rate)")
  q, lip = float(q), float(lipschitz)

  def qffl_rule(updates, weights, *, start_loss=None):
    if start_loss is None:
      raise ValueError("qffl's rule needs the clients' start_loss [K] (their loss at G_{t-1}): "
                       "a round computes it; server_update needs client_info=(losses, "
                       "num_examples, num_steps, start_loss)")
    # float32 at least (float64 updates stay float64: the tests' reference precision)
    ft = jnp.promote_types(jax.tree.leaves(updates)[0].dtype, jnp.float32)
    w, f = jnp.asarray(weights, ft), start_loss.astype(ft) + _EPS
    norms = sum(jnp.sum(jnp.square(u.astype(ft)).reshape(u.shape[0], -1), axis=1)
                for u in jax.tree.leaves(updates))  # ||theta_k - G||^2 = ||Delta_k||^2 / L^2
    h = q * f ** (q - 1) * lip ** 2 * norms + lip * f ** q
    coef = w * lip * f ** q / jnp.sum(w * h)  # w_t = G + sum_k coef_k (theta_k - G)
    return jax.tree.map(lambda u: jnp.tensordot(coef, u.astype(ft), axes=1,
                                                precision=jax.lax.Precision.HIGHEST
                                                ).astype(u.dtype), updates)
  return AggregationRule("qffl", qffl_rule, shift_equivariant=False)


def reads_start_loss(rule: Any) -> bool:
  """Whether an aggregation rule declares `start_loss` (then the round computes it)."""
  if rule is None:
    return False
  return "start_loss" in rule_info(getattr(rule, "fn", rule), {"start_loss": None})


def start_losses(client_update: ClientUpdate, variables: Any, x: jax.Array, y: jax.Array,
                 slots: Any, counts: jax.Array, keys: jax.Array, *, normalization: Any = None,
                 one_at_a_time: bool = True) -> jax.Array:
  """`[K]` each client's objective at `variables` (G_{t-1}), the mean over its real examples
  in batches of the client batch size. `slots` the round's `ClientSlots` (each client padded
  to whole batches); `one_at_a_time`: `lax.map` over the clients (each runs its own batches,
  reverse-differentiable), else `vmap` (a batched loop runs to the largest client)."""
  cu, b = client_update, client_update.batch_size
  if not hasattr(slots, "offsets"):  # [K, M] index rows
    slots = ClientSlots.from_rows(slots)
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  loop = cu.local_loop if one_at_a_time else "while"

  def one(offset, count, key):
    key = jax.random.fold_in(key, _START_LOSS_STREAM)

    def step(j, total):
      idx = jax.lax.dynamic_slice(slots.flat, (offset + j * b,), (b,))
      mask = j * b + jnp.arange(b, dtype=jnp.int32) < count
      xb = x[idx] if normalization is None else normalization(x[idx])
      value, _ = cu.loss_fn(cu.model, {"params": params, **model_state}, xb, y[idx], mask,
                            jax.random.fold_in(key, j), params)
      return total + value.astype(jnp.float32) * jnp.sum(mask).astype(jnp.float32)

    batches = (count + b - 1) // b
    total = run_steps(step, jnp.zeros((), jnp.float32), batches, -(-slots.flat.shape[0] // b),
                      loop)
    return total / jnp.maximum(count, 1).astype(jnp.float32)

  args = (slots.offsets, counts.astype(jnp.int32), keys)
  if one_at_a_time:
    return jax.lax.map(lambda a: one(*a), args)
  return jax.vmap(one)(*args)
