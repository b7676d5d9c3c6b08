"""`run(config, workdir)`: translates a config into library calls and owns the workdir.

The round loop, evaluation and the provenance protocol are the library's (`fl.rounds`,
`provenance.protocol`); this module builds them from the config and adds per-round callbacks
that write files, save checkpoints and drive the progress bar.

Writes into `workdir`:
  config.json       the resolved config;
  partition.json    each client's label counts (the provenance ground truth);
  metrics.jsonl     one row per round (global accuracy, client loss, provenance summary);
  provenance.jsonl  one row per traced input (round, input, labels, traced client, top
                    clients with probabilities, correct, the traced client's label counts);
  summary.json      the run's headline numbers.
Every row is flushed as soon as its round ends, so a crash loses nothing already computed.

The workdir holds one run (`checkpointing.plan_run`): its path and layout are checked before
anything is loaded; a run of the same config resumes (or, finished, changes nothing); results
of another config, `checkpoint.resume=False` over results, or fewer rounds than done are
refused with the ways out; `checkpoint.overwrite` moves the old run to WORKDIR/previous/.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from tracefl_jax.data import fixup_partition, load_dataset, make_partition
from tracefl_jax.data.base import DIGITS_MEAN, DIGITS_STD
from tracefl_jax.data.federated import federate, flip_labels
from tracefl_jax.data.partition import Partition
from tracefl_jax.experiment.checkpointing import (Checkpointer, WorkdirError, check_workdir,
                                                  move_aside, plan_run, read_jsonl, save_round)
from tracefl_jax.experiment import memory
from tracefl_jax.experiment.config import (parse_faulty_clients, parse_flip, parse_int_list,
                                           parse_store_rounds, validate)
from tracefl_jax.experiment.tracing import ProvenanceLog
from tracefl_jax.fl.client import make_optimizer
from tracefl_jax.fl.privacy import DPSettings, dp_epsilon
from tracefl_jax.fl.rounds import (GlobalEvaluator, RoundInfo, ServerState, TrainingDivergedError,
                                   federated_averaging, run_rounds)
from tracefl_jax.models import get_model
from tracefl_jax.provenance.protocol import (ProtocolSettings, provenance_callback,
                                             summarize_rounds)


def _partition(c: ml_collections.ConfigDict, labels: np.ndarray, num_classes: int):
  p = c.partition
  options: dict[str, Any] = {}
  if p.method == "dirichlet":
    options = dict(alpha=p.alpha, self_balancing=p.self_balancing,
                   min_partition_size=p.min_partition_size)
  elif p.method == "pathological":
    options = dict(classes_per_client=p.classes_per_client)
  elif p.method == "shards":
    options = dict(shards_per_client=p.shards_per_client)
  part = make_partition(labels, p.method, c.num_clients, c.seed, num_classes=num_classes,
                        **options)
  if p.fixup:
    part = fixup_partition(part, labels, min_label_count=p.min_label_count,
                           max_per_client=p.max_per_client, min_client_size=p.min_client_size)
    if part.num_clients < c.clients_per_round:
      raise ValueError(
          f"the partition fix-up left {part.num_clients} clients, fewer than "
          f"clients_per_round={c.clients_per_round}; lower partition.min_client_size or "
          f"clients_per_round, or raise partition.alpha")
  if p.max_clients:  # e.g. exactly 10,000 clients from a partition over more
    if part.num_clients < p.max_clients:
      raise ValueError(
          f"partition.max_clients={p.max_clients}: the partition has only {part.num_clients} "
          f"clients{' after the fix-up' if p.fixup else ''}; raise num_clients or the "
          f"dataset's size")
    part = Partition.from_indices(part.client_indices[:p.max_clients], labels, num_classes)
  return part


def _dataset_options(c: ml_collections.ConfigDict) -> dict[str, Any]:
  d = c.dataset
  shape = tuple(int(v) for v in str(d.synthetic_shape).split(",") if v)
  if d.name in ("synthetic", "synthetic_structured"):
    return dict(num_train=d.synthetic_size, num_test=max(d.synthetic_size // 5, 100),
                image_shape=shape, num_classes=d.synthetic_classes, seed=c.seed,
                noise=d.synthetic_noise)
  if d.name == "synthetic_text":
    return dict(num_train=d.synthetic_size, num_test=max(d.synthetic_size // 5, 100),
                seq_len=shape[0], vocab_size=d.vocab_size or 100,
                num_classes=d.synthetic_classes, seed=c.seed)
  if d.name in ("dbpedia", "yahoo"):
    return dict(tokenizer=d.tokenizer, max_length=d.max_length, download=d.download)
  if d.name in ("mnist", "cifar10", "pathmnist", "organamnist"):
    return dict(download=d.download)
  return {}


def model_spec(c: ml_collections.ConfigDict, ds) -> dict[str, Any]:
  """What rebuilds the run's `ModelDef` without the dataset (stored with traced rounds)."""
  spec: dict[str, Any] = {"name": c.model.name, "hf_path": c.model.hf_path,
                          "input_shape": list(ds.input_shape), "num_classes": ds.num_classes,
                          "vocab_size": None, "pad_token_id": None}
  if c.dataset.tokenizer:  # the tokenizer may have gained GPT's [PAD] token: pad with its id
    from tracefl_jax.data.text import load_tokenizer  # pylint: disable=g-import-not-at-top
    tok = load_tokenizer(c.dataset.tokenizer)
    spec["vocab_size"], spec["pad_token_id"] = len(tok), tok.pad_token_id
  elif c.dataset.name == "synthetic_text":
    spec["pad_token_id"] = 0  # make_synthetic_text pads with 0
  if (not c.model.hf_path and spec["vocab_size"] is None and ds.normalization is None
      and np.issubdtype(ds.x_train.dtype, np.integer)):  # token ids (uint8 pixels are not)
    spec["vocab_size"] = (c.dataset.vocab_size
                          or int(max(ds.x_train.max(), ds.x_test.max())) + 1)
  return spec


