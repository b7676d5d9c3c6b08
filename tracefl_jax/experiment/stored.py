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

New inputs (`model_inputs`): what a user hands the trace verb becomes the model's inputs, as
the run preprocessed its data; whatever cannot be read for sure is refused in one error that
says what the round takes (`expected_form`):

  uint8 image datasets (a `Normalization`)  integer pixels in [0, pixel_max], `[N, H, W, C]`
      (or `[N, H, W]` when C = 1, or one example): normalised here; or float inputs already
      normalised, which must lie in the range normalised pixels take (raw 0..255 pixels as
      floats would be traced silently wrong otherwise);
  token ids (an integer `input_dtype`)      integers in [0, vocab_size);
  other float datasets                      floats, preprocessed as the run's dataset is,
      within the range of the run's own test inputs (`input_range`, widened by a quarter of
      its span on each side): the raw digits pixels (0..16) given as floats are refused.

What the model takes (floats for a float model, integers for a token model, exactly
`[N, *input_shape]`, finite) is accepted exactly when `trace_clients` accepts it
(`provenance.checks.check_inputs`); the dataset's own form and one example without the batch
axis are what the verb adds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.data import Normalization
from tracefl_jax.experiment.checkpoints import CheckpointError, first_line, stderr_to_log
from tracefl_jax.experiment.config import FIELDS, base_config, config_fields
from tracefl_jax.experiment.algorithm_checks import STATEFUL
from tracefl_jax.experiment.io import top_clients
from tracefl_jax.experiment.stages import (ModelStage, build_algorithm, import_modules,
                                           model_from_spec)
from tracefl_jax.experiment.workdir import stored_rounds
from tracefl_jax.models.base import ModelDef
from tracefl_jax.provenance import ProvenanceResult, storage
from tracefl_jax.provenance import storage_files as files
from tracefl_jax.provenance.checks import widened_range as widened
from tracefl_jax.provenance.storage import StoredRound

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
  (`stages.build_algorithm`; fields a config.json of an older version lacks at their
  defaults): only its server side is used, so the client axis runs as "loop" (a sharded run
  is traced on any machine), or as the run's own for an algorithm with a per-client state
  table (which the loop does not run, and which refuses "sharded")."""
  c = base_config()
  for name, value in config_fields(config).items():
    if name in FIELDS:
      *parents, leaf = name.split(".")
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = value
  if c.algorithm not in STATEFUL:
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
  (`expected_form` says what a round takes; anything else is one ValueError saying it).

  Returns the `ProvenanceResult` (global client ids in `traced_client`) and the round, its
  `model` attached (`StoredRound.trace` traces more inputs).
  """
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


# --- new inputs, as the round's model takes them -----------------------------------------


def _is_int(dtype: np.dtype) -> bool:
  return np.issubdtype(dtype, np.integer) and dtype != np.bool_


def normalised_range(norm: Normalization) -> tuple[float, float]:
  """The smallest and largest value `norm` gives pixels in [0, pixel_max] (over channels)."""
  mean, std = np.asarray(norm.mean), np.asarray(norm.std)
  return float(np.min(-mean / std)), float(np.max((1.0 - mean) / std))


def expected_form(model: ModelDef, norm: Normalization | None,
                  vocab_size: int | None = None, input_range: Any = None) -> str:
  """What a stored round of this model and dataset takes, in words."""
  dims = ", ".join(map(str, model.input_shape))
  shape = f"[N, {dims}] (or one example [{dims}])"
  if norm is not None:
    if model.input_shape[-1] == 1:
      shape += f" or [N, {', '.join(map(str, model.input_shape[:-1]))}] without the channel axis"
    lo, hi = normalised_range(norm)
    return (f"{shape}: integer pixels in [0, {norm.pixel_max:g}] as the dataset stores them "
            f"(e.g. uint8; normalised here with mean {norm.mean}, std {norm.std}), or float "
            f"inputs already normalised so, in [{lo:.4g}, {hi:.4g}]")
  if _is_int(np.dtype(model.input_dtype)):
    ids = f" in [0, {vocab_size})" if vocab_size else ""
    return f"{shape}: integer token ids{ids}, tokenised as the run's dataset is"
  if input_range is not None:
    lo, hi = widened(input_range)
    return (f"{shape}: float inputs preprocessed as the run's dataset is, in [{lo:.4g}, "
            f"{hi:.4g}] (its test inputs lie in [{input_range[0]:.4g}, {input_range[1]:.4g}])")
  return f"{shape}: float inputs preprocessed as the run's dataset is"


def model_inputs(x: Any, model: ModelDef, norm: Normalization | None,
                 vocab_size: int | None = None, *, where: str = "this round",
                 input_range: Any = None) -> np.ndarray:
  """`x` as `model` takes it: `[N, *input_shape]` of `model.input_dtype`.

  Raises:
    ValueError: `x` is not in a form this round takes; the message names `x`'s shape, dtype
      (and range where that is the problem) and the form expected (`expected_form`).
  """
  x = np.asarray(x)
  shape, given = tuple(model.input_shape), list(x.shape)  # errors name the inputs as given

  def refuse(problem: str) -> ValueError:
    return ValueError(f"inputs have shape {given} and dtype {x.dtype}{problem}; "
                      f"{where} traces "
                      f"{expected_form(model, norm, vocab_size, input_range)}")

  if x.dtype == np.bool_ or not (_is_int(x.dtype) or np.issubdtype(x.dtype, np.floating)):
    raise refuse("")
  if x.shape == shape or (norm is not None and shape[-1] == 1 and x.shape == shape[:-1]):
    x = x[None]  # one example
  if norm is not None and shape[-1] == 1 and x.shape[1:] == shape[:-1]:
    x = x[..., None]  # grayscale images without their channel axis
  if x.ndim != len(shape) + 1 or x.shape[1:] != shape or x.shape[0] == 0:
    raise refuse("")
  model_takes_ints = _is_int(np.dtype(model.input_dtype))
  if model_takes_ints:
    if not _is_int(x.dtype):
      raise refuse("")
    if x.size and (x.min() < 0 or (vocab_size and x.max() >= vocab_size)):
      raise refuse(f" with values in [{x.min()}, {x.max()}]")
    return x.astype(model.input_dtype)
  if norm is None:
    if not np.issubdtype(x.dtype, np.floating):
      raise refuse("")
    finite = x[np.isfinite(x)]  # a non-finite row is traced as unattributable, as by
    if input_range is not None and finite.size:  # trace_clients
      lo, hi = widened(input_range)
      if finite.min() < lo or finite.max() > hi:
        raise refuse(f" with values in [{finite.min():.4g}, {finite.max():.4g}] (raw values? "
                     f"give them preprocessed as the run's dataset is)")
    return x.astype(model.input_dtype)
  if _is_int(x.dtype):  # raw pixels, as the dataset stores them
    if x.min() < 0 or x.max() > norm.pixel_max:
      raise refuse(f" with values in [{x.min()}, {x.max()}]")
    return norm(x).astype(model.input_dtype)
  lo, hi = normalised_range(norm)
  slack = 1e-3 * (hi - lo)
  finite = x[np.isfinite(x)]  # a non-finite row is traced as unattributable
  if finite.size and (finite.min() < lo - slack or finite.max() > hi + slack):
    raise refuse(f" with values in [{finite.min():.4g}, {finite.max():.4g}] (raw pixels as "
                 f"floats? give them as integers, e.g. x.astype(np.uint8))")
  return x.astype(model.input_dtype)
