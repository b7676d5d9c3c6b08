"""Algorithms as pieces: aggregation rules against NumPy, the server optimizer against optax by
hand, FedProx's gradient, exact resume of a FedAdam run, the leave-one-out truth for every
rule, and the round's argument errors."""

from __future__ import annotations

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tracefl_jax as tfl
from tracefl_jax.fl import losses, robust
from tracefl_jax.fl.algorithm import leave_one_out_variables
from tracefl_jax.fl.client import make_client_update
from tracefl_jax.fl.server import server_optimizer
from tracefl_jax.provenance.counterfactual import remove_client


# ------------------------------------------------------------------ rules against NumPy

def _stacked(k=6, seed=0):
  rng = np.random.default_rng(seed)
  return {"params": {"w": rng.normal(size=(k, 3, 2)).astype(np.float32),
                     "b": rng.normal(size=(k, 2)).astype(np.float32)},
          "batch_stats": {"n": rng.integers(0, 50, size=(k, 2)).astype(np.int32)}}


WEIGHTS = np.array([3.0, 0.0, 1.0, 2.0, 5.0, 1.0], np.float32)  # client 1 absent


def _np_trimmed(a, beta):
  s = np.sort(a, axis=0)
  cut = int(beta * a.shape[0])
  return s[cut:a.shape[0] - cut].mean(axis=0)


def _np_krum(flat, f, m):
  n = len(flat)
  d2 = ((flat[:, None] - flat[None]) ** 2).sum(-1)
  closest = max(n - f - 2, 1)
  scores = np.array([np.sort(np.delete(d2[i], i))[:closest].sum() for i in range(n)])
  return np.argsort(scores, kind="stable")[:m]


@pytest.mark.parametrize("rule, reference", [
    (robust.median(), lambda a: np.median(a, axis=0)),
    (robust.trimmed_mean(0.2), lambda a: _np_trimmed(a, 0.2)),
    (robust.trimmed_mean(0.34), lambda a: _np_trimmed(a, 0.34)),
])
def test_coordinatewise_rules_match_numpy_over_present_clients(rule, reference):
  stacked = _stacked()
  present = WEIGHTS > 0
  got = jax.jit(rule)(stacked, WEIGHTS)
  for leaf, out in zip(jax.tree.leaves(stacked), jax.tree.leaves(got)):
    want = reference(np.asarray(leaf, np.float64)[present])
    out = np.asarray(out)
    if leaf.dtype == np.int32:
      np.testing.assert_array_equal(out, np.round(want).astype(np.int32))
    else:
      np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("f, m", [(1, 1), (0, 2), (2, 3)])
def test_krum_selects_numpy_krum_among_present_clients(f, m):
  stacked = _stacked(seed=1)
  present = np.flatnonzero(WEIGHTS > 0)
  # Shift every model far from 0: the distances must survive (no Gram cancellation).
  stacked["params"]["w"] = stacked["params"]["w"] + 1e3
  flat = np.concatenate([np.asarray(leaf, np.float64).reshape(len(WEIGHTS), -1)[present]
                         for leaf in jax.tree.leaves(stacked["params"])], axis=1)
  # (integer leaves, counters, take no part in the distances)
  chosen = present[_np_krum(flat, f, m)]
  got = jax.jit(robust.krum(f, m))(stacked, WEIGHTS)
  want = np.asarray(stacked["params"]["w"], np.float64)[chosen].mean(axis=0)
  np.testing.assert_allclose(np.asarray(got["params"]["w"]), want, rtol=1e-6)


def test_weight_zero_is_absence_and_rules_vmap_over_federations():
  stacked = _stacked()
  for rule in (robust.median(), robust.trimmed_mean(0.2), robust.krum(1), robust.weighted_mean()):
    dropped = jax.tree.map(lambda a: a[WEIGHTS > 0], stacked)
    np.testing.assert_allclose(np.asarray(rule(stacked, WEIGHTS)["params"]["w"]),
                               np.asarray(rule(dropped, WEIGHTS[WEIGHTS > 0])["params"]["w"]),
                               rtol=1e-6, atol=1e-6)
    masks = np.array([WEIGHTS, WEIGHTS * (np.arange(6) != 2), WEIGHTS * (np.arange(6) != 4)])
    batched = jax.jit(jax.vmap(rule, in_axes=(None, 0)))(stacked, masks)
    for f in range(3):
      np.testing.assert_allclose(np.asarray(batched["params"]["b"][f]),
                                 np.asarray(rule(stacked, masks[f])["params"]["b"]),
                                 rtol=1e-6, atol=1e-6)


