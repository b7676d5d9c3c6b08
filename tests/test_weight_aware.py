"""Weight-aware provenance (`trace_clients(score="first_order")`): the first-order
leave-one-client-out drop, against a plain gradient recomputation and the exact removal."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracefl_jax.fl.aggregation import fedavg
from tracefl_jax.models import make_model
from tracefl_jax.provenance import counterfactual as cf
from tracefl_jax.provenance import protocol, trace_clients


class MLP(nn.Module):
  """Two Dense units, every parameter traced: T_k - T_G is the whole first-order term."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.tanh(nn.Dense(12)(x.reshape(x.shape[0], -1)))
    return nn.Dense(4)(x)


@pytest.fixture(scope="module")
def case():
  model = make_model("mlp", MLP(), (3, 3, 2), 4)
  g0 = model.init(jax.random.key(0))
  k = 40
  keys = iter(jax.random.split(jax.random.key(1), 8))
  # Clients near a common point with unequal spreads, as after a round of local training.
  spread = jnp.exp(jax.random.normal(next(keys), (k,)))
  clients = {"params": jax.tree.map(
      lambda a: a[None] + 0.02 * spread.reshape(-1, *([1] * a.ndim))
      * jax.random.normal(next(keys), (k, *a.shape)), g0["params"])}
  weights = np.asarray(jax.random.uniform(next(keys), (k,), minval=0.2, maxval=5.0),
                       np.float32)
  x = jax.random.normal(jax.random.key(9), (24, 3, 3, 2))
  return model, clients, weights, fedavg(clients, weights), x


def test_first_order_equals_a_plain_gradient_recomputation(case):
  model, clients, w, g, x = case
  res = trace_clients(model, g, clients, x, score="first_order", weights=w)
  pred = np.asarray(res.predicted)

  def s(params, n):
    return model.logits({"params": params}, x[n:n + 1])[0, pred[n]]

  def flat(tree):
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])

  total = w.astype(np.float64).sum()
  grads = np.stack([flat(jax.grad(s)(g["params"], n)) for n in range(x.shape[0])])  # [N, P]
  diffs = np.stack([flat(jax.tree.map(lambda c, gg: c[k] - gg, clients["params"],
                                      g["params"])) for k in range(len(w))])   # [K, P]
  expected = (grads @ diffs.T) * (w / (total - w))[None, :]
  scale = np.abs(expected).max()
  np.testing.assert_allclose(res.scores, expected, atol=2e-5 * scale)
  assert np.ptp(expected, axis=1).min() > 1e-3 * scale  # clients really differ
  # The same numbers from every kernel, chunked, and per layer.
  for kw in ({"kernel": "reference", "clients_per_chunk": 7},
             {"kernel": "jvp", "return_layers": True}):
    other = trace_clients(model, g, clients, x, score="first_order", weights=w, **kw)
    np.testing.assert_allclose(other.scores, res.scores, atol=2e-5 * scale)
  layers = trace_clients(model, g, clients, x, score="first_order", weights=w,
                         return_layers=True).layer_scores
  np.testing.assert_allclose(np.asarray(layers).sum(0), res.scores, atol=2e-5 * scale)
  np.testing.assert_allclose(res.probs, jax.nn.softmax(res.scores, axis=-1), rtol=1e-5)
  # The paper's score is unchanged by default and differs from the weight-aware one.
  paper = trace_clients(model, g, clients, x)
  assert np.mean(np.asarray(paper.traced_position) != np.asarray(res.traced_position)) > 0.2
  assert paper.first_order_scores is None
  # Given the weights, the paper's score carries the weight-aware one from the same pass,
  # with every kernel (jvp then scores per layer), and its own scores are unchanged.
  for kernel in ("grad", "jvp", "reference"):
    both = trace_clients(model, g, clients, x, weights=w, kernel=kernel)
    np.testing.assert_allclose(both.first_order_scores, res.scores, atol=2e-5 * scale)
    np.testing.assert_allclose(both.scores, paper.scores, rtol=1e-5,
                               atol=1e-6 * np.abs(paper.scores).max())


def test_first_order_ranks_clients_as_the_exact_removal(case):
  model, clients, w, g, x = case
  drops = np.asarray(cf.leave_one_out(model, clients, w, x, global_vars=g).drops)
  fo = np.asarray(trace_clients(model, g, clients, x, score="first_order", weights=w).scores)
  paper = np.asarray(trace_clients(model, g, clients, x, use_decay=False).scores)
  ours = cf.counterfactual_agreement(fo, drops)
  theirs = cf.counterfactual_agreement(paper, drops)
  assert ours["top1_agreement"] >= 0.95 and ours["spearman_mean"] > 0.99, ours
  # Unequal weights: T alone is not the drop.
  assert theirs["spearman_mean"] < ours["spearman_mean"] - 0.1, theirs
  assert theirs["top1_agreement"] < ours["top1_agreement"] - 0.2, theirs
  np.testing.assert_allclose(fo, drops, atol=0.05 * np.abs(drops).max())


