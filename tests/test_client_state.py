"""Per-client state and round hooks (issue 34 items 1-2): SCAFFOLD (option II) against a plain
NumPy per-client loop, unsampled clients keep their rows, the table is saved and restored with
ServerState; FedNova's rule gets the clients' step counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tracefl_jax as tfl
from tests.linear_federation import grad, linear_federation

LR, EPOCHS = 0.3, 2


@pytest.fixture(scope="module")
def setup():
  return linear_federation([6, 8, 10, 12], seed=0)


def _grad(w, b, x, y):
  g = grad(np.concatenate([w, b[None]]), x, y)
  return g[:-1], g[-1]


def _reference(variables, raw, schedule):
  """SCAFFOLD option II, one client at a time, float64; full-batch steps (batch >= sizes)."""
  x, y, parts = raw
  w = np.asarray(variables["params"]["Dense_0"]["kernel"], np.float64)
  b = np.asarray(variables["params"]["Dense_0"]["bias"], np.float64)
  cw, cb = np.zeros((4, *w.shape)), np.zeros((4, *b.shape))
  for clients in schedule:
    sw, sb = cw.mean(0), cb.mean(0)
    ys, news = [], []
    for i in clients:
      yw, yb = w.copy(), b.copy()
      for _ in range(EPOCHS):
        gw, gb = _grad(yw, yb, x[parts[i]].astype(np.float64), y[parts[i]])
        yw, yb = yw - LR * (gw - cw[i] + sw), yb - LR * (gb - cb[i] + sb)
      ys.append((yw, yb))
      news.append((cw[i] - sw + (w - yw) / (EPOCHS * LR), cb[i] - sb + (b - yb) / (EPOCHS * LR)))
    for i, (nw, nb) in zip(clients, news):
      cw[i], cb[i] = nw, nb
    w = np.mean([a for a, _ in ys], axis=0)
    b = np.mean([a for _, a in ys], axis=0)
  return w, b, cw, cb


@pytest.mark.parametrize("strategy", ["vmap", "scan"])
def test_scaffold_matches_a_numpy_per_client_loop(setup, strategy, tmp_path):
  model, data, variables, raw = setup
  alg = tfl.scaffold(model, LR, batch_size=12, local_epochs=EPOCHS, strategy=strategy)
  schedule = [[0, 1, 2], [1, 2, 3], [0, 2, 3]]
  state = alg.init(variables, num_clients=4)
  assert state.client_state["Dense_0"]["kernel"].shape == (4, 4, 3)
  for r, clients in enumerate(schedule, 1):
    before = state.client_state
    state, out = alg.round(state, clients, data, jax.random.key(r))
    absent = np.array(sorted(set(range(4)) - set(clients)))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a)[absent], np.asarray(b)[absent]),
                 state.client_state, before)  # unsampled clients keep their rows
    assert np.all(np.asarray(out.clients.num_steps) == EPOCHS)
    # The client models carry no state: aggregation and provenance see the models alone.
    assert jax.tree.structure(out.clients.variables) == jax.tree.structure(variables)
  w, b, cw, cb = _reference(variables, raw, schedule)
  got = state.variables["params"]["Dense_0"]
  np.testing.assert_allclose(got["kernel"], w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["bias"], b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state.client_state["Dense_0"]["kernel"], cw, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state.client_state["Dense_0"]["bias"], cb, rtol=1e-4, atol=1e-5)
  # The round's leave-one-out still re-runs its server side.
  jax.tree.map(np.testing.assert_array_equal, out.reaggregate(jnp.asarray(out.weights)),
               out.variables)
  # Checkpointed with ServerState; a template without the table is refused, naming it.
  path = tmp_path / "state.msgpack"
  tfl.save_server_state(path, state)
  back = tfl.load_server_state(path, alg.init(variables, num_clients=4))
  jax.tree.map(np.testing.assert_array_equal, back, state)
  with pytest.raises(ValueError, match="client_state/Dense_0/bias: file"):
    plain = tfl.federated_averaging(model, optax.sgd(LR), batch_size=12, local_epochs=1)
    tfl.load_server_state(path, plain.init(variables))


def test_client_state_errors(setup):
  model, data, variables, _ = setup
  alg = tfl.scaffold(model, LR, batch_size=12, local_epochs=1, strategy="vmap")
  with pytest.raises(ValueError, match="num_clients=C"):
    alg.init(variables)
  with pytest.raises(ValueError, match="2 rows for 4 clients"):
    alg.round(alg.init(variables, num_clients=2), [0, 1], data, jax.random.key(0))
  with pytest.raises(ValueError, match="vmap, chunked and scan"):
    tfl.scaffold(model, LR, batch_size=12, local_epochs=1, strategy="loop")


def test_fednova_rule_gets_the_step_counts(setup):
  model, data, variables, _ = setup
  alg = tfl.federated_averaging(model, optax.sgd(0.1), batch_size=4, local_epochs=2,
                                strategy="vmap", aggregator=tfl.fednova())
  _, out = alg.round(alg.init(variables), [0, 1, 2, 3], data, jax.random.key(1))
  tau = np.asarray(out.clients.num_steps, np.float64)
  np.testing.assert_array_equal(tau, 2 * np.ceil(np.array([6, 8, 10, 12]) / 4))
  p = np.asarray(out.weights, np.float64) / np.sum(out.weights)
  for leaf, theta, g in zip(jax.tree.leaves(out.variables),
                            jax.tree.leaves(out.clients.variables), jax.tree.leaves(variables)):
    g = np.asarray(g, np.float64)
    d = np.asarray(theta, np.float64) - g
    want = g + np.tensordot(p * (p @ tau) / tau, d, axes=1)
    np.testing.assert_allclose(np.asarray(leaf), want, rtol=1e-5, atol=1e-6)
  # Removal re-runs the rule with the same step counts.
  jax.tree.map(np.testing.assert_array_equal, out.reaggregate(jnp.asarray(out.weights)),
               out.variables)
