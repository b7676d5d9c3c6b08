"""FedDyn (fl/feddyn.py) against a plain NumPy per-client loop: the global model, the gradient
memories and h after three rounds of different sizes, each client's removal from the last
round, and the state's save/load."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tracefl_jax as tfl
from tests.linear_federation import grad, linear_federation, stacked
from tracefl_jax.fl.feddyn import FedDynState, feddyn

LR, ALPHA, EPOCHS = 0.3, 0.1, 2
SIZES = [6, 8, 10, 12]
SCHEDULE = [[0, 1, 2], [1, 3], [0, 1, 2, 3]]  # |P| changes, so does h's share |P| / m


@pytest.fixture(scope="module")
def setup():
  return linear_federation(SIZES, seed=0)


def _train(theta0, gi, x, y):
  theta = theta0.copy()
  for _ in range(EPOCHS):  # full-batch SGD on L_i - <g_i, theta> + alpha/2 ||theta - G||^2
    theta = theta - LR * (grad(theta, x, y) - gi + ALPHA * (theta - theta0))
  return theta


def _reference(variables, raw, schedule):
  """FedDyn one client at a time in float64 (params as one [5, 3] array: kernel over bias)."""
  x, y, parts = raw
  g_model = stacked(variables)
  m = len(parts)
  g, h = np.zeros((m, 5, 3)), np.zeros((5, 3))
  for clients in schedule:
    last = g_model, h.copy()
    thetas = {i: _train(g_model, g[i], x[parts[i]].astype(np.float64), y[parts[i]])
              for i in clients}
    for i in clients:
      g[i] -= ALPHA * (thetas[i] - g_model)
    h -= ALPHA / m * sum(thetas[i] - g_model for i in clients)
    g_model = np.mean([thetas[i] for i in clients], axis=0) - h / ALPHA
  g_prev, h_prev = last
  removed = []  # the last round without client k, every other state as it was
  for k in schedule[-1]:
    rest = [thetas[i] for i in schedule[-1] if i != k]
    h_k = h_prev - ALPHA / m * sum(t - g_prev for t in rest)
    removed.append(np.mean(rest, axis=0) - h_k / ALPHA)
  return g_model, g, h, removed


def _split(theta):
  return theta[:4], theta[4]


@pytest.mark.parametrize("strategy", ["vmap", "scan"])
def test_feddyn_matches_a_numpy_per_client_loop(setup, strategy, tmp_path):
  model, data, variables, raw = setup
  alg = feddyn(model, LR, ALPHA, batch_size=12, local_epochs=EPOCHS, strategy=strategy)
  state = alg.init(variables, num_clients=4)
  for r, clients in enumerate(SCHEDULE, 1):
    before = state.client_state
    state, out = alg.round(state, clients, data, jax.random.key(r))
    absent = np.array(sorted(set(range(4)) - set(clients)), np.int64)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a)[absent],
                                                            np.asarray(b)[absent]),
                 state.client_state, before)  # unsampled clients keep their memories
  want, g, h, removed = _reference(variables, raw, SCHEDULE)
  tol = dict(rtol=1e-4, atol=1e-5)
  got = state.variables["params"]["Dense_0"]
  for name, ref in zip(("kernel", "bias"), _split(want)):
    np.testing.assert_allclose(got[name], ref, **tol)
    np.testing.assert_allclose(state.client_state["Dense_0"][name],
                               g[:, :4] if name == "kernel" else g[:, 4], **tol)
    np.testing.assert_allclose(state.opt_state.h["Dense_0"][name], _split(h)[name == "bias"],
                               **tol)
  # h is the memories' mean over all m clients.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, np.mean(b, 0), **tol),
               state.opt_state.h, state.client_state)
  # Removing a client from the round removes it from the mean and from h's sum.
  weights = jnp.asarray(out.weights)
  jax.tree.map(np.testing.assert_array_equal, out.reaggregate(weights), out.variables)
  loo = tfl.leave_one_out_variables(out)["params"]["Dense_0"]
  for k, ref in enumerate(removed):
    np.testing.assert_allclose(loo["kernel"][k], _split(ref)[0], **tol)
    np.testing.assert_allclose(loo["bias"][k], _split(ref)[1], **tol)
  # Saved and restored with ServerState, h and the memories included.
  path = tmp_path / "feddyn.msgpack"
  tfl.save_server_state(path, state)
  back = tfl.load_server_state(path, alg.init(variables, num_clients=4))
  assert isinstance(back.opt_state, FedDynState)
  jax.tree.map(np.testing.assert_array_equal, back, state)


def test_feddyn_errors(setup):
  model, data, variables, _ = setup
  with pytest.raises(ValueError, match="alpha=0"):
    feddyn(model, LR, 0, batch_size=12, local_epochs=1)
  alg = feddyn(model, LR, ALPHA, batch_size=12, local_epochs=1, strategy="vmap")
  with pytest.raises(ValueError, match="num_clients=C"):
    alg.init(variables)
  plain = tfl.ServerState(variables, 0)
  with pytest.raises(ValueError, match="keeps h in opt_state"):
    alg.round(plain, [0, 1], data, jax.random.key(0))
