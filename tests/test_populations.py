"""Populations at realistic shape (issue 36): a round's slots follow its clients' own sizes,
the flat schedule equals each client's own, round programs are few and counted, the
multi-round accumulator touches only a round's rows, retraining masks stay sparse."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tracefl_jax.data import make_partition
from tracefl_jax.data.federated import (ClientSlots, federate, ladder_ceil, pack_client_slots,
                                        stack_client_indices)
from tracefl_jax.data.partition import heavy_tailed_sizes
from tracefl_jax.fl.client import make_client_update
from tracefl_jax.fl.lanes import client_slots, program_bound, round_lanes
from tracefl_jax.fl.rounds import federated_averaging, round_key, sample_clients
from tracefl_jax.fl.strategies import fold_client_keys, simulate_clients_with_steps
from tracefl_jax.models import get_model
from tracefl_jax.provenance import retrained, retraining
from tracefl_jax.provenance.federation_masks import FederationMasks
from tracefl_jax.provenance.multiround import MultiRoundAccumulator

BATCH, EPOCHS = 4, 2
SIZES = (1, 37, 0, 5, 9, 4, 64, 3)  # one large client, one empty, ragged tails
OPT = optax.sgd(0.1, momentum=0.9)


@pytest.fixture(scope="module")
def fed():
  rng = np.random.default_rng(0)
  n = sum(SIZES)
  x = jnp.asarray(rng.normal(size=(n, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, n), jnp.int32)
  parts = np.split(rng.permutation(n), np.cumsum(SIZES)[:-1])
  model = get_model("mlp", (6,), 3)
  return model, model.init(jax.random.key(1)), federate(x, y, parts)


def test_slots_follow_the_clients_own_sizes(fed):
  _, _, data = fed
  clients = np.arange(len(SIZES))
  slots, counts = data.round_slots(clients, BATCH)
  owned = client_slots(SIZES, BATCH)
  assert len(slots.flat) == ladder_ceil(owned.sum()) <= 1.5 * owned.sum()
  np.testing.assert_array_equal(slots.offsets, np.cumsum(owned) - owned)
  for c in clients:  # real indices first, then padding (0) up to whole batches
    own = slots.flat[slots.offsets[c]:slots.offsets[c] + owned[c]]
    np.testing.assert_array_equal(own[:SIZES[c]], data.client_indices[c])
    assert not own[SIZES[c]:].any()
  # The row layout pads every client to the largest: K x 64 slots here, 136 as slots.
  assert data.round_data(clients, BATCH).indices.size == len(SIZES) * 64
  assert [ladder_ceil(n) for n in (0, 1, 3, 5, 7, 9, 13, 25)] == [1, 1, 3, 6, 8, 12, 16, 32]


def test_flat_schedule_is_each_clients_own(fed):
  """One sort over the round's slots gives every client the batches `schedule` gives it
  alone (same draws, same stable order), whatever the layout or padding around it."""
  model, _, data = fed
  update = make_client_update(model, OPT, BATCH, EPOCHS)
  clients = np.array([6, 2, 1, 3, 7])
  keys = fold_client_keys(jax.random.key(3), jnp.asarray(clients))
  slots, counts = data.round_slots(clients, BATCH)
  padded = slots.with_empty_clients(2)  # the sharded round's padding clients own no slot
  batches, step_keys = jax.jit(update.schedule_slots)(
      jax.device_put(padded), jnp.asarray(np.r_[counts, 0, 0]),
      jnp.concatenate([keys, keys[:2]]))
  rows = stack_client_indices(data.client_indices, clients, BATCH)
  for k, c in enumerate(clients):
    alone, alone_keys = update.schedule(jnp.asarray(rows.indices[k]), counts[k], keys[k])
    n = SIZES[c]
    np.testing.assert_array_equal(batches[:, slots.offsets[k]:slots.offsets[k] + n],
                                  np.asarray(alone)[:, :n])
    np.testing.assert_array_equal(jax.random.key_data(step_keys[k]),
                                  jax.random.key_data(alone_keys))


@pytest.mark.parametrize("strategy,lanes", [("scan", None), ("vmap", 2), ("vmap", None),
                                            ("loop", None)])
def test_slots_equal_rows_and_a_plain_loop(fed, strategy, lanes):
  model, variables, data = fed
  update = make_client_update(model, OPT, BATCH, EPOCHS)
  clients = np.arange(len(SIZES))
  keys = fold_client_keys(jax.random.key(5), jnp.asarray(clients))
  one = jax.jit(update)
  rows = data.round_data(clients, BATCH)
  ref = [one(variables, data.x, data.y, rows.indices[k], rows.counts[k], keys[k])
         for k in clients]
  ref = jax.tree.map(lambda *a: jnp.stack(a), *ref)
  slots, counts = data.round_slots(clients, BATCH)

  def run(indices, counts):
    return simulate_clients_with_steps(update, variables, data.x, data.y, indices, counts,
                                       keys, strategy=strategy, lanes=lanes)
  if strategy != "loop":
    run = jax.jit(run)
  got, _ = run(jax.device_put(slots), jnp.asarray(counts))
  via_rows, _ = run(jnp.asarray(rows.indices), jnp.asarray(rows.counts))
  for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(ref), jax.tree.leaves(via_rows)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if strategy in ("scan", "loop"):  # one client's own program: the same numbers exactly
      np.testing.assert_array_equal(a, c)
  np.testing.assert_array_equal(got.num_steps, update.num_steps(np.array(SIZES)))


def test_round_programs_are_few_and_counted():
  """A run compiles one round program per (slot length T, lanes), both up a ladder: at most
  `program_bound`, here counted on a heavy-tailed federation over 5 rounds (K = 6: small
  rounds vary most; at K = 1,000 a round's total size, so T, barely moves)."""
  part = make_partition(np.arange(600) % 3, "heavy_tailed", 30, 0, num_classes=3,
                        exponent=1.2, min_size=2)
  rng = np.random.default_rng(0)
  data = federate(rng.normal(size=(600, 6)).astype(np.float32), np.arange(600) % 3, part)
  model = get_model("mlp", (6,), 3)
  algorithm = federated_averaging(model, optax.sgd(0.1), batch_size=8, local_epochs=1,
                                  strategy="vmap")
  state = algorithm.init(model.init(jax.random.key(0)))
  shapes = set()
  for r in range(1, 6):
    clients = sample_clients(0, r, data.num_clients, 6)
    slots, counts = data.round_slots(clients, 8)
    shapes.add((len(slots.flat), round_lanes("vmap", -(-counts // 8))))
    state, _ = algorithm.round(state, clients=clients, data=data, key=round_key(
        jax.random.key(0), r))
  compiled = algorithm.program._cache_size()  # pylint: disable=protected-access
  assert compiled == len(shapes) <= program_bound(part.client_sizes, 6, 8, "vmap")
  assert program_bound(part.client_sizes, 6, 8, "scan") <= 8


def test_heavy_tailed_sizes():
  sizes = heavy_tailed_sizes(100_000, 1_000, 0, "zipf", exponent=1.0, min_size=2)
  assert sizes.sum() == 100_000 and sizes.min() >= 2
  assert sizes.max() > 50 * np.median(sizes)  # a heavy tail
  np.testing.assert_array_equal(sizes, heavy_tailed_sizes(100_000, 1_000, 0, "zipf",
                                                          exponent=1.0, min_size=2))
  logn = heavy_tailed_sizes(10_000, 100, 1, "lognormal", sigma=1.5)
  assert logn.sum() == 10_000 and logn.max() > 5 * np.median(logn)
  part = make_partition(np.arange(500) % 5, "heavy_tailed", 20, 3, distribution="lognormal")
  assert sorted(np.concatenate(part.client_indices).tolist()) == list(range(500))
  with pytest.raises(ValueError, match="unknown size distribution 'pareto'"):
    heavy_tailed_sizes(100, 10, 0, "pareto")


def test_accumulator_touches_only_the_rounds_rows_in_place():
  """Rows updated in place (the table's buffer donated and reused); equal to the dense
  recurrence D <- gamma D + scatter(shift) with clients skipping rounds."""
  rng = np.random.default_rng(0)
  params = {"w": np.zeros((3, 2), np.float32)}
  for gamma in (1.0, 0.5, 0.0):
    acc = MultiRoundAccumulator(params, 7, round_decay=gamma)
    dense = np.zeros((7, 6))
    for ids in ([0, 3, 5], [3, 6], [1, 0, 4], [2]):
      clients = {"params": {"w": rng.normal(size=(len(ids), 3, 2)).astype(np.float32)}}
      g = {"params": {"w": rng.normal(size=(3, 2)).astype(np.float32)}}
      w = rng.uniform(1, 3, len(ids)).astype(np.float32)
      before = acc._table["w"].unsafe_buffer_pointer()  # pylint: disable=protected-access
      acc.update(clients, g, w, np.array(ids))
      assert acc._table["w"].unsafe_buffer_pointer() == before  # pylint: disable=protected-access
      dense *= gamma
      for pos, c in enumerate(ids):
        factor = w[pos] / (w.sum() - w[pos]) if len(ids) > 1 else 0.0
        dense[c] += factor * (clients["params"]["w"][pos] - g["params"]["w"]).ravel()
    got = np.asarray(acc.directions["w"]).reshape(7, -1)
    np.testing.assert_allclose(got, dense, rtol=1e-6, atol=1e-7)


def test_truth_masks_are_sparse_and_mean_the_dense_matrix():
  c, m = 7, 3
  masks = retrained.truth_masks(c, num_subsets=m, seed=2)
  dense = np.concatenate([np.ones((2, c), np.float32), 1.0 - np.eye(c, dtype=np.float32),
                          retrained.subset_masks(c, m, seed=2)])
  np.testing.assert_array_equal(np.asarray(masks), dense)
  assert len(masks) == masks.shape[0] == 2 + c + m
  np.testing.assert_array_equal(masks[4], dense[4])
  np.testing.assert_array_equal(np.asarray(masks[2 + c:]), dense[2 + c:])
  cols = np.array([5, 0, 3])
  np.testing.assert_array_equal(masks.take([9, 2, 2]).columns(cols), dense[[9, 2, 2]][:, cols])
  weighted = dense.copy()
  weighted[1, 4] = 0.5
  np.testing.assert_array_equal(FederationMasks.from_dense(weighted).dense(), weighted)
  # Distinct federations: the same answer from the sparse description as from the dense one.
  plan = [{"client_ids": np.array([0, 2, 3])}, {"client_ids": np.array([3, 5, 6])}]
  seeds = np.zeros(len(dense))
  for a, b in zip(retraining.distinct_federations(plan, masks, seeds),
                  retraining.distinct_federations(plan, dense, seeds)):
    np.testing.assert_array_equal(a, b)
  # At 100,000 clients the truth's masks hold one entry per leave-one-out row, not C.
  big = retrained.truth_masks(100_000)
  assert big.shape == (100_002, 100_000) and len(big.clients) == 100_000
  assert big.indptr.nbytes + big.clients.nbytes + big.values.nbytes < 3e6