def test_rule_and_server_optimizer_errors():
  with pytest.raises(ValueError, match="beta=0.5"):
    robust.trimmed_mean(0.5)
  with pytest.raises(ValueError, match="unknown aggregation rule 'avg'.*median"):
    robust.make_rule("avg")
  with pytest.raises(ValueError, match="unknown server optimizer 'rmsprop'.*adam"):
    server_optimizer("rmsprop", 0.1)
  with pytest.raises(ValueError, match="all the weight|weight 0"):
    robust.median()(_stacked(), np.zeros(6, np.float32))
  with pytest.raises(ValueError, match="mu=-1"):
    losses.fedprox(-1.0)


# ------------------------------------------------------------------------ rounds

class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 90).astype(np.int32)
  x = (rng.normal(size=(90, 4)) + y[:, None]).astype(np.float32)
  data = tfl.federate(x, y, [np.arange(i, 90, 5) for i in range(5)])
  model = tfl.make_model(MLP(), input_shape=(4,), num_classes=3)
  return model, data, model.init(jax.random.key(0))


def _alg(model, **kw):
  return tfl.federated_averaging(model, optax.sgd(0.1), batch_size=6, local_epochs=1,
                                 strategy="vmap", **kw)


def test_server_optimizer_applies_optax_to_the_pseudo_gradient(setup):
  model, data, variables = setup
  key = jax.random.key(3)
  plain = _alg(model)
  _, ref = plain.round(plain.init(variables), [0, 2, 4], data, key)
  adam = optax.adam(0.05, b1=0.9, b2=0.99, eps=1e-3)
  fedadam = _alg(model, server_optimizer=adam)
  state = fedadam.init(variables)
  new, out = fedadam.round(state, [0, 2, 4], data, key)
  # By hand: the aggregate is FedAvg's, the update is adam on G - A.
  grad = jax.tree.map(lambda g, a: g - a, variables["params"], ref.variables["params"])
  updates, opt_state = adam.update(grad, adam.init(variables["params"]), variables["params"])
  want = optax.apply_updates(variables["params"], updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               new.variables["params"], want)
  assert new.round == 1 and out.previous.variables is state.variables
  jax.tree.map(np.testing.assert_array_equal, new.opt_state, opt_state)
  # sgd(1.0) is FedAvg up to rounding.
  sgd_state, _ = _alg(model, server_optimizer=optax.sgd(1.0)).round(
      plain.init(variables)._replace(opt_state=optax.sgd(1.0).init(variables["params"])),
      [0, 2, 4], data, key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               sgd_state.variables, ref.variables)


def test_fedadam_resumed_from_serialized_state_equals_uninterrupted(setup):
  model, data, variables = setup
  alg = _alg(model, server_optimizer=server_optimizer("adam", 0.05),
             aggregator=robust.trimmed_mean(0.2))
  full, _ = tfl.run_rounds(alg, alg.init(variables), data, rounds=4, clients_per_round=4,
                           seed=1, divergence_factor=0)
  half, _ = tfl.run_rounds(alg, alg.init(variables), data, rounds=2, clients_per_round=4,
                           seed=1, divergence_factor=0)
  blob = flax.serialization.to_bytes(half)
  template = alg.init(jax.tree.map(jnp.zeros_like, variables))
  restored = flax.serialization.from_bytes(template, blob)
  assert restored.round == 2
  resumed, _ = tfl.run_rounds(alg, restored, data, rounds=4, clients_per_round=4, seed=1,
                              divergence_factor=0)
  jax.tree.map(np.testing.assert_array_equal, resumed.variables, full.variables)
  jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, full.opt_state)
  with pytest.raises(ValueError, match="opt_state"):
    alg.round(tfl.ServerState(variables, 0), [0, 1], data, jax.random.key(0))


