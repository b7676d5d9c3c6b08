"""The workdir rules that keep runs from mixing or losing results.

The workdir holds one run. `check_workdir` checks its path and layout before anything is
loaded or trained; `WorkdirLock` keeps a second run out while one works there; `plan_run`
decides what a run of a config does there: start afresh (an empty workdir),
resume (the same config's unfinished run), nothing (its finished run), or refuse (results of
another config, `checkpoint.resume=False` over results, fewer rounds than already done);
`move_aside` moves a previous run to `WORKDIR/previous/<time>/` for `checkpoint.overwrite`.
Nothing here deletes results.

The lock is an OS-level `flock` on `WORKDIR/.tracefl.lock`, released by the kernel when its
holder exits for any reason (SIGKILL included), so a lock file left by a dead process never
blocks: the file is only a place to lock and to name the holder. A second run is refused at
once (no waiting) with one line naming the holder (pid, host, start time). The file is
removed, still locked, when the run ends; a run that locked a file another run had just
removed (the path no longer names its inode) takes the lock again on the new file.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections

from tracefl_jax.experiment.config import FIELDS, config_fields
from tracefl_jax.experiment.io import WorkdirError, read_jsonl

# Config fields that do not change results: a run may resume with other values of these
# (a dotted prefix covers a whole section).
_RESUMABLE_FIELDS = ("rounds", "checkpoint", "client.divergence_factor")


def fingerprint(config_json: str) -> dict[str, Any]:
  """The config's dotted fields that decide results."""
  return {k: v for k, v in config_fields(json.loads(config_json)).items()
          if not any(k == f or k.startswith(f + ".") for f in _RESUMABLE_FIELDS)}


def config_diff(saved_json: str, current_json: str) -> list[str]:
  """The fields in which two configs differ in results, as `name (saved -> current)`. A field
  the saved config lacks (it was written before the field existed) counts as its default: a
  run made then resumes under a config that leaves the new field at its default."""
  saved, current = fingerprint(saved_json), fingerprint(current_json)
  for k in set(current) - set(saved):
    if k in FIELDS:
      saved[k] = json.loads(json.dumps(FIELDS[k].default))
  return [f"{k} ({saved.get(k)!r} -> {current.get(k)!r})"
          for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


# What a run writes into its workdir (moved aside together by `move_aside`).
RUN_FILES = ("config.json", "partition.json", "metrics.jsonl", "provenance.jsonl",
             "summary.json", "label_distribution.png", "client_probs.png", "run.log")
RUN_DIRS = ("checkpoints", "rounds")
PREVIOUS = "previous"  # WORKDIR/previous/<time>/: runs moved aside by checkpoint.overwrite

_WAYS_OUT = ("use another --workdir, or pass --overwrite (--config.checkpoint.overwrite=True) "
             "to move the old run to {previous}/<time>/")


def check_workdir(workdir: str | Path | None, *, allow_cwd: bool = False) -> Path:
  """Checks a workdir's path and layout and creates it; call before loading or training.

  Raises:
    WorkdirError: one line naming the path, when the workdir is not given (empty), is the
      current directory (unless `allow_cwd`), is a file, cannot be created or written, or a
      name the run writes (metrics.jsonl, checkpoints/, ...) is of the wrong kind.
  """
  if workdir is None or not str(workdir).strip():
    raise WorkdirError("no workdir given (--workdir is empty): name the directory for the "
                       "run's results, e.g. --workdir=runs/demo")
  path = Path(workdir).expanduser()
  if path.resolve() == Path.cwd().resolve() and not allow_cwd:
    raise WorkdirError(
        f"workdir {str(workdir)!r} is the current directory ({Path.cwd()}): the run's files "
        f"(config.json, metrics.jsonl, checkpoints/, ...) would mix with what is there; name a "
        f"sub-directory such as --workdir=runs/demo, or pass --allow_cwd to use it on purpose")
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"workdir {path} is a file, not a directory; give a directory with "
                       f"--workdir")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create workdir {path} ({e.strerror or e}); give a writable "
                       f"--workdir") from e
  for name in RUN_FILES:
    if (path / name).is_dir():
      raise WorkdirError(f"{path / name} is a directory, but the run writes its {name} file "
                         f"there; move it away or use another --workdir")
  for name in (*RUN_DIRS, PREVIOUS):
    if (path / name).exists() and not (path / name).is_dir():
      raise WorkdirError(f"{path / name} is a file, but the run keeps its {name}/ directory "
                         f"there; move it away or use another --workdir")
  probe = path / f".tracefl-write-test-{os.getpid()}"
  try:  # a real write: os.access says yes to root, and knows nothing of read-only mounts
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"workdir {path} is not writable ({e.strerror or e}); give a writable "
                       f"--workdir") from e
  for target in (path / n for n in (*RUN_FILES, *RUN_DIRS) if (path / n).exists()):
    if not os.access(target, os.W_OK):
      raise WorkdirError(f"{target} is not writable; give a writable --workdir")
  return path


