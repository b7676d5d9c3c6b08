"""Adaptive-clipping DP-FedAvg (fl/adaptive_clipping.py): against a NumPy per-client loop with
the noise off (global model and the clip norm's trajectory), seeded with the noise on (the
trajectory follows the noised fractions; with eta_C = 0 it is fixed-clipping DP-FedAvg bit for
bit), and its settings' errors."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import tracefl_jax as tfl
from tests.linear_federation import grad, linear_federation, stacked
from tracefl_jax.fl.adaptive_clipping import (AdaptiveClipping, ClipState, adaptive_dp_fedavg,
                                              noise_stddevs)

LR, EPOCHS = 0.3, 2
SIZES = [6, 8, 10, 12, 7]
SCHEDULE = [[0, 1, 2, 3], [1, 2, 3, 4], [0, 2, 3, 4]]


@pytest.fixture(scope="module")
def setup():
  return linear_federation(SIZES, seed=1, spread=True)  # clients' update norms spread out


def _reference(variables, raw, s):
  """Noise-free adaptive clipping, one client at a time in float64."""
  x, y, parts = raw
  g = stacked(variables)
  clip, clips, fractions = s.initial_clip_norm, [], []
  for clients in SCHEDULE:
    deltas = []
    for i in clients:
      theta = g.copy()
      for _ in range(EPOCHS):  # full-batch SGD
        theta -= LR * grad(theta, x[parts[i]].astype(np.float64), y[parts[i]])
      deltas.append(theta - g)
    norms = np.array([np.linalg.norm(d) for d in deltas])
    g = g + np.mean([d * min(1.0, clip / n) for d, n in zip(deltas, norms)], axis=0)
    b = np.mean(norms <= clip)
    clip *= np.exp(-s.clip_learning_rate * (b - s.target_quantile))
    clips.append(clip)
    fractions.append(b)
  return g, np.array(clips), np.array(fractions)


def test_adaptive_clipping_matches_a_numpy_loop_without_noise(setup):
  model, data, variables, raw = setup
  s = AdaptiveClipping(noise_multiplier=0.0, clients_per_round=4, initial_clip_norm=0.8,
                       target_quantile=0.5, clip_learning_rate=0.5)
  alg = adaptive_dp_fedavg(model, optax.sgd(LR), s, batch_size=12, local_epochs=EPOCHS,
                           strategy="vmap")
  state = alg.init(variables)
  clips, fractions = [], []
  for r, clients in enumerate(SCHEDULE, 1):
    state, out = alg.round(state, clients, data, jax.random.key(r))
    clips.append(float(state.opt_state.clip_norm))
    fractions.append(float(state.opt_state.below_fraction))
    assert out.aggregation == "dp_fedavg" and out.reaggregate is None
    assert out.traced is out.variables
  want, want_clips, want_fractions = _reference(variables, raw, s)
  assert np.all((0 < want_fractions) & (want_fractions < 1))  # some clipped, some not
  np.testing.assert_allclose(fractions, want_fractions, atol=1e-6)
  np.testing.assert_allclose(clips, want_clips, rtol=1e-5)
  got = state.variables["params"]["Dense_0"]
  np.testing.assert_allclose(got["kernel"], want[:4], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["bias"], want[4], rtol=1e-4, atol=1e-5)
  # No round program or server_update that would run plain FedAvg instead.
  assert alg.program is None and alg.server_update is None


def test_adaptive_clipping_with_noise_is_seeded_and_fixed_dp_at_eta_zero(setup, tmp_path):
  model, data, variables, _ = setup
  s = AdaptiveClipping(noise_multiplier=1.0, clients_per_round=4, initial_clip_norm=0.2,
                       clip_learning_rate=0.3, count_stddev=1.0)
  z_update, sigma_b = noise_stddevs(s)
  assert sigma_b == 1.0 and z_update == pytest.approx((1 - 0.25) ** -0.5)
  alg = adaptive_dp_fedavg(model, optax.sgd(LR), s, batch_size=12, local_epochs=1,
                           strategy="vmap")
  runs = []
  for _ in range(2):
    state, clips = alg.init(variables), [s.initial_clip_norm]
    for r, clients in enumerate(SCHEDULE, 1):
      state, out = alg.round(state, clients, data, jax.random.key(r))
      b = float(state.opt_state.below_fraction)
      # C follows the noised fraction: C_t = C_{t-1} exp(-eta (b - gamma)).
      np.testing.assert_allclose(float(state.opt_state.clip_norm),
                                 clips[-1] * np.exp(-0.3 * (b - 0.5)), rtol=1e-5)
      clips.append(float(state.opt_state.clip_norm))
      assert np.all(np.isfinite(np.asarray(out.clients.loss)))
      assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(state.variables))
    assert jax.tree.structure(state.variables) == jax.tree.structure(variables)
    runs.append((state, clips))
  jax.tree.map(np.testing.assert_array_equal, runs[0][0], runs[1][0])  # seeded
  assert len(set(runs[0][1])) == len(runs[0][1])  # the noisy count moved C every round
  path = tmp_path / "clip.msgpack"
  tfl.save_server_state(path, runs[0][0])
  back = tfl.load_server_state(path, alg.init(variables))
  assert isinstance(back.opt_state, ClipState)
  jax.tree.map(np.testing.assert_array_equal, back, runs[0][0])
  # eta_C = 0 keeps C: the round is fixed-clipping DP-FedAvg at z_Delta, noise draws and all.
  still = adaptive_dp_fedavg(model, optax.sgd(LR), s._replace(clip_learning_rate=0.0),
                             batch_size=12, local_epochs=1, strategy="vmap")
  fixed = tfl.federated_averaging(model, optax.sgd(LR), batch_size=12, local_epochs=1,
                                  strategy="vmap", weighting="uniform",
                                  dp=tfl.DPSettings(0.2, z_update, 4))
  a, _ = still.round(still.init(variables), SCHEDULE[0], data, jax.random.key(7))
  b, _ = fixed.round(fixed.init(variables), SCHEDULE[0], data, jax.random.key(7))
  jax.tree.map(np.testing.assert_array_equal, a.variables, b.variables)
  assert float(a.opt_state.clip_norm) == np.float32(0.2)


@pytest.mark.parametrize("change, msg", [
    (dict(noise_multiplier=1.0, count_stddev=0.4), "must exceed noise_multiplier / 2"),
    (dict(target_quantile=1.5), "0 <= target_quantile <= 1"),
    (dict(initial_clip_norm=0.0), "clip_norm=0.0 must be > 0"),
    (dict(clients_per_round=0), "clients_per_round=0"),
])
def test_adaptive_clipping_settings_errors(change, msg):
  with pytest.raises(ValueError, match=msg):
    noise_stddevs(AdaptiveClipping(0.0, 4)._replace(**change))


def test_adaptive_clipping_refuses_a_server_side(setup):
  model, data, variables, _ = setup
  with pytest.raises(ValueError, match="takes no \\['aggregator'\\]"):
    adaptive_dp_fedavg(model, optax.sgd(LR), AdaptiveClipping(0.0, 4), batch_size=12,
                       local_epochs=1, aggregator=tfl.median())
  alg = adaptive_dp_fedavg(model, optax.sgd(LR), AdaptiveClipping(0.0, 4), batch_size=12,
                           local_epochs=1, strategy="vmap")
  with pytest.raises(ValueError, match="keeps its clip norm in opt_state"):
    alg.round(tfl.ServerState(variables, 0), [0, 1], data, jax.random.key(0))
