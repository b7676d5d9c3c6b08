"""Measured memory of a run, and the chunking a sweep picks from it so that a cell fits.

Host memory is the process's resident set: its peak (Linux `VmHWM`) is reset when a run starts
(`reset_peak_rss`, writing 5 to /proc/self/clear_refs), so each run of a sweep reports its own
peak rather than the largest so far; where the reset is not possible the peak is the
process's (`getrusage`'s ru_maxrss) and says so. Device memory is the accelerator's
`peak_bytes_in_use` (None on CPU), which no API resets: in a sweep it is the largest so far.

`plan_chunks` is the sweep's rule: from the run with the most participants measured so far,
the bytes each participant cost (the rounds' peak minus the resident set when the rounds began,
data already loaded, over clients per round; fixed costs such as compilation are included, so
it errs high), predict a cell's growth; if that exceeds the budget, bound every client-stacked
computation (local training lanes, provenance, leave-one-out, FedDebug) to the number of
clients that fits.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax

# Of the memory available when a cell starts, the share a cell may plan to use.
BUDGET_FRACTION = 0.7


def _status_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def reset_peak_rss() -> bool:
  """Resets the process's peak resident set to its current one (Linux); False if not."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def rss_bytes() -> int | None:
  """The process's resident set now (Linux `VmRSS`), or None."""
  kib = _status_kib("VmRSS")
  return None if kib is None else kib * 1024


def peak_rss_bytes() -> int:
  """The peak resident set since the last `reset_peak_rss` (or since the process began)."""
  kib = _status_kib("VmHWM")
  if kib is not None:
    return kib * 1024
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def device_peak_bytes() -> int | None:
  """The first device's peak bytes in use (process-wide), or None where not reported (CPU)."""
  if jax.default_backend() == "cpu":
    return None
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def available_bytes() -> int | None:
  """Memory a new cell may use: the device's limit on accelerators, else the host's
  MemAvailable (Linux); None when unknown."""
  if jax.default_backend() != "cpu":
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
      return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def bytes_per_participant(summaries: Sequence[Mapping[str, Any]]) -> float | None:
  """Measured bytes per participant of the run with the most clients per round (its rounds'
  peak, on the device where one reports it, minus the rounds' start, over clients per round);
  None before any run is measured."""
  best: tuple[int, float] | None = None
  for summary in summaries:
    mem, k = summary.get("memory") or {}, summary.get("clients_per_round")
    if mem.get("device_peak_bytes") is not None and mem.get("device_start_bytes") is not None:
      growth = mem["device_peak_bytes"] - mem["device_start_bytes"]
    elif mem.get("rounds_peak_rss_bytes") and mem.get("start_rss_bytes") is not None:
      growth = mem["rounds_peak_rss_bytes"] - mem["start_rss_bytes"]
    else:
      continue
    if k and (best is None or k > best[0]):
      best = (k, max(growth, 0) / k)
  return None if best is None else best[1]


def plan_chunks(clients_per_round: int, per_participant: float | None,
                budget: int | None) -> int:
  """Clients per chunk for a cell: 0 (all at once) when the predicted growth fits `budget`
  bytes or nothing is measured yet, else the most participants that fit (at least 1)."""
  if not per_participant or budget is None or per_participant * clients_per_round <= budget:
    return 0
  return max(1, int(budget // per_participant))
