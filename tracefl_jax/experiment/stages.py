"""The stages `runner.run` is made of, each a function of the config (and the stages before):

  load_data(config)                     -> DataStage  dataset, partition, flips, test set
  build_model(config, data)             -> ModelStage the model, its initial variables, spec
  build_algorithm(config, model, data)  -> FederatedAlgorithm (with `algorithm_pieces`)
  build_evaluator(config, model, data)  -> GlobalEvaluator
  protocol_settings(config, faulty)     -> ProtocolSettings (the provenance section)

(`workdir.plan_run` comes before them; `resume.restore`, `runner.build_callbacks`, the
library's `run_rounds` and `summary.run_summary` follow.)
Each is a translation of one config section into library calls; nothing here writes files.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tracefl_jax.data import fixup_partition, load_dataset, make_partition
from tracefl_jax.data.federated import FederatedData, federate, flip_labels
from tracefl_jax.data.partition import Partition
from tracefl_jax.experiment.config import typed
from tracefl_jax.fl import losses, robust, server
from tracefl_jax.fl.adaptive_clipping import AdaptiveClipping, adaptive_dp_fedavg
from tracefl_jax.fl.client import make_optimizer
from tracefl_jax.fl.ditto import ditto
from tracefl_jax.fl.feddyn import feddyn
from tracefl_jax.fl.privacy import DPSettings
from tracefl_jax.fl.qffl import qffl
from tracefl_jax.fl.rounds import FederatedAlgorithm, GlobalEvaluator, federated_averaging
from tracefl_jax.fl.scaffold import fednova, scaffold
from tracefl_jax.models import get_model
from tracefl_jax.provenance.protocol import ProtocolSettings


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


# --- data --------------------------------------------------------------------------------


class DataStage(NamedTuple):
  data: FederatedData      # the clients' (flipped) data, stacked; label counts: ground truth
  x_test: np.ndarray       # [M, ...] the server test set, as stored (uint8 images stay so)
  y_test: np.ndarray       # [M]
  dataset: Any             # the loaded `Dataset` (name, classes, normalization, input shape)
  faulty: list[int]        # the faulty clients' ids ("largest" resolved)
  flip: dict[int, int]     # the flips that act on the dataset's labels


def dataset_options(c: ml_collections.ConfigDict) -> dict[str, Any]:
  d = c.dataset
  shape = tuple(int(v) for v in str(d.synthetic_shape).split(",") if v)
  if d.name in ("synthetic", "synthetic_structured"):
    pixels = {"pixels": d.synthetic_pixels} if d.name == "synthetic_structured" else {}
    return dict(num_train=d.synthetic_size, num_test=max(d.synthetic_size // 5, 100),
                image_shape=shape, num_classes=d.synthetic_classes, seed=c.seed,
                noise=d.synthetic_noise, **pixels)
  if d.name == "synthetic_text":
    return dict(num_train=d.synthetic_size, num_test=max(d.synthetic_size // 5, 100),
                seq_len=shape[0], vocab_size=d.vocab_size or 100,
                num_classes=d.synthetic_classes, seed=c.seed)
  if d.name in ("dbpedia", "yahoo"):
    return dict(tokenizer=d.tokenizer, max_length=d.max_length, download=d.download)
  if d.name in ("mnist", "cifar10", "pathmnist", "organamnist"):
    return dict(download=d.download)
  return {}


# Generated datasets are deterministic in their options: a sweep's cells that share one (the
# million presets' two cells, 24 M images) build it once per process, not once per cell.
GENERATED = ("synthetic", "synthetic_structured", "synthetic_text")
_last_generated: list[Any] = []  # [(key, Dataset)]: the last one only


def cached_dataset(c: ml_collections.ConfigDict):
  """`load_dataset` for the config; a generated dataset with the same options as the last
  one this process built is that one again (its arrays made read-only)."""
  options = dataset_options(c)
  if c.dataset.name not in GENERATED:
    _last_generated.clear()  # nothing generated is kept alive past its sweep
    return load_dataset(c.dataset.name, data_dir=c.dataset.data_dir, **options)
  key = (c.dataset.name, tuple(sorted(options.items())))
  if not (_last_generated and _last_generated[0][0] == key):
    _last_generated.clear()  # drop the old one before building the next
    ds = load_dataset(c.dataset.name, **options)
    for array in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
      array.flags.writeable = False  # shared by the cells that reuse it
    _last_generated.append((key, ds))
  return _last_generated[0][1]


def partition(c: ml_collections.ConfigDict, labels: np.ndarray, num_classes: int) -> Partition:
  """The config's partition (and fix-up, and `max_clients`) of the training labels."""
  p = c.partition
  options: dict[str, Any] = {}
  if p.method == "dirichlet":
    options = dict(alpha=p.alpha, self_balancing=p.self_balancing,
                   min_partition_size=p.min_partition_size)
  elif p.method == "pathological":
    options = dict(classes_per_client=p.classes_per_client)
  elif p.method == "shards":
    options = dict(shards_per_client=p.shards_per_client)
  elif p.method == "heavy_tailed":
    options = dict(distribution=p.sizes, exponent=p.size_spread, sigma=p.size_spread,
                   min_size=p.min_partition_size)
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


