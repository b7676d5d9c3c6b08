"""Provenance kernels against each other and against cases with known answers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracefl_jax.provenance import protocol as evaluation
from tracefl_jax.models import get_model, make_model
from tracefl_jax.provenance import layer_betas, trace_clients
from tracefl_jax.provenance import attribution, kernels

KERNELS = ("grad", "jvp", "reference")


class ConvNormDense(nn.Module):
  num_classes: int = 5

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), strides=(2, 2))(x)
    x = nn.LayerNorm()(nn.relu(x))
    x = nn.Conv(6, (3, 3))(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.LayerNorm()(nn.tanh(nn.Dense(16)(x)))
    return nn.Dense(self.num_classes)(x)


@pytest.fixture(scope="module")
def case():
  model = make_model("cnd", ConvNormDense(), (8, 8, 3), 5)
  g = model.init(jax.random.key(0))
  k = 7
  keys = iter(jax.random.split(jax.random.key(1), 64))
  clients = jax.tree.map(
      lambda a: a[None] * (1 + 0.3 * jax.random.normal(next(keys), (k, *a.shape)))
      + 0.05 * jax.random.normal(next(keys), (k, *a.shape)), g)
  x = jax.random.normal(jax.random.key(2), (6, 8, 8, 3))
  return model, g, clients, x


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def test_traced_layers_in_forward_order(case):
  model = case[0]
  assert model.traced_layers == (("Conv_0",), ("LayerNorm_0",), ("Conv_1",), ("Dense_0",),
                                 ("LayerNorm_1",), ("Dense_1",))
  assert get_model("cnn", (8, 8, 1), 10).traced_layers == (
      ("Conv_0",), ("Conv_1",), ("Dense_0",), ("Dense_1",))


def test_kernels_agree_per_layer(case):
  model, g, clients, x = case
  res = {k: trace_clients(model, g, clients, x, kernel=k, return_layers=True) for k in KERNELS}
  ref = res["reference"]
  for k in ("grad", "jvp"):
    assert _rel(res[k].layer_scores, ref.layer_scores) <= 1e-5, k
    assert _rel(res[k].scores, ref.scores) <= 1e-5, k
    np.testing.assert_array_equal(res[k].traced_client, ref.traced_client)
  # Totals without per-layer output (jvp pushes one beta-weighted direction) agree too.
  total = trace_clients(model, g, clients, x, kernel="jvp")
  assert _rel(total.scores, ref.scores) <= 1e-5
  np.testing.assert_allclose(ref.layer_scores.sum(0), ref.scores, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ref.probs, jax.nn.softmax(ref.scores, -1), rtol=1e-6)
  assert ref.scores.dtype == jnp.float32 and ref.layer_scores.shape == (6, 6, 7)


def test_known_answer_single_dense_layer():
  # T[n, k] = < W_k x_n + b_k, e_{y_hat} > for a one-layer model (beta = 1).
  model = make_model("lin", _Linear(), (3,), 4)
  rng = np.random.default_rng(0)
  g = {"params": {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                              "bias": jnp.asarray(rng.normal(size=4), jnp.float32)}}}
  w = rng.normal(size=(5, 3, 4)).astype(np.float32)
  b = rng.normal(size=(5, 4)).astype(np.float32)
  clients = {"params": {"Dense_0": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}}
  x = rng.normal(size=(8, 3)).astype(np.float32)
  y_hat = np.argmax(x @ np.asarray(g["params"]["Dense_0"]["kernel"])
                    + np.asarray(g["params"]["Dense_0"]["bias"]), axis=1)
  expected = np.einsum("ni,kio->nko", x, w) + b[None]
  expected = expected[np.arange(8), :, y_hat]
  for k in KERNELS:
    res = trace_clients(model, g, clients, jnp.asarray(x), kernel=k)
    np.testing.assert_allclose(res.scores, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(res.predicted, y_hat)


class _Linear(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(4)(x)


def test_ties_pick_the_first_client_and_scaled_client_wins(case):
  model, g, _, x = case
  twice = jax.tree.map(lambda a: a * 2.0, g)
  clients = jax.tree.map(lambda a, b: jnp.stack([a, a, b]), g, twice)
  res = trace_clients(model, g, clients, x)
  # Scores are linear in the client's weights: client 2 (= 2 G) scores exactly twice G's.
  np.testing.assert_allclose(res.scores[:, 2], 2 * res.scores[:, 0], rtol=1e-5)
  np.testing.assert_array_equal(res.scores[:, 0], res.scores[:, 1])
  expected = np.where(np.asarray(res.scores[:, 2]) > np.asarray(res.scores[:, 0]), 2, 0)
  np.testing.assert_array_equal(res.traced_client, expected)  # never 1: first on ties


def test_beta_decay_switch(case):
  model, g, clients, x = case
  np.testing.assert_allclose(layer_betas(4, 0.9), [0.729, 0.81, 0.9, 1.0], rtol=1e-6)
  raw = trace_clients(model, g, clients, x, use_decay=False, return_layers=True)
  one = trace_clients(model, g, clients, x, decay=1.0, return_layers=True)
  np.testing.assert_allclose(raw.scores, one.scores, rtol=1e-6)
  dec = trace_clients(model, g, clients, x, decay=0.5, return_layers=True)
  betas = 0.5 ** np.arange(5, -1, -1)
  np.testing.assert_allclose(dec.layer_scores, raw.layer_scores * betas[:, None, None],
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="decay=0 must be in"):
    trace_clients(model, g, clients, x, decay=0)


def test_size_factor_scales_scores(case):
  model, g, clients, x = case
  sizes = jnp.array([1, 2, 3, 4, 5, 6, 9])
  plain = trace_clients(model, g, clients, x)
  for k in KERNELS:
    scaled = trace_clients(model, g, clients, x, kernel=k, client_sizes=sizes,
                           use_size_factor=True)
    p = np.asarray(sizes) / np.sum(sizes)
    assert _rel(scaled.scores, np.asarray(plain.scores) * p[None]) <= 1e-5, k
  with pytest.raises(ValueError, match="needs client_sizes"):
    trace_clients(model, g, clients, x, use_size_factor=True)


def test_target_and_chunking_and_no_retrace(case):
  model, g, clients, x = case
  base = trace_clients(model, g, clients, x)
  other = (np.asarray(base.predicted) + 1) % 5
  targeted = trace_clients(model, g, clients, x, target=jnp.asarray(other))
  ref = trace_clients(model, g, clients, x, target=jnp.asarray(other), kernel="reference")
  assert _rel(targeted.scores, ref.scores) <= 1e-5
  assert not np.allclose(targeted.scores, base.scores)
  np.testing.assert_array_equal(targeted.predicted, base.predicted)  # prediction unchanged
  for k in KERNELS:
    chunked = trace_clients(model, g, clients, x, kernel=k, clients_per_chunk=3)
    assert _rel(chunked.scores, base.scores) <= 1e-5, k
  before = attribution._trace._cache_size()  # pylint: disable=protected-access
  trace_clients(model, g, jax.tree.map(lambda a: a * 1.1, clients), x + 1.0)
  assert attribution._trace._cache_size() == before  # pylint: disable=protected-access


@pytest.mark.parametrize("p", [100, 1000, 1024])
def test_blocked_contraction_equals_numpy(p):
  """The grad kernel's P-blocked [N, P] x [K, P] contraction, with and without a tail block."""
  rng = np.random.default_rng(p)
  grads, theta = rng.normal(size=(5, p)), rng.normal(size=(7, p))
  out = kernels.contract_blocked(jnp.asarray(grads, jnp.float32), jnp.asarray(theta, jnp.float32),
                                 block=64)
  np.testing.assert_allclose(np.asarray(out), grads @ theta.T, rtol=1e-5, atol=1e-4)


