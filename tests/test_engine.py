"""The simulation engine against plain references: one client, many clients, FedAvg, rounds."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tracefl_jax.fl import aggregation
from tracefl_jax.fl.client import make_client_update, masked_cross_entropy, shuffle_order
from tracefl_jax.data.federated import (bucket_length, federate, flip_labels,
                                        stack_client_indices)
from tracefl_jax.models import get_model
from tracefl_jax.fl.rounds import federated_averaging, round_key, sample_clients
from tracefl_jax.fl.strategies import (executed_steps, fold_client_keys, resolve_strategy,
                                       simulate_clients_with_steps)

BATCH, EPOCHS = 4, 2
# SGD with momentum for exactness checks: Adam divides noise-level gradients (dead ReLU units)
# by their own magnitude, turning float32 summation-order differences (vmap lowers per-client
# convolutions differently from a single-client program) into lr-sized steps.
OPT = optax.sgd(0.1, momentum=0.9)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(60, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 3, size=60).astype(np.int32)
  # Ragged clients, one of them empty: padding and masking must be exact.
  sizes = [9, 4, 13, 0, 6]
  perm = rng.permutation(60)
  client_indices = np.split(perm[: sum(sizes)], np.cumsum(sizes)[:-1])
  model = get_model("lenet", (8, 8, 1), 3)
  variables = model.init(jax.random.key(1))
  return model, variables, jnp.asarray(x), jnp.asarray(y), client_indices


def _tree_allclose(a, b, rtol=1e-5, atol=1e-6):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


@functools.lru_cache(maxsize=None)
def _plain_step(model, optimizer):
  """One SGD step on one real batch, compiled per batch shape (op-by-op dispatch spent ~80 s
  compiling small ops); no masks, no padding."""
  @jax.jit
  def step(p, opt_state, xb, yb):
    def loss_fn(p):
      logits = model.apply({"params": p}, xb, train=True)[0]
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    updates, opt_state = optimizer.update(jax.grad(loss_fn)(p), opt_state, p)
    return optax.apply_updates(p, updates), opt_state
  return step


def plain_client_training(model, optimizer, variables, x, y, idx, key):
  """One client's local training written plainly: Python loops, real batches, no masks."""
  params = variables["params"]
  opt_state = optimizer.init(params)
  n, m = len(idx), bucket_length(max(len(idx), 1), BATCH)

  for epoch_key in jax.random.split(key, EPOCHS):
    perm_key, _ = jax.random.split(epoch_key)
    order = np.asarray(shuffle_order(perm_key, m, jnp.int32(n)))[:n]
    ordered = np.asarray(idx)[order]
    for start in range(0, n, BATCH):
      b = ordered[start:start + BATCH]
      params, opt_state = _plain_step(model, optimizer)(params, opt_state, x[b], y[b])
  return {"params": params}


def test_masked_client_equals_plain_training(setup):
  model, variables, x, y, client_indices = setup
  opt, atol = OPT, 1e-6
  update = jax.jit(make_client_update(model, opt, BATCH, EPOCHS))
  for k in (0, 1, 2):
    key = jax.random.key(10 + k)
    data = stack_client_indices(client_indices, [k], BATCH, length=32)  # heavy padding
    out = update(variables, x, y, data.indices[0], data.counts[0], key)
    ref = plain_client_training(model, opt, variables, x, y, client_indices[k], key)
    _tree_allclose(out.variables, ref, atol=atol)
    assert int(out.num_steps) == EPOCHS * -(-len(client_indices[k]) // BATCH)


def test_padding_length_does_not_change_a_client(setup):
  model, variables, x, y, client_indices = setup
  update = jax.jit(make_client_update(model, optax.sgd(0.1), BATCH, EPOCHS))
  outs = []
  for length in (16, 64):
    data = stack_client_indices(client_indices, [2], BATCH, length=length)
    outs.append(update(variables, x, y, data.indices[0], data.counts[0], jax.random.key(3)))
  _tree_allclose(outs[0].variables, outs[1].variables, rtol=0, atol=0)


def test_empty_client_is_unchanged(setup):
  model, variables, x, y, client_indices = setup
  update = jax.jit(make_client_update(model, OPT, BATCH, EPOCHS))
  data = stack_client_indices(client_indices, [3], BATCH)
  out = update(variables, x, y, data.indices[0], data.counts[0], jax.random.key(0))
  _tree_allclose(out.variables, variables, rtol=0, atol=0)
  assert int(out.num_steps) == 0 and float(out.loss) == 0.0


@pytest.fixture(scope="module")
def uneven(setup):
  """Sizes 3, 40, 7, 130 and 0 at batch 8: one client needs 17 steps an epoch, two need 1."""
  model, variables = setup[0], setup[1]
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(180, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=180), jnp.int32)
  client_indices = np.split(rng.permutation(180), np.cumsum([3, 40, 7, 130])[:4])
  return model, variables, x, y, client_indices