def _faulty_and_flip(c, ds, part) -> tuple[list[int], dict[int, int]]:
  values = typed(c)
  faulty = None if values.faulty_clients is None else list(values.faulty_clients)
  # The flip acts on the labels the dataset has (as the original's mapping does in effect:
  # "1..13 -> 0" on a 10-class dataset flips 1..9).
  flip = {s: d for s, d in values.flip.items() if s < ds.num_classes}
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
  return faulty, flip


def load_data(config: ml_collections.ConfigDict) -> DataStage:
  """Loads the dataset, partitions it, flips the faulty clients' labels and stacks the clients
  (`federate`); the server test set is the first `eval.max_test_inputs` test examples."""
  c = config
  ds = cached_dataset(c)
  x_train, y_train = ds.x_train, ds.y_train
  if c.dataset.num_train:
    x_train, y_train = x_train[: c.dataset.num_train], y_train[: c.dataset.num_train]
  num_test = min(c.eval.max_test_inputs, c.dataset.num_test or len(ds.y_test))
  part = partition(c, y_train, ds.num_classes)
  client_indices = list(part.client_indices)
  faulty, flip = _faulty_and_flip(c, ds, part)
  if faulty:
    x_train, y_train, client_indices = flip_labels(y_train, client_indices, faulty, flip,
                                                   x_train)
  # Ground truth for provenance is what each client really trained on (flips included).
  # Image datasets stay uint8 (on the device, or on the host with `dataset.placement`); the
  # client step normalises each batch.
  data = federate(x_train, y_train, client_indices, num_classes=ds.num_classes,
                  normalization=ds.normalization, placement=c.dataset.placement)
  return DataStage(data, ds.x_test[:num_test], ds.y_test[:num_test], ds, faulty, flip)


# --- model -------------------------------------------------------------------------------


class ModelStage(NamedTuple):
  model: Any               # ModelDef
  variables: Any           # initial variables (fold_in(key(seed), 0): rounds count from 1)
  spec: dict[str, Any]     # what rebuilds the ModelDef without the dataset (`model_spec`)


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


def model_from_spec(spec: dict[str, Any], key: jax.Array):
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


def build_model(config: ml_collections.ConfigDict, data: DataStage) -> ModelStage:
  c = config
  spec = model_spec(c, data.dataset)
  model, variables = model_from_spec(spec, jax.random.fold_in(jax.random.key(c.seed), 0))
  if c.model.torchvision_weights and not spec["hf_path"]:
    from tracefl_jax.models.torchvision_import import import_torchvision  # pylint: disable=g-import-not-at-top
    variables = import_torchvision(variables, c.model.torchvision_weights, skip_head=True)
  return ModelStage(model, variables, spec)


# --- algorithm and evaluation ------------------------------------------------------------


def dp_settings(c: ml_collections.ConfigDict) -> DPSettings | None:
  """Fixed-clipping DP-FedAvg (`dp.enabled` without `dp.adaptive`), else None."""
  if not c.dp.enabled or c.dp.adaptive:
    return None
  return DPSettings(clip_norm=c.dp.clip_norm, noise_multiplier=c.dp.noise_multiplier,
                    clients_per_round=c.clients_per_round, noise_batch_stats=c.dp.parity,
                    trace_clean=c.dp.parity)


def adaptive_clipping(c: ml_collections.ConfigDict) -> AdaptiveClipping | None:
  """`dp.adaptive`: adaptive clipping's settings (C_0 = `dp.clip_norm`), else None."""
  d = c.dp
  if not (d.enabled and d.adaptive):
    return None
  return AdaptiveClipping(d.noise_multiplier, c.clients_per_round,
                          initial_clip_norm=d.clip_norm, target_quantile=d.target_quantile,
                          clip_learning_rate=d.clip_learning_rate,
                          count_stddev=d.count_stddev or None)


def client_loss(c: ml_collections.ConfigDict) -> losses.LossFn | None:
  """`client.loss`: None (cross-entropy) or FedProx with `client.prox_mu`."""
  if c.client.loss == "fedprox":
    return losses.fedprox(c.client.prox_mu)
  return None


def aggregation_rule(c: ml_collections.ConfigDict) -> robust.AggregationRule | None:
  """`aggregation.rule`: None for the mean (FedAvg), else the robust rule; FedNova's rule for
  `algorithm='fednova'`, q-FedAvg's (`qffl.q`, L = `qffl.lipschitz` or 1 / the client
  learning rate) for `algorithm='qffl'`."""
  a = c.aggregation
  if c.algorithm == "fednova":
    return fednova()
  if c.algorithm == "qffl":
    return qffl(c.qffl.q, c.qffl.lipschitz or 1.0 / c.client.learning_rate)
  if a.rule == "mean":
    return None
  return robust.make_rule(a.rule, trim_beta=a.trim_beta, num_byzantine=a.num_byzantine,
                          num_selected=a.num_selected)


