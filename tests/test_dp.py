"""DP-FedAvg: clipping, noise, which leaves are touched, which model is traced, epsilon."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize, stats

from tracefl_jax.fl import aggregation, privacy
from tracefl_jax.models import get_model
from tracefl_jax.fl.privacy import dp_epsilon
from tracefl_jax.data.federated import federate
from tracefl_jax.fl.privacy import DPSettings
from tracefl_jax.fl.rounds import federated_averaging, round_key


def _stacked(rng, c=4, scale=1.0):
  return {"params": {"w": jnp.asarray(rng.normal(size=(c, 6, 5)) * scale, jnp.float32),
                     "b": jnp.asarray(rng.normal(size=(c, 5)) * scale, jnp.float32)},
          "batch_stats": {"mean": jnp.asarray(rng.normal(size=(c, 5)), jnp.float32)}}


def _prev(rng):
  return {"params": {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
                     "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
          "batch_stats": {"mean": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}


def _flat(tree):
  return np.concatenate([np.ravel(l) for l in jax.tree.leaves(tree)])


def test_clip_update_bounds_norm_and_keeps_small_updates():
  rng = np.random.default_rng(0)
  big = {"a": jnp.asarray(rng.normal(size=(10, 10)) * 5, jnp.float32)}
  clipped, norm = privacy.clip_update(big, 1.5)
  assert float(norm) > 1.5
  np.testing.assert_allclose(np.linalg.norm(_flat(clipped)), 1.5, rtol=1e-5)
  np.testing.assert_allclose(_flat(clipped), _flat(big) * 1.5 / float(norm), rtol=1e-5)
  small = {"a": jnp.full((3,), 0.1, jnp.float32)}
  same, _ = privacy.clip_update(small, 1.0)
  np.testing.assert_array_equal(same["a"], small["a"])


def test_dp_fedavg_equals_numpy_reference_without_noise():
  rng = np.random.default_rng(1)
  stacked, prev = _stacked(rng, scale=3.0), _prev(rng)
  w = jnp.array([1.0, 2.0, 0.0, 5.0])
  agg = privacy.dp_fedavg(stacked, w, prev, jax.random.key(0), clip_norm=2.0,
                              noise_multiplier=0.0, clients_per_round=4)
  wn = np.asarray(w) / np.sum(w)
  ups = [np.concatenate([np.ravel(stacked["params"][k][c] - prev["params"][k])
                         for k in ("b", "w")]) for c in range(4)]
  norms = np.array([np.linalg.norm(u) for u in ups])
  np.testing.assert_allclose(agg.update_norms, norms, rtol=1e-5)
  for k in ("b", "w"):
    upd = np.stack([np.asarray(stacked["params"][k][c] - prev["params"][k])
                    * min(1.0, 2.0 / norms[c]) for c in range(4)])
    expected = np.asarray(prev["params"][k]) + np.tensordot(wn, upd, axes=1)
    np.testing.assert_allclose(agg.clean["params"][k], expected, rtol=1e-5, atol=1e-6)
  # Clipped client models stay within C of the previous model, so does their average.
  assert np.linalg.norm(_flat(agg.clean["params"]) - _flat(prev["params"])) <= 2.0 + 1e-5
  # Non-trainable state: plain FedAvg, not clipped.
  np.testing.assert_allclose(agg.clean["batch_stats"]["mean"],
                             np.tensordot(wn, np.asarray(stacked["batch_stats"]["mean"]), 1),
                             rtol=1e-5)


def test_noise_std_matches_sigma_on_trainable_leaves_only():
  prev = {"params": {"w": jnp.zeros((400, 500), jnp.float32)},
          "batch_stats": {"var": jnp.ones((300,), jnp.float32)}}
  stacked = jax.tree.map(lambda l: jnp.stack([l] * 10), prev)
  z, clip, k = 0.8, 2.5, 10
  agg = privacy.dp_fedavg(stacked, jnp.ones(10), prev, jax.random.key(3), clip_norm=clip,
                              noise_multiplier=z, clients_per_round=k)
  sigma = z * clip / k
  np.testing.assert_allclose(float(agg.noise_std), sigma, rtol=1e-6)
  noise = np.asarray(agg.noisy["params"]["w"] - agg.clean["params"]["w"]).ravel()
  assert abs(noise.mean()) < 5 * sigma / math.sqrt(noise.size)
  np.testing.assert_allclose(noise.std(), sigma, rtol=0.01)  # 200k samples: ~0.3% s.e.
  np.testing.assert_allclose(agg.noisy["batch_stats"]["var"], 1.0, rtol=1e-6)  # FedAvg only
  parity = privacy.dp_fedavg(stacked, jnp.ones(10), prev, jax.random.key(3),
                                 clip_norm=clip, noise_multiplier=z, clients_per_round=k,
                                 collections=("params", "batch_stats"))
  assert not np.allclose(parity.noisy["batch_stats"]["var"], 1.0)


@pytest.mark.parametrize("trace_clean", [False, True])
def test_parity_switch_changes_which_model_is_traced(trace_clean):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(40, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 40), jnp.int32)
  model = get_model("mlp", (8, 8, 1), 3)
  variables = model.init(jax.random.key(0))
  dp = DPSettings(clip_norm=0.5, noise_multiplier=1.0, clients_per_round=4,
                  trace_clean=trace_clean)
  algorithm = federated_averaging(model, optax.sgd(0.1), batch_size=5, local_epochs=1,
                                  strategy="vmap", dp=dp)
  data = federate(x, y, np.split(np.arange(40), 4))
  _, out = algorithm.round(algorithm.init(variables), clients=np.arange(4), data=data,
                           key=round_key(jax.random.key(1), 1))
  assert np.all(np.asarray(out.metrics["dp_update_norm"]) > 0)
  clean = privacy.dp_fedavg(out.clients.variables, jnp.ones(4), variables,
                                jax.random.key(0), clip_norm=0.5, noise_multiplier=0.0,
                                clients_per_round=4).clean
  same_as_clean = np.allclose(_flat(out.traced), _flat(clean), atol=1e-6)
  assert same_as_clean == trace_clean
  assert not np.allclose(_flat(out.variables), _flat(clean), atol=1e-6)  # trains on noisy


def _analytic_gaussian_epsilon(mu, delta):
  """Exact epsilon of a Gaussian mechanism with mu = sensitivity / sigma (Balle & Wang)."""
  def excess(eps):
    return (stats.norm.cdf(-eps / mu + mu / 2)
            - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta)
  return optimize.brentq(excess, 0.0, 100.0)


def test_epsilon_against_known_cases():
  delta, z, rounds = 1e-5, 2.0, 50
  eps = dp_epsilon(z, 1.0, rounds, delta)
  # Without subsampling, T rounds compose to one Gaussian with mu = sqrt(T) / z: the exact
  # epsilon is a lower bound and the textbook RDP bound an upper bound for the accountant.
  exact = _analytic_gaussian_epsilon(math.sqrt(rounds) / z, delta)
  textbook = min(rounds * a / (2 * z * z) + math.log(1 / delta) / (a - 1)
                 for a in np.linspace(1.01, 200, 20000))
  assert exact <= eps <= textbook
  assert eps < 1.25 * exact
  # Subsampling amplifies privacy; more noise or fewer rounds spend less.
  assert dp_epsilon(z, 0.1, rounds, delta) < eps
  assert dp_epsilon(2 * z, 1.0, rounds, delta) < eps
  assert dp_epsilon(z, 1.0, rounds // 2, delta) < eps
  assert dp_epsilon(0.0, 0.1, 10) == math.inf
  with pytest.raises(ValueError, match="sampling_rate"):
    dp_epsilon(1.0, 0.0, 10)
