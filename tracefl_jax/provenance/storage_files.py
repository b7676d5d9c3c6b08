"""The files of a stored round (`storage.py`): what is checked before anything is written,
the atomic swap of a new round for an old one, and the checks on load that name the damaged
file in one line.

A round is written into `.<name>.saving` beside `path` and swapped in only when complete
(`swap_in`): the old round moves to `.<name>.old`, the new one takes its name, the old one is
deleted. A failed save leaves the old round as it was; a crash between the two renames
leaves the old round complete in `.<name>.old`, which `complete_round` finds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

ROUND_FILE = "round.json"
# Keys of round.json that save_round writes itself; `meta` may not set them.
RESERVED = ("round", "num_clients", "checksums", "model_def", "aggregation", "storage",
            "input_range")


class StoredRoundError(RuntimeError):
  """A stored round that is missing, interrupted, corrupt, or not the given model's."""


def leaf_name(path: Any) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def array_checksums(tree: Any) -> dict[str, str]:
  """SHA-256 of every array leaf (dtype, shape and bytes), keyed by its path."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    out[leaf_name(path)] = h.hexdigest()
  return out


def shapes(tree: Any) -> dict[str, list[Any]]:
  """`{leaf path: [shape, dtype name]}` of every array leaf (JSON-ready)."""
  return {leaf_name(p): [list(np.shape(a)), np.dtype(a.dtype).name]
          for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _not_json(value: Any, where: str) -> str | None:
  """Where in `value` JSON cannot hold what it finds (numpy scalars, arrays, objects), or
  None. A numpy float32 would make `json.dumps` fail after the arrays were written."""
  if value is None or isinstance(value, (bool, str)):
    return None
  if type(value) in (int, float):  # not numpy's scalars, which json.dumps refuses
    return None
  if isinstance(value, (list, tuple)):
    for i, v in enumerate(value):
      bad = _not_json(v, f"{where}[{i}]")
      if bad:
        return bad
    return None
  if isinstance(value, dict):
    for k, v in value.items():
      if not isinstance(k, str):
        return f"{where} has the key {k!r} ({type(k).__name__}); JSON keys are strings"
      bad = _not_json(v, f"{where}[{k!r}]")
      if bad:
        return bad
    return None
  kind = f"{type(value).__module__}.{type(value).__name__}".replace("builtins.", "")
  hint = " (give float(...) or int(...))" if isinstance(value, (np.generic, np.ndarray)) else ""
  return f"{where} is a {kind} ({value!r}), which JSON cannot hold{hint}"


def check_meta(meta: dict[str, Any] | None, round_idx: int | None) -> int:
  """Refuses, before anything is written, `meta` that JSON cannot hold or that contradicts
  save_round's own fields; returns the round's number (`round_idx`, or `meta["round"]`)."""
  meta = meta or {}
  if not isinstance(meta, dict):
    raise ValueError(f"meta must be a dict of JSON values, got {type(meta).__name__}")
  bad = _not_json(meta, "meta")
  if bad:
    raise ValueError(f"save_round: {bad}; nothing was written")
  if round_idx is not None and (isinstance(round_idx, bool)
                                or not isinstance(round_idx, (int, np.integer))
                                or round_idx < 0):
    raise ValueError(f"save_round: round_idx={round_idx!r} must be an int >= 0")
  if "round" in meta:
    if round_idx is not None and meta["round"] != round_idx:
      raise ValueError(f"save_round: round_idx={round_idx} but meta['round']={meta['round']!r}"
                       f"; give the round's number once (round_idx)")
    if isinstance(meta["round"], bool) or not isinstance(meta["round"], int):
      raise ValueError(f"save_round: meta['round']={meta['round']!r} must be an int")
    round_idx = meta["round"]
  taken = [k for k in RESERVED if k in meta and k != "round"]
  if taken:
    raise ValueError(f"save_round: meta key(s) {', '.join(taken)} are written by save_round "
                     f"itself; rename them")
  return int(round_idx or 0)


def file_sizes(directory: Path) -> dict[str, int]:
  """`{path relative to directory: size in bytes}` of every file under `directory`."""
  return {str(p.relative_to(directory)): p.stat().st_size
          for p in sorted(directory.rglob("*")) if p.is_file()}


def check_files(path: Path, written: dict[str, int] | None) -> None:
  """One line naming the first file of the round that is missing or not the size it was
  written with (truncated, or replaced), before orbax reads it."""
  if not written:
    return  # rounds stored before file sizes were recorded
  for name, size in written.items():
    f = path / name
    if not f.is_file():
      raise StoredRoundError(f"stored round {path} is damaged: file {f} is missing")
    if f.stat().st_size != size:
      raise StoredRoundError(f"stored round {path} is damaged: file {f} has "
                             f"{f.stat().st_size} bytes, {size} were written (truncated or "
                             f"replaced)")


def checksum_mismatch(saved: dict[str, str] | None, arrays: Any) -> str | None:
  """`"array NAME PROBLEM"` for the first array whose data differs from its checksum in
  `saved` (checkpoints and stored rounds alike), or None; nothing to check without `saved`
  (written before checksums existed)."""
  if saved is None:
    return None
  now = array_checksums(arrays)
  for name in sorted(set(saved) | set(now)):
    if saved.get(name) != now.get(name):
      problem = ("is missing" if name not in now else "was not written with a checksum"
                 if name not in saved else "does not match the SHA-256 checksum written with "
                 "it")
      return f"array {name} {problem}"
  return None


def verify_checksums(path: Path, saved: dict[str, str] | None, arrays: Any) -> None:
  """Raises `StoredRoundError` naming the first array whose data differs from its checksum."""
  mismatch = checksum_mismatch(saved, arrays)
  if mismatch:
    raise StoredRoundError(f"stored round {path} is corrupt: {mismatch}.")


def saving_path(path: Path) -> Path:
  return path.parent / f".{path.name}.saving"


def old_path(path: Path) -> Path:
  return path.parent / f".{path.name}.old"


def swap_in(new: Path, path: Path) -> None:
  """Puts the complete round `new` at `path`; the round there before is deleted last."""
  old = old_path(path)
  if old.exists():
    if (path / ROUND_FILE).is_file():
      shutil.rmtree(old)
    else:  # a swap interrupted after its first rename: `old` is the complete round
      shutil.rmtree(path, ignore_errors=True)
  if path.exists():
    os.rename(path, old)
  os.rename(new, path)
  shutil.rmtree(old, ignore_errors=True)


def complete_round(path: Path) -> Path:
  """`path`, or the round a swap interrupted between its renames left in `.<name>.old`."""
  if not (path / ROUND_FILE).is_file() and (old_path(path) / ROUND_FILE).is_file():
    return old_path(path)
  return path


def read_record(path: Path) -> dict[str, Any]:
  """`round.json`, or one line naming it when it is missing, torn or not a round's."""
  f = path / ROUND_FILE
  if not f.is_file():
    raise StoredRoundError(f"{path} holds no stored round (no {ROUND_FILE}: never saved, or "
                           f"the save was interrupted); save one with save_round(path, ...)")
  try:
    record = json.loads(f.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise StoredRoundError(f"stored round {path} is damaged: {f} is not valid JSON (a torn "
                           f"write? {type(e).__name__}: {e})") from e
  except OSError as e:
    raise StoredRoundError(f"stored round {path}: cannot read {f} ({e})") from e
  if not isinstance(record, dict) or not isinstance(record.get("round"), int):
    raise StoredRoundError(f"stored round {path} is damaged: {f} does not hold a round's "
                           f"record (no integer 'round')")
  return record