@pytest.mark.parametrize("sizes,strategy,chunk,lanes", [
    ("ragged", "vmap", 0, None), ("ragged", "chunked", 2, None), ("ragged", "chunked", 3, None),
    ("ragged", "scan", 0, None), ("ragged", "loop", 0, None),
    ("uneven", "vmap", 0, None), ("uneven", "vmap", 0, 2), ("uneven", "chunked", 2, None),
    ("uneven", "chunked", 1, None), ("uneven", "scan", 0, None), ("uneven", "loop", 0, None),
    ("uneven", "sharded", 0, 2)])
def test_strategies_equal_python_loop(request, sizes, strategy, chunk, lanes):
  model, variables, x, y, client_indices = request.getfixturevalue(
      "setup" if sizes == "ragged" else "uneven")
  batch = BATCH if sizes == "ragged" else 8
  update = make_client_update(model, OPT, batch, EPOCHS)
  clients = np.array([0, 1, 2, 3, 4])
  if strategy == "sharded":  # 4 devices: pad the round with 3 empty clients
    client_indices = [*client_indices, *[np.zeros(0, np.int64)] * 3]
    clients = np.arange(8)
  data = stack_client_indices(client_indices, clients, batch)
  keys = fold_client_keys(jax.random.key(7), jnp.asarray(clients))
  one = jax.jit(update)
  ref = [one(variables, x, y, data.indices[k], data.counts[k], keys[k]) for k in clients]
  ref = jax.tree.map(lambda *l: jnp.stack(l), *ref)

  def run(i, c, k):
    return simulate_clients_with_steps(update, variables, x, y, i, c, k, strategy=strategy,
                                       clients_per_chunk=chunk, lanes=lanes)
  if strategy != "loop":
    run = jax.jit(run)
  got, executed = run(jnp.asarray(data.indices), jnp.asarray(data.counts), keys)
  _tree_allclose(got.variables, ref.variables)
  np.testing.assert_allclose(got.loss, ref.loss, rtol=1e-5)
  np.testing.assert_array_equal(got.num_examples, data.counts)
  steps = update.num_steps(data.counts)
  np.testing.assert_array_equal(got.num_steps, steps)  # each client its own steps, no more
  w = lanes or (chunk if strategy == "chunked" else len(clients) // jax.device_count()
                if strategy == "sharded" else len(clients))
  assert int(executed) == executed_steps(strategy, steps, w, jax.device_count())