def build_model(spec: dict[str, Any], key: jax.Array):
  """(ModelDef, initial variables) from a `model_spec`: a registry model, or a Hugging Face
  checkpoint's architecture and weights."""
  if spec["hf_path"]:
    from tracefl_jax.models.hf_import import load_hf_classifier  # pylint: disable=g-import-not-at-top
    return load_hf_classifier(spec["hf_path"], spec["num_classes"],
                              seq_len=spec["input_shape"][0], vocab_size=spec["vocab_size"],
                              pad_token_id=spec["pad_token_id"])
  model = get_model(spec["name"], tuple(spec["input_shape"]), spec["num_classes"],
                    vocab_size=spec["vocab_size"], pad_token_id=spec["pad_token_id"])
  return model, model.init(key)


def _build_model(c: ml_collections.ConfigDict, spec: dict[str, Any], key: jax.Array):
  model, variables = build_model(spec, key)
  if c.model.torchvision_weights and not spec["hf_path"]:
    from tracefl_jax.models.torchvision_import import import_torchvision  # pylint: disable=g-import-not-at-top
    variables = import_torchvision(variables, c.model.torchvision_weights, skip_head=True)
  return model, variables


class _JsonlWriter:
  def __init__(self, path: Path):
    self._f = open(path, "a", encoding="utf-8")

  def write(self, row: dict[str, Any]) -> None:
    # Standard JSON only: a non-finite number is written as null.
    self._f.write(json.dumps(_finite(row), default=_to_builtin, allow_nan=False) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def _finite(obj: Any) -> Any:
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  return obj


def _to_builtin(obj: Any) -> Any:
  if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
    return _finite(np.asarray(obj).tolist())
  raise TypeError(f"not JSON serialisable: {type(obj)}")


def _truncate_jsonl(path: Path, last_round: int) -> None:
  """Keeps the rows of rounds <= last_round (a resumed run recomputes the rest); a torn last
  line (a crash mid-write) belongs to a later round and goes with them."""
  if not path.exists():
    return
  rows, torn = read_jsonl(path)
  if torn:
    print(f"note: dropped the torn last line of {path} (a crash mid-write; it belonged to a "
          f"round after the checkpoint, which is run again)", file=sys.stderr)
  for number, row in enumerate(rows, 1):
    if not isinstance(row.get("round"), int):
      raise WorkdirError(f"{path}: row {number} has no round number; repair or delete it, or "
                         f"start afresh with --overwrite")
  _write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows
                              if r["round"] <= last_round))


def _write_atomic(path: Path, text: str) -> None:
  """Writes a whole file or nothing (a crash leaves the old file, never half of the new)."""
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


def import_modules(names: str) -> None:
  """Imports the config's `imports` (modules that register datasets or models by name)."""
  for name in (n.strip() for n in str(names).split(",")):
    if not name:
      continue
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ValueError(f"imports: cannot import module {name!r} ({e}); it must be importable "
                       f"from the current directory or PYTHONPATH") from e