def test_leave_one_out_recomputes_the_rule_without_each_client(setup):
  model, data, variables = setup
  key = jax.random.key(5)
  clients = [0, 1, 3, 4]
  mean = _alg(model)
  _, out = mean.round(mean.init(variables), clients, data, key)
  loo = leave_one_out_variables(out)
  w = jnp.asarray(out.weights)
  for k in range(4):
    closed = remove_client(out.variables, jax.tree.map(lambda a: a[k], out.clients.variables),
                           w[k], jnp.sum(w))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[k], b, rtol=1e-5, atol=1e-6),
                 loo, closed)
  med = _alg(model, aggregator=robust.median(), server_optimizer=optax.sgd(0.5, momentum=0.9))
  state = med.init(variables)
  _, out = med.round(state, clients, data, key)
  jax.tree.map(np.testing.assert_array_equal, out.reaggregate(jnp.asarray(out.weights)),
               out.variables)
  loo = leave_one_out_variables(out, clients_per_chunk=2)
  thetas = np.asarray(out.clients.variables["params"]["Dense_1"]["kernel"], np.float64)
  for k in range(4):
    a = np.median(np.delete(thetas, k, axis=0), axis=0)
    g = np.asarray(variables["params"]["Dense_1"]["kernel"], np.float64)
    want = g - 0.5 * (g - a)  # first momentum step: the plain gradient step
    np.testing.assert_allclose(np.asarray(loo["params"]["Dense_1"]["kernel"][k]), want,
                               rtol=1e-5, atol=1e-6)


def test_fedprox_gradient_adds_mu_times_distance_to_global(setup):
  model, _, variables = setup
  rng = np.random.default_rng(2)
  xb = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  yb = jnp.asarray(rng.integers(0, 3, 6), jnp.int32)
  mask = jnp.array([True] * 5 + [False])
  moved = jax.tree.map(lambda p: p + 0.3, variables["params"])
  steps = {}
  for name, loss in (("ce", None), ("prox", losses.fedprox(0.7))):
    cu = make_client_update(model, optax.sgd(0.1), 6, 1, loss_fn=loss)
    state = cu.init(variables)._replace(params=moved)
    steps[name] = cu.train_step(state, xb, yb, mask, jax.random.key(0), variables["params"])
  # d/dtheta mu/2 ||theta - G||^2 = mu (theta - G) = 0.7 * 0.3; sgd moves by -0.1 times that.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a - b, -0.1 * 0.7 * 0.3, atol=1e-6),
               steps["prox"].params, steps["ce"].params)


def test_round_and_algorithm_argument_errors(setup):
  model, data, variables = setup
  alg = _alg(model)
  with pytest.raises(TypeError, match="key must be one JAX PRNG key.*int 1"):
    alg.round(alg.init(variables), [0, 1], data, key=1)
  for kw, match in ((dict(batch_size=0, local_epochs=1), "batch_size=0"),
                    (dict(batch_size=-2, local_epochs=1), "batch_size=-2"),
                    (dict(batch_size=4, local_epochs=0), "local_epochs=0")):
    with pytest.raises(ValueError, match=match):
      tfl.federated_averaging(model, optax.sgd(0.1), **kw)
  with pytest.raises(ValueError, match="DP-FedAvg.*median"):
    tfl.federated_averaging(model, optax.sgd(0.1), batch_size=4, local_epochs=1,
                            aggregator=robust.median(),
                            dp=tfl.DPSettings(1.0, 0.1, 2))


def test_config_translates_to_the_library_pieces():
  # pylint: disable=g-import-not-at-top
  from tracefl_jax.experiment.stages import algorithm_pieces
  from tracefl_jax.experiment.config import FIELD_HELP, base_config, validate
  c = base_config()
  assert algorithm_pieces(c) == {"loss_fn": None, "aggregator": None, "server_optimizer": None}
  for field in ("server.optimizer", "server.learning_rate", "aggregation.rule",
                "client.loss", "client.prox_mu"):
    assert field in FIELD_HELP
  c.server.optimizer, c.server.learning_rate = "adam", 0.03
  c.aggregation.rule, c.aggregation.trim_beta = "trimmed_mean", 0.25
  validate(c)
  pieces = algorithm_pieces(c)
  assert pieces["aggregator"].name == "trimmed_mean(0.25)"
  tree = {"w": jnp.arange(3.0)}
  got, _ = pieces["server_optimizer"].update(tree, pieces["server_optimizer"].init(tree))
  want, _ = optax.adam(0.03, b1=0.9, b2=0.99, eps=1e-3).update(tree, optax.adam(0.03).init(tree))
  np.testing.assert_allclose(got["w"], want["w"])
  c.client.loss, c.server.optimizer, c.aggregation.rule = "fedprox", "rmsprop", "krum"
  c.aggregation.num_selected, c.dp.enabled = 9, True
  with pytest.raises(ValueError) as err:
    validate(c)
  for text in ("server.optimizer='rmsprop' is not one of none, sgd, adam",
               "aggregation.num_selected=9 exceeds", "aggregation.rule must be 'mean'"):
    assert text in str(err.value)
