"""Checkpoint and resume with orbax-checkpoint: the only module that imports orbax.

A checkpoint holds what a round loop needs to continue exactly as an uninterrupted run:
the round number and the global variables (array state), plus JSON metadata: the resolved
config (to refuse resuming under a different experiment) and the per-round history rows.
Client sampling and every PRNG key are functions of (seed, round), so no sampler or key state
needs saving. Orbax writes each step to a temporary directory and renames it when complete,
so a process killed mid-save (SIGKILL) leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored: corrupt, or from a different experiment."""


# Config fields that do not change results: a run may resume with other values of these.
_RESUMABLE_FIELDS = ("rounds", "checkpoint")


def _fingerprint(config_json: str) -> dict[str, Any]:
  config = json.loads(config_json)
  for field in _RESUMABLE_FIELDS:
    config.pop(field, None)
  return config


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
    self._manager.save(round_idx, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"variables": variables}),
        meta=ocp.args.JsonSave({"round": round_idx, "config": self._config_json,
                                "history": history})))
    self._manager.wait_until_finished()
    return True

  def restore(self, example_variables: Any) -> tuple[int, Any, list[dict[str, Any]]]:
    """The latest checkpoint as `(round, variables, history)`.

    Raises:
      CheckpointError: naming the directory, when the checkpoint is unreadable or was written
        by a run with a different config. The checkpoint is left untouched.
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
          f"as it is: move it away to start afresh, or use another --workdir.") from e
    if saved != current:
      diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
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
          f"({type(e).__name__}: {e}). It was left as it is: move it away to start afresh, "
          f"or use another --workdir.") from e
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
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / "arrays", {
      "global": global_vars, "clients": client_vars,
      "client_ids": np.asarray(client_ids, np.int64),
      "client_sizes": np.asarray(client_sizes, np.int64)}, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  (path / "round.json").write_text(json.dumps({"round": round_idx, **meta}, indent=2) + "\n")
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
      there or cannot be read.
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
  return StoredRound(int(meta.pop("round")), arrays["global"], arrays["clients"],
                     np.asarray(arrays["client_ids"]), np.asarray(arrays["client_sizes"]), meta)
