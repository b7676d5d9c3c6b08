"""Privacy accounting for DP-FedAvg, with Google's dp-accounting library.

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
