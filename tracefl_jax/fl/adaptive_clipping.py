"""DP-FedAvg with adaptive clipping (Andrew et al., NeurIPS 2021, Algorithm 1 with geometric
updates): the clip norm C follows a target quantile gamma of the clients' update norms.

Round t, with C = C_{t-1} from the server state (`ClipState`) and K = `clients_per_round`:

    Delta_i = theta_i - G,   b_i = [||Delta_i|| <= C]
    G_t     = G + mean_i clip_C(Delta_i) + N(0, (z_Delta C / K)^2)      (`privacy.dp_fedavg`)
    b       = (sum_i b_i + N(0, sigma_b^2)) / K
    C_t     = C exp(-eta_C (b - gamma))

`noise_multiplier` z is the whole round's (what `dp_epsilon` accounts): the paper's Theorem 1
splits it between the update, z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), and the count, so it
needs 2 sigma_b > z (sigma_b = K / 20 by default, the paper's). z = 0 turns both noises off.

The clients train in `federated_averaging`'s round program (no DP there); the clipping, noise
and C's step run after it as one jitted function of the client models, since the round
program takes its clip norm as a constant (a DP clip norm read from the server state would
let it run inside). So `program` and `server_update` are None: counterfactual retraining and
re-aggregation refuse this algorithm rather than run plain FedAvg. Removal is DP's closed form
on the noisy model (`aggregation == "dp_fedavg"`), as with fixed clipping.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tracefl_jax.fl.privacy import _check_dp, dp_fedavg
from tracefl_jax.fl.server import ServerState

_NOISE_STREAM = 2**31 - 1  # as the fixed-clipping round: no client id folds it in


class AdaptiveClipping(NamedTuple):
  """Adaptive-clipping DP-FedAvg settings (the paper's defaults; module docstring)."""
  noise_multiplier: float          # z of the whole round (update and count together)
  clients_per_round: int           # K, the denominators of the mean and of b
  initial_clip_norm: float = 0.1   # C_0
  target_quantile: float = 0.5     # gamma
  clip_learning_rate: float = 0.2  # eta_C
  count_stddev: float | None = None  # sigma_b; None: clients_per_round / 20


class ClipState(NamedTuple):
  """The server's clip state, `ServerState.opt_state` of this algorithm."""
  clip_norm: jax.Array       # float32 C for the next round
  below_fraction: jax.Array  # float32 the last round's noised b (nan before the first)


def noise_stddevs(settings: AdaptiveClipping) -> tuple[float, float]:
  """`(z_Delta, sigma_b)`: the update's share of the round's z (Theorem 1) and the count's
  noise, both 0 when z = 0. Raises ValueError for settings outside their ranges."""
  s = settings
  _check_dp(s.initial_clip_norm, s.noise_multiplier, s.clients_per_round)
  sigma_b = s.clients_per_round / 20 if s.count_stddev is None else float(s.count_stddev)
  if not (0 <= s.target_quantile <= 1 and s.clip_learning_rate >= 0 and sigma_b >= 0):
    raise ValueError(f"adaptive clipping needs 0 <= target_quantile <= 1, clip_learning_rate "
                     f">= 0 and count_stddev >= 0, got {s}")
  if s.noise_multiplier == 0:
    return 0.0, 0.0
  if not 2 * sigma_b > s.noise_multiplier:
    raise ValueError(f"count_stddev={sigma_b} leaves no noise for the update: it must exceed "
                     f"noise_multiplier / 2 = {s.noise_multiplier / 2} (the paper uses K / 20)")
  return (s.noise_multiplier ** -2 - (2 * sigma_b) ** -2) ** -0.5, sigma_b


def adaptive_clip_aggregate(stacked: Any, weights: jax.Array, previous: Any, key: jax.Array,
                            clip_norm: jax.Array, settings: AdaptiveClipping):
  """`(DPAggregate, C_t, b)`: one round's server side (module docstring) over the stacked
  client variables; `key` the round's noise key, `clip_norm` C_{t-1}. Jit with `settings`
  static."""
  z_update, sigma_b = noise_stddevs(settings)
  k = settings.clients_per_round
  agg = dp_fedavg(stacked, weights, previous, key, clip_norm=clip_norm,
                  noise_multiplier=z_update, clients_per_round=k)
  count = jnp.sum(agg.update_norms <= clip_norm) + sigma_b * jax.random.normal(
      jax.random.fold_in(key, 1))
  below = (count / k).astype(jnp.float32)
  step = jnp.exp(-settings.clip_learning_rate * (below - settings.target_quantile))
  return agg, (clip_norm * step).astype(jnp.float32), below


def adaptive_dp_fedavg(model: Any, optimizer: Any, settings: AdaptiveClipping, *,
                       batch_size: int, local_epochs: int, **kwargs: Any):
  """DP-FedAvg with adaptive clipping as a `FederatedAlgorithm` (module docstring): clients
  train with `optimizer`, C lives in `ServerState.opt_state` (`ClipState`). `kwargs` go to
  `federated_averaging` (strategy, weighting: "uniform" by default, compute_dtype, ...)."""
  from tracefl_jax.fl.algorithm import federated_averaging  # pylint: disable=g-import-not-at-top
  taken = sorted(set(kwargs) & {"dp", "aggregator", "server_optimizer", "client_state"})
  if taken:
    raise ValueError(f"adaptive_dp_fedavg sets its own server side; it takes no {taken}")
  noise_stddevs(settings)
  kwargs.setdefault("weighting", "uniform")
  inner = federated_averaging(model, optimizer, batch_size=batch_size,
                              local_epochs=local_epochs, **{**kwargs, "donate": False})
  step = jax.jit(adaptive_clip_aggregate, static_argnames="settings")

  def init(variables, num_clients=None, placement="auto"):
    clip = ClipState(jnp.float32(settings.initial_clip_norm), jnp.float32(math.nan))
    return inner.init(variables, num_clients, placement)._replace(opt_state=clip)

  def round_(state, clients, data, key):
    if not isinstance(state.opt_state, ClipState):
      raise ValueError("adaptive_dp_fedavg keeps its clip norm in opt_state: build the state "
                       "with algorithm.init(variables)")
    _, out = inner.round(state._replace(opt_state=None), clients, data, key)
    agg, clip, below = step(out.clients.variables, jnp.asarray(out.weights), state.variables,
                            jax.random.fold_in(key, _NOISE_STREAM), state.opt_state.clip_norm,
                            settings=settings)
    norms = ({"metrics": {"dp_update_norm": agg.update_norms, "dp_below_fraction": below,
                          "dp_clip_norm": state.opt_state.clip_norm}}
             if "metrics" in out._fields else {"update_norms": agg.update_norms})
    out = out._replace(variables=agg.noisy, traced=agg.noisy, previous=None, reaggregate=None,
                       aggregation="dp_fedavg", **norms)
    return ServerState(agg.noisy, state.round + 1, ClipState(clip, below), state.client_state), out

  return inner._replace(init=init, round=round_, program=None, server_update=None)
