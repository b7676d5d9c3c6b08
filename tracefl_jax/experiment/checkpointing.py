"""Checkpoint and resume with orbax-checkpoint (the only module that imports orbax), and the
workdir rules that keep runs from mixing or losing results.

A checkpoint holds what a round loop needs to continue exactly as an uninterrupted run:
the round number and the global variables (array state), plus JSON metadata: the resolved
config (to refuse resuming under a different experiment), the per-round history rows and a
SHA-256 checksum of every array, verified on restore. Client sampling and every PRNG key are
functions of (seed, round), so no sampler or key state needs saving. Orbax writes each step to
a temporary directory and renames it when complete, so a process killed mid-save (SIGKILL)
leaves the previous checkpoint intact.

The workdir holds one run. `check_workdir` checks its path and layout before anything is
loaded or trained; `plan_run` decides what a run of a config does there: start afresh (an
empty workdir), resume (the same config's unfinished run), nothing (its finished run), or
refuse (results of another config, `checkpoint.resume=False` over results, fewer rounds than
already done); `move_aside` moves a previous run to `WORKDIR/previous/<time>/` for
`checkpoint.overwrite`. Nothing here deletes results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored: corrupt, or from a different experiment."""


class WorkdirError(ValueError):
  """A workdir that cannot take this run: its path, layout, or the results it holds."""


# Config fields that do not change results: a run may resume with other values of these
# (a dotted prefix covers a whole section).
_RESUMABLE_FIELDS = ("rounds", "checkpoint", "client.divergence_factor")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _fingerprint(config_json: str) -> dict[str, Any]:
  """The config's dotted fields that decide results."""
  return {k: v for k, v in _flatten(json.loads(config_json)).items()
          if not any(k == f or k.startswith(f + ".") for f in _RESUMABLE_FIELDS)}


def config_diff(saved_json: str, current_json: str) -> list[str]:
  """The fields in which two configs differ in results, as `name (saved -> current)`."""
  saved, current = _fingerprint(saved_json), _fingerprint(current_json)
  return [f"{k} ({saved.get(k)!r} -> {current.get(k)!r})"
          for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def array_checksums(tree: Any) -> dict[str, str]:
  """`{leaf path: SHA-256 of dtype, shape and bytes}` of every array of a pytree."""
  sums = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    digest = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    digest.update(a.tobytes())
    sums[jax.tree_util.keystr(path, simple=True, separator="/")] = digest.hexdigest()
  return sums


def _verify_checksums(what: str, saved: dict[str, str] | None, tree: Any,
                      remedy: str) -> None:
  """Raises `CheckpointError` naming the first leaf whose data differs from its checksum."""
  if saved is None:  # written before checksums existed
    return
  now = array_checksums(tree)
  for name in sorted(set(saved) | set(now)):
    if saved.get(name) != now.get(name):
      problem = ("is missing" if name not in now else "was not written with a checksum"
                 if name not in saved else "does not match the SHA-256 checksum written "
                 "with it")
      raise CheckpointError(f"{what} is corrupt: array {name} {problem}. It was left as it "
                            f"is: {remedy}")


_REMEDY = ("--overwrite moves the run to WORKDIR/previous/<time>/ to start afresh, or use "
           "another --workdir.")


class Checkpointer:
  """Saves `(round, variables, history)` every `every` rounds under `workdir/checkpoints`."""

  def __init__(self, workdir: str | Path, config_json: str, every: int, keep: int = 2):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = Path(workdir).resolve() / "checkpoints"
    self.every = every
    self._config_json = config_json
    # Orbax logs every save at INFO through absl; keep the console for the progress bar.
    logging.getLogger("absl").setLevel(logging.WARNING)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_round(self) -> int | None:
    return self._manager.latest_step()

  def maybe_save(self, round_idx: int, variables: Any, history: list[dict[str, Any]],
                 *, force: bool = False) -> bool:
    if not (force or (self.every and round_idx % self.every == 0)):
      return False
    if self._manager.latest_step() == round_idx:
      return False
    ocp = self._ocp
    state = {"variables": variables}
    self._manager.save(round_idx, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"round": round_idx, "config": self._config_json,
                                "history": history, "checksums": array_checksums(state)})))
    self._manager.wait_until_finished()
    return True

  def restore(self, example_variables: Any) -> tuple[int, Any, list[dict[str, Any]]]:
    """The latest checkpoint as `(round, variables, history)`.

    Raises:
      CheckpointError: naming the directory, when the checkpoint is unreadable, its arrays do
        not match their checksums (naming the array), or it was written by a run with a
        different config. The checkpoint is left untouched.
    """
    step = self._manager.latest_step()
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    ocp = self._ocp
    where = self.directory / str(step)
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = meta["meta"]
      saved, current = _fingerprint(meta["config"]), _fingerprint(self._config_json)
    except Exception as e:  # orbax raises many types for unreadable files
      raise CheckpointError(
          f"checkpoint {where} is corrupt or unreadable ({type(e).__name__}: {e}). It was left "
          f"as it is: {_REMEDY}") from e
    if saved != current:
      diff = config_diff(meta["config"], self._config_json)
      raise CheckpointError(
          f"checkpoint {where} was written by a different experiment (config differs in: "
          f"{', '.join(diff)}). Resume with the same config, or use another --workdir.")
    abstract = {"variables": jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), example_variables)}
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:
      raise CheckpointError(
          f"checkpoint {where} does not hold this model's variables or is corrupt "
          f"({type(e).__name__}: {e}). It was left as it is: {_REMEDY}") from e
    _verify_checksums(f"checkpoint {where}", meta.get("checksums"), state, _REMEDY)
    return int(meta["round"]), state["variables"], list(meta["history"])

  def close(self) -> None:
    self._manager.close()


