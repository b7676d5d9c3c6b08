"""DP-FedAvg (server-side fixed clipping, spec section 4) and its privacy accounting.

Aggregation: flwr's DifferentialPrivacyServerSideFixedClipping as a pure function over stacked
client variables. Accounting: Google's dp-accounting library (imported when first used).

Each round samples `clients_per_round` of `num_clients` clients and releases a Gaussian
mechanism with noise multiplier z on updates clipped to C (user-level DP). Client sampling
here is uniform without replacement, accounted as Poisson sampling with rate q = K / N, the
usual approximation (as in DP-FedAvg, McMahan et al. 2018). With FedAvg weights that are not
uniform the per-client sensitivity exceeds C / K; the epsilon reported is then the standard
figure for the configured (z, q, rounds), not a bound for example-weighted averaging.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tracefl_jax.fl.aggregation import fedavg


class DPSettings(NamedTuple):
  """DP-FedAvg with server-side fixed clipping (see `dp_fedavg`)."""
  clip_norm: float
  noise_multiplier: float
  clients_per_round: int
  noise_batch_stats: bool = False  # original's defect: clip and noise BatchNorm statistics
  trace_clean: bool = False        # original's defect: trace the pre-noise aggregate


def dp_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int,
               delta: float = 1e-5) -> float:
  """Epsilon of `rounds` Poisson-subsampled Gaussian mechanisms (RDP accountant).

  Returns `inf` when the noise is too small for any finite bound (e.g. the paper's z = 0.003).
  """
  if not 0 < sampling_rate <= 1:
    raise ValueError(f"sampling_rate={sampling_rate} must be in (0, 1]")
  if rounds < 0 or not 0 < delta < 1:
    raise ValueError(f"need rounds >= 0 and 0 < delta < 1, got {rounds}, {delta}")
  if noise_multiplier <= 0:
    return math.inf
  import dp_accounting  # pylint: disable=g-import-not-at-top
  from dp_accounting import rdp  # pylint: disable=g-import-not-at-top

  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), rounds)
  accountant = rdp.RdpAccountant()
  accountant.compose(event)
  # The accountant logs one warning per RDP order it drops for numerical reasons.
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    return float(accountant.get_epsilon(delta))
  finally:
    absl_logger.setLevel(level)



class DPAggregate(NamedTuple):
  """DP-FedAvg result: the noisy model training continues from, and the pre-noise aggregate.

  The original traced `clean` while training continued from `noisy` (a defect); tracefl_jax
  traces `noisy` unless its parity switch asks for the original's behaviour.
  """
  noisy: Any               # G_t = FedAvg(clipped) + N(0, sigma^2) on the noised collections
  clean: Any               # FedAvg(clipped), before noise
  update_norms: jax.Array  # [C] L2 norm of each client's update before clipping
  noise_std: jax.Array     # sigma = z * C / clients_per_round


def _norm(tree: Any) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(l.astype(jnp.float32))) for l in leaves))


def _check_dp(clip_norm: Any, noise_multiplier: Any = 0.0, clients_per_round: Any = 1) -> None:
  """One-line errors for DP settings that would silently misbehave (checked when concrete)."""
  concrete = lambda v: not isinstance(v, jax.core.Tracer)  # noqa: E731
  # A negative C flips every update's sign (the scale min(1, C / norm) turns negative).
  if concrete(clip_norm) and not float(clip_norm) > 0:
    raise ValueError(f"clip_norm={clip_norm} must be > 0 (the L2 bound C on each client's "
                     f"update)")
  if concrete(noise_multiplier) and not float(noise_multiplier) >= 0:
    raise ValueError(f"noise_multiplier={noise_multiplier} must be >= 0 (0 = no noise)")
  if concrete(clients_per_round) and not (float(clients_per_round) >= 1
                                          and float(clients_per_round).is_integer()):
    raise ValueError(f"clients_per_round={clients_per_round} must be an integer >= 1 (the "
                     f"noise std is z * C / clients_per_round)")


def clip_update(update: Any, clip_norm: float) -> tuple[Any, jax.Array]:
  """Scales `update` by min(1, C / ||update||_2), the norm taken over the whole pytree.

  Returns `(clipped, norm_before)`. Updates with norm <= C are returned unchanged. Raises
  ValueError for a concrete `clip_norm <= 0`.
  """
  _check_dp(clip_norm)
  norm = _norm(update)
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
  return jax.tree.map(lambda l: (l * scale).astype(l.dtype), update), norm


def dp_fedavg(
    stacked: Any,
    weights: jax.Array,
    previous: Any,
    key: jax.Array,
    *,
    clip_norm: float,
    noise_multiplier: float,
    clients_per_round: int,
    collections: tuple[str, ...] = ("params",),
) -> DPAggregate:
  """DP-FedAvg over stacked client variables `[C, ...]` (a dict of collections).

  For each client, update = theta_k - G_{t-1} over the collections in `collections` is clipped
  to norm `clip_norm`; the clipped models G_{t-1} + clip(update) are averaged with FedAvg;
  Gaussian noise of std z * C / clients_per_round is added to every averaged entry of those
  collections. Other collections (BatchNorm statistics) are averaged as plain FedAvg, untouched
  by clipping and noise; `collections=("params", "batch_stats")` reproduces the original,
  which clipped and noised the BatchNorm counters too.

  Raises ValueError for `clip_norm <= 0`, `noise_multiplier < 0` or `clients_per_round < 1`
  (Python numbers in every library call, so checked before tracing), and as `fedavg` for the
  weights.
  """
  _check_dp(clip_norm, noise_multiplier, clients_per_round)
  private = {k: stacked[k] for k in collections if k in stacked}
  prev = {k: previous[k] for k in private}
  updates = jax.tree.map(lambda s, p: s - p[None], private, prev)
  clipped, norms = jax.vmap(lambda u: clip_update(u, clip_norm))(updates)
  clipped_models = jax.tree.map(lambda u, p: (p[None] + u).astype(p.dtype), clipped, prev)
  clean = fedavg({**stacked, **clipped_models}, weights)
  sigma = jnp.float32(noise_multiplier * clip_norm / clients_per_round)
  leaves, treedef = jax.tree.flatten({k: clean[k] for k in private})
  keys = jax.random.split(key, max(len(leaves), 1))
  noised = [l + (sigma * jax.random.normal(k, l.shape)).astype(l.dtype)
            if jnp.issubdtype(l.dtype, jnp.floating) else l for l, k in zip(leaves, keys)]
  noisy = {**clean, **jax.tree.unflatten(treedef, noised)}
  return DPAggregate(noisy, clean, norms, sigma)
