"""Stored rounds: a round's models kept in the workdir, and tracing new inputs against them.

A run with `--config.provenance.store_rounds=...` keeps the chosen rounds' models (the traced
global model, the stacked client models, their ids and sizes) under `WORKDIR/rounds/`. Later,

  python -m tracefl_jax trace --workdir=runs/demo --round=40 --inputs=x.npy [--out=a.jsonl]

answers "which client is responsible for THIS prediction?" for inputs that were never seen
during training, with the run's own provenance settings; the numbers equal the online trace of
the same round.

Several processes: every process calls `save_round` with the same (host) values; orbax writes
the arrays from process 0, and process 0 writes `round.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.data import Normalization
from tracefl_jax.experiment.checkpoints import (CheckpointError, array_checksums, first_line,
                                                stderr_to_log, verify_checksums)
from tracefl_jax.experiment.stages import model_from_spec
from tracefl_jax.experiment.tracing import top_clients
from tracefl_jax.experiment.workdir import stored_rounds
from tracefl_jax.provenance import ProvenanceResult, trace_clients


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
  primary = jax.process_index() == 0
  if primary:
    (path / "round.json").unlink(missing_ok=True)
  arrays = jax.tree.map(np.asarray, {
      "global": global_vars, "clients": client_vars,
      "client_ids": np.asarray(client_ids, np.int64),
      "client_sizes": np.asarray(client_sizes, np.int64)})
  checkpointer = ocp.StandardCheckpointer()
  try:
    with stderr_to_log(Path(workdir)):
      checkpointer.save(path / "arrays", arrays, force=True)
      checkpointer.wait_until_finished()
  except Exception as e:  # a full disk, a file-size limit: orbax's words, its first line
    logging.getLogger("orbax").exception("storing round %d", round_idx)
    raise CheckpointError(f"cannot store round {round_idx} in {path} ({first_line(e)}); make "
                          f"room and run the same command again to resume") from e
  finally:
    checkpointer.close()
  if primary:
    (path / "round.json").write_text(json.dumps(
        {"round": round_idx, **meta, "checksums": array_checksums(arrays)}, indent=2) + "\n")
  return path


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
                          f"({first_line(e)})") from e
  verify_checksums(f"stored round {path}", meta.pop("checksums", None), arrays,
                   "rerun the experiment with provenance.store_rounds to store it again.")
  return StoredRound(int(meta.pop("round")), arrays["global"], arrays["clients"],
                     np.asarray(arrays["client_ids"]), np.asarray(arrays["client_sizes"]), meta)

def trace_stored_round(workdir: str | Path, x: Any, round_idx: int | None = None, *,
                       kernel: str | None = None) -> tuple[ProvenanceResult, StoredRound]:
  """Traces inputs `x` (`[N, *input_shape]`, or one example) against a stored round.

  For a run on uint8 images (mnist, cifar10, MedMNIST) `x` may be uint8 pixels, normalised
  here as the run normalised its data, or already normalised floats.

  Returns the `ProvenanceResult` (global client ids in `traced_client`) and the round.
  """
  workdir = Path(workdir)
  stored = load_round(workdir, round_idx)
  config = json.loads((workdir / "config.json").read_text())
  p, batch_size = config["provenance"], config["client"]["batch_size"]
  model, _ = model_from_spec(stored.meta["model"], jax.random.key(0))
  x = np.asarray(x)
  norm = stored.meta.get("normalization")
  if norm and x.dtype == np.uint8:  # raw pixels of a uint8 image dataset: as the run saw them
    x = Normalization(**norm)(x)
  if x.shape == model.input_shape:
    x = x[None]
  if x.shape[1:] != model.input_shape:
    raise ValueError(f"inputs have shape {x.shape}; round {stored.round} of {workdir} traces "
                     f"inputs of shape [N, {', '.join(map(str, model.input_shape))}] "
                     f"(preprocessed as the run's dataset is)")
  if np.issubdtype(np.dtype(model.input_dtype), np.integer) != np.issubdtype(x.dtype,
                                                                             np.integer):
    raise ValueError(f"inputs have dtype {x.dtype}; this model takes {np.dtype(model.input_dtype)}")
  result = trace_clients(
      model, stored.global_vars, stored.client_vars, jnp.asarray(x, model.input_dtype),
      kernel=kernel or p["kernel"], decay=p["decay"], use_decay=p["use_decay"],
      client_sizes=jnp.asarray(stored.client_sizes // batch_size),
      use_size_factor=p["use_size_factor"], clients_per_chunk=p["clients_per_chunk"] or None,
      client_ids=stored.client_ids)
  return result, stored


def attribution_rows(result: ProvenanceResult, round_idx: int,
                     top_k: int = 3) -> list[dict[str, Any]]:
  """One JSON-ready row per input: prediction, traced client, its probability, top clients."""
  probs, ids = np.asarray(result.probs), np.asarray(result.client_ids)
  rows = []
  for n in range(probs.shape[0]):
    row = {"round": round_idx, "input": n, "predicted": int(result.predicted[n]),
           "traced_client": int(result.traced_client[n])}
    if not result.attributable[n]:  # a non-finite score: no client is named
      row.update(attributable=False, probability=None, top_clients=[])
    else:
      row.update(probability=float(probs[n, result.traced_position[n]]),
                 top_clients=top_clients(probs[n], ids, top_k))
    rows.append(row)
  return rows