def protocol_settings(c: ml_collections.ConfigDict,
                      faulty_clients: list[int] | None = None) -> ProtocolSettings:
  """The config's provenance section as the library's `ProtocolSettings` (`faulty_clients`:
  the ids `faulty.clients` resolved to, needed for "largest")."""
  p = c.provenance
  if faulty_clients is None:
    faulty_clients = parse_faulty_clients(c.faulty.clients)
    if faulty_clients is None:
      raise ValueError("faulty.clients='largest' is resolved on the partition: pass the ids")
  return ProtocolSettings(
      mode=p.mode, per_label=p.per_label, max_faulty_inputs=p.max_faulty_inputs,
      faulty_clients=tuple(faulty_clients), flip=parse_flip(c.faulty.flip),
      kernel=p.kernel, decay=p.decay, use_decay=p.use_decay,
      use_size_factor=p.use_size_factor,
      size_unit=c.client.batch_size,  # the original counts the data-size factor in batches
      clients_per_chunk=p.clients_per_chunk, block_mask=p.block_mask,
      shard_clients=p.shard_clients,
      counterfactual=p.counterfactual, feddebug=p.feddebug,
      feddebug_inputs=p.feddebug_inputs, feddebug_threshold=p.feddebug_threshold)


def _normalization_meta(ds) -> dict[str, Any] | None:
  """The dataset's `Normalization` as JSON (stored rounds normalise uint8 inputs with it)."""
  norm = ds.normalization
  return None if norm is None else dataclasses.asdict(norm)


def _feddebug_normalize(ds):
  """The test transform's normalisation for FedDebug's random inputs (in [0, 1]): the image
  dataset's own `Normalization` on a [0, 1] scale; digits are stored normalised (float)."""
  if ds.normalization is not None:
    return dataclasses.replace(ds.normalization, pixel_max=1.0)
  if ds.name == "digits":
    mean, std = np.asarray(DIGITS_MEAN, np.float32), np.asarray(DIGITS_STD, np.float32)
    return lambda x: (x - mean) / std
  return None


