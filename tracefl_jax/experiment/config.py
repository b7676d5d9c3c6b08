"""The experiment configuration: one table, `FIELDS`, gives each field its default, its
meaning and its rule; `base_config()`, `FIELD_HELP`, the command line's help and
`validate(config)` are all read from it.

Configs are ml_collections `ConfigDict`s, locked so that a misspelt override
(`--config.clinets_per_round=5`) fails instead of being silently added. Experiment files under
`configs/` start from `base_config()` and set what differs (big_vision style). The string
fields with structure (`provenance.rounds`, `provenance.store_rounds`, `faulty.clients`,
`faulty.flip`) are parsed in one place, `typed(config)`, which the checks and the run share.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_collections

from tracefl_jax.data.partition import PARTITION_METHODS, SIZE_DISTRIBUTIONS
from tracefl_jax.data.placement import PLACEMENTS
from tracefl_jax.data.structured import PIXELS
from tracefl_jax.experiment import algorithm_checks, config_checks as checks
from tracefl_jax.experiment.algorithm_checks import ALGORITHMS
from tracefl_jax.experiment.config_checks import (CROSS, FREE, LOSSES, NON_NEGATIVE, POSITIVE,
                                                  SEED_MAX, Choices, Parse, Range)
from tracefl_jax.fl.aggregation import WEIGHTINGS
from tracefl_jax.fl.client import OPTIMIZERS
from tracefl_jax.fl.robust import RULES
from tracefl_jax.fl.server import SERVER_OPTIMIZERS
from tracefl_jax.fl.strategies import STRATEGIES
from tracefl_jax.provenance.attribution import KERNELS, SCORES
from tracefl_jax.provenance.capture import OUTPUTS
from tracefl_jax.provenance.protocol import MODES as PROVENANCE_MODES

__all__ = ["FIELDS", "FIELD_HELP", "Field", "Typed", "base_config", "config_fields", "typed",
           "validate"]


class Field(NamedTuple):
  """A config field: its default (None: an unset string), one line of meaning, its rule (a
  `config_checks` rule: Range, Choices, Parse, CROSS or FREE)."""
  default: Any
  help: str
  rule: Any


F = Field
ZERO_ALL = Range(0, note="0: all")
FRACTION = Range(0, 1, high_open=True)

# The defaults are the original's protocol (spec sections 3-4) at the embedded dataset's
# size: the paper runs 100 clients with 10 per round; the embedded digits set (1,437 training
# images) supports 20 clients after the fix-up's 32-example floor, so the defaults are 20
# clients with 5 per round and the paper presets (configs/) set 100 and 10.
FIELDS: dict[str, Field] = {
    "imports": F("", "comma-separated Python modules imported before the run (they may "
                     "register datasets and models by name)", FREE),
    "seed": F(42, "root seed: partition, client sampling, initialisation and training keys",
              Range(0, SEED_MAX, note="jax.random.key keeps 32 bits")),
    "rounds": F(10, "federated rounds to run (a larger value continues a finished run)",
                POSITIVE),
    "num_clients": F(20, "clients the training set is partitioned into (before the fix-up)",
                     POSITIVE),
    "clients_per_round": F(5, "clients sampled uniformly per round", CROSS),
    # --- dataset
    "dataset.name": F("digits", "dataset, built in or registered by a module in `imports`",
                      Choices(checks.datasets)),
    "dataset.data_dir": F(None, "directory holding local dataset files (default: "
                                "TRACEFL_DATA_DIR)", CROSS),
    "dataset.download": F(False, "fetch missing mnist/cifar10/MedMNIST data into data_dir",
                          FREE),
    "dataset.num_train": F(0, "keep the first num_train training examples (0: all)", ZERO_ALL),
    "dataset.num_test": F(0, "keep the first num_test test examples (0: all)", ZERO_ALL),
    "dataset.placement": F("auto", "where the training set lives: device, host (each round "
                                   "gathers its clients' examples) or auto (federate's rule)",
                           Choices(PLACEMENTS)),
    "dataset.tokenizer": F(None, "text datasets: a local Hugging Face tokenizer directory",
                           CROSS),
    "dataset.max_length": F(128, "text datasets: tokens per example (truncated and padded)",
                            POSITIVE),
    "dataset.synthetic_size": F(2000, "synthetic / synthetic_text: training examples",
                                POSITIVE),
    "dataset.synthetic_shape": F("32,32,3", "synthetic: image shape 'H,W,C'; synthetic_text: "
                                            "'seq_len'", CROSS),
    "dataset.synthetic_classes": F(10, "synthetic / synthetic_text: number of labels",
                                   Range(2)),
    "dataset.synthetic_noise": F(1.0, "synthetic: standard deviation of the Gaussian noise "
                                      "added to the class prototypes (larger is harder)",
                                 NON_NEGATIVE),
    "dataset.synthetic_pixels": F("float32", "synthetic_structured: pixel storage (uint8: "
                                             "quantised, a quarter of the memory)",
                                  Choices(PIXELS)),
    "dataset.vocab_size": F(0, "text models without a tokenizer (synthetic_text): vocabulary "
                               "size (0: from the data)", CROSS),
    # --- partition
    "partition.method": F("dirichlet", "how examples are split over clients",
                          Choices(PARTITION_METHODS)),
    "partition.alpha": F(0.3, "dirichlet: concentration (smaller is more non-IID)",
                         Range(0, low_open=True)),
    "partition.self_balancing": F(True, "dirichlet: stop giving a class to clients above the "
                                        "average size (flwr-datasets)", FREE),
    "partition.min_partition_size": F(0, "dirichlet: redraw until every client has this many "
                                         "examples; heavy_tailed: each client's minimum",
                                      NON_NEGATIVE),
    "partition.sizes": F("zipf", "heavy_tailed: client sizes' distribution",
                         Choices(SIZE_DISTRIBUTIONS)),
    "partition.size_spread": F(1.0, "heavy_tailed: zipf's exponent or lognormal's sigma",
                               Range(0, low_open=True)),
    "partition.classes_per_client": F(2, "pathological: labels per client", POSITIVE),
    "partition.shards_per_client": F(2, "shards: label-sorted shards per client", POSITIVE),
    "partition.fixup": F(True, "the original's per-client fix-up (spec section 4: drop rare "
                               "labels and small clients, cap sizes); False: the raw "
                               "partition", FREE),
    "partition.min_label_count": F(10, "fix-up: drop a client's labels with fewer examples",
                                   NON_NEGATIVE),
    "partition.max_per_client": F(2048, "fix-up: keep at most this many examples per client",
                                  POSITIVE),
    "partition.min_client_size": F(32, "fix-up: drop clients with fewer examples",
                                   NON_NEGATIVE),
    "partition.max_clients": F(0, "keep the first max_clients clients after the fix-up (0: "
                                  "all), so that a partition over more clients yields "
                                  "exactly this many", ZERO_ALL),
    # --- model
    "model.name": F("cnn", "model, built in or registered by a module in `imports`",
                    Choices(checks.models, unless="model.hf_path")),
    "model.hf_path": F(None, "a local Hugging Face checkpoint directory (its architecture and "
                             "weights)", CROSS),
    "model.torchvision_weights": F(None, "a torchvision .pt/.safetensors file to start from "
                                         "(head skipped)", CROSS),
    # --- the algorithm: FedAvg's family from the pieces below, or one with memory
    "algorithm": F("fedavg", "federated algorithm: fedavg (its family: client.loss, "
                             "aggregation.rule, server.optimizer, dp.*), scaffold (Karimireddy "
                             "et al. 2020), feddyn (Acar et al. 2021), fednova (Wang et al. "
                             "2020), qffl (q-FedAvg, Li et al. 2020) or ditto (personal models, "
                             "Li et al. 2021); all but ditto train with client.optimizer=sgd "
                             "and their papers average uniformly (aggregation.weighting=uniform)",
                   Choices(ALGORITHMS)),
    "feddyn.alpha": F(0.1, "feddyn: the dynamic regulariser alpha of the client objective and "
                           "of the server's h", Range(0, low_open=True)),
    "ditto.lam": F(0.1, "ditto: lam, the personal models' proximal pull to the global model",
                   NON_NEGATIVE),
    "qffl.q": F(1.0, "qffl: the fairness exponent q (0: FedAvg's mean)", NON_NEGATIVE),
    "qffl.lipschitz": F(0.0, "qffl: the Lipschitz estimate L (0: 1 / client.learning_rate, "
                             "the paper's)", NON_NEGATIVE),
    # --- client: local training and its objective
    "client.optimizer": F("adam", "local optimizer", Choices(OPTIMIZERS)),
    "client.learning_rate": F(1e-3, "local learning rate", Range(0, low_open=True)),
    "client.weight_decay": F(0.0, "local weight decay (adamw, sgd)", NON_NEGATIVE),
    "client.momentum": F(0.0, "sgd momentum", FRACTION),
    "client.batch_size": F(32, "local batch size", POSITIVE),
    "client.local_epochs": F(2, "local epochs per round", POSITIVE),
    "client.divergence_factor": F(1e3, "stop with an error when a round's mean client loss "
                                       "exceeds this multiple of ln(classes), the loss of a "
                                       "uniform guess (0: off)", Range(0, note="0: off")),
    "client.loss": F("cross_entropy", "client objective (fedprox: + prox_mu / 2 ||w - G||^2, "
                                      "Li et al. 2020)", Choices(LOSSES)),
    "client.prox_mu": F(0.01, "fedprox: proximal coefficient mu", NON_NEGATIVE),
    # --- aggregation: the rule over the round's client models
    "aggregation.weighting": F("batches", "FedAvg weights (batches: the original's "
                                          "floor(n_k / batch_size))", Choices(WEIGHTINGS)),
    "aggregation.rule": F("mean", "aggregation rule (mean: FedAvg; the robust rules are "
                                  "unweighted over the round's clients of weight > 0)",
                          Choices(RULES)),
    "aggregation.trim_beta": F(0.2, "trimmed_mean: fraction of values cut from each end, in "
                                    "[0, 0.5)", Range(0, 0.5, high_open=True)),
    "aggregation.num_byzantine": F(0, "krum: assumed faulty clients f (neighbours scored: "
                                      "n - f - 2)", NON_NEGATIVE),
    "aggregation.num_selected": F(1, "krum: clients averaged (1: Krum, more: multi-Krum)",
                                  POSITIVE),
    # --- server: the optimizer over the pseudo-gradient (Reddi et al., ICLR 2021)
    "server.optimizer": F("none", "server optimizer on the pseudo-gradient G - aggregate "
                                  "(none: FedAvg; sgd + momentum: FedAvgM; adam/yogi/adagrad: "
                                  "FedOpt)", Choices(SERVER_OPTIMIZERS)),
    "server.learning_rate": F(1.0, "server learning rate", Range(0, low_open=True)),
    "server.momentum": F(0.0, "server sgd momentum (FedAvgM)", FRACTION),
    "server.b1": F(0.9, "server adam/yogi beta1", FRACTION),
    "server.b2": F(0.99, "server adam/yogi beta2", FRACTION),
    "server.eps": F(1e-3, "server adam/yogi/adagrad epsilon (tau, adaptivity)",
                    Range(0, low_open=True)),
    # --- simulation and evaluation
    "simulation.strategy": F("auto", "how the client axis runs", Choices(STRATEGIES)),
    "simulation.clients_per_chunk": F(0, "chunked: clients per chunk (0: one chunk)",
                                      Range(0, note="0: one chunk")),
    "simulation.compute_dtype": F("float32", "local training precision (bfloat16: with "
                                             "float32 master weights)",
                                  Choices(("float32", "bfloat16"))),
    "eval.batch_size": F(512, "batch size of global-model evaluation", POSITIVE),
    "eval.max_test_inputs": F(2048, "server test set: the first max_test_inputs test examples",
                              POSITIVE),
    # --- provenance (TraceFL, online)
    "provenance.enabled": F(True, "trace the round's clients online (TraceFL)", FREE),
    "provenance.rounds": F("", "rounds to trace: '' every round, else comma-separated round "
                               "numbers", Parse(checks.parse_int_list, "a list of integers")),
    "provenance.mode": F("correct", "which inputs are traced (faulty: mispredictions of "
                                    "label-flipping clients, Table I)",
                         Choices(PROVENANCE_MODES)),
    "provenance.kernel": F("auto", "provenance kernel", Choices(KERNELS)),
    "provenance.decay": F(0.9, "per-layer decay beta of the layer weights, in (0, 1]",
                          Range(0, 1, low_open=True)),
    "provenance.use_decay": F(True, "weight layers by decay**depth as the paper does", FREE),
    "provenance.use_size_factor": F(False, "multiply scores by the client's data size (in "
                                           "batches)", CROSS),
    "provenance.score": F("tracefl", "client score (first_order: the weight-aware first-order "
                                     "leave-one-client-out drop, no decay)", Choices(SCORES)),
    "provenance.multi_round": F(False, "also attribute each traced prediction over all rounds "
                                       "so far (multi-round provenance; one [clients, params] "
                                       "accumulator)", FREE),
    "provenance.output": F("logit", "the explained output of every score and truth: logit "
                                    "(the paper's), margin (the logit minus the log-sum-exp "
                                    "of the other classes) or log_prob", Choices(OUTPUTS)),
    "provenance.per_label": F(2, "correct mode: traced inputs per label held by the "
                                 "participants", POSITIVE),
    "provenance.max_faulty_inputs": F(10, "faulty mode: traced inputs per round", POSITIVE),
    "provenance.clients_per_chunk": F(0, "clients scored at once (0: all; bounds memory)",
                                      ZERO_ALL),
    "provenance.shard_clients": F(False, "score the clients sharded over all devices (every "
                                         "process's after jax.distributed.initialize)", FREE),
    "provenance.top_k": F(3, "top clients written per input to provenance.jsonl", POSITIVE),
    "provenance.block_mask": F("parity", "BERT blocks scored without the attention mask as "
                                         "the original (parity), or with it (fixed)",
                               Choices(("parity", "fixed"))),
    "provenance.counterfactual": F(True, "exact leave-one-client-out truth per traced input",
                                   FREE),
    "provenance.feddebug": F(True, "faulty mode: FedDebug beside TraceFL (image models)", FREE),
    "provenance.feddebug_inputs": F(10, "FedDebug: random inputs per round", POSITIVE),
    "provenance.feddebug_threshold": F(0.003, "FedDebug: neuron activation threshold",
                                       NON_NEGATIVE),
    "provenance.store_rounds": F(
        "last", "keep rounds' models in WORKDIR/rounds to trace new inputs later (the trace "
                "command): 'last' (the final round, so every finished run can be traced), "
                "'all', '3,7,10', or 'none'/'' to store nothing; disk per round: "
                "clients_per_round + 1 copies of the model's variables (e.g. 10 x 110M-param "
                "BERT: 4.4 GB)",
        Parse(checks.parse_store_rounds, "'last', 'all', a list of round numbers like "
                                         "'3,7,10', or 'none' (or '')")),
    # --- the comparison of attribution methods against retrained federations (`compare`)
    "attribution.enabled": F(False, "a cell of the attribution comparison (the compare "
                                    "command, configs/attribution.py), not a plain run", FREE),
    "attribution.setting": F("", "the cell's name in the comparison table", FREE),
    "attribution.explain_inputs": F(100, "test inputs explained (correct mode: the first the "
                                         "final model predicts correctly; faulty: matching "
                                         "mispredictions)", POSITIVE),
    "attribution.subsets": F(20, "random half-subsets of clients retrained for the LDS (0: "
                                 "none)", CROSS),
    "attribution.noise_seed": F(1, "truth seed s retrains the base and leave-one-out "
                                   "federations with data seed seed + s * noise_seed", CROSS),
    "attribution.truth_seeds": F(3, "data seeds the leave-one-out retraining truth is "
                                    "averaged over (>= 2: their agreement is reported as the "
                                    "ceiling)", POSITIVE),
    "attribution.bootstrap": F(1000, "resamples of each interval (top-1: over inputs; LDS: "
                                     "over subsets)", POSITIVE),
    "attribution.topk_inputs": F(0, "top-k removal: for the first this many explained inputs, "
                                    "retrain without each method's top k clients (0: off)",
                                 NON_NEGATIVE),
    "attribution.topk": F(3, "top-k removal: k = 1, 3, 5 up to this (at most "
                             "clients_per_round)", POSITIVE),
    "attribution.round_decay": F(1.0, "multi-round provenance: weight gamma^(R - r) of round "
                                      "r, in [0, 1]", Range(0, 1)),
    "attribution.federations_per_chunk": F(0, "retrained federations run side by side (0: "
                                              "all)", ZERO_ALL),
    "attribution.per_round": F(True, "also trace every round (paper's and weight-aware score)",
                               FREE),
    "attribution.across_rounds": F(True, "also score the influence across rounds (a "
                                         "differentiable re-run of the whole training per 25 "
                                         "inputs; off in the quick/cpu/mnist presets)", FREE),
    # --- differential privacy
    "dp.enabled": F(False, "DP-FedAvg: server-side clipping and Gaussian noise", FREE),
    "dp.noise_multiplier": F(0.0, "DP noise multiplier z (sigma = z * clip_norm / "
                                  "clients_per_round)", NON_NEGATIVE),
    "dp.clip_norm": F(1.0, "DP clipping norm C of each client's update (dp.adaptive: its "
                           "initial value C_0)", Range(0, low_open=True)),
    "dp.delta": F(1e-5, "DP delta of the reported epsilon",
                  Range(0, 1, low_open=True, high_open=True)),
    "dp.parity": F(False, "DP as the original (noise BatchNorm statistics, trace the "
                          "pre-noise aggregate)", FREE),
    "dp.adaptive": F(False, "adaptive clipping (Andrew et al. 2021): the clip norm follows a "
                            "quantile of the clients' update norms; dp.noise_multiplier is "
                            "split between the update and the count", FREE),
    "dp.target_quantile": F(0.5, "dp.adaptive: target quantile gamma of the update norms "
                                 "kept below the clip norm", Range(0, 1)),
    "dp.clip_learning_rate": F(0.2, "dp.adaptive: geometric step eta_C of the clip norm, "
                                    "C <- C exp(-eta_C (b - gamma))", NON_NEGATIVE),
    "dp.count_stddev": F(0.0, "dp.adaptive: noise sigma_b of the count below the clip norm, "
                              "> dp.noise_multiplier / 2 (0: clients_per_round / 20, the "
                              "paper's)", Range(0, note="0: clients_per_round / 20")),
    # --- checkpoints
    "checkpoint.every": F(5, "rounds between checkpoints (0: only at the end)",
                          Range(0, note="0: only at the end")),
    "checkpoint.resume": F(True, "continue the same config's run found in the workdir; False "
                                 "refuses a workdir that holds results", FREE),
    "checkpoint.overwrite": F(False, "move a previous run in the workdir to WORKDIR/previous/"
                                     "<time>/ and start afresh (the CLI's --overwrite)", FREE),
    # --- label-flipping clients (provenance.mode='faulty')
    "faulty.clients": F("", "comma-separated faulty client ids, e.g. '0'; or 'largest': the "
                            "client holding the most examples of the flipped labels (after "
                            "the fix-up)",
                        Parse(checks.parse_faulty_clients, "'largest' or comma-separated "
                                                           "client ids, e.g. '0,3'")),
    "faulty.flip": F("", "label flips of the faulty clients, 'src:dst,...', e.g. '1:0,2:0'",
                     Parse(checks.parse_flip, "'src:dst,...' with integer labels, e.g. "
                                              "'1:0,2:0'")),
    "faulty.every_round": F(False, "the faulty clients take part in every round (the others "
                                   "are sampled around them)", CROSS),
}

FIELD_HELP: dict[str, str] = {name: f.help for name, f in FIELDS.items()}


def base_config() -> ml_collections.ConfigDict:
  """Every field of `FIELDS` at its default, locked (a misspelt field is an error)."""
  c = ml_collections.ConfigDict()
  for name, field in FIELDS.items():
    *sections, leaf = name.split(".")
    node = c
    for section in sections:
      if section not in node:
        node[section] = ml_collections.ConfigDict()
      node = node[section]
    # An unset string is a placeholder: None, yet typed, so an override must be a string.
    node[leaf] = (ml_collections.config_dict.placeholder(str) if field.default is None
                  else field.default)
  c.lock()
  return c


def config_fields(config: ml_collections.ConfigDict | Mapping[str, object],
                  prefix: str = "") -> dict[str, object]:
  """`{dotted field: value}` of every leaf field, in the config's order (a config, or the
  nested dict of its JSON, e.g. a workdir's config.json)."""
  fields: dict[str, object] = {}
  for name, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
      fields.update(config_fields(value, f"{prefix}{name}."))
    else:
      fields[f"{prefix}{name}"] = value
  return fields


