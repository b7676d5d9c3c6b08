"""No computation on padding: uneven clients, step accounting, packed lanes, compile reuse."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tracefl_jax.data import fixup_partition, partition_dirichlet
from tracefl_jax.data.federated import bucket_length, federate, stack_client_indices
from tracefl_jax.fl import aggregation
from tracefl_jax.fl.client import local_steps, make_client_update
from tracefl_jax.fl.packing import GROUP
from tracefl_jax.fl.rounds import federated_averaging, round_key, run_rounds, sample_clients
from tracefl_jax.fl.strategies import (auto_lanes, executed_steps, fold_client_keys,
                                       packed_steps, round_lanes)
from tracefl_jax.models import get_model, make_model

BATCH, EPOCHS = 8, 2
# Uneven clients, one empty (the brief's 3, 40, 7, 130, 0 and three more so that a round has
# enough work for more than one lane).
SIZES = (3, 40, 7, 130, 0, 60, 33, 90)
OPT = optax.sgd(0.1, momentum=0.9)  # see test_engine.py: exact comparisons want SGD


def _tree_allclose(a, b, rtol=1e-5, atol=1e-6):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def uneven():
  rng = np.random.default_rng(0)
  n = sum(SIZES)
  x = jnp.asarray(rng.normal(size=(n, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, n), jnp.int32)
  parts = np.split(rng.permutation(n), np.cumsum(SIZES)[:-1])
  model = get_model("lenet", (8, 8, 1), 3)
  return model, model.init(jax.random.key(1)), federate(x, y, parts)


@pytest.fixture(scope="module")
def loop_reference(uneven):
  """All clients' round 1 as a plain Python loop over clients (one jitted client program per
  client), then FedAvg by examples."""
  model, variables, data = uneven
  clients = np.arange(len(SIZES))
  key = round_key(jax.random.key(0), 1)
  update = jax.jit(make_client_update(model, OPT, BATCH, EPOCHS))
  rd = data.round_data(clients, BATCH)
  keys = fold_client_keys(key, jnp.asarray(clients))
  outs = [update(variables, data.x, data.y, rd.indices[i], rd.counts[i], keys[i])
          for i in range(len(clients))]
  outs = jax.tree.map(lambda *leaves: jnp.stack(leaves), *outs)
  weights = aggregation.client_weights(rd.counts)
  return clients, key, outs, aggregation.fedavg(outs.variables,
                                                jnp.asarray(weights, jnp.float32))


@pytest.mark.parametrize("strategy,chunk", [("vmap", 0), ("chunked", 3), ("chunked", 1),
                                            ("scan", 0), ("loop", 0), ("sharded", 0)])
def test_uneven_round_every_strategy_equals_loop(uneven, loop_reference, strategy, chunk):
  model, variables, data = uneven
  clients, key, ref_clients, ref_global = loop_reference
  algorithm = federated_averaging(model, OPT, batch_size=BATCH, local_epochs=EPOCHS,
                                  strategy=strategy, clients_per_chunk=chunk)
  _, out = algorithm.round(algorithm.init(variables), clients=clients, data=data, key=key)
  _tree_allclose(out.clients.variables, ref_clients.variables)
  np.testing.assert_allclose(out.clients.loss, ref_clients.loss, rtol=1e-5)
  _tree_allclose(out.variables, ref_global)
  # Every client took exactly its own steps; the empty one kept G's variables.
  steps = local_steps(np.array(SIZES), BATCH, EPOCHS)
  np.testing.assert_array_equal(out.clients.num_steps, steps)
  _tree_allclose(jax.tree.map(lambda a: a[SIZES.index(0)], out.clients.variables), variables,
                 rtol=0, atol=0)
  # The steps computed are those the sizes say (idle lanes included when packed).
  lanes = round_lanes(strategy, steps, chunk, jax.device_count())
  assert out.steps_needed == steps.sum() == 98
  assert int(out.steps_executed) == executed_steps(strategy, steps, lanes, jax.device_count())
  if strategy in ("scan", "loop") or chunk == 1:
    assert int(out.steps_executed) == out.steps_needed


CALLS = []


class _CountingNet(nn.Module):
  """Counts its train-mode forward passes on the host (one per computed step, or one per
  packed-loop iteration: a callback under vmap runs once for all lanes)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    if train:
      jax.debug.callback(lambda: CALLS.append(1))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("strategy,chunk", [("scan", 0), ("loop", 0), ("chunked", 1),
                                            ("chunked", 3), ("vmap", 0)])
def test_computed_steps_counted_in_the_program(uneven, strategy, chunk):
  """scan and loop run exactly the needed steps (ratio 1.0); packed lanes run what
  `packed_steps` says; the row's numbers are those counts."""
  _, _, data = uneven
  model = make_model("counting", _CountingNet(), (8, 8, 1), 3)
  algorithm = federated_averaging(model, optax.sgd(0.1), batch_size=BATCH, local_epochs=EPOCHS,
                                  strategy=strategy, clients_per_chunk=chunk)
  state = algorithm.init(model.init(jax.random.key(0)))
  CALLS.clear()
  _, history = run_rounds(algorithm, state, data, rounds=2, clients_per_round=6, seed=3)
  jax.effects_barrier()
  needed = executed = 0
  for row in history:
    steps = local_steps(np.array(SIZES)[row["clients"]], BATCH, EPOCHS)
    lanes = round_lanes(strategy, steps, chunk)
    assert row["steps_needed"] == steps.sum()
    assert row["steps_executed"] == executed_steps(strategy, steps, lanes)
    assert row["step_ratio"] == row["steps_executed"] / row["steps_needed"]
    needed += row["steps_needed"]
    executed += row["steps_executed"] // (lanes or 1)  # forward passes: iterations if packed
  if strategy in ("scan", "loop"):
    assert len(CALLS) == executed == needed
  else:  # the fixed-trip lane loop computes at most GROUP - 1 masked iterations a round more
    assert executed <= len(CALLS) <= executed + (GROUP - 1) * len(history)
  if strategy in ("scan", "loop") or chunk == 1:
    assert executed == needed and all(row["step_ratio"] == 1.0 for row in history)


