"""Issue 34 item 5, the smaller holes: each a clear error naming the fix, or a working path.
String server optimizers, a loss returning a scalar, a rule that does not reduce over
clients, nn.remat / nn.scan layers, save/load of ServerState against its template, and
non-finite clients reaching a robust rule."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tracefl_jax as tfl
from tracefl_jax.fl import robust


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def _data(nan_client=None):
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 60).astype(np.int32)
  x = (rng.normal(size=(60, 4)) + y[:, None]).astype(np.float32)
  parts = [np.arange(i, 60, 5) for i in range(5)]
  if nan_client is not None:
    x[parts[nan_client]] = np.nan
  return tfl.federate(x, y, parts)


@pytest.fixture(scope="module")
def setup():
  model = tfl.make_model(MLP(), input_shape=(4,), num_classes=3)
  return model, _data(), model.init(jax.random.key(0))


def _alg(model, **kw):
  return tfl.federated_averaging(model, optax.sgd(0.1), batch_size=6, local_epochs=1,
                                 strategy="vmap", **kw)


def test_string_optimizers_name_the_factory(setup):
  model, _, _ = setup
  with pytest.raises(TypeError, match=r'tfl.server_optimizer\(\'adam\', lr\)'):
    _alg(model, server_optimizer="adam")
  with pytest.raises(TypeError, match="make_optimizer"):
    tfl.federated_averaging(model, "sgd", batch_size=6, local_epochs=1)


def test_loss_returning_a_scalar_is_one_clear_error(setup):
  model, data, variables = setup

  def scalar_loss(model, variables, x, y, mask, rng, global_params=None):
    return tfl.cross_entropy(model, variables, x, y, mask, rng)[0]

  alg = _alg(model, loss_fn=scalar_loss)
  with pytest.raises(TypeError, match=r"scalar_loss returned an array of shape \(\).*"
                     r"\(loss, model_state\)"):
    alg.round(alg.init(variables), [0, 1], data, jax.random.key(0))


def test_rule_that_does_not_reduce_over_clients_is_named(setup):
  model, data, variables = setup

  def forgot_to_reduce(updates, weights):
    return jax.tree.map(lambda u: u * 0.5, updates)

  alg = _alg(model, aggregator=forgot_to_reduce)
  with pytest.raises(ValueError, match=r"forgot_to_reduce returned leaf .* of shape \(2, .*"
                     r"reduced over the client axis"):
    alg.round(alg.init(variables), [0, 1], data, jax.random.key(0))


class Remat(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.remat(nn.Dense)(8)(x)))


class _Body(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(4)(x)), None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    x, _ = nn.scan(_Body, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=2)()(x, None)
    return nn.Dense(3)(x)


def test_remat_and_scan_refused_when_built_and_traced_outside(setup):
  _, data, _ = setup
  with pytest.raises(ValueError, match=r"'CheckpointDense_0' .* inside nn.remat.*without "
                     r"nn.remat.*traced_layers.*\('Dense_0',\)"):
    tfl.make_model(Remat(), input_shape=(4,), num_classes=3)
  with pytest.raises(ValueError, match=r"'Scan_Body_0/Dense_0' .* inside nn.scan.*unroll"):
    tfl.make_model(Scanned(), input_shape=(4,), num_classes=3)
  # The old hint (a block naming the scan) led to an error blaming input_shape.
  with pytest.raises(ValueError, match=r"'Scan_Body_0' .* inside nn.scan") as err:
    tfl.make_model(Scanned(), input_shape=(4,), num_classes=3,
                   traced_layers=[("Scan_Body_0",), ("Dense_0",)])
  assert "input_shape" not in str(err.value)
  # The fix named works: trained with remat, traced at the layers outside it.
  model = tfl.make_model(Remat(), input_shape=(4,), num_classes=3, traced_layers=[("Dense_0",)])
  alg = tfl.federated_averaging(model, optax.sgd(0.1), batch_size=6, local_epochs=1,
                                strategy="vmap")
  _, out = alg.round(alg.init(model.init(jax.random.key(0))), [0, 1, 2], data,
                     jax.random.key(1))
  result = tfl.trace_clients(model, out.variables, out.clients.variables, data.x[:4])
  assert np.all(np.isfinite(np.asarray(result.scores)))


def test_save_and_load_server_state_check_the_template(setup, tmp_path):
  model, data, variables = setup
  adam = _alg(model, server_optimizer=tfl.server_optimizer("adam", 0.05))
  state, _ = tfl.run_rounds(adam, adam.init(variables), data, rounds=2, clients_per_round=3,
                            divergence_factor=0)
  path = tmp_path / "server.msgpack"
  tfl.save_server_state(path, state, label="fedadam")
  back = tfl.load_server_state(path, adam.init(variables), label="fedadam")
  assert back.round == 2
  jax.tree.map(np.testing.assert_array_equal, back, state)
  yogi = _alg(model, server_optimizer=tfl.server_optimizer("yogi", 0.05))
  with pytest.raises(ValueError, match="'fedadam', not 'fedyogi'"):
    tfl.load_server_state(path, yogi.init(variables), label="fedyogi")
  for other, diff in ((_alg(model, server_optimizer=tfl.server_optimizer("sgd", 1.0,
                                                                         momentum=0.9)),
                       "ScaleByAdamState, template TraceState"),
                      (_alg(model), "opt_state:type: file tuple, template None")):
    with pytest.raises(ValueError, match=f"does not fit the template.*{diff}"):
      tfl.load_server_state(path, other.init(variables))


def test_nonfinite_clients_reach_a_median_when_allowed(setup):
  model, _, variables = setup
  data = _data(nan_client=2)
  alg = _alg(model, aggregator=robust.median())
  kw = dict(rounds=2, clients_per_round=5, divergence_factor=0)
  with pytest.raises(tfl.TrainingDivergedError, match=r"clients \[2\].*allow_nonfinite"):
    tfl.run_rounds(alg, alg.init(variables), data, **kw)
  state, rows = tfl.run_rounds(alg, alg.init(variables), data, allow_nonfinite_clients=True,
                               **kw)
  assert [r["nonfinite_clients"] for r in rows] == [[2], [2]]
  assert all(np.isfinite(r["client_loss"]) for r in rows)
  # Round 1 by hand: the median sorts a NaN last, so of the 5 values of a coordinate it
  # takes the 3rd smallest with the NaN as the largest.
  _, out = alg.round(alg.init(variables), np.arange(5), data,
                     tfl.round_key(jax.random.key(0), 1))
  assert any(np.isnan(np.asarray(a[2])).any() for a in jax.tree.leaves(out.clients.variables))
  for theta, got in zip(jax.tree.leaves(out.clients.variables), jax.tree.leaves(out.variables)):
    theta = np.asarray(theta, np.float64)
    want = np.sort(np.where(np.isnan(theta), np.inf, theta), axis=0)[2]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(state.variables))
  # The mean has no defence: the run stops on the non-finite global model.
  mean = _alg(model)
  with pytest.raises(tfl.TrainingDivergedError, match="non-finite parameters"):
    tfl.run_rounds(mean, mean.init(variables), data, allow_nonfinite_clients=True, **kw)