class Typed(NamedTuple):
  """The string fields with structure, parsed (`typed`)."""
  provenance_rounds: tuple[int, ...]    # () = every round
  store_rounds: frozenset[int]          # the rounds whose models are kept
  faulty_clients: tuple[int, ...] | None  # None = "largest" (resolved on the partition)
  flip: dict[int, int]                  # faulty.flip {src: dst}


def _typed(c: ml_collections.ConfigDict) -> tuple[Typed, list[str]]:
  """The typed values, and one line per field that does not parse (its value then empty)."""
  values, errors = {}, []
  for name, field in FIELDS.items():
    if isinstance(field.rule, Parse):
      text = checks.get(c, name)
      try:
        values[name] = field.rule.parse(text)
      except ValueError:
        errors.append(f"{name}={text!r} is not {field.rule.what}")
        values[name] = field.rule.parse("")
  store = values["provenance.store_rounds"]
  store = ({c.rounds} if store == "last" else set(range(1, c.rounds + 1)) if store == "all"
           else set(store))
  return Typed(values["provenance.rounds"], frozenset(store), values["faulty.clients"],
               values["faulty.flip"]), errors


def typed(c: ml_collections.ConfigDict) -> Typed:
  """The string fields of `c` as typed values (`c` validated: `validate`).

  Raises:
    ValueError: a field that does not parse, named.
  """
  values, errors = _typed(c)
  if errors:
    _raise_invalid(errors)
  return values


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises `ValueError` listing every problem of the config at once, before any work: each
  field is checked for its type and its rule in `FIELDS`, and against the fields it depends
  on; one problem is one line naming the field, the value and what is valid."""
  errors = checks.type_errors(c, {n: f.default for n, f in FIELDS.items()})
  if errors:  # the value checks below assume the types
    _raise_invalid(errors)
  errors += checks.rule_errors(c, {n: f.rule for n, f in FIELDS.items()})
  values, parse_errors = _typed(c)
  errors += parse_errors
  errors += checks.cross_field_errors(c, values)
  errors += algorithm_checks.algorithm_errors(c)  # algorithm, aggregation.rule, dp.adaptive
  if errors:
    _raise_invalid(errors)


def _raise_invalid(errors: list[str]) -> None:
  if len(errors) == 1:
    raise ValueError(f"invalid config: {errors[0]}")
  raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))
