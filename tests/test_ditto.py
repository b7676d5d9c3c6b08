"""Ditto (fl/ditto.py, issue 34): the global model and every personal model against a plain
NumPy per-client loop (float64) over three rounds, unsampled clients keep their personal
models, G is FedAvg's bit for bit, per-client accuracy against a plain loop, and a personal model traced per client with
TraceFL (`trace_clients` on `personal_variables`)."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import tracefl_jax as tfl
from tests.linear_federation import grad, linear_federation, stacked

LR, LAM, EPOCHS, SIZES = 0.3, 0.5, 2, [6, 8, 10, 12]
SCHEDULE = [[0, 1, 2], [1, 3], [0, 2, 3]]


@pytest.fixture(scope="module")
def setup():
  return linear_federation(SIZES, seed=2)


def _reference(variables, raw, schedule):
  """Ditto one client at a time in float64, full-batch SGD (batch >= every client): theta_k
  from G on the cross-entropy, v_k from v_k on it plus LAM / 2 ||v - G||^2; G = mean theta_k."""
  x, y, parts = raw
  g = stacked(variables)
  v = np.repeat(g[None], len(parts), axis=0)
  for clients in schedule:
    thetas = []
    for i in clients:
      xi, yi = x[parts[i]].astype(np.float64), y[parts[i]]
      theta = g.copy()
      for _ in range(EPOCHS):
        theta = theta - LR * grad(theta, xi, yi)
        v[i] = v[i] - LR * (grad(v[i], xi, yi) + LAM * (v[i] - g))
      thetas.append(theta)
    g = np.mean(thetas, axis=0)
  return g, v


def _ditto(model, strategy="vmap", lam=LAM):
  return tfl.ditto(model, optax.sgd(LR), lam, batch_size=12, local_epochs=EPOCHS,
                   weighting="uniform", strategy=strategy)


@pytest.mark.parametrize("strategy", ["vmap", "scan"])
def test_global_and_personal_models_match_a_per_client_loop(setup, strategy):
  model, data, variables, raw = setup
  alg = _ditto(model, strategy)
  state = alg.init(variables, num_clients=4)
  for r, clients in enumerate(SCHEDULE, 1):
    before = state.client_state
    state, out = alg.round(state, clients, data, jax.random.key(r))
    absent = np.array(sorted(set(range(4)) - set(clients)), np.int64)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a)[absent],
                                                            np.asarray(b)[absent]),
                 state.client_state, before)  # unsampled clients keep their personal models
  want_g, want_v = _reference(variables, raw, SCHEDULE)
  tol = dict(rtol=1e-4, atol=1e-5)
  got = state.variables["params"]["Dense_0"]
  np.testing.assert_allclose(got["kernel"], want_g[:4], **tol)
  np.testing.assert_allclose(got["bias"], want_g[4], **tol)
  table = state.client_state["Dense_0"]
  np.testing.assert_allclose(table["kernel"], want_v[:, :4], **tol)
  np.testing.assert_allclose(table["bias"], want_v[:, 4], **tol)
  # The client models carry none of it: the global training is FedAvg's, the rule the mean.
  assert out.aggregation == "mean"
  one = tfl.personal_variables(state, 2)["params"]["Dense_0"]
  np.testing.assert_array_equal(one["kernel"], table["kernel"][2])


def test_the_global_model_is_fedavgs_bit_for_bit(setup):
  """The personal step reads G and writes only the table: G_t is FedAvg's, exactly."""
  model, data, variables, _ = setup
  alg = _ditto(model)
  fedavg = tfl.federated_averaging(model, optax.sgd(LR), batch_size=12, local_epochs=EPOCHS,
                                   weighting="uniform")
  state, plain = alg.init(variables, num_clients=4), fedavg.init(variables)
  for r, clients in enumerate(SCHEDULE, 1):
    state, _ = alg.round(state, clients, data, jax.random.key(r))
    plain, _ = fedavg.round(plain, clients, data, jax.random.key(r))
  jax.tree.map(np.testing.assert_array_equal, state.variables, plain.variables)


def test_personal_accuracy_is_each_clients_own(setup):
  model, data, variables, raw = setup
  x, y, parts = raw
  alg = _ditto(model)
  state = alg.init(variables, num_clients=4)
  for r, clients in enumerate(SCHEDULE, 1):
    state, _ = alg.round(state, clients, data, jax.random.key(r))
  held = [p[: len(p) // 2] for p in parts[:3]] + [np.array([], np.int64)]
  table = jax.tree.map(np.asarray, state.client_state["Dense_0"])
  want = [np.mean(np.argmax(x[p] @ table["kernel"][c] + table["bias"][c], 1) == y[p])
          if len(p) else np.nan for c, p in enumerate(held)]
  np.testing.assert_allclose(tfl.personal_accuracy(model, state, x, y, held), want)
  with pytest.raises(ValueError, match="2 clients' examples for a table of 4"):
    tfl.personal_accuracy(model, state, x, y, held[:2])


def test_a_personal_model_is_traced_per_client(setup):
  """TraceFL on a personal model: `trace_clients` with `personal_variables(state, k)` in G's
  place scores v_k's predictions over the round's client models. v_k is not the clients'
  aggregate, and the fast kernels stay exact for it (equal to the layer re-evaluation
  reference). At lam = 0 a client's personal model after its first round is its round-1
  client model (same start G_0, batches and steps)."""
  model, data, variables, raw = setup
  x, _, parts = raw
  alg = _ditto(model, lam=0.0)
  state, out = alg.round(alg.init(variables, num_clients=4), [0, 1, 2, 3], data,
                         jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, state.client_state,
               out.clients.variables["params"])
  state, out = alg.round(state, [0, 1, 3], data, jax.random.key(2))
  for k in (0, 2):  # client 2 sat round 2 out: its personal model is still theta_2 of round 1
    personal = tfl.personal_variables(state, k)
    scores = {kernel: np.asarray(tfl.trace_clients(
        model, personal, out.clients.variables, x[parts[k]], client_ids=out.client_ids,
        kernel=kernel).scores) for kernel in ("grad", "jvp", "reference")}
    assert scores["reference"].shape == (len(parts[k]), 3)
    np.testing.assert_allclose(scores["grad"], scores["reference"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores["jvp"], scores["reference"], rtol=1e-5, atol=1e-6)
    of_g = np.asarray(tfl.trace_clients(model, state.variables, out.clients.variables,
                                        x[parts[k]], kernel="reference").scores)
    assert not np.allclose(of_g, scores["reference"])  # v_k's own answer, not G's


def test_ditto_errors(setup):
  model, data, variables, _ = setup
  with pytest.raises(ValueError, match="lam=-1"):
    _ditto(model, lam=-1)
  with pytest.raises(ValueError, match="strategies vmap, chunked and scan"):
    _ditto(model, strategy="loop")
  with pytest.raises(ValueError, match="num_clients=C"):
    _ditto(model).init(variables)
