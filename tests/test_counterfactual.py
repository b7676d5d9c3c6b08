"""Leave-one-client-out counterfactual (spec section 8): exactness and the TraceFL identity."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from tracefl_jax.fl.aggregation import fedavg
from tracefl_jax.models import make_model
from tracefl_jax.provenance import trace_clients
from tracefl_jax.provenance import counterfactual as cf


class BNNet(nn.Module):
  """A small CNN with standard BatchNorm: its running statistics are averaged too."""
  num_classes: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(6, (3, 3))(x)))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)


class Linear(nn.Module):
  """One Dense on the flattened input: the logits are linear in the parameters."""
  num_classes: int = 4

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def _clients(model, num_clients, seed):
  g = model.init(jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 1), 64))

  def perturb(a):
    noise = jax.random.normal(next(keys), (num_clients, *a.shape))
    return a[None] * (1 + 0.3 * noise) + 0.1 * jax.random.normal(next(keys), noise.shape)

  clients = {"params": jax.tree.map(perturb, g["params"])}
  if "batch_stats" in g:  # distinct, valid statistics per client (variances stay positive)
    stats = g["batch_stats"]
    clients["batch_stats"] = jax.tree.map(
        lambda a: a[None] + 0.5 * jax.random.normal(next(keys), (num_clients, *a.shape)),
        {k: {"mean": v["mean"]} for k, v in stats.items()})
    for k, v in stats.items():
      clients["batch_stats"][k]["var"] = v["var"][None] * jnp.exp(
          0.5 * jax.random.normal(next(keys), (num_clients, *v["var"].shape)))
  return clients


def _reference(model, clients, weights, x):
  """Plainly: G_{-k} by explicit weighted averaging of the other clients' leaves (float64)."""
  host = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(clients))
  w = np.asarray(weights, np.float64)

  def average(mask):
    ww = w * mask
    return jax.tree.map(lambda a: jnp.asarray(np.tensordot(ww / ww.sum(), a, axes=1),
                                              jnp.float32), host)

  logits = np.asarray(model.logits(average(np.ones_like(w)), x))
  predicted = np.argmax(logits, axis=1)
  s = logits[np.arange(len(x)), predicted]
  loo = np.zeros((len(x), len(w)))
  for k in range(len(w)):
    mask = np.ones_like(w)
    mask[k] = 0
    loo[:, k] = np.asarray(model.logits(average(mask), x))[np.arange(len(x)), predicted]
  return predicted, s, loo