# --- Stored rounds: a round's models kept for tracing after training ----------------------


class StoredRound(NamedTuple):
  """A traced round as stored in the workdir (`provenance.store_rounds`)."""
  round: int
  global_vars: Any         # the model provenance explains (G_t)
  client_vars: Any         # the round's client models, every leaf stacked [K, ...]
  client_ids: np.ndarray   # [K] global ids, in the round's order
  client_sizes: np.ndarray # [K] example counts
  meta: dict[str, Any]     # {"model": model_spec, ...}


def rounds_directory(workdir: str | Path) -> Path:
  return Path(workdir).resolve() / "rounds"


def save_round(workdir: str | Path, round_idx: int, *, global_vars: Any, client_vars: Any,
               client_ids: Any, client_sizes: Any, meta: dict[str, Any]) -> Path:
  """Writes `WORKDIR/rounds/<round>/` (orbax arrays, then `round.json` last: a round without
  `round.json` was interrupted and is not listed)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = rounds_directory(workdir) / str(round_idx)
  (path / "round.json").unlink(missing_ok=True)
  arrays = {"global": global_vars, "clients": client_vars,
            "client_ids": np.asarray(client_ids, np.int64),
            "client_sizes": np.asarray(client_sizes, np.int64)}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / "arrays", arrays, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  (path / "round.json").write_text(json.dumps(
      {"round": round_idx, **meta, "checksums": array_checksums(arrays)}, indent=2) + "\n")
  return path


def stored_rounds(workdir: str | Path) -> list[int]:
  """The complete stored rounds of a workdir, ascending."""
  directory = rounds_directory(workdir)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / "round.json").exists())


def load_round(workdir: str | Path, round_idx: int | None = None) -> StoredRound:
  """A stored round (default: the last one stored).

  Raises:
    CheckpointError: naming the workdir and the rounds that are stored, when the round is not
      there or cannot be read, or naming the array whose data does not match its checksum.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  available = stored_rounds(workdir)
  if not available:
    raise CheckpointError(
        f"no stored rounds in {rounds_directory(workdir)}; run the experiment with "
        f"--config.provenance.store_rounds=all (or a list of rounds, or 'last') to keep the "
        f"client models of traced rounds")
  if round_idx is None:
    round_idx = available[-1]
  if round_idx not in available:
    raise CheckpointError(f"round {round_idx} is not stored in {rounds_directory(workdir)}; "
                          f"stored rounds: {', '.join(map(str, available))}")
  path = rounds_directory(workdir) / str(round_idx)
  try:
    meta = json.loads((path / "round.json").read_text())
    checkpointer = ocp.StandardCheckpointer()
    arrays = checkpointer.restore(path / "arrays")
    checkpointer.close()
  except Exception as e:  # orbax raises many types for unreadable files
    raise CheckpointError(f"stored round {path} is corrupt or unreadable "
                          f"({type(e).__name__}: {e})") from e
  _verify_checksums(f"stored round {path}", meta.pop("checksums", None), arrays,
                    "rerun the experiment with provenance.store_rounds to store it again.")
  return StoredRound(int(meta.pop("round")), arrays["global"], arrays["clients"],
                     np.asarray(arrays["client_ids"]), np.asarray(arrays["client_sizes"]), meta)


# --- The workdir: one run, never mixed with another, never deleted ---------------------

# What a run writes into its workdir (moved aside together by `move_aside`).
RUN_FILES = ("config.json", "partition.json", "metrics.jsonl", "provenance.jsonl",
             "summary.json", "label_distribution.png", "client_probs.png")
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


def plan_run(workdir: str | Path, config_json: str, *, rounds: int, resume: bool,
             overwrite: bool) -> tuple[str, dict[str, Any] | None]:
  """What a run of this config does in the workdir: `("fresh" | "resume" | "overwrite", None)`
  or `("finished", summary)` (nothing to do).

  Raises:
    WorkdirError: one line naming the workdir, what it holds and the ways out, when the run
      would mix with or lose results there: `resume=False` over results, results of another
      config, or fewer `rounds` than already done.
  """
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


def finished_summary(workdir: str | Path, config_json: str, rounds: int) -> dict[str, Any] | None:
  """The summary of this config's finished run in `workdir`, or None."""
  if not Path(workdir).is_dir():
    return None
  try:
    plan, summary = plan_run(workdir, config_json, rounds=rounds, resume=True, overwrite=False)
  except WorkdirError:
    return None
  return summary if plan == "finished" else None


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


def read_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], bool]:
  """The rows of a JSONL file this package wrote, and whether a torn last line was dropped.

  A last line that is not valid JSON was torn by a crash mid-write (rows are written one
  line at a time): it is dropped. Any other malformed line is a `WorkdirError` naming the
  file and the line number.
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
        return rows, True
      raise WorkdirError(
          f"{path} line {number} is not valid JSON ({e}); only a torn last line (a crash "
          f"mid-write) is dropped on resume: repair or delete that line, or start afresh with "
          f"--overwrite") from e
    rows.append(row)
  return rows, False
