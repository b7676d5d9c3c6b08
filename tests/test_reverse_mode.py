"""Reverse mode through local training (issue 35, item 1): the scanned local loop computes
what the while loop computes, bit for bit, and `jax.grad` through a client, a round and
several rounds (FedAdam) equals finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tracefl_jax.data.federated import federate, stack_client_indices
from tracefl_jax.fl.client import make_client_update
from tracefl_jax.fl.local_loop import DEFAULT_LOCAL_LOOP, run_steps
from tracefl_jax.fl.rounds import federated_averaging
from tracefl_jax.fl.strategies import fold_client_keys, simulate_clients_with_steps
from tracefl_jax.models import get_model

BATCH, EPOCHS = 4, 2
SIZES = [9, 4, 13, 0, 6]  # ragged, one empty: padded steps and skipped chunks


def _data(features=(8, 8, 1), n=40, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, *features)).astype(np.float32)
  y = rng.integers(0, 3, n).astype(np.int32)
  clients = np.split(rng.permutation(n)[:sum(SIZES)], np.cumsum(SIZES)[:-1])
  return x, y, clients


def _equal(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_run_steps_scan_equals_while_for_every_total():
  step = lambda t, s: s * 1.5 + t  # noqa: E731
  for total in range(0, 11):
    ref = run_steps(step, jnp.float32(1.0), jnp.int32(total), 10, "while")
    assert float(run_steps(step, jnp.float32(1.0), jnp.int32(total), 10, "scan")) == float(ref)
  with pytest.raises(ValueError, match="local_loop='fori'"):
    make_client_update(get_model("mlp", (4,), 3), optax.sgd(0.1), 4, 1, local_loop="fori")


@pytest.mark.parametrize("strategy", ["single", "scan", "vmap", "chunked"])
def test_scan_loop_equals_while_loop_bit_for_bit(strategy):
  """Forward results: the scanned loop equals the while loop exactly, alone, under the "scan"
  strategy (its loop), and under the packed strategies (their own lane loop)."""
  x, y, clients = _data()
  # LeNet where the CPU runs it ("auto" = "scan"); the vmapped paths on an MLP (cheaper).
  model = get_model("lenet" if strategy == "scan" else "mlp", (8, 8, 1), 3)
  variables = model.init(jax.random.key(1))
  opt = optax.adam(0.01)
  data = federate(x, y, clients)
  ids = np.arange(len(SIZES))
  keys = fold_client_keys(jax.random.key(7), jnp.asarray(ids))
  outs = []
  for loop in ("while", "scan"):
    update = make_client_update(model, opt, BATCH, EPOCHS, local_loop=loop)
    if strategy == "single":
      rows = stack_client_indices(clients, ids, BATCH, length=32)  # heavy padding
      outs.append(jax.jit(jax.vmap(update, in_axes=(None, None, None, 0, 0, 0)))(
          variables, data.x, data.y, jnp.asarray(rows.indices), jnp.asarray(rows.counts),
          keys))
    else:
      slots = data.round_slots(ids, BATCH)
      outs.append(jax.jit(lambda i, c, k, update=update: simulate_clients_with_steps(
          update, variables, data.x, data.y, i, c, k, strategy=strategy,
          clients_per_chunk=2)[0])(jax.device_put(slots.indices), jnp.asarray(slots.counts),
                                   keys))
  _equal(outs[0], outs[1])
  np.testing.assert_array_equal(outs[1].num_steps, EPOCHS * -(-np.asarray(SIZES) // BATCH))


# ------------------------------------------------------------------ gradients (float64)

def _objective(model, variables, x, y, mask, rng, global_params=None):
  """Masked cross-entropy in the parameters' own dtype (the default casts logits to
  float32, which would cap a float64 finite-difference check at float32's precision)."""
  del rng, global_params
  logits, state = model.apply(variables, x, train=True)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  w = mask.astype(losses.dtype)
  return jnp.sum(losses * w) / jnp.maximum(jnp.sum(w), 1.0), state


def _mean_rule(updates, weights):
  """The weighted mean in the updates' dtype (FedAvg's default averages in float32)."""
  w = weights.astype(jax.tree.leaves(updates)[0].dtype)
  return jax.tree.map(lambda u: jnp.tensordot(w / jnp.sum(w), u, axes=1), updates)


def _f64(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _check_fd(f, theta, grad, direction, eps, rtol):
  """Central difference of `f` at `theta` along `direction` against `<grad, direction>`."""
  shift = lambda s: jax.tree.map(lambda t, d: t + s * d, theta, direction)  # noqa: E731
  fd = (f(shift(eps)) - f(shift(-eps))) / (2 * eps)
  ad = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
  np.testing.assert_allclose(float(ad), float(fd), rtol=rtol)
  assert abs(float(ad)) > 1e-6  # a real signal, not 0 == 0


def _unit(tree, key):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  d = [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)]
  norm = jnp.sqrt(sum(jnp.sum(v * v) for v in d))
  return jax.tree.unflatten(treedef, [v / norm for v in d])