def test_fedavg_equals_numpy_weighted_mean():
  rng = np.random.default_rng(0)
  stacked = {"a": rng.normal(size=(4, 3, 2)).astype(np.float32),
             "b": {"c": rng.normal(size=(4, 5)).astype(np.float32)}}
  w = np.array([3.0, 0.0, 1.0, 6.0], np.float32)
  got = aggregation.fedavg(jax.tree.map(jnp.asarray, stacked), jnp.asarray(w))
  for name, leaf in [("a", stacked["a"]), ("c", stacked["b"]["c"])]:
    expected = np.tensordot(w / w.sum(), leaf, axes=1)
    actual = got["a"] if name == "a" else got["b"]["c"]
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_fedavg_weightings_and_errors():
  n = np.array([10, 40, 70])
  np.testing.assert_array_equal(aggregation.client_weights(n, "examples"), [10, 40, 70])
  np.testing.assert_array_equal(aggregation.client_weights(n, "batches", 32), [0, 1, 2])
  with pytest.raises(ValueError, match="weight 0"):
    aggregation.fedavg({"a": jnp.ones((2, 3))}, aggregation.client_weights(np.array([3, 5]),
                                                                            "batches", 32))
  with pytest.raises(ValueError, match="unknown weighting"):
    aggregation.client_weights(n, "median")
  counter = {"n": jnp.array([1, 2, 4], jnp.int32)}
  assert int(aggregation.fedavg(counter, jnp.ones(3))["n"]) == 2  # round(7/3)


def test_sampling_is_a_function_of_seed_and_round():
  a = sample_clients(42, 3, 100, 10)
  np.testing.assert_array_equal(a, sample_clients(42, 3, 100, 10))
  assert len(set(a)) == 10 and a.min() >= 0 and a.max() < 100
  assert not np.array_equal(a, sample_clients(42, 4, 100, 10))
  with pytest.raises(ValueError, match="cannot sample"):
    sample_clients(0, 1, 5, 6)


def test_round_does_not_retrace_and_trains(setup):
  model, variables, x, y, client_indices = setup
  algorithm = federated_averaging(model, OPT, batch_size=BATCH, local_epochs=EPOCHS,
                                  strategy="vmap")
  data = federate(x, y, client_indices)
  state = algorithm.init(variables)
  root = jax.random.key(0)
  for r in (1, 2, 3):
    state, out = algorithm.round(state, clients=[0, 2, 4], data=data, key=round_key(root, r))
    np.testing.assert_array_equal(out.weights, [9, 13, 6])  # examples by default
    np.testing.assert_array_equal(out.client_ids, [0, 2, 4])
    expected = aggregation.fedavg(out.clients.variables, jnp.asarray(out.weights))
    _tree_allclose(out.variables, expected)
    assert state.round == r and state.variables is out.variables
  assert algorithm.program._cache_size() == 1  # pylint: disable=protected-access


def test_auto_strategy_per_backend(setup):
  _, variables, *_ = setup
  assert resolve_strategy("auto", variables, "cpu") == "scan"  # lenet has convolutions
  assert resolve_strategy("auto", variables, "gpu") == "vmap"
  dense = get_model("mlp", (8, 8, 1), 3).init(jax.random.key(0))
  assert resolve_strategy("auto", dense, "cpu") == "vmap"
  with pytest.raises(ValueError, match="valid: auto, vmap"):
    resolve_strategy("pmap", variables)


def test_bucketing_and_label_flip(setup):
  assert [bucket_length(n, 32) for n in (1, 32, 33, 65, 200)] == [32, 32, 64, 128, 256]
  # A round's padded length is the federation's, whichever clients it draws.
  _, _, x, y, client_indices = setup
  data = federate(x, y, client_indices)
  assert data.round_length(BATCH) == 16  # largest client 13
  assert data.round_data([1, 4], BATCH).indices.shape == (2, 16)
  x = np.arange(6, dtype=np.float32)[:, None]
  y = np.array([0, 1, 2, 1, 2, 0])
  parts = [np.array([0, 1, 2]), np.array([3, 4, 5])]
  x2, y2, parts2 = flip_labels(y, parts, [1], {1: 0, 2: 0}, x)
  np.testing.assert_array_equal(y2[parts2[1]], [0, 0, 0])
  np.testing.assert_array_equal(x2[parts2[1]], x[parts[1]])
  np.testing.assert_array_equal(y2[parts2[0]], y[parts[0]])  # other clients read originals


def test_masked_cross_entropy_ignores_padding():
  logits = jnp.array([[2.0, 0.0], [0.0, 5.0], [9.0, -9.0]])
  labels = jnp.array([0, 1, 1])
  full = masked_cross_entropy(logits[:2], labels[:2], jnp.ones(2, bool))
  masked = masked_cross_entropy(logits, labels, jnp.array([True, True, False]))
  np.testing.assert_allclose(masked, full, rtol=1e-6)


