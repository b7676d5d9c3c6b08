"""The run's files as text: JSONL rows appended and flushed one at a time, read back with a
torn last line told apart from a malformed one, and whole files written atomically.
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
