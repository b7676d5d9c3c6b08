"""The run's derived outputs: summary.json (headline numbers) and the per-run figures.

Both are functions of the run's files and history, so a run that finds them missing (a crash
after the last round, before or while they were written) rebuilds them, even when there is
nothing else to do.

Times: `seconds` is the wall time of the rounds over every invocation of a resumed run;
per-round and per-input times are steady state, the median over rounds after the first
(which compiles), with round 1's own beside them.

Memory: host memory is the process's resident set: its peak (Linux `VmHWM`) is reset when a
run starts (`reset_peak_rss`, writing 5 to /proc/self/clear_refs), so each run of a sweep
reports its own peak rather than the largest so far; where the reset is not possible the peak
is the process's (`getrusage`'s ru_maxrss) and says so. Device memory is the accelerator's
`peak_bytes_in_use` (None on CPU), which no API resets: in a sweep it is the largest so far.

`plan_chunks` is a sweep's rule from the summaries' memory: from the run with the most
participants measured so far, the bytes each participant cost (the rounds' peak minus the
resident set when the rounds began, data already loaded, over clients per round; fixed costs
such as compilation are included, so it errs high), predict a cell's growth; if that exceeds
the budget, bound every client-stacked computation (local training lanes, provenance,
leave-one-out, FedDebug) to the number of clients that fits.
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from tracefl_jax.experiment.figures import plot_run
from tracefl_jax.experiment.io import write_atomic
from tracefl_jax.provenance.protocol import summarize_rounds

_PER_INPUT = ("tracefl_seconds_per_input", "feddebug_seconds_per_input")
# Of the memory available when a cell starts, the share a cell may plan to use.
BUDGET_FRACTION = 0.7


# --- memory ------------------------------------------------------------------------------


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


# --- the summary -------------------------------------------------------------------------


def memory_start() -> dict[str, Any]:
  """The loading phase's peak, then a fresh peak for the rounds."""
  mem = {"load_peak_rss_bytes": peak_rss_bytes(), "start_rss_bytes": rss_bytes(),
         "device_start_bytes": None}
  if device_peak_bytes() is not None:
    mem["device_start_bytes"] = (jax.local_devices()[0].memory_stats() or {}).get("bytes_in_use")
  mem["peak_reset"] = reset_peak_rss()
  return mem


def memory_end(mem: dict[str, Any]) -> dict[str, Any]:
  rounds_peak = peak_rss_bytes()
  return {**mem, "rounds_peak_rss_bytes": rounds_peak,
          "peak_rss_bytes": max(rounds_peak, mem["load_peak_rss_bytes"]),
          "device_peak_bytes": device_peak_bytes()}


def steady(values: list[float | None]) -> float | None:
  """Median over rounds after the first (which compiles), or the only value."""
  values = [v for v in values if v is not None]
  if not values:
    return None
  return float(np.median(values[1:] if len(values) > 1 else values))


def summarize(history: list[dict[str, Any]], seconds: float, strategy: str) -> dict[str, Any]:
  acc = [h["accuracy"] for h in history]
  summary: dict[str, Any] = {
      "rounds": len(history),
      "final_accuracy": acc[-1],
      "best_accuracy": max(acc),
      "seconds": seconds,
      "client_strategy": strategy,
      # Per round, steady state (median after round 1) and round 1 (compilation included).
      "round_seconds": steady([h.get("train_seconds") for h in history]),
      "first_round_seconds": history[0].get("train_seconds"),
      "provenance_round_seconds": steady([h.get("provenance_seconds") for h in history]),
      "first_provenance_seconds": history[0].get("provenance_seconds"),
  }
  traced = [h["provenance"] for h in history if "provenance" in h]
  if traced:
    summary["provenance"] = prov = summarize_rounds(traced)
    used = [t for t in traced if not t.get("skipped")]
    for key in _PER_INPUT:  # steady state, as the round times (the mean had compilation in)
      if prov.get(key) is not None:
        prov[key] = steady([t.get(key) for t in used])
  return summary


def run_summary(config: ml_collections.ConfigDict, history: list[dict[str, Any]],
                seconds: float, strategy: str, data, mem: dict[str, Any]) -> dict[str, Any]:
  """The summary of a run's history, with the run's setting and memory."""
  c, part = config, data.data.partition
  summary = summarize(history, seconds, strategy)
  summary.update(provenance_mode=c.provenance.mode if c.provenance.enabled else None,
                 clients=data.data.num_clients, clients_per_round=c.clients_per_round,
                 client_size_median=float(np.median(part.client_sizes)),
                 faulty_client_sizes=[int(part.client_sizes[k]) for k in data.faulty],
                 memory=memory_end(mem))
  if c.dp.enabled:
    summary["dp"] = {"noise_multiplier": c.dp.noise_multiplier, "clip_norm": c.dp.clip_norm,
                     "delta": c.dp.delta, "epsilon": history[-1]["dp_epsilon"],
                     "sampling_rate": c.clients_per_round / data.data.num_clients}
  return summary


def write_outputs(workdir, summary: dict[str, Any] | None, *, figures: bool) -> list[str]:
  """Writes summary.json (when given) and the figures that are missing; returns the names of
  the figures made."""
  if summary is not None:
    write_atomic(workdir / "summary.json", json.dumps(summary, indent=2) + "\n")
  if not figures:
    return []
  return [p.name for p in plot_run(workdir, only_missing=True)]


def nothing_to_do(plan, rounds: int, *, figures: bool, primary: bool) -> dict[str, Any]:
  """A finished run: its files stay as they are; only missing figures are made."""
  made = write_outputs(plan.workdir, None, figures=figures) if primary else []
  if primary:
    rebuilt = f"; made its missing figures ({', '.join(made)})" if made else ""
    print(f"nothing to do: {plan.workdir} holds this config's finished run ({rounds} rounds); "
          f"its files are unchanged{rebuilt} (a larger --config.rounds continues it, "
          f"--overwrite starts afresh)", file=sys.stderr)
  return plan.summary
