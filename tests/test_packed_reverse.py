"""Reverse mode through the packed strategies (issue 35): the packed lane loop's fixed-trip
form (`fl/packing.py`) computes what its while loop computes, bit for bit, stays within its
static trip bound, and `jax.grad` through rounds and through a federation under "vmap" and
"chunked" equals finite differences (float64); a sweep under "vmap" equals sequential runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.test_reverse_mode import (BATCH, EPOCHS, SIZES, _check_fd, _data, _equal, _mean_rule,
                                     _objective, _round_fn, _setup64, _unit)
from tracefl_jax.data.federated import federate
from tracefl_jax.fl.client import make_client_update
from tracefl_jax.fl.federation import federation
from tracefl_jax.fl.lanes import packed_steps
from tracefl_jax.fl.packing import pack_trips
from tracefl_jax.fl.rounds import federated_averaging, run_rounds
from tracefl_jax.fl.server import server_optimizer
from tracefl_jax.fl.strategies import fold_client_keys, simulate_clients_with_steps
from tracefl_jax.models import get_model


def test_trip_bound_covers_the_schedule():
  """`pack_trips` is at least the queue's iterations (`packed_steps / lanes`) for ragged
  sizes, empty clients, every lane count, with and without a cap."""
  rng = np.random.default_rng(0)
  update = make_client_update(get_model("mlp", (4,), 3), optax.sgd(0.1), 4, 2)
  for _ in range(300):
    k = int(rng.integers(1, 12))
    sizes = rng.integers(0, 60, k) * (rng.random(k) > 0.2)
    steps = np.asarray(update.num_steps(sizes))
    slots = int((-(-sizes // 4) * 4).sum()) + int(rng.integers(0, 9))  # T: whole batches + pad
    for lanes in range(1, k + 1):
      need = packed_steps(steps, lanes) // lanes
      assert pack_trips(update, slots, k, lanes) >= need
      assert pack_trips(update, slots, k, lanes, max_steps=int(steps.max())) >= need


@pytest.mark.parametrize("strategy,lanes", [("vmap", None), ("chunked", 3)])
def test_fixed_trip_equals_while_with_a_cap(strategy, lanes):
  """With the federation's cap (`max_steps` = the largest client's steps) the fixed-trip
  lane loop gives the while loop's outputs and executed steps exactly."""
  x, y, clients = _data()
  model = get_model("mlp", (8, 8, 1), 3)
  variables = model.init(jax.random.key(1))
  data = federate(x, y, clients)
  ids = np.arange(len(SIZES))
  keys = fold_client_keys(jax.random.key(7), jnp.asarray(ids))
  slots = data.round_slots(ids, BATCH)
  cap = EPOCHS * -(-max(SIZES) // BATCH)
  outs = []
  for loop in ("while", "scan"):
    update = make_client_update(model, optax.adam(0.01), BATCH, EPOCHS, local_loop=loop)
    outs.append(jax.jit(lambda i, c, k, update=update: simulate_clients_with_steps(
        update, variables, data.x, data.y, i, c, k, strategy=strategy,
        clients_per_chunk=lanes or 0, max_steps=cap))(
            jax.device_put(slots.indices), jnp.asarray(slots.counts), keys))
  _equal(outs[0], outs[1])
  steps = EPOCHS * -(-np.asarray(SIZES) // BATCH)
  assert int(outs[1][1]) == packed_steps(steps, lanes or len(SIZES))


@pytest.mark.parametrize("strategy", ["vmap", "chunked"])
def test_grad_through_packed_rounds_equals_finite_differences(strategy):
  """d(validation loss of G_3) / d(G_0, client lr, server lr) through 3 FedAdam rounds
  under the packed strategies: finite differences, and the "scan" strategy's gradient."""
  with jax.enable_x64(True):
    model, variables, data, clients, val_loss = _setup64()

    def loss(theta, strategy):
      v, lrs = theta
      return val_loss(_round_fn(model, data, clients, lrs[0], lrs[1], 3, strategy)(v))

    f = jax.jit(lambda theta: loss(theta, strategy))
    theta = (variables, jnp.asarray([0.1, 0.01], jnp.float64))
    g = jax.grad(f)(theta)
    _check_fd(f, theta, g, _unit(theta, jax.random.key(1)), 1e-5, 1e-5)
    for i in range(2):
      e = (jax.tree.map(jnp.zeros_like, variables), jnp.eye(2, dtype=jnp.float64)[i])
      _check_fd(f, theta, g, e, 1e-6, 1e-5)
    ref = jax.jit(jax.grad(lambda theta: loss(theta, "scan")))(theta)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ the federation

FED_SIZES = [9, 4, 13, 0, 6, 11, 7, 5]
K = 3


def _fed_data(dtype=np.float32, n=64):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, 6)).astype(dtype)
  y = rng.integers(0, 3, n).astype(np.int32)
  clients = np.split(rng.permutation(n)[:sum(FED_SIZES)], np.cumsum(FED_SIZES)[:-1])
  return federate(x, y, clients, num_classes=3), jnp.asarray(x[-8:]), jnp.asarray(y[-8:])


