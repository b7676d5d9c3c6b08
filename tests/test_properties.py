"""Property tests (hypothesis) for the library's pure functions: partitions, FedAvg,
`trace_clients` and DP clipping.

Shapes are fixed per test so that each jitted function compiles once; hypothesis draws the
values (or, for model-sized pytrees, a seed and scales). No example database is written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tracefl_jax.data.partition import fixup_partition, make_partition
from tracefl_jax.fl import aggregation, privacy
from tracefl_jax.models import get_model
from tracefl_jax.provenance import trace_clients

FAST = settings(max_examples=50, deadline=None, database=None)
MODEL = settings(max_examples=30, deadline=None, database=None)


# --- Partitions ---------------------------------------------------------------------------


@st.composite
def labelled(draw, min_size=1):
  """(labels [n], num_classes, num_clients) with 1 <= num_clients <= n."""
  k = draw(st.integers(1, 6))
  labels = np.asarray(draw(st.lists(st.integers(0, k - 1), min_size=min_size, max_size=120)),
                      np.int64)
  return labels, k, draw(st.integers(1, min(len(labels), 12)))


def _check_partition(part, labels, num_clients, k, complete):
  assert part.num_clients == num_clients
  assert part.label_counts.shape == (num_clients, k)
  for ix, counts in zip(part.client_indices, part.label_counts):
    np.testing.assert_array_equal(counts, np.bincount(labels[ix], minlength=k))
  flat = np.concatenate([np.zeros(0, np.int64), *part.client_indices])
  assert len(np.unique(flat)) == len(flat), "an index is given to two clients (or twice)"
  assert flat.size == 0 or (flat.min() >= 0 and flat.max() < len(labels))
  if complete:
    np.testing.assert_array_equal(np.sort(flat), np.arange(len(labels)))


@FAST
@given(labelled(), st.integers(0, 2**32 - 1))
def test_iid_assigns_every_index_once(data, seed):
  labels, k, c = data
  part = make_partition(labels, "iid", c, seed, num_classes=k)
  _check_partition(part, labels, c, k, complete=True)
  sizes = part.client_sizes
  assert sizes.max() - sizes.min() <= 1


@FAST
@given(labelled(), st.integers(0, 2**32 - 1), st.floats(0.2, 5.0), st.booleans())
def test_dirichlet_assigns_every_index_once(data, seed, alpha, balancing):
  labels, k, c = data
  try:
    part = make_partition(labels, "dirichlet", c, seed, num_classes=k, alpha=alpha,
                          self_balancing=balancing)
  except ValueError as e:  # a documented refusal (the balanced shares underflow), not a bug
    assume("underflows" not in str(e))
    raise
  _check_partition(part, labels, c, k, complete=True)


@FAST
@given(labelled(), st.integers(0, 2**32 - 1), st.data())
def test_pathological_assigns_held_classes(data, seed, draw):
  labels, k, c = data
  per_client = draw.draw(st.integers(1, k))
  part = make_partition(labels, "pathological", c, seed, num_classes=k,
                        classes_per_client=per_client)
  # Every class is held by someone once C * classes_per_client >= K (round-robin deal).
  _check_partition(part, labels, c, k, complete=c * per_client >= k)
  assert np.all((part.label_counts > 0).sum(axis=1) <= per_client)


@FAST
@given(labelled(), st.integers(0, 2**32 - 1), st.integers(1, 3))
def test_shards_assign_every_index_once(data, seed, shards):
  labels, k, c = data
  assume(c * shards <= len(labels))
  part = make_partition(labels, "shards", c, seed, num_classes=k, shards_per_client=shards)
  _check_partition(part, labels, c, k, complete=True)


@FAST
@given(labelled(min_size=10), st.integers(0, 2**32 - 1), st.sampled_from(["iid", "dirichlet"]),
       st.integers(0, 6), st.integers(1, 40), st.integers(0, 15))
def test_fixup_partition_invariants(data, seed, method, min_label, max_per, min_size):
  labels, k, c = data
  options = {"alpha": 0.5} if method == "dirichlet" else {}
  try:
    part = make_partition(labels, method, c, seed, num_classes=k, **options)
  except ValueError as e:
    assume("underflows" not in str(e))
    raise
  fixed = fixup_partition(part, labels, min_label_count=min_label, max_per_client=max_per,
                          min_client_size=min_size)
  owner = np.full(len(labels), -1)
  for c_orig, ix in enumerate(part.client_indices):
    owner[ix] = c_orig
  # A client keeps min(max_per, examples of its labels with >= min_label) examples and is
  # dropped when that is below min_size; survivors keep their order.
  expected = []
  for ix in part.client_indices:
    counts = np.bincount(labels[ix], minlength=k)
    size = min(max_per, int(counts[counts >= min_label].sum()))
    if size >= min_size:
      expected.append(size)
  np.testing.assert_array_equal(fixed.client_sizes, expected)
  assert fixed.label_counts.shape == (len(expected), k)
  origins = []
  for ix, counts in zip(fixed.client_indices, fixed.label_counts):
    np.testing.assert_array_equal(counts, np.bincount(labels[ix], minlength=k))
    assert min_size <= len(ix) <= max_per
    if not len(ix):  # min_client_size=0 keeps emptied clients; they have no origin to check
      continue
    source = part.client_indices[owner[ix[0]]]
    origins.append(owner[ix[0]])
    assert np.all(owner[ix] == owner[ix[0]]), "a kept client mixes two original clients"
    where = {int(v): i for i, v in enumerate(source)}
    order = [where[int(v)] for v in ix]
    assert order == sorted(order), "a kept client's indices are not in the original order"
    original = np.bincount(labels[source], minlength=k)
    assert np.all(original[np.unique(labels[ix])] >= min_label)
    if max_per >= len(source):  # without truncation every kept label keeps its count
      assert np.all(counts[counts > 0] >= min_label)
  assert origins == sorted(origins) and len(set(origins)) == len(origins)


# --- FedAvg -------------------------------------------------------------------------------

C = 4
_fedavg = jax.jit(aggregation.fedavg)


@st.composite
def stacked_and_weights(draw):
  finite = st.floats(-100, 100, width=32, allow_subnormal=False)
  tree = {"a": draw(hnp.arrays(np.float32, (C, 3, 2), elements=finite)),
          "b": {"c": draw(hnp.arrays(np.float32, (C, 5), elements=finite))}}
  w = draw(hnp.arrays(np.float32, (C,), elements=st.one_of(
      st.just(0.0), st.floats(2.0**-10, 10, width=32))))
  assume(w.sum() > 0)
  return tree, w


def _close(a, b, scale):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5,
                             atol=1e-5 * (1 + scale))


@FAST
@given(stacked_and_weights())
def test_fedavg_is_a_convex_combination_equal_to_numpy(data):
  tree, w = data
  got = _fedavg(jax.tree.map(jnp.asarray, tree), jnp.asarray(w))
  for leaf, avg in zip(jax.tree.leaves(tree), jax.tree.leaves(got)):
    scale = np.abs(leaf).max()
    avg = np.asarray(avg, np.float64)
    assert np.all(avg >= leaf.min(axis=0) - 1e-5 * (1 + scale))
    assert np.all(avg <= leaf.max(axis=0) + 1e-5 * (1 + scale))
    w64 = w.astype(np.float64)
    _close(avg, np.tensordot(w64 / w64.sum(), leaf.astype(np.float64), axes=1), scale)


@FAST
@given(stacked_and_weights(), st.permutations(range(C)), st.floats(1e-2, 1e2))
def test_fedavg_permutation_and_scale_invariance(data, perm, factor):
  tree, w = data
  perm = np.asarray(perm)
  base = _fedavg(tree, jnp.asarray(w))
  permuted = _fedavg(jax.tree.map(lambda a: a[perm], tree), jnp.asarray(w[perm]))
  scaled = _fedavg(tree, jnp.asarray(w * np.float32(factor)))
  for leaf, b, p, s in zip(jax.tree.leaves(tree), jax.tree.leaves(base),
                           jax.tree.leaves(permuted), jax.tree.leaves(scaled)):
    _close(p, b, np.abs(leaf).max())
    _close(s, b, np.abs(leaf).max())


# --- trace_clients ------------------------------------------------------------------------

K, N = 4, 3


@pytest.fixture(scope="module")
def mlp():
  model = get_model("mlp", (4, 4, 1), 3)  # Dense traced units: affine in their parameters
  g = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (N, 4, 4, 1))
  return model, g, x


def _clients(g, seed, scale, k=K):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: jnp.asarray(np.asarray(a)[None] + scale * rng.normal(size=(k, *a.shape)),
                            jnp.float32), g)


@MODEL
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(0.01, 0.5),
       perm=st.permutations(range(K)))
def test_permuting_clients_permutes_score_columns(mlp, seed, scale, perm):
  model, g, x = mlp
  perm = np.asarray(perm)
  clients = _clients(g, seed, scale)
  base = trace_clients(model, g, clients, x)
  moved = trace_clients(model, g, jax.tree.map(lambda a: a[perm], clients), x,
                        client_ids=jnp.asarray(perm))
  scores = np.asarray(base.scores)
  np.testing.assert_allclose(moved.scores, scores[:, perm], rtol=1e-5,
                             atol=1e-5 * (1 + np.abs(scores).max()))
  np.testing.assert_allclose(moved.probs, np.asarray(base.probs)[:, perm], rtol=1e-4,
                             atol=1e-6)
  # The same global client wins wherever the top score is not a near-tie.
  top2 = np.sort(scores, axis=1)[:, -2:]
  clear = top2[:, 1] - top2[:, 0] > 1e-4 * (1 + np.abs(scores).max())
  np.testing.assert_array_equal(np.asarray(moved.traced_client)[clear],
                                np.asarray(base.traced_client)[clear])


@MODEL
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(0.01, 0.5),
       delta_scale=st.floats(0.0, 1.0))
def test_same_delta_on_every_client_leaves_probabilities(mlp, seed, scale, delta_scale):
  model, g, x = mlp
  clients = _clients(g, seed, scale)
  rng = np.random.default_rng(seed + 1)
  delta = jax.tree.map(lambda a: delta_scale * rng.normal(size=a.shape), g)
  shifted = jax.tree.map(lambda c, d: (c + d[None]).astype(c.dtype), clients, delta)
  base = trace_clients(model, g, clients, x)
  moved = trace_clients(model, g, shifted, x)
  # Each traced unit is linear in its parameters, so every client's score of an input moves
  # by the same <f_l(a; delta), g_l> sum, which the softmax over clients cancels.
  diff = np.asarray(moved.scores, np.float64) - np.asarray(base.scores, np.float64)
  tol = 1e-5 * (1 + np.abs(np.asarray(moved.scores)).max() + np.abs(np.asarray(base.scores)).max())
  np.testing.assert_allclose(diff, np.broadcast_to(diff[:, :1], diff.shape), atol=tol, rtol=0)
  np.testing.assert_allclose(moved.probs, base.probs, atol=tol, rtol=0)


@MODEL
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(0.0, 2.0))
def test_a_single_client_gets_probability_one(mlp, seed, scale):
  model, g, x = mlp
  res = trace_clients(model, g, _clients(g, seed, scale, k=1), x, client_ids=jnp.array([5]))
  np.testing.assert_array_equal(res.probs, np.ones((N, 1), np.float32))
  np.testing.assert_array_equal(res.traced_client, [5] * N)
  assert bool(np.all(res.attributable))


# --- DP clipping --------------------------------------------------------------------------

_clip = jax.jit(privacy.clip_update)


@st.composite
def updates(draw):
  values = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
  return {"a": draw(hnp.arrays(np.float32, (3, 4), elements=values)),
          "b": draw(hnp.arrays(np.float32, (5,), elements=values))}


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(l, np.float64)) for l in jax.tree.leaves(tree)])


@FAST
@given(updates(), st.floats(1e-3, 1e3))
def test_clipping_bounds_the_norm_and_keeps_the_direction(update, clip):
  clipped, norm = _clip(update, clip)
  u, v = _flat(update), _flat(clipped)
  true_norm = np.linalg.norm(u)
  # atol: float32 squares underflow (flushed to zero) below ~1e-19, so such norms read 0.
  np.testing.assert_allclose(float(norm), true_norm, rtol=1e-5, atol=1e-18)
  assert np.linalg.norm(v) <= clip * (1 + 1e-5) + 1e-6
  if true_norm <= clip * (1 - 1e-6):
    np.testing.assert_array_equal(v, u)  # small updates are returned unchanged
  if true_norm > 0:
    # Clipping only rescales: v = s u with s = min(1, C / ||u||) > 0.
    s = min(1.0, clip / true_norm)
    np.testing.assert_allclose(v, s * u, rtol=1e-5, atol=1e-5 * s * np.abs(u).max())
