"""The comparison's yardstick (issue 33): truths over seeds with their ceiling, top-1 among
the clients that could be responsible, and bootstrap intervals, each against a plain loop."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats

from tracefl_jax.provenance import intervals, retrained


def test_truth_over_seeds_against_a_plain_loop():
  rng = np.random.default_rng(0)
  c, s, m, n = 5, 3, 4, 6
  masks, index = retrained.seeded_truth_masks(c, m, seed=2, num_seeds=s)
  assert sum(len(masks.entries(f)[0]) for f in range(len(masks))) == s * c + m * (c - c // 2)
  masks = np.asarray(masks)  # sparse: one entry per left-out client
  assert masks.shape == (s * (1 + c) + m, c) and index.tolist()[:2 * (1 + c)] == (
      [0] * (1 + c) + [1] * (1 + c))
  np.testing.assert_array_equal(masks[s * (1 + c):], retrained.subset_masks(c, m, seed=2))
  for k in range(s):
    block = masks[k * (1 + c):(k + 1) * (1 + c)]
    np.testing.assert_array_equal(block[0], 1.0)
    np.testing.assert_array_equal(block[1:], 1.0 - np.eye(c))
  outputs = rng.normal(size=(len(masks), n))
  truth = retrained.truth_over_seeds(outputs, c, s, masks[s * (1 + c):])
  drops = np.zeros((s, n, c))
  for k in range(s):
    for client in range(c):
      for i in range(n):
        drops[k, i, client] = outputs[k * (1 + c), i] - outputs[k * (1 + c) + 1 + client, i]
  np.testing.assert_allclose(truth.seed_drops, drops)
  np.testing.assert_allclose(truth.drops, drops.mean(0))
  np.testing.assert_array_equal(truth.top_client, drops.mean(0).argmax(1))
  agree, rho = [], []
  for a, b in itertools.combinations(range(s), 2):
    agree.append(np.mean(drops[a].argmax(1) == drops[b].argmax(1)))
    rho += [scipy.stats.spearmanr(drops[a, i], drops[b, i]).statistic for i in range(n)]
  assert truth.ceiling_top1 == pytest.approx(np.mean(agree))
  assert truth.ceiling_spearman == pytest.approx(np.mean(rho))
  assert retrained.truth_over_seeds(outputs[1 + c:2 * (1 + c)], c, 1).ceiling_top1 is None
  # Top-1 among the candidates only: a method scoring every participant below 0 names a
  # participant, not a client at 0 that could not be responsible.
  scores = -np.ones((n, c)) - rng.uniform(size=(n, c))
  scores[:, 4] = 0.0  # not a participant
  top = retrained.restricted_top(scores, np.array([1, 1, 1, 1, 0], bool))
  np.testing.assert_array_equal(top, scores[:, :4].argmax(1))
  assert retrained.compare(scores, truth)["retrain_top1"] == np.mean(truth.top_client == 4)
  with pytest.raises(ValueError, match="at least one candidate"):
    retrained.restricted_top(scores, np.zeros(c, bool))


def test_intervals_against_a_plain_loop():
  rng = np.random.default_rng(1)
  n, c, m, draws = 12, 5, 8, 200
  a, b = rng.uniform(size=n) > 0.4, rng.uniform(size=n) > 0.6
  got = intervals.mean_interval(a, draws=draws, seed=3)
  idx = np.random.default_rng(3).integers(0, n, (draws, n))
  means = [np.mean([a[j] for j in row]) for row in idx]
  assert got.value == pytest.approx(a.mean())
  assert (got.low, got.high) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
  diff = intervals.paired_interval(a, b, draws=draws, seed=3)
  d = [np.mean([float(a[j]) - float(b[j]) for j in row]) for row in idx]
  assert diff.value == pytest.approx(np.mean(a.astype(float) - b))
  assert (diff.low, diff.high) == pytest.approx(tuple(np.quantile(d, [0.025, 0.975])))
  assert diff.p == pytest.approx(min(1.0, 2 * min(np.mean(np.asarray(d) <= 0),
                                                  np.mean(np.asarray(d) >= 0))))
  # LDS: Spearman over subsets of the summed scores, resampled over subsets.
  scores, other = rng.normal(size=(n, c)), rng.normal(size=(n, c))
  masks = retrained.subset_masks(c, m, seed=0)
  outputs = masks @ scores.T + 0.5 * rng.normal(size=(m, n))

  def plain_lds(s, rows):
    vals = []
    for i in range(n):
      pred = [sum(s[i, j] * masks[r, j] for j in range(c)) for r in rows]
      rho = scipy.stats.spearmanr(pred, [outputs[r, i] for r in rows]).statistic
      if np.isfinite(rho):
        vals.append(rho)
    return np.mean(vals)

  lds = intervals.lds_interval(scores, masks, outputs, draws=50, seed=4)
  assert lds.value == pytest.approx(plain_lds(scores, range(m)))
  assert lds.value == pytest.approx(np.nanmean(retrained.lds(scores, masks, outputs)))
  rows = np.random.default_rng(4).integers(0, m, (50, m))
  want = [plain_lds(scores, r) for r in rows]
  assert (lds.low, lds.high) == pytest.approx(tuple(np.quantile(want, [0.025, 0.975])))
  paired = intervals.paired_lds_interval(scores, other, masks, outputs, draws=50, seed=4)
  want_d = [plain_lds(scores, r) - plain_lds(other, r) for r in rows]
  assert paired.value == pytest.approx(plain_lds(scores, range(m)) - plain_lds(other, range(m)))
  assert (paired.low, paired.high) == pytest.approx(tuple(np.quantile(want_d, [0.025, 0.975])))
  assert paired.p < 0.05  # the true scores beat unrelated ones


def test_compare_methods_rows_are_the_pieces():
  rng = np.random.default_rng(5)
  n, c, s, m = 10, 6, 2, 5
  masks, _ = retrained.seeded_truth_masks(c, m, seed=1, num_seeds=s)
  truth = retrained.truth_over_seeds(rng.normal(size=(len(masks), n)), c, s,
                                     masks[s * (1 + c):])
  scores = {"tracefl": rng.normal(size=(n, c)), "other": truth.drops + rng.normal(size=(n, c))}
  cand = {"tracefl": np.array([1, 1, 1, 0, 1, 1], bool)}
  rows = intervals.compare_methods(scores, truth, cand, draws=100, seed=2)
  for name, sc in scores.items():
    want = retrained.compare(sc, truth, cand.get(name))
    assert rows[name]["retrain_top1"] == pytest.approx(want["retrain_top1"])
    assert rows[name]["retrain_spearman"] == pytest.approx(want["retrain_spearman"])
    assert rows[name]["lds"] == pytest.approx(want["lds"])
    assert rows[name]["retrain_top1_low"] <= rows[name]["retrain_top1"] <= rows[name][
        "retrain_top1_high"]
  hit = lambda name: (retrained.restricted_top(scores[name], cand.get(name))  # noqa: E731
                      == truth.top_client).astype(float)
  diff = intervals.paired_interval(hit("other"), hit("tracefl"), draws=100, seed=2)
  assert rows["other"]["retrain_top1_diff"] == pytest.approx(diff.value)
  assert rows["other"]["retrain_top1_diff_p"] == pytest.approx(diff.p)
  assert "retrain_top1_diff" not in rows["tracefl"] and "lds_diff" in rows["other"]


def test_topk_removal_against_a_plain_loop():
  import jax
  import optax
  from tests.test_retraining import MLP, _kw
  from tracefl_jax.data.federated import federate
  from tracefl_jax.fl.rounds import federated_averaging
  from tracefl_jax.models import make_model
  from tracefl_jax.provenance import retraining, topk_removal

  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 120)
  x = (rng.normal(size=(120, 4)) + 2.0 * np.eye(4)[y]).astype(np.float32)
  parts = np.split(rng.permutation(120), np.cumsum([10, 24, 14, 30, 18, 24])[:-1])
  data = federate(x, y, parts)
  model = make_model("mlp", MLP(), (4,), 3)
  algorithm = federated_averaging(model, optax.sgd(0.3), batch_size=8, local_epochs=1,
                                  strategy="scan")
  init = model.init(jax.random.key(0))
  kw = dict(rounds=2, clients_per_round=6, seed=0, batch_size=8, local_epochs=1)
  xs = x[:5]
  scores = {"a": rng.normal(size=(5, 6)), "b": rng.normal(size=(5, 6))}
  cand = {"a": np.array([1, 1, 1, 1, 0, 1], bool)}
  masks, rows = topk_removal.topk_masks(scores, (1, 2), 6, cand,
                                        random_candidates=np.ones(6, bool), seed=1)
  assert len(masks) == 2 * 3 * 5
  for f in range(len(masks)):  # each row leaves out its method's top k for its input
    if rows.method[f] == "random":
      assert len(masks.entries(f)[0]) == rows.k[f]
      continue
    s = np.where(cand.get(rows.method[f], np.ones(6, bool)), scores[rows.method[f]][rows.input[f]],
                 -np.inf)
    assert sorted(masks.entries(f)[0].tolist()) == sorted(np.argsort(-s)[:rows.k[f]].tolist())
  feds = retraining.retrain(algorithm, init, data, masks, **kw)
  base = retraining.retrain(algorithm, init, data, np.ones((1, 6), np.float32), **kw)
  target = np.asarray(model.logits(jax.tree.map(lambda a: a[0], base), xs)).argmax(1)
  out, pred = topk_removal.row_outputs(model, feds, xs, target, rows.input, "margin")
  for f in range(len(masks)):
    z = np.asarray(model.logits(jax.tree.map(lambda a, f=f: a[f], feds), xs[rows.input[f]][None]),
                   np.float64)[0]
    t = target[rows.input[f]]
    assert out[f] == pytest.approx(z[t] - np.log(np.exp(np.delete(z, t)).sum()), abs=1e-5)
    assert pred[f] == z.argmax()
  z = np.asarray(model.logits(jax.tree.map(lambda a: a[0], base), xs), np.float64)
  base_out = np.array([z[i, t] - np.log(np.exp(np.delete(z[i], t)).sum())
                       for i, t in enumerate(target)])
  table = topk_removal.topk_table(rows, out, pred, base_out, target, draws=50)
  for r in table:
    sel = [f for f in range(len(masks)) if rows.method[f] == r["method"] and rows.k[f] == r["k"]]
    assert r["drop"] == pytest.approx(np.mean([base_out[rows.input[f]] - out[f] for f in sel]),
                                      abs=1e-5)
    assert r["flip_rate"] == np.mean([pred[f] != target[rows.input[f]] for f in sel])
  assert {(r["method"], r["k"]) for r in table} == {(m, k) for m in ("a", "b", "random")
                                                    for k in (1, 2)}


def test_client_values_against_a_plain_loop():
  rng = np.random.default_rng(7)
  c, m, n = 6, 40, 3
  masks = retrained.subset_masks(c, m, seed=3)
  true = rng.normal(size=(n, c))
  outputs = masks @ true.T + 0.01 * rng.normal(size=(m, n))
  values = retrained.banzhaf(masks, outputs)
  for i in range(n):
    for j in range(c):
      with_j = [outputs[r, i] for r in range(m) if masks[r, j]]
      without = [outputs[r, i] for r in range(m) if not masks[r, j]]
      assert values[i, j] == pytest.approx(np.mean(with_j) - np.mean(without))
  # An additive utility: the datamodel recovers it, and Banzhaf ranks like it.
  fit = retrained.datamodel(masks, outputs, ridge=1e-6)
  # Half-subsets all hold C / 2 clients: the weights are known up to a shift common to all.
  np.testing.assert_allclose(fit - fit.mean(1, keepdims=True),
                             true - true.mean(1, keepdims=True), atol=0.05)
  assert np.mean([scipy.stats.spearmanr(values[i], true[i]).statistic for i in range(n)]) > 0.8
  assert np.isnan(retrained.banzhaf(np.ones((4, c)), np.ones((4, n)))).all()