def _fedavg(model, strategy="vmap", **kwargs):
  def build(hp):
    return federated_averaging(
        model, optax.sgd(hp["client_lr"]), batch_size=BATCH, local_epochs=2,
        strategy=strategy, server_optimizer=server_optimizer("sgd", hp["server_lr"]),
        **kwargs)
  return build


def test_packed_federation_equals_run_rounds_and_sweeps_in_one_program():
  """Under "vmap": one federation equals `run_rounds` (its own lanes, "while" or "scan")
  bit for bit; 2 lrs x 2 seeds as one vmapped call equal the 4 runs; one compiled program
  serves every plan."""
  data, _, _ = _fed_data()
  model = get_model("mlp", (6,), 3)
  variables = model.init(jax.random.key(1))
  build = _fedavg(model)
  fed = federation(build, data, rounds=3, clients_per_round=K, batch_size=BATCH)
  hp = {"client_lr": 0.1, "server_lr": 1.0}
  runs = {}
  for lr in (0.05, 0.1):
    for seed in (0, 1):
      alg = build({**hp, "client_lr": lr})
      runs[lr, seed] = run_rounds(alg, alg.init(variables), data, rounds=3,
                                  clients_per_round=K, seed=seed)[0].variables
  for seed in (0, 1):
    got = fed(variables, hp, fed.plan(seed), jax.random.key(seed))[0].variables
    _equal(got, runs[0.1, seed])
  assert fed._jitted._cache_size() == 1  # pylint: disable=protected-access
  seeds = [0, 1]
  sweep = jax.jit(jax.vmap(jax.vmap(fed.run, in_axes=(None, None, 0, 0, None, None)),
                           in_axes=(None, {"client_lr": 0, "server_lr": None}) + (None,) * 4))
  out = sweep(variables, {"client_lr": jnp.asarray([0.05, 0.1]), "server_lr": 1.0},
              fed.plans(seeds), jax.vmap(jax.random.key)(jnp.asarray(seeds)), data.x,
              data.y)[0].variables
  for i, lr in enumerate((0.05, 0.1)):
    for j, seed in enumerate(seeds):
      got = jax.tree.map(lambda a, i=i, j=j: a[i, j], out)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(runs[lr, seed]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_hypergradient_through_a_packed_federation_equals_finite_differences():
  """d(validation loss of G_6) / d(client lr, server lr) through 6 rounds of FedAvg with a
  server learning rate under "vmap", float64, against central differences."""
  with jax.enable_x64(True):
    data, xv, yv = _fed_data(np.float64)
    model = get_model("mlp", (6,), 3)
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                             model.init(jax.random.key(2)))
    build = _fedavg(model, loss_fn=_objective, aggregator=_mean_rule)
    fed = federation(build, data, rounds=6, clients_per_round=K, batch_size=BATCH)
    plan, key = fed.plan(3), jax.random.key(3)

    @jax.jit
    def val_loss(hp):
      v = fed.run(variables, hp, plan, key, data.x, data.y)[0].variables
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(v, xv)[0],
                                                             yv).mean()

    hp = {"client_lr": jnp.float64(0.1), "server_lr": jnp.float64(0.8)}
    g = jax.grad(val_loss)(hp)
    for name in hp:
      eps = 1e-6 * float(hp[name])
      up, down = ({**hp, name: hp[name] + s * eps} for s in (1, -1))
      fd = (val_loss(up) - val_loss(down)) / (2 * eps)
      np.testing.assert_allclose(float(g[name]), float(fd), rtol=1e-5)
      assert abs(float(g[name])) > 1e-6
