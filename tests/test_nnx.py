"""Flax NNX models through make_model: the same network written in NNX and in linen, on the
same weights, trains (one FedAvg round, BatchNorm statistics included) and traces equally."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import tracefl_jax as tfl


class NNXNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, dropout: float = 0.0):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.ln = nnx.LayerNorm(64, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(64, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)])

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    x = self.drop(self.ln(x.reshape(x.shape[0], -1)))
    return self.layers[1](nnx.relu(self.layers[0](x)))


class LinenNet(nn.Module):
  """NNXNet in linen, with the adapter's names (`layers[0]` -> "layers_0")."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), name="conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
    x = nn.LayerNorm(name="ln")(x.reshape(x.shape[0], -1))
    return nn.Dense(3, name="layers_1")(nn.relu(nn.Dense(8, name="layers_0")(x)))


@pytest.fixture(scope="module")
def twins():
  nnx_model = tfl.make_model(NNXNet(nnx.Rngs(0)), input_shape=(4, 4, 1), num_classes=3)
  linen_model = tfl.make_model(LinenNet(), input_shape=(4, 4, 1), num_classes=3)
  variables = nnx_model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 60).astype(np.int32)
  x = (rng.normal(size=(60, 4, 4, 1)) + y[:, None, None, None]).astype(np.float32)
  data = tfl.federate(x, y, [np.arange(i, 60, 3) for i in range(3)])
  return nnx_model, linen_model, variables, data


def test_nnx_layers_are_traced_in_execution_order(twins):
  nnx_model, linen_model, variables, _ = twins
  assert nnx_model.traced_layers == (("conv",), ("ln",), ("layers_0",), ("layers_1",))
  assert nnx_model.traced_layers == linen_model.traced_layers
  assert nnx_model.untraced == (("bn",),) and nnx_model.name == "NNXNet"
  # init returns the NNX module's own weights, in the linen layout.
  linen_vars = linen_model.init(jax.random.key(0))
  assert jax.tree.structure(variables) == jax.tree.structure(linen_vars)
  np.testing.assert_array_equal(variables["params"]["layers_0"]["kernel"],
                                NNXNet(nnx.Rngs(0)).layers[0].kernel.value)


def test_nnx_trains_and_traces_like_its_linen_twin(twins):
  nnx_model, linen_model, variables, data = twins
  x = data.x[:5]
  np.testing.assert_allclose(nnx_model.logits(variables, x), linen_model.logits(variables, x),
                             rtol=1e-5, atol=1e-6)
  outs = {}
  for name, model in (("nnx", nnx_model), ("linen", linen_model)):
    alg = tfl.federated_averaging(model, optax.sgd(0.1), batch_size=8, local_epochs=1,
                                  strategy="vmap")
    state, out = alg.round(alg.init(variables), [0, 1, 2], data, jax.random.key(4))
    trace = tfl.trace_clients(model, out.traced, out.clients.variables, x,
                              return_layers=True)
    outs[name] = (state.variables, out.clients.variables, trace)
  (g_n, c_n, t_n), (g_l, c_l, t_l) = outs["nnx"], outs["linen"]
  assert jax.tree.structure(g_n) == jax.tree.structure(g_l)
  assert not np.allclose(g_n["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"])
  for a, b in zip(jax.tree.leaves((g_n, c_n)), jax.tree.leaves((g_l, c_l))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(t_n.layer_scores, t_l.layer_scores, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(t_n.traced_client, t_l.traced_client)


def test_nnx_dropout_draws_from_the_dropout_stream():
  model = tfl.make_model(NNXNet(nnx.Rngs(1), dropout=0.5), input_shape=(4, 4, 1),
                         num_classes=3)
  variables = model.init(jax.random.key(0))
  x = jnp.ones((2, 4, 4, 1))
  def train(seed):
    return model.apply(variables, x, train=True, rng=jax.random.key(seed))[0]
  np.testing.assert_array_equal(train(1), train(1))
  assert not np.allclose(train(1), train(2))
  np.testing.assert_array_equal(model.logits(variables, x), model.logits(variables, x))
