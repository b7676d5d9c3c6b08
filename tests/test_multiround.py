"""Multi-round provenance (`provenance.multiround`): the accumulated first-order effect of each
client over all rounds, against a plain recomputation; online == stored; one round == the
weight-aware score; the protocol callback reports it."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tracefl_jax.data.federated import federate
from tracefl_jax.fl.rounds import GlobalEvaluator, federated_averaging, run_rounds
from tracefl_jax.models import make_model
from tracefl_jax.provenance import protocol, round_callback, trace_clients
from tracefl_jax.provenance.multiround import MultiRoundAccumulator, multi_round_scores


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3)(nn.tanh(nn.Dense(8)(x.reshape(x.shape[0], -1))))


@pytest.fixture(scope="module")
def run():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 3, 90)
  x = (rng.normal(size=(90, 4)) + 2.0 * np.eye(4)[y]).astype(np.float32)
  parts = np.split(rng.permutation(90), [10, 25, 40, 60, 72])
  data = federate(x, y, parts)
  model = make_model("mlp", MLP(), (4,), 3)
  algorithm = federated_averaging(model, optax.sgd(0.3), batch_size=8, local_epochs=1,
                                  strategy="scan")
  rounds = []
  settings = protocol.ProtocolSettings(per_label=1, counterfactual=False)
  evaluator = GlobalEvaluator(model, x[:30], y[:30])
  acc = MultiRoundAccumulator(model.init(jax.random.key(0))["params"], 6, round_decay=0.5)
  traced = []
  traced_cb = round_callback.provenance_callback(model, evaluator, settings, rounds=[3],
                                           multi_round=acc,
                                           on_trace=lambda r, t: traced.append(t))

  def keep(info):
    out = info.output
    rounds.append((out.clients.variables, out.traced, out.weights, out.client_ids))

  state, history = run_rounds(algorithm, algorithm.init(model.init(jax.random.key(0))), data,
                              rounds=3, clients_per_round=4, seed=3,
                              callbacks=[keep, evaluator, traced_cb])
  return model, data, state.variables, rounds, acc, history, x, traced


def test_multi_round_equals_a_plain_sum_over_rounds(run):
  model, data, final, rounds, acc, history, x, _ = run
  xs = jnp.asarray(x[:9])
  res = acc.scores(model, final, xs)
  pred = np.asarray(res.predicted)

  def flat(tree):
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])

  grads = np.stack([flat(jax.grad(lambda p, n=n: model.logits({"params": p}, xs[n:n + 1])[
      0, pred[n]])(final["params"])) for n in range(9)])
  expected = np.zeros((9, 6))
  for r, (clients, g, w, ids) in enumerate(rounds, start=1):
    w = np.asarray(w, np.float64)
    for pos, c in enumerate(ids):
      shift = flat(jax.tree.map(lambda a, b: a[pos] - b, clients["params"], g["params"]))
      expected[:, c] += 0.5 ** (3 - r) * w[pos] / (w.sum() - w[pos]) * (grads @ shift)
  scale = np.abs(expected).max()
  np.testing.assert_allclose(res.scores, expected, atol=1e-4 * scale)
  np.testing.assert_array_equal(res.client_ids, np.arange(6))
  assert np.ptp(expected, axis=1).min() > 1e-3 * scale
  # From stored rounds, the same; one round alone is the weight-aware score of that round.
  stored = multi_round_scores(model, final, rounds, xs, 6, round_decay=0.5)
  np.testing.assert_allclose(stored.scores, res.scores, rtol=1e-5, atol=1e-6 * scale)
  clients, g, w, ids = rounds[-1]
  one = multi_round_scores(model, g, rounds[-1:], xs, 6)
  fo = trace_clients(model, g, clients, xs, score="first_order", weights=w)
  np.testing.assert_allclose(np.asarray(one.scores)[:, ids], fo.scores, rtol=1e-4,
                             atol=1e-5 * np.abs(fo.scores).max())
  assert set(np.flatnonzero(np.abs(np.asarray(one.scores)).max(0) == 0)) == (
      set(range(6)) - set(ids.tolist()))


def test_protocol_reports_multi_round_attribution(run):
  model, data, final, rounds, acc, history, x, traced = run
  assert "provenance" not in history[0] and acc.rounds == 3  # updated in untraced rounds too
  summary = history[2]["provenance"]
  (t,) = traced
  clients = np.asarray(summary["multiround_clients"])
  assert len(clients) == summary["inputs"] == len(t.inputs) > 0
  mr = acc.scores(model, final, jnp.asarray(x[t.inputs]))
  np.testing.assert_array_equal(clients, mr.traced_client)
  holds = data.label_counts[clients, t.labels] > 0
  assert summary["multiround_accuracy"] == pytest.approx(holds.mean())
  with pytest.raises(ValueError, match=r"client_ids=\[7\] must be"):
    acc.update(*rounds[0][:3], np.array([7]))
