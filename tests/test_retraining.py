"""Retrained federations over a federation axis (`provenance.retraining`) and their truths
(`provenance.retrained`): batched == sequential == `run_rounds`, masks mean what they say."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from tracefl_jax.data.federated import federate
from tracefl_jax.fl import losses, robust
from tracefl_jax.fl.privacy import DPSettings
from tracefl_jax.fl.rounds import federated_averaging, run_rounds
from tracefl_jax.fl.server import server_optimizer
from tracefl_jax.models import make_model
from tracefl_jax.provenance import retrained, retraining

ROUNDS, PER_ROUND, BATCH, EPOCHS = 3, 3, 8, 1


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3)(nn.tanh(nn.Dense(8)(x.reshape(x.shape[0], -1))))


def _leaves(tree):
  return [np.asarray(a) for a in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def fed():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 120)
  x = (rng.normal(size=(120, 4)) + 2.0 * np.eye(4)[y]).astype(np.float32)
  sizes = [10, 24, 14, 30, 18, 24]
  parts = np.split(rng.permutation(120), np.cumsum(sizes)[:-1])
  model = make_model("mlp", MLP(), (4,), 3)
  algorithm = federated_averaging(model, optax.sgd(0.3), batch_size=BATCH,
                                  local_epochs=EPOCHS, strategy="scan")  # one compilation
  # A seed whose 3 rounds of 3 of 6 clients never sample some client.
  seed = next(s for s in range(200) if not retraining.participation(
      retraining.round_plan(federate(x, y, parts), rounds=ROUNDS, clients_per_round=PER_ROUND,
                            seed=s, batch_size=BATCH), 6).any(0).all())
  return model, algorithm, x, y, parts, seed, model.init(jax.random.key(seed))


def _kw(seed):
  return dict(rounds=ROUNDS, clients_per_round=PER_ROUND, seed=seed, batch_size=BATCH,
              local_epochs=EPOCHS)


def test_batched_federations_equal_sequential_retrainings_and_run_rounds(fed):
  model, algorithm, x, y, parts, seed, init = fed
  data = federate(x, y, parts)
  masks = retrained.truth_masks(6, num_subsets=2, seed=1)  # 10 federations
  data_seeds = np.full(len(masks), seed)
  data_seeds[1] = seed + 1  # the noise-floor federation
  batched = retraining.retrain(algorithm, init, data, masks, data_seeds=data_seeds,
                               federations_per_chunk=4, **_kw(seed))  # 4 + 4 + 2 (padded)
  for f in range(len(masks)):
    one = retraining.retrain_sequential(algorithm, init, data, masks[f],
                                        data_seed=data_seeds[f], **_kw(seed))
    for a, b in zip(_leaves(jax.tree.map(lambda v: v[f], batched)), _leaves(one)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  state, _ = run_rounds(algorithm, algorithm.init(init), data, rounds=ROUNDS,
                        clients_per_round=PER_ROUND, seed=seed)
  for a, b in zip(_leaves(jax.tree.map(lambda v: v[0], batched)), _leaves(state.variables)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Different masks and seeds do give different models (the comparison is not vacuous).
  finals = np.stack([np.concatenate([a.ravel() for a in _leaves(jax.tree.map(
      lambda v: v[f], batched))]) for f in range(len(masks))])
  sampled = retraining.participation(retraining.round_plan(
      data, rounds=ROUNDS, clients_per_round=PER_ROUND, seed=seed, batch_size=BATCH), 6).any(0)
  assert np.abs(finals[1] - finals[0]).max() > 1e-3
  for c in np.flatnonzero(sampled):
    assert np.abs(finals[2 + c] - finals[0]).max() > 1e-3

  # Truths from the logits: drops, noise and LDS agree with their definitions.
  xs = x[:7]
  target = np.asarray(model.logits(state.variables, xs)).argmax(1)
  logits = np.asarray(retrained.explained_logits(model, batched, xs, target))
  truth = retrained.with_subsets(retrained.truth_from_logits(logits, 6), masks[8:])
  np.testing.assert_allclose(truth.drops[:, 3], logits[0] - logits[5])
  np.testing.assert_allclose(truth.noise, np.abs(logits[0] - logits[1]))
  for c in np.flatnonzero(~sampled):
    np.testing.assert_allclose(truth.drops[:, c], 0.0, atol=1e-6)


def test_never_sampled_and_zero_weight_clients(fed):
  model, algorithm, x, y, parts, seed, init = fed
  data = federate(x, y, parts)
  sampled = retraining.participation(retraining.round_plan(
      data, rounds=ROUNDS, clients_per_round=PER_ROUND, seed=seed, batch_size=BATCH), 6).any(0)
  never = int(np.flatnonzero(~sampled)[0])
  # A sampled client that is not the largest (the padded client length stays the same).
  gone = int(next(c for c in np.flatnonzero(sampled) if len(parts[c]) < 30))
  masks = np.ones((3, 6), np.float32)
  masks[1, never] = 0
  masks[2, gone] = 0
  out = retraining.retrain(algorithm, init, data, masks, **_kw(seed))
  for a in _leaves(out):
    np.testing.assert_array_equal(a[1], a[0])
  # Never sampled: nothing changes, shown without `retrain`'s sharing of equal federations.
  plan = retraining.round_plan(data, rounds=ROUNDS, clients_per_round=PER_ROUND, seed=seed,
                               batch_size=BATCH)
  rows, inverse = retraining.distinct_federations(plan, masks, np.full(3, seed))
  np.testing.assert_array_equal(rows, [0, 2])
  np.testing.assert_array_equal(inverse, [0, 0, 1])
  rows, _ = retraining.distinct_federations(plan, masks, [seed, seed + 1, seed])
  np.testing.assert_array_equal(rows, [0, 1, 2])  # another data seed is another federation
  full = retraining.retrain_sequential(algorithm, init, data, masks[0], **_kw(seed))
  for a, b in zip(_leaves(full), _leaves(retraining.retrain_sequential(
      algorithm, init, data, masks[1], **_kw(seed)))):
    np.testing.assert_array_equal(a, b)
  without = [p if c != gone else np.zeros(0, np.int64) for c, p in enumerate(parts)]
  built = retraining.retrain_sequential(algorithm, init, federate(x, y, without),
                                        np.ones(6), **_kw(seed))
  for a, b in zip(_leaves(out), _leaves(built)):
    np.testing.assert_allclose(a[2], b, rtol=1e-5, atol=1e-6)
  assert max(np.abs(a[2] - a[0]).max() for a in _leaves(out)) > 1e-3


def _assert_close(a, b):
  for u, v in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def _row(batched, f):
  return jax.tree.map(lambda v: v[f], batched)


def test_server_optimizer_robust_rule_and_fedprox_retrain_like_run_rounds(fed):
  """FedAdam + trimmed mean + FedProx: each federation carries its own Adam state; batched
  (all at once, and chunked through `lax.map`) == sequential == `run_rounds`."""
  model, _, x, y, parts, seed, init = fed
  data = federate(x, y, parts)
  per_round = 5  # 5 present clients: trimmed_mean(0.2) cuts one from each end
  kw = dict(_kw(seed), clients_per_round=per_round)
  pieces = dict(batch_size=BATCH, local_epochs=EPOCHS, strategy="scan",
                loss_fn=losses.fedprox(0.5), aggregator=robust.trimmed_mean(0.2))
  algorithm = federated_averaging(model, optax.sgd(0.3), **pieces,
                                  server_optimizer=server_optimizer("adam", 0.05))
  plan = retraining.round_plan(data, rounds=ROUNDS, clients_per_round=per_round, seed=seed,
                               batch_size=BATCH)
  absent = int(np.setdiff1d(np.arange(6), plan[0]["client_ids"])[0])  # not in round 1
  gone = int(plan[1]["client_ids"][0])  # sampled in round 2
  masks = np.ones((4, 6), np.float32)
  masks[2, gone] = 0  # leave-one-out
  masks[3] = np.eye(6)[absent]  # round 1 has no participant: Adam's state must not move
  data_seeds = np.full(4, seed)
  data_seeds[1] = seed + 1
  batched = retraining.retrain(algorithm, init, data, masks, data_seeds=data_seeds, **kw)
  chunked = retraining.retrain(algorithm, init, data, masks, data_seeds=data_seeds,
                               federations_per_chunk=3, federation_strategy="map", **kw)
  _assert_close(chunked, batched)
  for f in range(len(masks)):
    _assert_close(_row(batched, f), retraining.retrain_sequential(
        algorithm, init, data, masks[f], data_seed=data_seeds[f], **kw))
  state, _ = run_rounds(algorithm, algorithm.init(init), data, rounds=ROUNDS,
                        clients_per_round=per_round, seed=seed)
  _assert_close(_row(batched, 0), state.variables)
  finals = np.stack([np.concatenate([a.ravel() for a in _leaves(_row(batched, f))])
                     for f in range(len(masks))])
  assert np.abs(finals[1:] - finals[0]).max(axis=1).min() > 1e-3
  # The server optimizer mattered: without it the same federation ends elsewhere.
  plain = federated_averaging(model, optax.sgd(0.3), **pieces)
  without = retraining.retrain_sequential(plain, init, data, masks[0], **kw)
  assert max(np.abs(a - b).max() for a, b in zip(
      _leaves(without), _leaves(state.variables))) > 1e-3


def test_dp_fedavg_retrains_like_run_rounds(fed):
  """DP-FedAvg's noise comes from the federation's round key: batched == sequential ==
  `run_rounds`, and a left-out client's federation shares the base one's noise draws."""
  model, _, x, y, parts, seed, init = fed
  data = federate(x, y, parts)
  dp = DPSettings(clip_norm=0.5, noise_multiplier=0.5, clients_per_round=PER_ROUND)
  algorithm = federated_averaging(model, optax.sgd(0.3), batch_size=BATCH,
                                  local_epochs=EPOCHS, strategy="scan", dp=dp)
  plan = retraining.round_plan(data, rounds=ROUNDS, clients_per_round=PER_ROUND, seed=seed,
                               batch_size=BATCH)
  masks = np.ones((3, 6), np.float32)
  masks[2, int(plan[0]["client_ids"][0])] = 0
  data_seeds = np.array([seed, seed + 1, seed])
  batched = retraining.retrain(algorithm, init, data, masks, data_seeds=data_seeds,
                               **_kw(seed))
  for f in range(len(masks)):
    _assert_close(_row(batched, f), retraining.retrain_sequential(
        algorithm, init, data, masks[f], data_seed=data_seeds[f], **_kw(seed)))
  state, _ = run_rounds(algorithm, algorithm.init(init), data, rounds=ROUNDS,
                        clients_per_round=PER_ROUND, seed=seed)
  _assert_close(_row(batched, 0), state.variables)


def test_lds_and_compare_match_their_definitions():
  rng = np.random.default_rng(3)
  scores = rng.normal(size=(5, 6))
  masks = retrained.subset_masks(6, 8, seed=2)
  assert masks.shape == (8, 6) and np.all(masks.sum(1) == 3)
  exact = masks @ scores.T  # a perfectly additive truth: LDS 1
  np.testing.assert_allclose(retrained.lds(scores, masks, exact), 1.0)
  np.testing.assert_allclose(retrained.lds(scores, masks, -exact), -1.0)
  noisy = exact + rng.normal(size=exact.shape)
  import scipy.stats
  expected = [scipy.stats.spearmanr(exact[:, n], noisy[:, n]).statistic for n in range(5)]
  np.testing.assert_allclose(retrained.lds(scores, masks, noisy), expected, rtol=1e-10)
  logits = rng.normal(size=(2 + 6 + 8, 5))
  truth = retrained.with_subsets(retrained.truth_from_logits(logits, 6), masks)
  res = retrained.compare(truth.drops, truth)
  assert res["retrain_top1"] == 1.0 and res["retrain_spearman"] == pytest.approx(1.0)
  with pytest.raises(ValueError, match=r"masks has shape \(2, 5\)"):
    retraining.retrain(None, {}, federate(np.zeros((4, 1), np.float32), np.zeros(4, np.int64),
                                          [np.arange(2), np.arange(2, 4)] * 3),
                       np.ones((2, 5)), **_kw(0))