def _setup64():
  x, y, clients = _data(features=(6,), n=48)
  model = get_model("mlp", (6,), 3)
  variables = _f64(model.init(jax.random.key(2)))
  data = federate(jnp.asarray(x, jnp.float64), y, clients)
  xv, yv = jnp.asarray(x[-8:], jnp.float64), jnp.asarray(y[-8:])

  def val_loss(v):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(v, xv)[0], yv).mean()
  return model, variables, data, clients, val_loss


def test_default_local_loop_is_scan():
  assert DEFAULT_LOCAL_LOOP == "scan"
  assert make_client_update(get_model("mlp", (4,), 3), optax.sgd(0.1), 4, 1).local_loop == (
      "scan")


def test_grad_through_one_client_equals_finite_differences():
  with jax.enable_x64(True):
    model, variables, data, clients, val_loss = _setup64()
    # eps_root > 0: Adam's sqrt(v) has an infinite derivative at v = 0 (a parameter whose
    # gradient is exactly 0, e.g. behind a dead ReLU), NaN in reverse mode without it.
    update = make_client_update(model, optax.adam(0.05, eps_root=1e-12), BATCH, EPOCHS,
                                loss_fn=_objective)
    rows = stack_client_indices(clients, [2], BATCH, length=32)
    idx, count = jnp.asarray(rows.indices[0]), jnp.asarray(rows.counts[0])

    @jax.jit
    def f(v):
      return val_loss(update(v, data.x, data.y, idx, count, jax.random.key(3)).variables)

    g = jax.grad(f)(variables)
    _check_fd(f, variables, g, _unit(variables, jax.random.key(0)), 1e-5, 1e-6)


def _round_fn(model, data, clients, client_lr, server_lr, rounds, strategy="scan"):
  """R rounds of FedAdam from G_0 (the program's rounds, each under `jax.checkpoint`) ->
  G_R; the learning rates may be traced."""
  algorithm = federated_averaging(
      model, optax.sgd(client_lr), batch_size=BATCH, local_epochs=EPOCHS, strategy=strategy,
      loss_fn=_objective, aggregator=_mean_rule,
      server_optimizer=optax.adam(server_lr, b1=0.9, b2=0.99, eps=1e-3, eps_root=1e-12))
  ids = np.array([0, 1, 2, 4])
  slots = data.round_slots(ids, BATCH)
  weights = jnp.asarray(slots.counts, jnp.float64)

  def one_round(carry, r):
    v, opt_state = carry
    out = algorithm.program(v, data.x, data.y, slots.indices, jnp.asarray(slots.counts),
                            jnp.asarray(ids, jnp.int32), jax.random.fold_in(
                                jax.random.key(5), r), weights, opt_state=opt_state)
    return out[0], out[5]

  def run(v):
    carry = (v, algorithm.init(v).opt_state)
    for r in range(rounds):
      carry = jax.checkpoint(one_round)(carry, r)
    return carry[0]
  return run


@pytest.mark.parametrize("rounds", [1, 3])
def test_grad_through_rounds_equals_finite_differences(rounds):
  """d(validation loss of G_R) / d(G_0, client lr, server lr) through R FedAdam rounds."""
  with jax.enable_x64(True):
    model, variables, data, clients, val_loss = _setup64()

    @jax.jit
    def f(theta):
      v, lrs = theta
      return val_loss(_round_fn(model, data, clients, lrs[0], lrs[1], rounds)(v))

    theta = (variables, jnp.asarray([0.1, 0.01], jnp.float64))
    g = jax.grad(f)(theta)
    _check_fd(f, theta, g, _unit(theta, jax.random.key(1)), 1e-5, 1e-5)
    for i in range(2):  # each learning rate alone
      e = (jax.tree.map(jnp.zeros_like, variables), jnp.eye(2, dtype=jnp.float64)[i])
      _check_fd(f, theta, g, e, 1e-6, 1e-5)


def test_grad_through_default_round_float32():
  """The defaults (float32, FedAvg's mean, the default objective) under the "scan" strategy
  (what "auto" picks on CPU for a CNN): jax.grad through `algorithm.program` matches finite
  differences to float32's precision."""
  x, y, clients = _data(features=(6,))
  model = get_model("mlp", (6,), 3)
  variables = model.init(jax.random.key(1))
  data = federate(x, y, clients)
  algorithm = federated_averaging(model, optax.sgd(0.1), batch_size=BATCH, local_epochs=1,
                                  strategy="scan")
  ids = np.array([0, 1, 2, 4])
  slots = data.round_slots(ids, BATCH)
  xv, yv = data.x[-8:], data.y[-8:]

  @jax.jit
  def f(v):
    new = algorithm.program(v, data.x, data.y, slots.indices, jnp.asarray(slots.counts),
                            jnp.asarray(ids, jnp.int32), jax.random.key(5),
                            jnp.asarray(slots.counts, jnp.float32))[0]
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(new, xv)[0],
                                                           yv).mean()

  g = jax.grad(f)(variables)
  norm = jnp.sqrt(sum(jnp.sum(a * a) for a in jax.tree.leaves(g)))
  # eps 1e-4: ReLU kinks make larger steps erratic (1e-3: 13% off; 1e-4: 0.03%).
  _check_fd(f, variables, g, jax.tree.map(lambda a: a / norm, g), 1e-4, 1e-2)
