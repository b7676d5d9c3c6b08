"""`run(config, workdir)`: the only place that reads a config and loops over rounds.

Writes into `workdir`:
  config.json       the resolved config;
  partition.json    each client's label counts (the provenance ground truth);
  metrics.jsonl     one row per round (global accuracy, client loss, provenance summary);
  provenance.jsonl  one row per traced input (round, input, labels, traced client, top
                    clients with probabilities, correct, the traced client's label counts);
  summary.json      the run's headline numbers.
Every row is flushed as soon as its round ends, so a crash loses nothing already computed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from tracefl_jax.fl import aggregation
from tracefl_jax.fl.client import make_optimizer
from tracefl_jax.experiment.config import parse_flip, parse_int_list, validate
from tracefl_jax.data import fixup_partition, load_dataset, make_partition
from tracefl_jax.data.federated import flip_labels, stack_client_indices
from tracefl_jax.models import get_model
from tracefl_jax.experiment.checkpointing import Checkpointer
from tracefl_jax.fl.privacy import dp_epsilon
from tracefl_jax.fl.rounds import (DPSettings, make_predict_fn, make_round_fn, round_key,
                                sample_clients)


class TrainingDivergedError(FloatingPointError):
  """Raised when a round produces non-finite client losses or global parameters."""


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
  return part


def _dataset_options(c: ml_collections.ConfigDict) -> dict[str, Any]:
  d = c.dataset
  shape = tuple(int(v) for v in str(d.synthetic_shape).split(",") if v)
  if d.name == "synthetic":
    return dict(num_train=d.synthetic_size, num_test=max(d.synthetic_size // 5, 100),
                image_shape=shape, num_classes=d.synthetic_classes, seed=c.seed)
  if d.name == "synthetic_text":
    return dict(num_train=d.synthetic_size, num_test=max(d.synthetic_size // 5, 100),
                seq_len=shape[0], vocab_size=d.vocab_size or 100,
                num_classes=d.synthetic_classes, seed=c.seed)
  if d.name in ("dbpedia", "yahoo"):
    return dict(tokenizer=d.tokenizer, max_length=d.max_length, download=d.download)
  if d.name in ("mnist", "cifar10", "pathmnist", "organamnist"):
    return dict(download=d.download)
  return {}


def _build_model(c: ml_collections.ConfigDict, ds, key: jax.Array):
  """(ModelDef, initial variables): a registry model, or pretrained weights when given."""
  if c.model.hf_path:
    from tracefl_jax.models.hf_import import load_hf_classifier  # pylint: disable=g-import-not-at-top
    vocab = pad = None
    if c.dataset.tokenizer:  # the tokenizer may have gained GPT's [PAD] token
      from tracefl_jax.data.text import load_tokenizer  # pylint: disable=g-import-not-at-top
      tok = load_tokenizer(c.dataset.tokenizer)
      vocab, pad = len(tok), tok.pad_token_id
    return load_hf_classifier(c.model.hf_path, ds.num_classes, seq_len=ds.input_shape[0],
                              vocab_size=vocab, pad_token_id=pad)
  vocab = None
  if jnp.issubdtype(ds.x_train.dtype, jnp.integer):
    vocab = c.dataset.vocab_size or int(max(ds.x_train.max(), ds.x_test.max())) + 1
  model = get_model(c.model.name, ds.input_shape, ds.num_classes, vocab_size=vocab)
  variables = model.init(key)
  if c.model.torchvision_weights:
    from tracefl_jax.models.torchvision_import import import_torchvision  # pylint: disable=g-import-not-at-top
    variables = import_torchvision(variables, c.model.torchvision_weights, skip_head=True)
  return model, variables


class _JsonlWriter:
  def __init__(self, path: Path):
    self._f = open(path, "a", encoding="utf-8")

  def write(self, row: dict[str, Any]) -> None:
    self._f.write(json.dumps(row, default=_to_builtin) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def _to_builtin(obj: Any) -> Any:
  if isinstance(obj, (np.generic, jax.Array)):
    return np.asarray(obj).tolist()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  raise TypeError(f"not JSON serialisable: {type(obj)}")


def _truncate_jsonl(path: Path, last_round: int) -> None:
  """Keeps the rows of rounds <= last_round (a resumed run recomputes the rest)."""
  if not path.exists():
    return
  rows = [line for line in path.read_text(encoding="utf-8").splitlines()
          if line.strip() and json.loads(line)["round"] <= last_round]
  path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")


def run(config: ml_collections.ConfigDict, workdir: str | Path, *,
        progress: bool = True) -> dict[str, Any]:
  """Runs one federated experiment with online provenance; returns the summary dict.

  If `workdir` holds a checkpoint of the same experiment (and `checkpoint.resume`), the run
  continues after the checkpoint's round and ends exactly as an uninterrupted run would.
  """
  validate(config)
  c = config
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config_json = c.to_json_best_effort(indent=2)

  ds = load_dataset(c.dataset.name, data_dir=c.dataset.data_dir, **_dataset_options(c))
  x_train, y_train = ds.x_train, ds.y_train
  if c.dataset.num_train:
    x_train, y_train = x_train[: c.dataset.num_train], y_train[: c.dataset.num_train]
  num_test = min(c.eval.max_test_inputs, c.dataset.num_test or len(ds.y_test))
  x_test, y_test = ds.x_test[:num_test], ds.y_test[:num_test]

  part = _partition(c, y_train, ds.num_classes)
  client_indices = list(part.client_indices)
  faulty = parse_int_list(c.faulty.clients)
  flip = parse_flip(c.faulty.flip)
  if faulty:
    x_train, y_train, client_indices = flip_labels(y_train, client_indices, faulty, flip,
                                                   x_train)
  # Ground truth for provenance is what each client really trained on (flips included).
  label_counts = np.stack([np.bincount(y_train[ix], minlength=ds.num_classes)
                           for ix in client_indices])

  root = jax.random.key(c.seed)
  model, variables = _build_model(c, ds, jax.random.fold_in(root, 0))  # rounds count from 1
  optimizer = make_optimizer(c.client.optimizer, c.client.learning_rate,
                             c.client.weight_decay, c.client.momentum)
  dp = None
  if c.dp.enabled:
    dp = DPSettings(clip_norm=c.dp.clip_norm, noise_multiplier=c.dp.noise_multiplier,
                    clients_per_round=c.clients_per_round, noise_batch_stats=c.dp.parity,
                    trace_clean=c.dp.parity)
  round_fn = make_round_fn(model, optimizer, batch_size=c.client.batch_size,
                           local_epochs=c.client.local_epochs, strategy=c.simulation.strategy,
                           clients_per_chunk=c.simulation.clients_per_chunk,
                           example_variables=variables, dp=dp,
                           compute_dtype=jnp.dtype(c.simulation.compute_dtype),
                           donate=True)
  predict = make_predict_fn(model, c.eval.batch_size)

  checkpointer = Checkpointer(workdir, config_json, c.checkpoint.every)
  history: list[dict[str, Any]] = []
  start = 1
  if c.checkpoint.resume and checkpointer.latest_round() is not None:
    last, variables, history = checkpointer.restore(variables)
    start = last + 1
    for name in ("metrics.jsonl", "provenance.jsonl"):
      _truncate_jsonl(workdir / name, last)
  else:
    for name in ("metrics.jsonl", "provenance.jsonl"):
      (workdir / name).unlink(missing_ok=True)
  (workdir / "config.json").write_text(config_json + "\n")
  (workdir / "partition.json").write_text(json.dumps({
      "label_counts": label_counts.tolist(), "faulty_clients": faulty,
      "flip": {str(k): v for k, v in flip.items()}}) + "\n")

  x_dev, y_dev = jnp.asarray(x_train), jnp.asarray(y_train)
  x_test_dev = jnp.asarray(x_test)
  tracer = None
  if c.provenance.enabled:
    from tracefl_jax.experiment.tracing import RoundTracer  # pylint: disable=g-import-not-at-top
    tracer = RoundTracer(c, model, label_counts, x_test, y_test, faulty, flip,
                         _JsonlWriter(workdir / "provenance.jsonl"))
  trace_rounds = set(parse_int_list(c.provenance.rounds)) or set(range(1, c.rounds + 1))

  metrics = _JsonlWriter(workdir / "metrics.jsonl")
  t_start = time.perf_counter()
  bar = tqdm(range(start, c.rounds + 1), desc="rounds", unit="round", disable=not progress,
             initial=start - 1, total=c.rounds)
  try:
    for r in bar:
      t0 = time.perf_counter()
      clients = sample_clients(c.seed, r, len(client_indices), c.clients_per_round)
      data = stack_client_indices(client_indices, clients, c.client.batch_size)
      weights = aggregation.client_weights(data.counts, c.aggregation.weighting,
                                           c.client.batch_size)
      out = round_fn(variables, x_dev, y_dev, data.indices, data.counts, clients,
                     round_key(root, r), weights)
      losses = np.asarray(out.clients.loss)
      if not np.all(np.isfinite(losses)):
        bad = clients[~np.isfinite(losses)].tolist()
        raise TrainingDivergedError(
            f"round {r}: non-finite training loss on clients {bad}. Metrics of the rounds "
            f"before are in {workdir / 'metrics.jsonl'}, checkpoints in "
            f"{checkpointer.directory}. Lower client.learning_rate (now "
            f"{c.client.learning_rate}) or check the data for NaN/inf values.")
      variables = out.variables
      preds = np.asarray(predict(variables, x_test_dev))
      row: dict[str, Any] = {
          "round": r,
          "accuracy": float(np.mean(preds == y_test)),
          "client_loss": float(np.average(losses, weights=np.maximum(data.counts, 1e-9))),
          "clients": clients.tolist(),
          "train_seconds": time.perf_counter() - t0,
      }
      if dp is not None:
        row["dp_update_norm_mean"] = float(np.mean(np.asarray(out.update_norms)))
        row["dp_epsilon"] = dp_epsilon(c.dp.noise_multiplier,
                                       c.clients_per_round / len(client_indices), r,
                                       c.dp.delta)
      if tracer is not None and r in trace_rounds:
        t1 = time.perf_counter()
        traced_preds = (np.asarray(predict(out.traced, x_test_dev))
                        if dp is not None and dp.trace_clean else preds)
        row["provenance"] = tracer.trace_round(r, out.traced, out.clients.variables, clients,
                                               data.counts, traced_preds)
        row["provenance_seconds"] = time.perf_counter() - t1
      metrics.write(row)
      history.append(row)
      checkpointer.maybe_save(r, variables, history)
      bar.set_postfix(acc=f"{row['accuracy']:.3f}", **_postfix(row))
    checkpointer.maybe_save(c.rounds, variables, history, force=True)
  finally:
    metrics.close()
    checkpointer.close()
    if tracer is not None:
      tracer.close()

  summary = _summarize(history, time.perf_counter() - t_start, round_fn.strategy)
  if dp is not None:
    summary["dp"] = {"noise_multiplier": c.dp.noise_multiplier, "clip_norm": c.dp.clip_norm,
                     "delta": c.dp.delta, "epsilon": history[-1]["dp_epsilon"],
                     "sampling_rate": c.clients_per_round / len(client_indices)}
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def _postfix(row: dict[str, Any]) -> dict[str, str]:
  prov = row.get("provenance")
  if not prov or prov.get("skipped"):
    return {}
  return {"trace": f"{prov['accuracy']:.3f}"}


def _summarize(history: list[dict[str, Any]], seconds: float, strategy: str) -> dict[str, Any]:
  acc = [h["accuracy"] for h in history]
  summary: dict[str, Any] = {
      "rounds": len(history),
      "final_accuracy": acc[-1],
      "best_accuracy": max(acc),
      "seconds": seconds,
      "client_strategy": strategy,
  }
  traced = [h["provenance"] for h in history if "provenance" in h]
  if traced:
    from tracefl_jax.experiment.tracing import summarize_rounds  # pylint: disable=g-import-not-at-top
    summary["provenance"] = summarize_rounds(traced)
  return summary