def test_matches_explicit_averaging():
  model = make_model("bn", BNNet(), (8, 8, 2), 4)
  clients = _clients(model, 5, seed=0)
  weights = np.array([1.0, 3.0, 0.5, 2.0, 4.0], np.float32)
  x = jax.random.normal(jax.random.key(7), (9, 8, 8, 2))
  res = cf.leave_one_out(model, clients, weights, x)
  predicted, s, loo = _reference(model, clients, weights, x)
  np.testing.assert_array_equal(res.predicted, predicted)
  np.testing.assert_allclose(res.target_logit, s, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(res.loo_logit, loo, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(res.drops, s[:, None] - loo, atol=1e-5 * np.abs(loo).max())
  np.testing.assert_array_equal(res.top_client, np.argmax(np.asarray(res.drops), axis=1))
  assert np.abs(np.asarray(res.drops)).min() > 1e-4  # every removal matters: not vacuous
  # The same answer from a given G, and when the clients are chunked (5 = 2 + 2 + 1).
  g = fedavg(clients, weights)
  for other in (cf.leave_one_out(model, clients, weights, x, global_vars=g),
                cf.leave_one_out(model, clients, weights, x, clients_per_chunk=2)):
    np.testing.assert_allclose(other.drops, res.drops, rtol=1e-5, atol=1e-6)
  # A target other than the prediction explains that class's logit.
  target = (predicted + 1) % 4
  res_t = cf.leave_one_out(model, clients, weights, x, target=jnp.asarray(target, jnp.int32))
  logits = np.asarray(model.logits(g, x))
  np.testing.assert_allclose(res_t.target_logit, logits[np.arange(9), target], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(res_t.predicted, predicted)


def test_client_with_all_the_weight_is_rejected():
  model = make_model("lin", Linear(), (3, 3, 1), 4)
  clients = _clients(model, 3, seed=0)
  x = jnp.ones((2, 3, 3, 1))
  with pytest.raises(ValueError, match=r"\[1\] hold all the aggregation weight"):
    cf.leave_one_out(model, clients, np.array([0.0, 2.0, 0.0]), x)
  with pytest.raises(ValueError, match="shape"):
    cf.leave_one_out(model, clients, np.ones(4), x)
  # A zero-weight client is not in G: removing it changes nothing.
  res = cf.leave_one_out(model, clients, np.array([1.0, 2.0, 0.0]), x)
  np.testing.assert_allclose(res.drops[:, 2], 0.0, atol=1e-6)


def test_linear_model_tracefl_is_the_exact_counterfactual():
  """For s linear in the parameters (one Dense, bias included), s(theta) = <grad s, theta>
  exactly, so with no decay TraceFL's T[n, k] = s_n(theta_k) and s_n(G) = sum_k w_k T[n, k] / W.
  Then s(G_{-k}) = (W s(G) - w_k s(theta_k)) / (W - w_k), i.e.
    drop[n, k] = w_k / (W - w_k) * (T[n, k] - s_n(G)),
  and with equal weights w: drop = (T - mean_k T) / (K - 1), an increasing function of T."""
  model = make_model("lin", Linear(), (4, 4, 2), 4)
  num_clients = 6
  clients = _clients(model, num_clients, seed=1)
  x = jax.random.normal(jax.random.key(3), (12, 4, 4, 2))

  weights = np.full(num_clients, 2.0, np.float32)  # equal, but not 1
  g = fedavg(clients, weights)
  prov = trace_clients(model, g, clients, x, use_decay=False)
  res = cf.leave_one_out(model, clients, weights, x, global_vars=g)
  t = np.asarray(prov.scores, np.float64)
  np.testing.assert_array_equal(res.predicted, prov.predicted)
  np.testing.assert_allclose(res.target_logit, t.mean(axis=1), rtol=1e-5)
  np.testing.assert_allclose(res.drops, (t - t.mean(axis=1, keepdims=True)) / (num_clients - 1),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(res.top_client, prov.traced_position)
  np.testing.assert_allclose(cf.spearman(t - t.mean(axis=1, keepdims=True), res.drops), 1.0,
                             rtol=1e-12)
  assert cf.counterfactual_agreement(t, res.drops) == {"top1_agreement": 1.0,
                                                       "spearman_mean": 1.0}

  # Unequal weights: the same exact relation with w_k / (W - w_k) per client (TraceFL's argmax
  # is then no longer the counterfactual's in general: the factor differs per client).
  weights = np.array([1.0, 3.0, 0.5, 2.0, 4.0, 1.5], np.float32)
  g = fedavg(clients, weights)
  t = np.asarray(trace_clients(model, g, clients, x, use_decay=False).scores, np.float64)
  res = cf.leave_one_out(model, clients, weights, x)
  w, total = weights.astype(np.float64), weights.sum(dtype=np.float64)
  s = t @ w / total
  np.testing.assert_allclose(res.target_logit, s, rtol=1e-5)
  np.testing.assert_allclose(res.drops, w / (total - w) * (t - s[:, None]), rtol=1e-5,
                             atol=1e-5)


def test_spearman_matches_scipy_with_ties():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 4, (50, 7)).astype(np.float64)  # many ties
  b = rng.integers(0, 3, (50, 7)).astype(np.float32)
  a[0], b[1] = np.arange(7), np.arange(7)[::-1]
  keep = (np.ptp(a, axis=1) > 0) & (np.ptp(b, axis=1) > 0)  # scipy warns on constant rows
  ours = cf.spearman(a, b)
  expected = [scipy.stats.spearmanr(a[i], b[i]).statistic for i in np.nonzero(keep)[0]]
  np.testing.assert_allclose(ours[keep], expected, rtol=1e-12, atol=1e-12)
  assert np.all(np.isnan(ours[~keep]))
  np.testing.assert_array_equal(cf.rank_average(a), scipy.stats.rankdata(a, axis=1))
  c = rng.normal(size=30)
  assert cf.spearman(c, c ** 3) == pytest.approx(1.0)
  assert cf.spearman(c, -c) == pytest.approx(-1.0)
  agreement = cf.counterfactual_agreement(a[keep], b[keep])
  assert agreement["spearman_mean"] == pytest.approx(np.mean(expected))
  assert agreement["top1_agreement"] == pytest.approx(
      np.mean(np.argmax(a[keep], 1) == np.argmax(b[keep], 1)))
