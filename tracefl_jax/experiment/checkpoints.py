"""Checkpoint and resume with orbax-checkpoint (with stored.py, the only orbax users).

A checkpoint holds what a round loop needs to continue exactly as an uninterrupted run: the
whole server state pytree (`ServerState`: the global variables, the round, and whatever else
an algorithm keeps there: a server optimizer's state, FedDyn's h, adaptive clipping's clip
norm, the `[C, ...]` per-client state table of SCAFFOLD and FedDyn), plus JSON metadata: the resolved
config (to refuse resuming under a different experiment), the per-round history rows, the
wall time spent so far and a SHA-256 checksum of every array, verified on restore. Client
sampling and every PRNG key are functions of (seed, round), so no sampler or key state needs
saving. Orbax writes each step to a temporary directory and renames it when complete, so a
process killed mid-save (SIGKILL) leaves the previous checkpoint intact.

Several processes: every process calls `save` and `restore` (orbax synchronises them); the
state is saved as host NumPy arrays, identical in every process, which orbax writes from
process 0 only; every process restores the same step.

Orbax's own failures (thread tracebacks, TensorStore spec dumps) go to `WORKDIR/run.log`
(`quiet_orbax`); the errors raised here keep to one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.experiment.workdir import config_diff
# One checksum, and one check of it, for checkpoints and stored rounds.
from tracefl_jax.provenance.storage_files import array_checksums, checksum_mismatch


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored: corrupt, or from a different experiment."""


LOG_FILE = "run.log"  # orbax's messages, kept out of the terminal


def first_line(e: BaseException, limit: int = 400) -> str:
  """`Type: first line of the message`, at most about `limit` characters: its start and its
  end, where TensorStore puts the cause (the whole message is in run.log)."""
  text = (str(e).strip().splitlines() or [""])[0]
  if len(text) > limit:
    text = f"{text[:limit // 2]} ... {text[-limit // 2:]}"
  return f"{type(e).__name__}: {text}"


_UNWRITTEN: set[str] = set()  # run.log files a record could not be written to


class _LogFile(logging.FileHandler):
  """WORKDIR/run.log. A record it cannot write (a full disk) is dropped, not printed to the
  terminal with two tracebacks (logging's default): the run's one error line says what
  failed, and `details` no longer points at the log."""

  def emit(self, record: logging.LogRecord) -> None:
    try:  # opening the file is outside FileHandler's own guard
      super().emit(record)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)

  def handleError(self, record: logging.LogRecord) -> None:
    del record
    _UNWRITTEN.add(self.baseFilename)


def details(workdir: str | Path) -> str:
  """Where an error's whole text is: run.log, unless it could not be written."""
  path = Path(workdir).resolve() / LOG_FILE
  if str(path) in _UNWRITTEN:
    return f"{path} could not be written either"
  return f"details in {path}"