# --- the lock ----------------------------------------------------------------------------

LOCK_FILE = ".tracefl.lock"


class WorkdirBusyError(WorkdirError):
  """Another live run holds the workdir's lock."""


class WorkdirLock:
  """`with WorkdirLock(workdir): ...` holds the workdir for the block (or `acquire`/`release`).

  Raises:
    WorkdirBusyError: one line naming the workdir and the holder, when another run holds it.
  """

  def __init__(self, workdir: str | Path):
    self.path = Path(workdir) / LOCK_FILE
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    while True:
      fd = self._open()
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise WorkdirBusyError(
            f"workdir {self.path.parent} is in use by another run ({holder}); wait for it to "
            f"end, or use another --workdir") from None
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)  # the file was removed by the run that just ended: lock the new one
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {stamp}\n".encode())
    self._fd = fd
    return self

  def _open(self) -> int:
    """The lock file, opened or created; never through a symbolic link (a dangling one made
    `open` fail with a bare 'No such file or directory')."""
    try:
      return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
      if self.path.is_symlink():
        raise WorkdirError(
            f"{self.path} is a symbolic link (to {os.readlink(self.path)}), not the lock file "
            f"a run leaves: remove it (rm {self.path}) and run again") from None
      raise WorkdirError(f"cannot open the workdir's lock file {self.path} ({e.strerror}): "
                         f"it must be a regular file the run can write; remove it or fix its "
                         f"permissions, and run again") from None

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      self.path.unlink(missing_ok=True)  # still locked: no run can take the old file meanwhile
    except OSError:
      pass
    os.close(self._fd)  # closing releases the lock
    self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# --- what a run does there ---------------------------------------------------------------


def stored_rounds(workdir: str | Path) -> list[int]:
  """The complete stored rounds of a workdir (`WORKDIR/rounds/<round>/round.json`), ascending."""
  directory = Path(workdir) / "rounds"
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / "round.json").exists())


class WorkdirState(NamedTuple):
  """What a workdir holds."""
  results: list[str]             # results found (what a fresh run would mix with)
  config_json: str | None        # config.json
  checkpoint_round: int | None   # the latest complete checkpoint's round
  summary: dict[str, Any] | None  # summary.json, when readable


def inspect_workdir(workdir: str | Path) -> WorkdirState:
  path = Path(workdir)
  results = [name for name in ("metrics.jsonl", "provenance.jsonl", "summary.json")
             if (path / name).is_file() and (path / name).stat().st_size > 0]
  # Complete checkpoints and stored rounds only: a save killed midway left a temporary folder.
  steps = [int(p.name) for p in (path / "checkpoints").iterdir()
           if p.name.isdigit() and p.is_dir()] if (path / "checkpoints").is_dir() else []
  if steps:
    results.append("checkpoints/")
  if stored_rounds(path):
    results.append("rounds/")
  config_json = summary = None
  if (path / "config.json").is_file():
    config_json = (path / "config.json").read_text(encoding="utf-8")
  try:
    summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
  except (OSError, ValueError):
    pass
  return WorkdirState(results, config_json, max(steps) if steps else None,
                      summary if isinstance(summary, dict) else None)


