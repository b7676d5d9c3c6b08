"""The run's derived outputs: summary.json (headline numbers) and the per-run figures.

Both are functions of the run's files and history, so a run that finds them missing (a crash
after the last round, before or while they were written) rebuilds them, even when there is
nothing else to do.

Times: `seconds` is the wall time of the rounds over every invocation of a resumed run;
per-round and per-input times are steady state, the median over rounds after the first
(which compiles), with round 1's own beside them.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import ml_collections
import numpy as np

from tracefl_jax.experiment import memory
from tracefl_jax.experiment.io import write_atomic
from tracefl_jax.provenance.protocol import summarize_rounds

_PER_INPUT = ("tracefl_seconds_per_input", "feddebug_seconds_per_input")


def memory_start() -> dict[str, Any]:
  """The loading phase's peak, then a fresh peak for the rounds (`memory`)."""
  mem = {"load_peak_rss_bytes": memory.peak_rss_bytes(), "start_rss_bytes": memory.rss_bytes(),
         "device_start_bytes": None}
  if memory.device_peak_bytes() is not None:
    mem["device_start_bytes"] = (jax.local_devices()[0].memory_stats() or {}).get("bytes_in_use")
  mem["peak_reset"] = memory.reset_peak_rss()
  return mem


def memory_end(mem: dict[str, Any]) -> dict[str, Any]:
  rounds_peak = memory.peak_rss_bytes()
  return {**mem, "rounds_peak_rss_bytes": rounds_peak,
          "peak_rss_bytes": max(rounds_peak, mem["load_peak_rss_bytes"]),
          "device_peak_bytes": memory.device_peak_bytes()}


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
  from tracefl_jax.experiment import results  # pylint: disable=g-import-not-at-top
  return [p.name for p in results.plot_run(workdir, only_missing=True)]


def nothing_to_do(plan, rounds: int, *, figures: bool, primary: bool) -> dict[str, Any]:
  """A finished run: its files stay as they are; only missing figures are made."""
  made = write_outputs(plan.workdir, None, figures=figures) if primary else []
  if primary:
    rebuilt = f"; made its missing figures ({', '.join(made)})" if made else ""
    print(f"nothing to do: {plan.workdir} holds this config's finished run ({rounds} rounds); "
          f"its files are unchanged{rebuilt} (a larger --config.rounds continues it, "
          f"--overwrite starts afresh)", file=sys.stderr)
  return plan.summary
