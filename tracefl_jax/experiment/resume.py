"""The run's starting point: afresh, or the latest checkpoint with the JSONL files reconciled.

Histories cannot have gaps. On resume from checkpoint R (which holds the metrics rows of
rounds 1..R), `metrics.jsonl` is rewritten from the checkpoint's rows (a row the file lost is
rebuilt, with a note), and `provenance.jsonl` keeps its rows of rounds 1..R, which must be
complete: each round's row count is known from its metrics row (`provenance.inputs`), and
rows the file lacks cannot be rebuilt from a checkpoint, so the run refuses, naming the
rounds. Rows after R are dropped (those rounds run again). A torn last line (a crash
mid-write) is judged by the round it names: after R it is run again; at or before R it is
rebuilt (metrics) or reported missing (provenance).
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from tracefl_jax.experiment.checkpoints import Checkpointer
from tracefl_jax.experiment.io import WorkdirError, json_line, read_jsonl, write_atomic
from tracefl_jax.experiment.stages import DataStage
from tracefl_jax.experiment.workdir import PREVIOUS, RunPlan, move_aside


class Start(NamedTuple):
  state: Any                      # the server state the loop continues from
  history: list[dict[str, Any]]   # the metrics rows of rounds 1..state.round
  seconds: float                  # wall time of the rounds already run (earlier invocations)


def _round_of(line: str) -> int | None:
  match = re.match(r'\s*\{\s*"round"\s*:\s*(\d+)', line)
  return int(match.group(1)) if match else None


def _note(message: str) -> None:
  print(f"note: {message}", file=sys.stderr)


def _rows(path: Path, last: int) -> tuple[list[dict[str, Any]], str | None]:
  """The file's rows (each with a round number), and a note on its torn last line."""
  if not path.exists():
    return [], None
  rows, torn = read_jsonl(path)
  for number, row in enumerate(rows, 1):
    if not isinstance(row.get("round"), int):
      raise WorkdirError(f"{path}: row {number} has no round number; repair or delete it, or "
                         f"start afresh with --overwrite")
  if torn is None:
    return rows, None
  r = _round_of(torn)
  if r is not None and r <= last:
    return rows, f"round {r}, which checkpoint {last} holds"
  where = f"round {r}" if r is not None else "its round unreadable"
  return rows, f"{where}, after checkpoint {last}: that round runs again"


def reconcile(workdir: Path, history: list[dict[str, Any]], last: int) -> None:
  """Makes metrics.jsonl and provenance.jsonl hold exactly rounds 1..`last` (module doc);
  both files are checked before either is written.

  Raises:
    WorkdirError: naming the file and the rounds, when provenance.jsonl lacks rows of rounds
      the checkpoint holds (they cannot be rebuilt), or a row has no round number.
  """
  metrics, provenance = workdir / "metrics.jsonl", workdir / "provenance.jsonl"
  rows, torn_metrics = _rows(metrics, last)
  have = {r["round"] for r in rows if r["round"] <= last}
  lost = [h["round"] for h in history if h["round"] not in have]
  rows, torn_prov = _rows(provenance, last)
  kept = [r for r in rows if r["round"] <= last]
  count = Counter(r["round"] for r in kept)
  want = {h["round"]: (h.get("provenance") or {}).get("inputs", 0) for h in history}
  short = [r for r, n in want.items() if count.get(r, 0) != n]
  if short:
    raise WorkdirError(
        f"{provenance} lacks rows of rounds {_span(short)}, which checkpoint {last} holds "
        f"(their traced inputs cannot be rebuilt from a checkpoint); restore the file, or "
        f"start afresh with --overwrite (the run moves to {workdir / PREVIOUS}/<time>/)")
  for path, torn in ((metrics, torn_metrics), (provenance, torn_prov)):
    if torn:
      _note(f"dropped the torn last line of {path} (a crash mid-write; {torn})")
  if lost:
    _note(f"{metrics} lacked the rows of rounds {_span(lost)}; rebuilt them from checkpoint "
          f"{last}")
  write_atomic(metrics, "".join(json_line(h) for h in history))
  if len(kept) != len(rows) or torn_prov:
    write_atomic(provenance, "".join(json.dumps(r) + "\n" for r in kept))


def _span(rounds: list[int]) -> str:
  return ", ".join(map(str, sorted(rounds)))


def move_previous(plan: RunPlan) -> None:
  """`overwrite`: moves the previous run to WORKDIR/previous/<time>/ (every check passed)."""
  moved = move_aside(plan.workdir)
  print(f"moved the previous run in {plan.workdir} to {moved}", file=sys.stderr)


def restore(plan: RunPlan, checkpointer: Checkpointer, initial_state: Any) -> Start:
  """The latest checkpoint's state, history and seconds on resume, else the initial state.
  Every process calls it (orbax restores the same step in each)."""
  if plan.action == "resume" and checkpointer.latest_round() is not None:
    return Start(*checkpointer.restore(initial_state))
  return Start(initial_state, [], 0.0)


def write_start_files(plan: RunPlan, start: Start, data: DataStage) -> None:
  """Reconciles the JSONL files with the start (`reconcile`), then writes config.json and
  partition.json (the primary process)."""
  workdir = plan.workdir
  reconcile(workdir, start.history, int(start.state.round))
  write_atomic(workdir / "config.json", plan.config_json + "\n")
  write_atomic(workdir / "partition.json", json.dumps({
      "label_counts": data.data.label_counts.tolist(), "faulty_clients": data.faulty,
      "flip": {str(k): v for k, v in data.flip.items()}}) + "\n")