def _action(workdir: str | Path, config_json: str, *, rounds: int, resume: bool,
            overwrite: bool) -> tuple[str, dict[str, Any] | None]:
  """What a run of this config does in the workdir: `("fresh" | "resume" | "overwrite", None)`
  or `("finished", summary)` (nothing to do); `plan_run`'s errors."""
  path = Path(workdir)
  state = inspect_workdir(path)
  if not state.results:
    return "fresh", None
  if overwrite:
    return "overwrite", None
  holds = f"workdir {path} holds a run ({', '.join(state.results)})"
  ways_out = _WAYS_OUT.format(previous=path / PREVIOUS)
  if not resume:
    raise WorkdirError(f"{holds}; a fresh run (checkpoint.resume=False) would mix with its "
                       f"results. Resume it (the same config, checkpoint.resume=True), "
                       f"{ways_out}")
  if state.config_json is None:
    if state.checkpoint_round is not None:
      return "resume", None  # the checkpoint's own config is checked when it is restored
    raise WorkdirError(f"{holds} without its config.json, so it cannot be resumed; {ways_out}")
  try:
    diff = config_diff(state.config_json, config_json)
  except ValueError as e:
    raise WorkdirError(f"{path / 'config.json'} is not valid JSON ({e}); {ways_out}") from e
  if diff:
    raise WorkdirError(f"{holds} of a different experiment (config differs in: "
                       f"{', '.join(diff)}); resume it with its own config, {ways_out}")
  done = max(state.checkpoint_round or 0, (state.summary or {}).get("rounds") or 0)
  if done > rounds:
    raise WorkdirError(f"{holds} with {done} rounds done, more than rounds={rounds}: a shorter "
                       f"run would leave results that disagree. Pass --config.rounds={done} "
                       f"(or more) to keep or continue it, {ways_out}")
  if state.summary is not None and state.summary.get("rounds") == rounds:
    return "finished", state.summary
  return "resume", None


class RunPlan(NamedTuple):
  """What a run does in its (checked, locked) workdir."""
  workdir: Path
  action: str                       # "fresh" | "resume" | "overwrite" | "finished"
  config_json: str                  # the resolved config, as config.json holds it
  summary: dict[str, Any] | None    # the finished run's summary ("finished")


def plan_run(config: ml_collections.ConfigDict, workdir: Path) -> RunPlan:
  """What a run of `config` does in the workdir: start afresh, resume, move the previous run
  aside (`checkpoint.overwrite`), or nothing (its finished run); on resume a malformed JSONL
  row is an error now, before anything is loaded.

  Raises:
    WorkdirError: one line naming the workdir, what it holds and the ways out, when the run
      would mix with or lose results there: `checkpoint.resume=False` over results, results
      of another config, or fewer `rounds` than already done.
  """
  c = config
  config_json = c.to_json_best_effort(indent=2)
  action, finished = _action(workdir, config_json, rounds=c.rounds,
                             resume=c.checkpoint.resume, overwrite=c.checkpoint.overwrite)
  if action == "resume":
    for name in ("metrics.jsonl", "provenance.jsonl"):
      if (workdir / name).exists():
        read_jsonl(workdir / name)
  return RunPlan(workdir, action, config_json, finished)


def finished_summary(workdir: str | Path, config_json: str, rounds: int) -> dict[str, Any] | None:
  """The summary of this config's finished run in `workdir`, or None."""
  if not Path(workdir).is_dir():
    return None
  try:
    action, summary = _action(workdir, config_json, rounds=rounds, resume=True, overwrite=False)
  except WorkdirError:
    return None
  return summary if action == "finished" else None


def move_aside(workdir: str | Path) -> Path:
  """Moves a run's files and directories to `WORKDIR/previous/<time>/` (renames, no copy)."""
  path = Path(workdir)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  dest, n = path / PREVIOUS / stamp, 1
  while dest.exists():
    dest, n = path / PREVIOUS / f"{stamp}-{n}", n + 1
  dest.mkdir(parents=True)
  for name in (*RUN_FILES, *RUN_DIRS):
    if (path / name).exists():
      os.replace(path / name, dest / name)
  return dest