def test_packed_steps_counts_lanes():
  steps = np.array([2, 10, 2, 34, 0, 16, 10, 24])
  assert packed_steps(steps, 1) == 98  # one lane: nothing idle
  # Two lanes, longest first: lane 0 runs 34 then 10, 2, 2 (48); lane 1 runs 24, 16, 10 (50).
  assert packed_steps(steps, 2) == 2 * 50
  assert packed_steps(steps, 8) == 8 * 34  # one vmap over all clients: everyone waits for 34
  assert packed_steps(np.zeros(4, int), 3) == 0
  # Sharded over 4 devices (snake deal of the longest-first order), one lane each.
  assert packed_steps(steps, 1, devices=4) == 98
  # Auto lanes: the most lanes computing <= 1.1x the needed steps (3 lanes: 102 <= 107.8).
  assert packed_steps(steps, 3) == 3 * 34 and auto_lanes(steps) == 3
  assert auto_lanes(np.full(100, 7)) == 100  # equal clients: one vmap, nothing idle
  assert auto_lanes(np.zeros(5, int)) == 1


def _paper_sizes():
  """MNIST-sized labels, Dirichlet 0.3 over 100 clients, then the partition fix-up."""
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 6000))
  partition = fixup_partition(partition_dirichlet(labels, 100, 0.3, seed=0), labels)
  return partition.client_sizes


def test_paper_shaped_step_ratio_within_target():
  sizes = _paper_sizes()
  steps = local_steps(sizes, 32, 2)
  needed = scan = packed = padded_before = 0
  for r in range(1, 51):
    s = steps[sample_clients(0, r, len(sizes), 10)]
    needed += s.sum()
    scan += executed_steps("scan", s)
    packed += executed_steps("vmap", s, round_lanes("vmap", s))
    # The former scheme: every client ran the round's longest, in a power of two of batches.
    padded_before += len(s) * EPOCHS * bucket_length(s.max() // EPOCHS * 32, 32) // 32
  assert scan == needed  # the CPU default (scan) computes no padded step
  assert packed / needed <= 1.15, packed / needed
  assert padded_before / needed > 2.0


def test_client_randomness_does_not_depend_on_its_company(uneven):
  model, variables, data = uneven
  update = make_client_update(model, OPT, BATCH, EPOCHS)
  # Its schedule (batches and step keys) is the same at any padded length.
  ix = data.client_indices[6]
  count, key = jnp.int32(len(ix)), jax.random.key(5)
  short = update.schedule(jnp.asarray(stack_client_indices([ix], [0], BATCH).indices[0]),
                          count, key)
  long = update.schedule(jnp.asarray(stack_client_indices([ix], [0], BATCH, 512).indices[0]),
                         count, key)
  np.testing.assert_array_equal(short[0][:, :len(ix)], long[0][:, :len(ix)])
  np.testing.assert_array_equal(jax.random.key_data(short[1]), jax.random.key_data(long[1]))
  # Client 6 trained alone, or beside other clients (other positions in the round, other
  # lanes and queue places when packed).
  key = round_key(jax.random.key(0), 4)
  results = {}
  for strategy, company in [("scan", [6]), ("scan", [1, 2, 3, 5, 6]), ("vmap", [6, 7, 3]),
                            ("vmap", [1, 2, 3, 5, 6])]:
    algorithm = federated_averaging(model, OPT, batch_size=BATCH, local_epochs=EPOCHS,
                                    strategy=strategy)
    _, out = algorithm.round(algorithm.init(variables), clients=company, data=data, key=key)
    assert int(out.clients.num_steps[company.index(6)]) == local_steps(33, BATCH, EPOCHS)
    results[strategy, tuple(company)] = jax.tree.map(lambda a: a[company.index(6)],
                                                     out.clients.variables)
  alone = results["scan", (6,)]
  _tree_allclose(results["scan", (1, 2, 3, 5, 6)], alone, rtol=0, atol=0)
  _tree_allclose(results["vmap", (6, 7, 3)], alone)
  _tree_allclose(results["vmap", (1, 2, 3, 5, 6)], alone)


def test_second_round_with_same_lanes_does_not_recompile(uneven):
  model, variables, data = uneven
  algorithm = federated_averaging(model, OPT, batch_size=BATCH, local_epochs=EPOCHS,
                                  strategy="vmap")
  state = algorithm.init(variables)
  root = jax.random.key(0)
  sizes = np.array(SIZES)
  rounds = ([3, 5, 6, 7], [3, 1, 5, 7], [0, 1, 2, 3])  # lanes 2, 2, then 1
  lanes = [round_lanes("vmap", local_steps(sizes[c], BATCH, EPOCHS)) for c in rounds]
  assert lanes == [2, 2, 1]
  for r, clients in enumerate(rounds, start=1):
    state, _ = algorithm.round(state, clients=clients, data=data, key=round_key(root, r))
    compiled = algorithm.program._cache_size()  # pylint: disable=protected-access
    assert compiled == len(set(lanes[:r]))