def test_auto_kernel_is_grad_for_affine_units_and_reference_for_blocks():
  cnn = get_model("cnn", (8, 8, 1), 10)
  bert = get_model("bert_tiny", (16,), 4, vocab_size=50)
  gpt = get_model("gpt_tiny", (16,), 4, vocab_size=50)
  assert attribution.choose_kernel(cnn) == "grad"
  assert attribution.choose_kernel(gpt) == "grad"
  assert attribution.choose_kernel(bert) == "reference"


def test_bad_kernel_name(case):
  model, g, clients, x = case
  with pytest.raises(ValueError, match="unknown provenance kernel 'fast'; valid: auto"):
    trace_clients(model, g, clients, x, kernel="fast")


def test_selection_and_baselines_hand_checked():
  labels = np.array([0, 1, 1, 2, 0, 1, 2, 2, 0])
  pred = np.array([0, 1, 0, 2, 0, 1, 1, 2, 1])
  counts = np.array([[5, 0, 0], [1, 3, 0]])  # participants hold labels 0 and 1 only
  idx = evaluation.select_correct_inputs(pred, labels, counts, per_label=2)
  np.testing.assert_array_equal(idx, [0, 1, 4, 5])  # label 2 is held by nobody
  np.testing.assert_array_equal(
      evaluation.select_correct_inputs(pred, labels, counts, per_label=3), [])  # < 3 each
  np.testing.assert_array_equal(
      evaluation.select_correct_inputs(pred, labels, counts, per_label=2, max_inputs=5),
      [0, 4])  # in the first 5, label 1 has one hit (skipped); label 0 has inputs 0 and 4
  base = evaluation.round_baselines(counts, labels[idx], np.array([0, 1, 1, 1]))
  # Label 0: both hold it; label 1: only participant 1. Random: (1 + .5 + 1 + .5) / 4.
  assert base["random_baseline"] == pytest.approx(0.75)
  assert base["largest_client_baseline"] == pytest.approx(0.5)  # client 0 (5) lacks label 1
  assert base["oracle_accuracy"] == pytest.approx(0.75)  # oracle 0, 1, 0, 1 vs traced 0, 1, 1, 1
  np.testing.assert_array_equal(
      evaluation.localization_correct(np.array([0, 1, 1, 0]), labels[idx], counts),
      [True, True, True, False])
  faulty = evaluation.select_faulty_inputs(pred, labels, {1: 0, 2: 0}, max_inputs=10)
  np.testing.assert_array_equal(faulty, [2])  # input 6 predicts 1 (not a flip target)
  fb = evaluation.round_baselines(counts, labels[faulty], np.array([0]), faulty_local=[1])
  assert fb == {"random_baseline": 0.5, "largest_client_baseline": 0.0, "oracle_accuracy": None}
