"""Stored rounds: a round's models kept in the workdir, and tracing new inputs against them.

A run keeps its last round's models (`provenance.store_rounds`, default "last"; "all", a list
of rounds, or "" for none): the traced global model, the stacked client models, their ids and
sizes, under `WORKDIR/rounds/<round>/` in the library's format (`provenance/storage.py`: this module
only places rounds in the workdir and adds the run's model spec and normalisation). Later,

  python -m tracefl_jax trace --workdir=runs/demo --round=40 --inputs=x.npy [--out=a.jsonl]

answers "which client is responsible for THIS prediction?" for inputs that were never seen
during training, with the run's own provenance settings; the numbers equal the online trace of
the same round under every algorithm: a round whose server side is not FedAvg's mean (a robust
rule, a server optimizer) is re-run without each client by the run's own algorithm, rebuilt
from its config.json (`run_algorithm`). A round records its model; one copied from a run of
another model is refused. The run's `imports` are imported first (a model the user registered rebuilds
by name), and inputs may be given in the dataset's own form (uint8 pixels are normalised as
the run normalised them).

Several processes: every process calls `save_round` with the same (host) values; orbax writes
the arrays from process 0, and process 0 writes `round.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tracefl_jax.data import Normalization
from tracefl_jax.experiment.checkpoints import CheckpointError, first_line, stderr_to_log
from tracefl_jax.experiment.stages import (ModelStage, build_algorithm, import_modules,
                                           model_from_spec)
from tracefl_jax.experiment.io import top_clients
from tracefl_jax.experiment.workdir import stored_rounds
from tracefl_jax.provenance import storage
from tracefl_jax.provenance import storage_files as files
from tracefl_jax.provenance.storage import StoredRound
from tracefl_jax.models.base import ModelDef
from tracefl_jax.provenance import ProvenanceResult

_REMEDY = "rerun the experiment with provenance.store_rounds to store it again."


def rounds_directory(workdir: str | Path) -> Path:
  return Path(workdir).resolve() / "rounds"


def save_round(workdir: str | Path, round_idx: int, output: Any = None, *,
               meta: dict[str, Any], model: ModelDef | None = None, **arrays: Any) -> Path:
  """Writes `WORKDIR/rounds/<round>/` with `provenance.storage.save_round`: the round's `RoundOutput`
  (its weights and server side with it; or the arrays one by one, `global_vars=...`), written
  beside an older copy and swapped in when complete."""
  path = rounds_directory(workdir) / str(round_idx)
  try:
    with stderr_to_log(Path(workdir)):
      storage.save_round(path, output, round_idx=round_idx, model=model, meta=meta, **arrays)
  except ValueError:
    raise  # refused before anything was written: the caller's mistake, in its words
  except Exception as e:  # a full disk, a file-size limit: orbax's words, its first line
    logging.getLogger("orbax").exception("storing round %d", round_idx)
    raise CheckpointError(f"cannot store round {round_idx} in {path} ({first_line(e)}); make "
                          f"room and run the same command again to resume") from e
  return path


def round_path(workdir: str | Path, round_idx: int | None = None) -> Path:
  """`WORKDIR/rounds/<round>` of a complete stored round (default: the last one stored).

  Raises:
    CheckpointError: naming the workdir and the rounds that are stored.
  """
  available = stored_rounds(workdir)
  if not available:
    raise CheckpointError(
        f"no stored rounds in {rounds_directory(workdir)}; run the experiment with "
        f"--config.provenance.store_rounds=last (the default; or all, or a list of rounds) "
        f"to keep the client models of traced rounds")
  if round_idx is None:
    round_idx = available[-1]
  if round_idx not in available:
    raise CheckpointError(f"round {round_idx} is not stored in {rounds_directory(workdir)}; "
                          f"stored rounds: {', '.join(map(str, available))}")
  return rounds_directory(workdir) / str(round_idx)


def load_round(workdir: str | Path, round_idx: int | None = None,
               model: ModelDef | None = None, algorithm: Any = None) -> StoredRound:
  """A stored round (default: the last one stored), as `provenance.storage.load_round` gives it:
  with `model` attached (and its variables checked) when given, and the round's own removal
  of a client rebuilt from `algorithm` (the run's, `run_algorithm`).

  Raises:
    CheckpointError, one line naming the file: the round is not there, cannot be read, is
      not `model`'s, or an array does not match its checksum (the round is left as it is).
  """
  path = round_path(workdir, round_idx)
  try:
    with stderr_to_log(Path(workdir)):  # orbax's own reports go to run.log, not the terminal
      return storage.load_round(path, model, algorithm)
  except storage.StoredRoundError as e:
    raise CheckpointError(f"{str(e).rstrip('.')}. It was left as it is: {_REMEDY}") from e


def run_algorithm(config: dict[str, Any], model: ModelDef, spec: dict[str, Any]) -> Any:
  """The run's `FederatedAlgorithm` rebuilt from its config.json by the runner's own stage
  (`stages.build_algorithm`): only its server side is used, so the client axis runs as
  "loop" (a sharded run is traced on any machine)."""
  c = ml_collections.ConfigDict(json.loads(json.dumps(config)))
  c.simulation.strategy = "loop"
  return build_algorithm(c, ModelStage(model, None, spec), None)


def run_config(workdir: str | Path) -> dict[str, Any]:
  """The run's resolved config (`WORKDIR/config.json`), with one clear error without it."""
  path = Path(workdir) / "config.json"
  if not path.is_file():
    raise CheckpointError(
        f"{Path(workdir).resolve()} is not a run's workdir (no config.json); a round saved "
        f"from Python with tracefl_jax.save_round is traced with "
        f"tracefl_jax.load_round(path, model).trace(x)")
  return json.loads(path.read_text())


def trace_stored_round(workdir: str | Path, x: Any, round_idx: int | None = None, *,
                       kernel: str | None = None) -> tuple[ProvenanceResult, StoredRound]:
  """Traces inputs `x` against a stored round of a run, with the run's provenance settings.

  The run's `imports` are imported first, so a model it registered rebuilds by name. `x` is
  `[N, *input_shape]` or one example, in the dataset's own form or as the model takes it: a
  run on uint8 images (mnist, cifar10, MedMNIST, image folders) takes raw integer pixels,
  normalised here as the run normalised its data, or already normalised floats
  (`inputs.expected_form` says what a round takes; anything else is one ValueError saying it).

  Returns the `ProvenanceResult` (global client ids in `traced_client`) and the round, its
  `model` attached (`StoredRound.trace` traces more inputs).
  """
  from tracefl_jax.experiment.inputs import model_inputs  # pylint: disable=g-import-not-at-top
  workdir = Path(workdir)
  config = run_config(workdir)
  path = round_path(workdir, round_idx)
  import_modules(config.get("imports", ""))
  try:
    meta = files.read_record(files.complete_round(path))
  except storage.StoredRoundError as e:
    raise CheckpointError(f"{e}. It was left as it is: {_REMEDY}") from e
  _check_run_model(workdir, path, meta.get("model"), config)
  model, _ = model_from_spec(meta["model"], jax.random.key(0))
  algorithm = None
  if meta.get("aggregation") not in (None, "mean", "dp_fedavg"):  # the rule is re-run
    algorithm = run_algorithm(config, model, meta["model"])
  stored = load_round(workdir, int(meta["round"]), model, algorithm)
  norm = stored.meta.get("normalization")
  x = model_inputs(x, model, Normalization(**norm) if norm else None,
                   stored.meta["model"].get("vocab_size"),
                   where=f"round {stored.round} of {workdir}",
                   input_range=stored.input_range)
  p, batch_size = config["provenance"], config["client"]["batch_size"]
  result = stored.trace(
      x, kernel=kernel or p["kernel"], decay=p["decay"], use_decay=p["use_decay"],
      client_sizes=jnp.asarray(stored.client_sizes // batch_size),
      use_size_factor=p["use_size_factor"], clients_per_chunk=p["clients_per_chunk"] or None,
      score=p.get("score", "tracefl"))
  return result, stored


def _check_run_model(workdir: Path, path: Path, spec: Any, config: dict[str, Any]) -> None:
  """A round is traced by the model it records; refused when that is not the run's model
  (a round copied from another run's workdir)."""
  if not isinstance(spec, dict) or "name" not in spec:
    raise CheckpointError(f"stored round {path} does not record its model (round.json has "
                          f"no 'model'); {_REMEDY}")
  run = config.get("model", {})
  stored = (spec.get("name"), spec.get("hf_path"))
  if stored != (run.get("name"), run.get("hf_path")):
    raise CheckpointError(
        f"stored round {path} is a round of model {spec.get('hf_path') or spec['name']!r}, "
        f"but the run in {workdir} trains model {run.get('hf_path') or run.get('name')!r} "
        f"(its config.json): the round was not stored by this run; trace it in its own "
        f"run's workdir")


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