def run(config: ml_collections.ConfigDict, workdir: str | Path, *,
        progress: bool = True, allow_cwd: bool = False) -> dict[str, Any]:
  """Runs one federated experiment with online provenance; returns the summary dict.

  If `workdir` holds a checkpoint of the same experiment (and `checkpoint.resume`), the run
  continues after the checkpoint's round and ends exactly as an uninterrupted run would; if
  it holds the same experiment's finished run, nothing changes and its summary is returned.

  Raises:
    WorkdirError: before anything is loaded, for a workdir that is empty, the current
      directory (unless `allow_cwd`), not writable or of the wrong layout, or holds results
      this run would mix with or lose (see `checkpointing.plan_run`).
    CheckpointError: a checkpoint that is corrupt or of another experiment (left in place).
    TrainingDivergedError: the loss exploded; earlier rounds' rows and checkpoints stay.
  """
  import_modules(config.imports)
  validate(config)
  memory.reset_peak_rss()  # this run's peak, not an earlier run's of the same process
  c = config
  workdir = check_workdir(workdir, allow_cwd=allow_cwd)
  config_json = c.to_json_best_effort(indent=2)
  plan, finished = plan_run(workdir, config_json, rounds=c.rounds, resume=c.checkpoint.resume,
                            overwrite=c.checkpoint.overwrite)
  if plan == "finished":
    print(f"nothing to do: {workdir} holds this config's finished run ({c.rounds} rounds); "
          f"its files are unchanged", file=sys.stderr)
    return finished
  if plan == "resume":  # a malformed row is an error now, before anything is loaded
    for name in ("metrics.jsonl", "provenance.jsonl"):
      if (workdir / name).exists():
        read_jsonl(workdir / name)

  ds = load_dataset(c.dataset.name, data_dir=c.dataset.data_dir, **_dataset_options(c))
  x_train, y_train = ds.x_train, ds.y_train
  if c.dataset.num_train:
    x_train, y_train = x_train[: c.dataset.num_train], y_train[: c.dataset.num_train]
  num_test = min(c.eval.max_test_inputs, c.dataset.num_test or len(ds.y_test))
  x_test, y_test = ds.x_test[:num_test], ds.y_test[:num_test]

  part = _partition(c, y_train, ds.num_classes)
  client_indices = list(part.client_indices)
  faulty = parse_faulty_clients(c.faulty.clients)
  # The flip acts on the labels the dataset has (as the original's mapping does in effect:
  # "1..13 -> 0" on a 10-class dataset flips 1..9).
  flip = {s: d for s, d in parse_flip(c.faulty.flip).items() if s < ds.num_classes}
  bad = sorted({d for d in flip.values() if not 0 <= d < ds.num_classes})
  if bad:
    raise ValueError(f"faulty.flip maps to labels {bad} that {c.dataset.name} does not have "
                     f"(labels 0..{ds.num_classes - 1})")
  if (faulty is None or faulty) and not flip:
    raise ValueError(f"faulty.flip={c.faulty.flip!r} flips no label of {c.dataset.name} "
                     f"(labels 0..{ds.num_classes - 1})")
  if faulty is None:  # "largest": the client with the most examples the flip changes
    faulty = [int(np.argmax(part.label_counts[:, sorted(flip)].sum(axis=1)))]
  bad = [k for k in faulty if k >= part.num_clients]
  if bad:
    raise ValueError(f"faulty.clients {bad} do not exist: the partition has "
                     f"{part.num_clients} clients after the fix-up")
  if faulty:
    x_train, y_train, client_indices = flip_labels(y_train, client_indices, faulty, flip,
                                                   x_train)
  # Ground truth for provenance is what each client really trained on (flips included).
  # Image datasets stay uint8 on the device; the client step normalises each batch.
  data = federate(x_train, y_train, client_indices, num_classes=ds.num_classes,
                  normalization=ds.normalization)

  root = jax.random.key(c.seed)
  spec = model_spec(c, ds)
  model, variables = _build_model(c, spec, jax.random.fold_in(root, 0))  # rounds count from 1
  optimizer = make_optimizer(c.client.optimizer, c.client.learning_rate,
                             c.client.weight_decay, c.client.momentum)
  dp = None
  if c.dp.enabled:
    dp = DPSettings(clip_norm=c.dp.clip_norm, noise_multiplier=c.dp.noise_multiplier,
                    clients_per_round=c.clients_per_round, noise_batch_stats=c.dp.parity,
                    trace_clean=c.dp.parity)
  algorithm = federated_averaging(
      model, optimizer, batch_size=c.client.batch_size, local_epochs=c.client.local_epochs,
      weighting=c.aggregation.weighting, strategy=c.simulation.strategy,
      clients_per_chunk=c.simulation.clients_per_chunk, dp=dp,
      compute_dtype=jnp.dtype(c.simulation.compute_dtype), donate=True)
  # Normalised floats: the evaluator's x is what provenance traces.
  evaluator = GlobalEvaluator(model, x_test, y_test, c.eval.batch_size,
                              normalization=ds.normalization)

  if plan == "overwrite":  # as late as possible: every check above has passed
    moved = move_aside(workdir)
    print(f"moved the previous run in {workdir} to {moved}", file=sys.stderr)
  checkpointer = Checkpointer(workdir, config_json, c.checkpoint.every)
  state = algorithm.init(variables)
  history: list[dict[str, Any]] = []
  last = 0
  if plan == "resume" and checkpointer.latest_round() is not None:
    last, variables, history = checkpointer.restore(variables)
    state = ServerState(variables, last)
  for name in ("metrics.jsonl", "provenance.jsonl"):  # rows after the checkpoint are redone
    _truncate_jsonl(workdir / name, last)
  _write_atomic(workdir / "config.json", config_json + "\n")
  _write_atomic(workdir / "partition.json", json.dumps({
      "label_counts": data.label_counts.tolist(), "faulty_clients": faulty,
      "flip": {str(k): v for k, v in flip.items()}}) + "\n")

  metrics = _JsonlWriter(workdir / "metrics.jsonl")
  prov_log = ProvenanceLog(_JsonlWriter(workdir / "provenance.jsonl"), data.label_counts,
                           top_k=c.provenance.top_k)
  callbacks: list[Any] = [evaluator]
  if c.provenance.enabled:
    settings = dataclasses.replace(protocol_settings(c, faulty), flip=flip)
    callbacks.append(provenance_callback(
        model, evaluator, settings, rounds=parse_int_list(c.provenance.rounds),
        on_trace=prov_log.write_round, seed=c.seed,
        feddebug_normalize=_feddebug_normalize(ds)))
  if dp is not None:
    rate = c.clients_per_round / data.num_clients
    callbacks.append(lambda info: {"dp_epsilon": dp_epsilon(c.dp.noise_multiplier, rate,
                                                            info.round, c.dp.delta)})
  store = parse_store_rounds(c.provenance.store_rounds, c.rounds)
  if store:
    def keep_round(info: RoundInfo) -> None:
      if info.round in store:
        out = info.output
        save_round(workdir, info.round, global_vars=out.traced,
                   client_vars=out.clients.variables, client_ids=out.client_ids,
                   client_sizes=np.asarray(out.clients.num_examples),
                   meta={"model": spec, "normalization": _normalization_meta(ds)})
    callbacks.append(keep_round)
  bar = tqdm(total=c.rounds, initial=state.round, desc="rounds", unit="round",
             disable=not progress)

  def log(info: RoundInfo) -> None:
    metrics.write(info.metrics)
    history.append(info.metrics)
    checkpointer.maybe_save(info.round, info.state.variables, history)
    bar.update(1)
    bar.set_postfix(acc=f"{info.metrics['accuracy']:.3f}", **_postfix(info.metrics))

  mem = _memory_start()
  t_start = time.perf_counter()
  try:
    state, _ = run_rounds(algorithm, state, data, rounds=c.rounds,
                          clients_per_round=c.clients_per_round, seed=c.seed,
                          callbacks=[*callbacks, log],
                          divergence_factor=c.client.divergence_factor,
                          always_sampled=faulty if c.faulty.every_round else ())
    checkpointer.maybe_save(c.rounds, state.variables, history, force=True)
  except TrainingDivergedError as e:
    kept = (f"The rows of rounds 1-{history[-1]['round']} are in {workdir / 'metrics.jsonl'}, "
            f"checkpoints in {checkpointer.directory}; a run with another learning rate needs "
            f"another --workdir or --overwrite." if history else
            "No round finished, so the workdir holds no results to keep.")
    raise TrainingDivergedError(
        f"{e} client.learning_rate is now {c.client.learning_rate:g} "
        f"(client.optimizer={c.client.optimizer}). {kept}") from e
  finally:
    bar.close()
    metrics.close()
    prov_log.close()
    checkpointer.close()

  summary = _summarize(history, time.perf_counter() - t_start, algorithm.strategy)
  summary.update(provenance_mode=c.provenance.mode if c.provenance.enabled else None,
                 clients=data.num_clients, clients_per_round=c.clients_per_round,
                 client_size_median=float(np.median(data.partition.client_sizes)),
                 faulty_client_sizes=[int(data.partition.client_sizes[k]) for k in faulty],
                 memory=_memory_end(mem))
  if dp is not None:
    summary["dp"] = {"noise_multiplier": c.dp.noise_multiplier, "clip_norm": c.dp.clip_norm,
                     "delta": c.dp.delta, "epsilon": history[-1]["dp_epsilon"],
                     "sampling_rate": c.clients_per_round / data.num_clients}
  _write_atomic(workdir / "summary.json", json.dumps(summary, indent=2) + "\n")
  return summary