def test_sharded_round_equals_unsharded_on_fake_devices(setup):
  assert jax.device_count() == 4, "conftest sets 4 fake CPU devices"
  model, variables, x, y, client_indices = setup
  clients = np.array([0, 1, 2, 4, 3])  # 5 clients: padded to 8 over 4 devices
  data = federate(x, y, client_indices)
  outs = {}
  for strategy in ("vmap", "sharded"):
    algorithm = federated_averaging(model, OPT, batch_size=BATCH, local_epochs=EPOCHS,
                                    strategy=strategy)
    _, outs[strategy] = algorithm.round(algorithm.init(variables), clients=clients, data=data,
                                        key=round_key(jax.random.key(0), 1))
  _tree_allclose(outs["sharded"].variables, outs["vmap"].variables)
  _tree_allclose(outs["sharded"].clients, outs["vmap"].clients)
  leaf = jax.tree.leaves(outs["sharded"].clients.variables)[0]
  assert leaf.shape[0] == 5


def test_bfloat16_compute_tracks_float32(setup):
  model, variables, x, y, client_indices = setup
  data = stack_client_indices(client_indices, [2], BATCH)
  deltas = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    update = jax.jit(make_client_update(model, optax.sgd(0.05), BATCH, 1, compute_dtype=dtype))
    out = update(variables, x, y, data.indices[0], data.counts[0], jax.random.key(0))
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(out.variables))  # fp32 master
    deltas[dtype] = np.concatenate([np.ravel(a - b) for a, b in zip(
        jax.tree.leaves(out.variables), jax.tree.leaves(variables))])
  ref = deltas[jnp.float32]
  rel = np.linalg.norm(deltas[jnp.bfloat16] - ref) / np.linalg.norm(ref)
  # bfloat16 keeps 8 significant bits: the update direction agrees to a few percent.
  assert 0 < rel < 0.05, rel


def _round_temp_bytes(model, variables, strategy, k, chunk):
  """XLA's temporary-buffer size for the jitted round with K clients of 8 examples each."""
  algorithm = federated_averaging(model, OPT, batch_size=BATCH, local_epochs=1,
                                  strategy=strategy, clients_per_chunk=chunk)
  data = stack_client_indices(np.split(np.arange(8 * k) % 60, k), np.arange(k), BATCH)
  args = (variables, jnp.zeros((60, 8, 8, 1)), jnp.zeros(60, jnp.int32),
          jnp.asarray(data.indices), jnp.asarray(data.counts), jnp.arange(k),
          jax.random.key(0), jnp.full(k, 1.0 / k))
  return algorithm.program.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_round_memory_is_flat_in_k(setup):
  """At a fixed chunk size the round's working memory does not grow with K (vmap's does)."""
  model, variables = setup[0], setup[1]
  chunked = [_round_temp_bytes(model, variables, "chunked", k, 4) for k in (8, 64)]
  vmapped = [_round_temp_bytes(model, variables, "vmap", k, 0) for k in (8, 64)]
  assert chunked[1] <= 1.1 * chunked[0], chunked
  assert vmapped[1] > 4 * vmapped[0], vmapped


def test_donated_round_equals_plain_round_and_consumes_its_input(setup):
  model, variables, x, y, client_indices = setup
  data = federate(x, y, client_indices)
  outs = []
  for donate in (False, True):
    algorithm = federated_averaging(model, OPT, batch_size=BATCH, local_epochs=1,
                                    strategy="vmap", donate=donate)
    start = jax.tree.map(jnp.copy, variables)
    outs.append(algorithm.round(algorithm.init(start), clients=[0, 1, 2], data=data,
                                key=round_key(jax.random.key(0), 1))[1].variables)
    assert all(leaf.is_deleted() == donate for leaf in jax.tree.leaves(start))
  _tree_allclose(outs[0], outs[1], rtol=0, atol=0)
