"""FedDebug (spec section 7) against the original's loop written plainly with itertools."""

from __future__ import annotations

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracefl_jax.models import get_model, make_model
from tracefl_jax.provenance import feddebug as fd


# ---- the original, plainly: per client, per input (batch of one), itertools.combinations ----

def _ref_vector(model, variables, x1):
  """One (client, input) neuron vector: Dense/Conv outputs via Flax's own capture mechanism
  (independent of the intercept used by the library), ReLU, per-layer min-max, concatenated."""
  _, state = model.module.apply(
      variables, x1[None], train=False, mutable=["intermediates"],
      capture_intermediates=lambda mdl, name: (name == "__call__"
                                               and isinstance(mdl, (nn.Dense, nn.Conv))))
  vec = []
  for out in jax.tree.leaves(state["intermediates"]):
    a = np.maximum(np.asarray(out, np.float32).reshape(-1), 0)
    with np.errstate(invalid="ignore"):  # max == min: NaN, inactive, as torch
      vec.append((a - a.min()) / (a.max() - a.min()))
  return np.concatenate(vec)


def _ref_search(active, num_faulty):
  """active [K, n] bool for ONE input -> (faulty list, per-step {left out client: count})."""
  active = active[:, ~np.all(active, axis=0)]  # drop neurons active in every client, once
  clients = tuple(range(active.shape[0]))
  faulty, steps = [], []
  for _ in range(num_faulty):
    best, best_count, counts = None, -1, {}
    for subset in itertools.combinations(clients, len(clients) - 1):
      count = int(np.sum(np.all(active[list(subset)], axis=0)))
      counts[(set(clients) - set(subset)).pop()] = count
      if count > best_count:  # strictly greater: the first subset wins ties
        best, best_count = subset, count
    faulty.append((set(clients) - set(best)).pop())
    steps.append(counts)
    clients = best
  return faulty, steps


def _ref_localize(model, client_vars, x, threshold, num_faulty):
  num_clients = jax.tree.leaves(client_vars)[0].shape[0]
  clients = [jax.tree.map(lambda a, j=j: a[j], client_vars) for j in range(num_clients)]
  vectors = np.stack([[_ref_vector(model, c, xi) for xi in np.asarray(x)] for c in clients])
  return [_ref_search(vectors[:, i] > threshold, num_faulty) for i in range(x.shape[0])]


def _check_against_reference(res, ref, num_clients):
  for i, (faulty, steps) in enumerate(ref):
    np.testing.assert_array_equal(res.predicted_faulty[i], faulty)
    for s, counts in enumerate(steps):
      expected = [counts.get(j, -1) for j in range(num_clients)]
      np.testing.assert_array_equal(res.step_counts[i, s], expected)
  np.testing.assert_array_equal(res.counts, res.step_counts[:, 0])