def server_optimizer(c: ml_collections.ConfigDict) -> Any:
  """`server.*`: None (G_t = aggregate) or the optax transformation of the pseudo-gradient."""
  s = c.server
  return server.server_optimizer(s.optimizer, s.learning_rate, momentum=s.momentum, b1=s.b1,
                                 b2=s.b2, eps=s.eps)


def algorithm_pieces(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """Keyword arguments of `federated_averaging` for the config's client objective,
  aggregation rule and server optimizer (`fl.losses`, `fl.robust`, `fl.server`); the defaults
  give None for every piece, i.e. plain FedAvg bit for bit."""
  return {"loss_fn": client_loss(c), "aggregator": aggregation_rule(c),
          "server_optimizer": server_optimizer(c)}


def build_algorithm(config: ml_collections.ConfigDict, model: ModelStage,
                    data: DataStage, *, donate: bool = True) -> FederatedAlgorithm:
  """The config's `algorithm` with its client optimizer and simulation strategy: FedAvg (or
  fixed/adaptive-clipping DP-FedAvg) with its client objective, aggregation rule and server
  optimizer (`algorithm_pieces`), FedNova's or q-FFL's rule, Ditto (FedAvg's family plus
  personal models), or SCAFFOLD and FedDyn (their own SGD clients, objective and server
  step; `algorithm_checks.algorithm_errors` refuses the pieces they fix). Stateful ones are
  initialised with `init(variables, num_clients=C)`.
  `donate`: G_{t-1}'s buffers go to the round (off where the initial variables are reused)."""
  del data  # what an algorithm may size itself by (clients, classes)
  c = config
  common = dict(batch_size=c.client.batch_size, local_epochs=c.client.local_epochs,
                weighting=c.aggregation.weighting, strategy=c.simulation.strategy,
                clients_per_chunk=c.simulation.clients_per_chunk,
                compute_dtype=jnp.dtype(c.simulation.compute_dtype))
  if c.algorithm == "scaffold":  # server.optimizer 'sgd' (no momentum): its global step
    step = c.server.learning_rate if c.server.optimizer == "sgd" else 1.0
    return scaffold(model.model, c.client.learning_rate, server_learning_rate=step,
                    donate=donate, **common)
  if c.algorithm == "feddyn":
    return feddyn(model.model, c.client.learning_rate, c.feddyn.alpha, donate=donate,
                  **common)
  optimizer = make_optimizer(c.client.optimizer, c.client.learning_rate,
                             c.client.weight_decay, c.client.momentum)
  pieces = algorithm_pieces(c)
  if c.algorithm == "ditto":  # personal models on the client optimizer, G as FedAvg's family
    return ditto(model.model, optimizer, c.ditto.lam, donate=donate, **common, **pieces)
  adaptive = adaptive_clipping(c)
  if adaptive is not None:  # its own server side (mean rule, no server optimizer: checked)
    return adaptive_dp_fedavg(model.model, optimizer, adaptive, loss_fn=pieces["loss_fn"],
                              **common)
  return federated_averaging(model.model, optimizer, dp=dp_settings(c), donate=donate,
                             **common, **pieces)


def build_evaluator(config: ml_collections.ConfigDict, model: ModelStage,
                    data: DataStage) -> GlobalEvaluator:
  """The global model on the server test set; its `x` (normalised floats) is what
  provenance traces."""
  return GlobalEvaluator(model.model, data.x_test, data.y_test, config.eval.batch_size,
                         normalization=data.dataset.normalization)


def protocol_settings(c: ml_collections.ConfigDict,
                      faulty_clients: list[int] | None = None) -> ProtocolSettings:
  """The config's provenance section as the library's `ProtocolSettings` (`faulty_clients`:
  the ids `faulty.clients` resolved to, needed for "largest")."""
  p, values = c.provenance, typed(c)
  if faulty_clients is None:
    faulty_clients = values.faulty_clients
    if faulty_clients is None:
      raise ValueError("faulty.clients='largest' is resolved on the partition: pass the ids")
  return ProtocolSettings(
      mode=p.mode, per_label=p.per_label, max_faulty_inputs=p.max_faulty_inputs,
      faulty_clients=tuple(faulty_clients), flip=values.flip,
      kernel=p.kernel, decay=p.decay, use_decay=p.use_decay,
      use_size_factor=p.use_size_factor,
      size_unit=c.client.batch_size,  # the original counts the data-size factor in batches
      clients_per_chunk=p.clients_per_chunk, block_mask=p.block_mask,
      shard_clients=p.shard_clients,
      counterfactual=p.counterfactual, feddebug=p.feddebug, score=p.score, output=p.output,
      feddebug_inputs=p.feddebug_inputs, feddebug_threshold=p.feddebug_threshold)


def normalization_meta(ds) -> dict[str, Any] | None:
  """The dataset's `Normalization` as JSON (stored rounds normalise uint8 inputs with it)."""
  norm = ds.normalization
  return None if norm is None else dataclasses.asdict(norm)
