"""q-FFL / q-FedAvg (fl/qffl.py, issue 34): the rule against the paper's Algorithm 2 written
in NumPy (float64), three rounds against a plain per-client loop (float32 library, float64
reference), q = 0 against FedAvg with the same weights, the start losses computed only for a
rule that reads them, and a round's removal of each client (online and stored)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tracefl_jax as tfl
from tests.linear_federation import linear_federation, stacked
from tracefl_jax.provenance import storage

LR, EPOCHS, SIZES = 0.3, 2, [6, 8, 10, 12]
SCHEDULE = [[0, 1, 2], [1, 2, 3], [0, 2, 3]]


@pytest.fixture(scope="module")
def setup():
  return linear_federation(SIZES, seed=1)


def _paper_step(w, wbars, losses, q, lip, present):
  """Algorithm 2's server step over flat float64 vectors, one client at a time."""
  num, den = np.zeros_like(w), 0.0
  for wbar, f, p in zip(wbars, losses, present):
    if not p:
      continue
    f = f + 1e-10
    delta = lip * (w - wbar)
    num += f ** q * delta
    den += q * f ** (q - 1) * np.sum(delta ** 2) + lip * f ** q
  return w - num / den


@pytest.mark.parametrize("q", [0.0, 0.5, 2.0])
def test_the_rule_is_the_papers_step_in_float64(q):
  rng = np.random.default_rng(0)
  w = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=4)}
  thetas = [{k: v + 0.1 * rng.normal(size=v.shape) for k, v in w.items()} for _ in range(4)]
  losses, present = rng.uniform(0.2, 2.0, 4), np.array([1.0, 1.0, 0.0, 1.0])
  flat = lambda t: np.concatenate([t["a"].ravel(), t["b"]])  # noqa: E731
  want = _paper_step(flat(w), [flat(t) for t in thetas], losses, q, 1 / LR, present)
  with jax.enable_x64(True):
    updates = {k: jnp.stack([t[k] - w[k] for t in thetas]) for k in w}
    step = tfl.qffl(q, 1 / LR).fn(updates, jnp.asarray(present), start_loss=jnp.asarray(losses))
    got = np.concatenate([np.asarray(w["a"] + step["a"]).ravel(), w["b"] + step["b"]])
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def _softmax_ce(theta, x, y):
  logits = x @ theta[:4] + theta[4]
  z = logits - logits.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  p = np.exp(logp)
  d = (p - np.eye(3)[y]) / len(y)
  return -logp[np.arange(len(y)), y].mean(), np.concatenate([x.T @ d, d.sum(0)[None]])


def _reference(variables, raw, schedule, q):
  """q-FedAvg one client at a time in float64: full-batch SGD (batch >= every client), F_k the
  mean cross-entropy at G before training; also the last round without each client."""
  x, y, parts = raw
  g = stacked(variables)
  for clients in schedule:
    thetas, losses = [], []
    for i in clients:
      xi, yi = x[parts[i]].astype(np.float64), y[parts[i]]
      losses.append(_softmax_ce(g, xi, yi)[0])
      theta = g.copy()
      for _ in range(EPOCHS):
        theta = theta - LR * _softmax_ce(theta, xi, yi)[1]
      thetas.append(theta.ravel())
    prev, g = g, _paper_step(g.ravel(), thetas, losses, q, 1 / LR, [1] * len(clients)
                             ).reshape(g.shape)
  removed = [_paper_step(prev.ravel(), thetas, losses, q, 1 / LR,
                         [int(j != k) for j in range(len(clients))]).reshape(g.shape)
             for k in range(len(clients))]
  return g, np.array(losses), removed


def _qffl(model, q, strategy="vmap"):
  return tfl.federated_averaging(model, optax.sgd(LR), batch_size=12, local_epochs=EPOCHS,
                                 weighting="uniform", strategy=strategy,
                                 aggregator=tfl.qffl(q, lipschitz=1 / LR))


def _run(alg, variables, data, schedule=SCHEDULE):
  state = alg.init(variables)
  for r, clients in enumerate(schedule, 1):
    state, out = alg.round(state, clients, data, jax.random.key(r))
  return state, out


@pytest.mark.parametrize("strategy", ["vmap", "scan"])
def test_three_rounds_match_a_per_client_loop(setup, strategy):
  model, data, variables, raw = setup
  state, out = _run(_qffl(model, 1.0, strategy), variables, data)
  want, losses, removed = _reference(variables, raw, SCHEDULE, 1.0)
  tol = dict(rtol=1e-4, atol=1e-5)
  got = state.variables["params"]["Dense_0"]
  np.testing.assert_allclose(got["kernel"], want[:4], **tol)
  np.testing.assert_allclose(got["bias"], want[4], **tol)
  np.testing.assert_allclose(out.clients.start_loss, losses, rtol=1e-5)
  assert out.aggregation == "qffl"
  # The leave-one-out truth re-runs q-FFL without client k (its loss out of both sums).
  loo = tfl.leave_one_out_variables(out)["params"]["Dense_0"]
  for k, ref in enumerate(removed):
    np.testing.assert_allclose(loo["kernel"][k], ref[:4], **tol)
    np.testing.assert_allclose(loo["bias"][k], ref[4], **tol)


def test_q_zero_is_fedavg_with_the_same_weights(setup):
  model, data, variables, _ = setup
  fedavg = tfl.federated_averaging(model, optax.sgd(LR), batch_size=4, local_epochs=EPOCHS,
                                   weighting="examples")
  q0 = tfl.federated_averaging(model, optax.sgd(LR), batch_size=4, local_epochs=EPOCHS,
                               weighting="examples", aggregator=tfl.qffl(0.0, 1 / LR))
  (a, out_a), (b, out_b) = _run(fedavg, variables, data), _run(q0, variables, data)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7),
               a.variables, b.variables)
  # Only the rule that reads them gets start losses; FedAvg's round computes none.
  assert out_a.clients.start_loss is None and out_b.clients.start_loss.shape == (3,)


def test_a_stored_qffl_round_reaggregates_as_the_online_one(setup, tmp_path):
  model, data, variables, _ = setup
  alg = _qffl(model, 1.0)
  _, out = _run(alg, variables, data, SCHEDULE[:2])
  path = storage.save_round(tmp_path / "round", out, round_idx=2, model=model)
  stored = storage.load_round(path, model, alg)
  reaggregate, kind = stored.removal()
  assert kind == "rule"
  masks = jnp.asarray(out.weights)[None] * (1 - jnp.eye(3))
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7),
               jax.vmap(reaggregate)(masks), tfl.leave_one_out_variables(out))


def test_qffl_errors():
  with pytest.raises(ValueError, match="lipschitz=0"):
    tfl.qffl(1.0, 0)
  with pytest.raises(ValueError, match="start_loss"):
    tfl.qffl(1.0, 1.0).fn({"w": jnp.ones((2, 3))}, jnp.ones(2))