def test_bad_arguments_are_named(case):
  model, clients, w, g, x = case
  k = len(w)
  with pytest.raises(ValueError, match="needs weights"):
    trace_clients(model, g, clients, x, score="first_order")
  with pytest.raises(ValueError, match=r"score='loo'; valid: tracefl, first_order"):
    trace_clients(model, g, clients, x, score="loo")
  alone = np.zeros(k, np.float32)
  alone[3] = 1.0
  with pytest.raises(ValueError, match=r"position\(s\) \[3\] hold all"):
    trace_clients(model, g, clients, x, score="first_order", weights=alone)
  with pytest.raises(ValueError, match="finite and >= 0"):
    trace_clients(model, g, clients, x, score="first_order", weights=-w)
  with pytest.raises(ValueError, match="use_size_factor"):
    trace_clients(model, g, clients, x, score="first_order", weights=w, use_size_factor=True,
                  client_sizes=np.ones(k))
  with pytest.raises(ValueError, match="client_ids has dtype float"):
    trace_clients(model, g, clients, x, client_ids=np.arange(k, dtype=np.float32))
  big = np.arange(k, dtype=np.int64)
  big[5] = 2**31
  with pytest.raises(ValueError, match=r"client_ids\[5\]=2147483648 is out of range"):
    trace_clients(model, g, clients, x, client_ids=big)
  with pytest.raises(ValueError, match=r"client_ids\[0\]=-1 .*unattributable"):
    trace_clients(model, g, clients, x, client_ids=np.arange(-1, k - 1))
  with pytest.raises(ValueError, match="score='x' is not one of"):
    protocol.ProtocolSettings(score="x")


def test_largest_client_ties_count_as_ties():
  counts = np.array([[4, 4], [8, 0], [0, 8], [1, 1]])  # three clients of 8 examples
  base = protocol.round_baselines(counts, np.array([0]), np.array([0]), faulty_local=[0])
  assert base["largest_client_baseline"] == pytest.approx(1 / 3)  # not 1.0 by position
  base = protocol.round_baselines(counts, np.array([0, 1]), np.array([0, 0]))
  # Label 0 held by clients 0 and 1 of the tied three, label 1 by clients 0 and 2.
  assert base["largest_client_baseline"] == pytest.approx(2 / 3)


def test_protocol_traces_with_the_weight_aware_score(case):
  model, clients, w, g, x = case
  k = len(w)
  logits = np.asarray(model.logits(g, x))
  pred = logits.argmax(1)
  label_counts = np.ones((k, 4), np.int64)
  settings = protocol.ProtocolSettings(score="first_order", per_label=5)
  traced = protocol.trace_round(model, g, clients, client_ids=np.arange(k),
                                client_sizes=np.full(k, 4), label_counts=label_counts,
                                x_test=x, y_test=pred, predictions=pred, settings=settings,
                                weights=w)
  fo = trace_clients(model, g, clients, x[traced.inputs], score="first_order", weights=w)
  np.testing.assert_allclose(traced.probs, fo.probs, rtol=1e-5, atol=1e-7)
  assert traced.summary["score"] == "first_order"
  assert traced.summary["counterfactual_top1"] >= 0.75
  # The paper's score reports the weight-aware one beside it, against the same truth.
  paper = protocol.trace_round(model, g, clients, client_ids=np.arange(k),
                               client_sizes=np.full(k, 4), label_counts=label_counts,
                               x_test=x, y_test=pred, predictions=pred,
                               settings=protocol.ProtocolSettings(per_label=5), weights=w)
  assert paper.summary["first_order_counterfactual_top1"] == pytest.approx(
      traced.summary["counterfactual_top1"])
  assert (paper.summary["first_order_counterfactual_spearman"]
          > paper.summary["counterfactual_spearman"] + 0.1)
  assert paper.summary["first_order_accuracy"] == 1.0  # every client holds every label here
  skipped = protocol.trace_round(model, g, clients, client_ids=np.arange(k),
                                 client_sizes=np.full(k, 4), label_counts=label_counts,
                                 x_test=x, y_test=pred, predictions=pred, settings=settings)
  assert skipped.summary["skipped"] and "weights" in skipped.summary["reason"]


def test_protocol_judges_the_leave_one_out_client_by_the_modes_rule(case):
  # counterfactual_accuracy: the localization rule applied to the client whose removal lowers
  # the predicted logit most (the fade's question: does the truth itself pass the rule?).
  model, clients, w, g, x = case
  k = len(w)
  pred = np.asarray(model.logits(g, x)).argmax(1)
  label_counts = np.asarray(jax.random.bernoulli(jax.random.key(3), 0.5, (k, 4)), np.int64)
  settings = protocol.ProtocolSettings(per_label=5)
  traced = protocol.trace_round(model, g, clients, client_ids=np.arange(k),
                                client_sizes=np.full(k, 4), label_counts=label_counts,
                                x_test=x, y_test=pred, predictions=pred, settings=settings,
                                weights=w)
  drops = np.asarray(cf.leave_one_out(model, clients, w, x[traced.inputs], global_vars=g).drops)
  top = drops.argmax(1)
  np.testing.assert_array_equal(traced.counterfactual_client, top)
  want = np.mean(label_counts[top, pred[traced.inputs]] > 0)
  assert 0.0 < want < 1.0  # the case tells a rule that holds from one that does not
  assert traced.summary["counterfactual_accuracy"] == pytest.approx(want)
  faulty = protocol.trace_round(
      model, g, clients, client_ids=np.arange(k), client_sizes=np.full(k, 4),
      label_counts=label_counts, x_test=x, y_test=(pred + 1) % 4, predictions=pred,
      settings=protocol.ProtocolSettings(mode="faulty", faulty_clients=(int(top[0]),),
                                         flip={c: int(pred[traced.inputs][0]) for c in range(4)}),
      weights=w)
  drops = np.asarray(cf.leave_one_out(model, clients, w, x[faulty.inputs], global_vars=g).drops)
  assert faulty.summary["counterfactual_accuracy"] == pytest.approx(
      np.mean(drops.argmax(1) == top[0]))
