"""Parity with the original procedure in PyTorch (forward/backward hooks) on identical weights.

Spec section 6 reported one score off by ~1e-2 with max pooling. What we found: both
frameworks route a tied max-pooling window's gradient to its first element, and ties on real
images come from constant background regions, where every client's layer output is constant
too, so the routing cannot change a score. Parity holds to 1e-5 on tie-free inputs, on real
digits, and on digits drawn on a constant canvas where every input has tied windows. A
mismatch needs a tie between positions with different receptive fields, decided by each
framework's float rounding; it did not occur here, and the tolerance was not loosened.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests import torch_reference as tr
from tracefl_jax.data import load_dataset
from tracefl_jax.models import get_model, make_model
from tracefl_jax.models.cnn import FedAvgCNN
from tracefl_jax.provenance import trace_clients

K = 10
torch.set_default_dtype(torch.float32)


class NormNet(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(6, (3, 3), padding="SAME")(x))
    x = nn.LayerNorm(epsilon=1e-6)(x)
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes)(nn.relu(nn.Dense(32)(x)))


def _clients(global_vars, key, scale=0.05):
  def perturb(leaf, k):
    return leaf[None] + scale * jnp.std(leaf) * jax.random.normal(k, (K, *leaf.shape))
  leaves, treedef = jax.tree.flatten(global_vars)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [perturb(l, k) for l, k in zip(leaves, keys)])


def _torch_clients(model, client_vars):
  return [[tr.torch_layer_params(_layer(jax.tree.map(lambda a: a[k], client_vars["params"]),
                                        path)) for path in model.traced_layers]
          for k in range(K)]


def _layer(params, path):
  for key in path:
    params = params[key]
  return params


def _compare(model, torch_model, x, key):
  g = model.init(key)
  clients = _clients(g, jax.random.fold_in(key, 1))
  tr.load_flax(torch_model, g["params"], model.traced_layers)
  ref, ref_pred = tr.original_scores(torch_model, _torch_clients(model, clients), x)
  out = {k: trace_clients(model, g, clients, jnp.asarray(x), kernel=k)
         for k in ("grad", "jvp", "reference")}
  return ref, ref_pred, out


def _rel_err(a, b):
  return np.abs(np.asarray(a, np.float64) - b).max(axis=1) / np.abs(b).max(axis=1)


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_cnn_parity_on_tie_free_inputs(pool):
  x = np.random.default_rng(0).normal(size=(6, 12, 12, 1)).astype(np.float32)
  if pool == "max":
    model = get_model("cnn", (12, 12, 1), 10)
    flat = 3 * 3 * 64
  else:
    model = make_model("avgcnn", _AvgCNN(10), (12, 12, 1), 10)
    flat = 3 * 3 * 64
  torch_model = tr.TorchFedAvgCNN(1, 10, flat=flat, pool=pool)
  ref, ref_pred, out = _compare(model, torch_model, x, jax.random.key(3))
  if pool == "max":
    assert not tr.pooling_near_ties(torch_model, x).any()
  for name, res in out.items():
    np.testing.assert_array_equal(res.predicted, ref_pred)
    assert _rel_err(res.scores, ref).max() <= 1e-5, name
    np.testing.assert_array_equal(res.traced_client, np.argmax(ref, axis=1))


class _AvgCNN(FedAvgCNN):
  @nn.compact
  def __call__(self, x, train=False):
    for f in self.features:
      x = nn.avg_pool(nn.relu(nn.Conv(f, (5, 5), padding="SAME")(x)), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.hidden)(x)))


def test_layernorm_model_parity():
  x = np.random.default_rng(1).normal(size=(5, 8, 8, 2)).astype(np.float32)
  model = make_model("normnet", NormNet(), (8, 8, 2), 10)
  assert len(model.traced_layers) == 4
  torch_model = tr.TorchNormNet(2, 10, ch=6, flat=4 * 4 * 6, hidden=32)
  ref, ref_pred, out = _compare(model, torch_model, x, jax.random.key(5))
  for name, res in out.items():
    np.testing.assert_array_equal(res.predicted, ref_pred)
    assert _rel_err(res.scores, ref).max() <= 1e-5, name
    np.testing.assert_array_equal(res.traced_client, np.argmax(ref, axis=1))


@pytest.fixture(scope="module")
def digits():
  return load_dataset("digits").x_test[:24]


def test_digits_avg_pooling_parity(digits):
  model = make_model("avgcnn", _AvgCNN(10), (8, 8, 1), 10)
  torch_model = tr.TorchFedAvgCNN(1, 10, flat=2 * 2 * 64, pool="avg")
  ref, _, out = _compare(model, torch_model, digits, jax.random.key(7))
  assert _rel_err(out["grad"].scores, ref).max() <= 1e-5


def test_max_pool_tie_routing_is_the_same_in_both_frameworks():
  # A window with tied maxima: both send the whole gradient to the first (row-major) one.
  x = np.array([[1., 1., 0., 2.], [1., 1., 2., 2.], [3., 0., 5., 0.], [0., 3., 0., 5.]],
               np.float32)
  jax_grad = jax.grad(lambda v: jnp.sum(nn.max_pool(v[None, :, :, None], (2, 2),
                                                    strides=(2, 2))))(jnp.asarray(x))
  t = torch.tensor(x)[None, None].requires_grad_()
  torch.nn.functional.max_pool2d(t, 2, 2).sum().backward()
  expected = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(jax_grad, expected)
  np.testing.assert_array_equal(t.grad[0, 0].numpy(), expected)


def test_digits_on_a_background_canvas_parity_despite_pooling_ties(digits):
  # MNIST-like: a digit on a constant background, so many pooling windows tie exactly. A tie
  # inside a constant region cannot move a score: every client's layer output is constant
  # there too, so whichever tied position takes the gradient, the dot product is the same.
  # Only ties between positions with DIFFERENT receptive fields could (spec section 6's
  # observation); rounding decides those, and none occurs on these inputs.
  x = np.full((8, 20, 20, 1), digits.min(), np.float32)
  x[:, 6:14, 6:14] = digits[:8]
  model = get_model("cnn", (20, 20, 1), 10)
  torch_model = tr.TorchFedAvgCNN(1, 10, flat=5 * 5 * 64, pool="max")
  ref, ref_pred, out = _compare(model, torch_model, x, jax.random.key(1))
  assert tr.pooling_near_ties(torch_model, x).all()
  for name, res in out.items():
    np.testing.assert_array_equal(res.predicted, ref_pred)
    assert _rel_err(res.scores, ref).max() <= 1e-5, name
    np.testing.assert_array_equal(res.traced_client, np.argmax(ref, axis=1))
