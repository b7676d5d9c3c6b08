"""The run's files as text: JSONL rows appended and flushed one at a time, read back with a
torn last line told apart from a malformed one, and whole files written atomically; and the
rows of provenance.jsonl (`ProvenanceLog`).

provenance.jsonl holds one row per traced input of the library's `TracedRound`s: round, input
(index in the server test set), label, predicted, traced_client (global id; -1 when a score
was not finite, with `attributable: false`), correct, top_clients ([id, probability] pairs),
the traced client's label counts, counterfactual_client (the client whose removal lowers the
predicted logit most, when computed), and, for rounds with at most 64 participants, every
participant's probability.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from tracefl_jax.provenance.protocol import TracedRound


class WorkdirError(ValueError):
  """A workdir that cannot take this run: its path, layout, or the results it holds."""


def finite(obj: Any) -> Any:
  """`obj` with every non-finite float replaced by None (standard JSON has no NaN)."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite(v) for v in obj]
  return obj


def _to_builtin(obj: Any) -> Any:
  if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
    return finite(np.asarray(obj).tolist())
  raise TypeError(f"not JSON serialisable: {type(obj)}")


def json_line(row: dict[str, Any]) -> str:
  """One row as a line of standard JSON (non-finite numbers as null, NumPy/JAX values as
  Python's), newline included."""
  return json.dumps(finite(row), default=_to_builtin, allow_nan=False) + "\n"


class JsonlWriter:
  """Appends rows to a JSONL file, each flushed as soon as it is written (a crash loses at
  most the line being written, which `read_jsonl` recognises as torn)."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    self._f = open(path, "a", encoding="utf-8")

  def write(self, row: dict[str, Any]) -> None:
    try:
      self._f.write(json_line(row))
      self._f.flush()
    except OSError as e:  # a write's own error names no file (e.g. a full disk)
      raise _named(e, self.path) from None

  def close(self) -> None:
    self._f.close()


class NullWriter:
  """A writer that writes nothing (every process but the one that writes files)."""

  def write(self, row: dict[str, Any]) -> None:
    del row

  def close(self) -> None:
    pass


def write_atomic(path: str | Path, text: str) -> None:
  """Writes a whole file or nothing (a crash leaves the old file, never half of the new)."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  try:
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
  except OSError as e:  # a full disk: no half-written temporary left behind
    with contextlib.suppress(OSError):
      tmp.unlink(missing_ok=True)
    raise _named(e, path) from None


def _named(e: OSError, path: Path) -> OSError:
  """`e` naming `path` when it names no file (the errno keeps its subclass)."""
  return e if e.filename else OSError(e.errno, e.strerror or str(e), str(path))


def read_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], str | None]:
  """The rows of a JSONL file this package wrote, and the torn last line (None if none).

  A last line that is not valid JSON was torn by a crash mid-write (rows are written one
  line at a time): it is returned apart, not as a row. Any other malformed line is a
  `WorkdirError` naming the file and the line number.
  """
  path = Path(path)
  lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
  if lines[-1] == "":
    lines.pop()
  rows: list[dict[str, Any]] = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if not isinstance(row, dict):
        raise ValueError(f"a {type(row).__name__}, not a row object")
    except ValueError as e:
      if number == len(lines):
        return rows, line
      raise WorkdirError(
          f"{path} line {number} is not valid JSON ({e}); only a torn last line (a crash "
          f"mid-write) is dropped on resume: repair or delete that line, or start afresh with "
          f"--overwrite") from e
    rows.append(row)
  return rows, None


# --- provenance.jsonl --------------------------------------------------------------------

# Full per-client probability vectors are logged when a round has at most this many clients.
_FULL_PROBS_MAX_CLIENTS = 64


def top_clients(probs: np.ndarray, client_ids: np.ndarray, k: int) -> list[list[Any]]:
  """`[[id, probability], ...]` of the k most probable clients of one input (stable order)."""
  order = np.argsort(-probs, kind="stable")[:k]
  return [[int(client_ids[j]), float(probs[j])] for j in order]


class ProvenanceLog:
  """Writes a traced round's rows through `writer.write(row)`."""

  def __init__(self, writer: Any, label_counts: np.ndarray, top_k: int = 3):
    self.writer = writer
    self.label_counts = np.asarray(label_counts)  # [num_clients, num_classes]
    self.top_k = top_k

  def write_round(self, round_idx: int, traced: TracedRound) -> None:
    ids = traced.client_ids
    top_k = min(self.top_k, len(ids))
    for n in range(len(traced.inputs)):
      row = {
          "round": round_idx, "input": int(traced.inputs[n]), "label": int(traced.labels[n]),
          "predicted": int(traced.predicted[n]), "traced_client": int(traced.traced_client[n]),
          "correct": bool(traced.correct[n]),
      }
      if not traced.attributable[n]:
        row["attributable"] = False
      else:
        row["top_clients"] = top_clients(traced.probs[n], ids, top_k)
        row["traced_client_label_counts"] = (
            self.label_counts[traced.traced_client[n]].tolist())
      if traced.counterfactual_client[n] >= 0:
        row["counterfactual_client"] = int(traced.counterfactual_client[n])
      if len(ids) <= _FULL_PROBS_MAX_CLIENTS:
        row["participants"] = ids.tolist()
        row["probs"] = traced.probs[n].tolist()
      self.writer.write(row)

  def close(self) -> None:
    self.writer.close()