def _postfix(row: dict[str, Any]) -> dict[str, str]:
  prov = row.get("provenance")
  if not prov or prov.get("skipped"):
    return {}
  return {"trace": f"{prov['accuracy']:.3f}"}


def _memory_start() -> dict[str, Any]:
  """The loading phase's peak, then a fresh peak for the rounds (`memory`)."""
  mem = {"load_peak_rss_bytes": memory.peak_rss_bytes(), "start_rss_bytes": memory.rss_bytes(),
         "device_start_bytes": None}
  if memory.device_peak_bytes() is not None:
    mem["device_start_bytes"] = (jax.devices()[0].memory_stats() or {}).get("bytes_in_use")
  mem["peak_reset"] = memory.reset_peak_rss()
  return mem


def _memory_end(mem: dict[str, Any]) -> dict[str, Any]:
  rounds_peak = memory.peak_rss_bytes()
  return {**mem, "rounds_peak_rss_bytes": rounds_peak,
          "peak_rss_bytes": max(rounds_peak, mem["load_peak_rss_bytes"]),
          "device_peak_bytes": memory.device_peak_bytes()}


def _steady(values: list[float]) -> float | None:
  """Median over rounds after the first (which compiles), or the only value."""
  values = [v for v in values if v is not None]
  if not values:
    return None
  return float(np.median(values[1:] if len(values) > 1 else values))


def _summarize(history: list[dict[str, Any]], seconds: float, strategy: str) -> dict[str, Any]:
  acc = [h["accuracy"] for h in history]
  summary: dict[str, Any] = {
      "rounds": len(history),
      "final_accuracy": acc[-1],
      "best_accuracy": max(acc),
      "seconds": seconds,
      "client_strategy": strategy,
      # Per round, steady state (median after round 1) and round 1 (compilation included).
      "round_seconds": _steady([h.get("train_seconds") for h in history]),
      "first_round_seconds": history[0].get("train_seconds"),
      "provenance_round_seconds": _steady([h.get("provenance_seconds") for h in history]),
      "first_provenance_seconds": history[0].get("provenance_seconds"),
  }
  traced = [h["provenance"] for h in history if "provenance" in h]
  if traced:
    summary["provenance"] = summarize_rounds(traced)
  return summary