def _clients(model, num_clients, seed, scale=0.5):
  g = model.init(jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
  return g, jax.tree.map(
      lambda a: a[None] * (1 + scale * jax.random.normal(next(keys), (num_clients, *a.shape)))
      + 0.05 * jax.random.normal(next(keys), (num_clients, *a.shape)), g)


@pytest.mark.parametrize("name,num_clients,num_faulty",
                         [("cnn", 4, 1), ("cnn", 7, 2), ("lenet", 7, 1), ("lenet", 4, 2),
                          ("mlp", 7, 2)])
def test_matches_original_loop(name, num_clients, num_faulty):
  model = get_model(name, (8, 8, 1), 3)
  _, clients = _clients(model, num_clients, seed=num_clients)
  x = fd.feddebug_inputs(jax.random.key(3), 6, model.input_shape)
  res = jax.device_get(fd.feddebug_localize(model, clients, x, num_faulty=num_faulty))
  assert res.predicted_faulty.shape == (6, num_faulty)
  assert res.counts.shape == (6, num_clients)
  ref = _ref_localize(model, clients, x, 0.003, num_faulty)
  _check_against_reference(res, ref, num_clients)
  # Not a vacuous comparison: clients differ and the search has something to count.
  assert res.counts.max() > 0


def test_subset_search_ties_and_repetition():
  """Small random masks make ties frequent: the vectorised search must pick exactly the
  subset the combinations loop picks, at every step."""
  rng = np.random.default_rng(0)
  for num_clients, num_faulty, neurons in [(4, 1, 3), (4, 3, 5), (5, 2, 4), (7, 2, 6),
                                           (7, 4, 12)]:
    active = rng.random((num_clients, 200, neurons)) < 0.7
    res = jax.device_get(fd.localize_active(jnp.asarray(active), num_faulty))
    ref = [_ref_search(active[:, i], num_faulty) for i in range(active.shape[1])]
    _check_against_reference(res, ref, num_clients)


def test_tie_order_identical_clients():
  """Identical clients: every count is 0 and the first combination leaves out the last
  client, so the faulty picks are K-1, K-2, ... (the largest remaining position)."""
  model = get_model("lenet", (8, 8, 1), 3)
  g = model.init(jax.random.key(0))
  clients = jax.tree.map(lambda a: jnp.stack([a] * 5), g)
  x = fd.feddebug_inputs(jax.random.key(1), 4, model.input_shape)
  res = fd.feddebug_localize(model, clients, x, num_faulty=3)
  np.testing.assert_array_equal(res.predicted_faulty, np.tile([4, 3, 2], (4, 1)))
  np.testing.assert_array_equal(res.counts, 0)
  assert _ref_search(np.zeros((5, 3), bool), 3)[0] == [4, 3, 2]


@pytest.mark.parametrize("faulty", [(2,), (0, 5)])
def test_finds_a_clearly_different_client(faulty):
  """Benign clients are near copies. The first faulty client's first convolution is negated,
  so the neurons active in every other client are silent in it; a second one (b = 2) has its
  hidden dense layer negated instead, so the two also disagree with each other."""
  model = get_model("cnn", (8, 8, 1), 3)
  _, clients = _clients(model, 6, seed=0, scale=0.01)
  params = dict(clients["params"])
  for layer, client in zip(("Conv_0", "Dense_0"), faulty):
    params[layer] = jax.tree.map(lambda a, c=client: a.at[c].multiply(-1.0), params[layer])
  clients = {**clients, "params": params}
  x = fd.feddebug_inputs(jax.random.key(5), 10, model.input_shape)
  res = fd.feddebug_localize(model, clients, x, num_faulty=len(faulty))
  assert fd.feddebug_accuracy(res.predicted_faulty, faulty) == 100.0
  chunked = fd.feddebug_localize(model, clients, x, num_faulty=len(faulty),
                                 clients_per_chunk=4)
  np.testing.assert_array_equal(chunked.step_counts, res.step_counts)


def test_inputs_follow_kaiming_uniform():
  x = fd.feddebug_inputs(jax.random.key(0), 64, (32, 32, 3))
  bound = math.sqrt(6 / (32 * 32))  # torch: C x H x W tensor, fan_in = H * W
  assert x.shape == (64, 32, 32, 3) and x.dtype == jnp.float32
  assert float(jnp.abs(x).max()) <= bound and float(jnp.abs(x).max()) > 0.99 * bound
  np.testing.assert_allclose(float(jnp.std(x)), bound / math.sqrt(3), rtol=0.01)
  mean, std = 0.1307, 0.3081
  y = fd.feddebug_inputs(jax.random.key(0), 64, (32, 32, 3), lambda a: (a - mean) / std)
  np.testing.assert_allclose(y, (x - mean) / std, rtol=1e-6)
  with pytest.raises(ValueError, match="channel axis"):
    fd.feddebug_inputs(jax.random.key(0), 2, (10,))


def test_accuracy_and_validation():
  pred = np.array([[0, 3], [1, 2], [0, 1]])
  assert fd.feddebug_accuracy(pred, [0, 1]) == pytest.approx((50 + 50 + 100) / 3)
  assert fd.feddebug_accuracy(pred[:, :1], [0]) == pytest.approx(200 / 3)
  model = get_model("mlp", (4, 4, 1), 3)
  _, clients = _clients(model, 3, seed=0)
  x = fd.feddebug_inputs(jax.random.key(0), 2, model.input_shape)
  with pytest.raises(ValueError, match="num_faulty"):
    fd.feddebug_localize(model, clients, x, num_faulty=3)
  assert fd.feddebug_paths(model) == (("Dense_0",), ("Dense_1",), ("Dense_2",))


def test_units_exclude_layernorm_and_follow_execution_order():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      late = nn.Dense(3, name="declared_first")
      h = nn.LayerNorm()(nn.Conv(4, (3, 3))(x))
      return late(h.reshape(h.shape[0], -1))

  model = make_model("n", Net(), (6, 6, 1), 3)
  assert fd.feddebug_paths(model) == (("Conv_0",), ("declared_first",))