@contextlib.contextmanager
def quiet_orbax(workdir: str | Path | None):
  """Sends orbax's (absl's) log records and the tracebacks of its worker threads to
  `WORKDIR/run.log` instead of the terminal (nowhere when `workdir` is None)."""
  loggers = [logging.getLogger(name) for name in ("absl", "orbax")]
  saved = [(lg, lg.level, lg.propagate, list(lg.handlers)) for lg in loggers]
  handler: logging.Handler = (_LogFile(Path(workdir).resolve() / LOG_FILE, delay=True)
                              if workdir is not None else logging.NullHandler())
  handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
  for lg in loggers:
    lg.handlers = [handler]
    lg.propagate = False
    lg.setLevel(logging.WARNING)
  hook = threading.excepthook

  def to_log(args):
    logging.getLogger("orbax").error("exception in thread %s", args.thread,
                                     exc_info=(args.exc_type, args.exc_value,
                                               args.exc_traceback))
  def unraisable_to_log(args):  # may run in a thread after the block: straight to the file
    if workdir is None:
      return
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value,
                                              args.exc_traceback))
    try:
      with open(Path(workdir) / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(f"exception ignored in {args.object!r}\n{text}")
    except OSError:
      pass
  threading.excepthook, unraisable = to_log, sys.unraisablehook
  sys.unraisablehook = unraisable_to_log
  try:
    yield
  finally:
    threading.excepthook = hook  # orbax's futures may end after the block: keep them quiet
    if unraisable is not sys.__unraisablehook__:
      sys.unraisablehook = unraisable
    for lg, level, propagate, handlers in saved:
      lg.handlers, lg.propagate = handlers, propagate
      lg.setLevel(level)
    handler.close()


@contextlib.contextmanager
def stderr_to_log(workdir: str | Path):
  """Sends the process's stderr (file descriptor 2) to `WORKDIR/run.log` for the block: what
  TensorStore's threads print from C++ when a write fails ("Event loop is closed" tracebacks)
  bypasses Python's logging."""
  try:
    sys.stderr.flush()
    saved = os.dup(2)
    log = os.open(Path(workdir) / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  except OSError:  # no descriptor 2 or no room for the log: leave stderr as it is
    yield
    return
  os.dup2(log, 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(log)


def leaf_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def verify_checksums(what: str, saved: dict[str, str] | None, tree: Any, remedy: str) -> None:
  """Raises `CheckpointError` naming the first leaf whose data differs from its checksum
  (`storage_files.checksum_mismatch`, the stored rounds' check)."""
  mismatch = checksum_mismatch(saved, tree)
  if mismatch:
    raise CheckpointError(f"{what} is corrupt: {mismatch}. It was left as it is: {remedy}")


def to_host(tree: Any) -> dict[str, np.ndarray]:
  """A pytree's leaves as `{leaf path: NumPy array}` (what orbax writes)."""
  return {leaf_name(p): np.asarray(leaf)
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def from_host(arrays: dict[str, Any], example: Any) -> Any:
  """The pytree of `example`'s structure from `to_host`'s dict: JAX arrays where `example`
  has them, Python scalars where it has them (e.g. `ServerState.round`)."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(example)
  leaves = []
  for path, leaf in paths:
    value = arrays[leaf_name(path)]
    if isinstance(leaf, (bool, int, float)):
      leaves.append(type(leaf)(np.asarray(value)))
    elif isinstance(leaf, jax.Array):
      leaves.append(jnp.asarray(value))
    else:
      leaves.append(np.asarray(value))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _flat_keys(arrays: dict[str, Any]) -> dict[str, Any]:
  # orbax nests keys on "/": number the leaves, keep their names in the metadata.
  return {f"leaf{i:05d}": v for i, v in enumerate(arrays.values())}


REMEDY = ("--overwrite moves the run to WORKDIR/previous/<time>/ to start afresh, or use "
          "another --workdir.")


class Checkpointer:
  """Saves `(state, history, seconds)` every `every` rounds under `workdir/checkpoints`."""

  def __init__(self, workdir: str | Path, config_json: str, every: int, keep: int = 2):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = Path(workdir).resolve() / "checkpoints"
    self.every = every
    self._config_json = config_json
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_round(self) -> int | None:
    return self._manager.latest_step()

  def maybe_save(self, state: Any, history: list[dict[str, Any]], seconds: float,
                 *, force: bool = False) -> bool:
    """Saves the server state `state` (any pytree with a `round` field) with the history
    rows and the wall time so far, when its round is due (or `force`)."""
    round_idx = int(state.round)
    if not (force or (self.every and round_idx % self.every == 0)):
      return False
    if self._manager.latest_step() == round_idx:
      return False
    arrays = to_host(state)
    try:
      with stderr_to_log(self.directory.parent):
        self._save(round_idx, arrays, history, seconds)
    except Exception as e:  # a full disk, a file-size limit: orbax's words, its first line
      logging.getLogger("orbax").exception("saving checkpoint %d", round_idx)
      raise CheckpointError(
          f"cannot write checkpoint {round_idx} in {self.directory} ({first_line(e)}); the "
          f"rows of rounds 1-{round_idx} and the earlier checkpoints are kept: make room and "
          f"run the same command again to resume ({details(self.directory.parent)})") from e
    return True

  def _save(self, round_idx: int, arrays: dict[str, np.ndarray],
            history: list[dict[str, Any]], seconds: float) -> None:
    ocp = self._ocp
    self._manager.save(round_idx, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_flat_keys(arrays)),
        meta=ocp.args.JsonSave({"round": round_idx, "config": self._config_json,
                                "history": history, "seconds": seconds,
                                "leaves": list(arrays), "checksums": array_checksums(arrays)})))
    self._manager.wait_until_finished()

  def restore(self, example_state: Any) -> tuple[Any, list[dict[str, Any]], float]:
    """The latest checkpoint as `(state, history, seconds)`, `state` of `example_state`'s
    structure.

    Raises:
      CheckpointError: naming the directory, when the checkpoint is unreadable, its arrays do
        not match their checksums (naming the array), or it was written by a run with a
        different config or state structure. The checkpoint is left untouched.
    """
    step = self._manager.latest_step()
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    ocp = self._ocp
    where = self.directory / str(step)
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = meta["meta"]
      diff = config_diff(meta["config"], self._config_json)
    except Exception as e:  # orbax raises many types for unreadable files
      logging.getLogger("orbax").exception("restoring %s", where)
      raise CheckpointError(f"checkpoint {where} is corrupt or unreadable ({first_line(e)}). "
                            f"It was left as it is: {REMEDY}") from e
    if diff:
      raise CheckpointError(
          f"checkpoint {where} was written by a different experiment (config differs in: "
          f"{', '.join(diff)}). Resume with the same config, or use another --workdir.")
    example = to_host(example_state)
    if list(example) != meta.get("leaves"):
      raise CheckpointError(
          f"checkpoint {where} holds a server state of other fields than this run's "
          f"({len(meta.get('leaves') or [])} arrays, this run has {len(example)}). It was left "
          f"as it is: {REMEDY}")
    try:
      with stderr_to_log(self.directory.parent):
        flat = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_flat_keys(example))))["state"]
    except Exception as e:
      logging.getLogger("orbax").exception("restoring %s", where)
      raise CheckpointError(
          f"checkpoint {where} does not hold this model's variables or is corrupt "
          f"({first_line(e)}). It was left as it is: {REMEDY}") from e
    arrays = dict(zip(example, (flat[k] for k in _flat_keys(example))))
    verify_checksums(f"checkpoint {where}", meta.get("checksums"), arrays, REMEDY)
    return (from_host(arrays, example_state), list(meta["history"]),
            float(meta.get("seconds") or 0.0))

  def close(self) -> None:
    self._manager.close()
