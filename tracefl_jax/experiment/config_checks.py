"""What `config.validate` checks, field by field of `base_config()`.

Every field is in exactly one of:
  RANGES         numbers with a valid range (`Range`), checked for every config;
  CHOICES        strings with a fixed set of values (callables for the registries, read after
                 the run's `imports` registered their names);
  CROSS_FIELD    fields whose validity depends on others (checked by `cross_field_errors`);
  FREE           booleans and free text (their type is the only rule);
and every field's type is checked against `base_config()`'s default (an int field takes an
int, not a bool or a float; a placeholder string takes a string or None). A test walks
`base_config()` and fails on a field in none of these, so a new field gets a rule.

Messages name the field, the value and the valid range or choices:
`eval.batch_size=0 must be >= 1`, `seed=-5 must be in [0, 4294967295] (...)`.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections

from tracefl_jax.data.partition import PARTITION_METHODS
from tracefl_jax.experiment.algorithms import LOSSES
from tracefl_jax.fl.aggregation import WEIGHTINGS
from tracefl_jax.fl.client import OPTIMIZERS
from tracefl_jax.fl.robust import RULES
from tracefl_jax.fl.server import SERVER_OPTIMIZERS
from tracefl_jax.fl.strategies import STRATEGIES
from tracefl_jax.provenance.attribution import KERNELS, SCORES
from tracefl_jax.provenance.protocol import MODES as PROVENANCE_MODES

SEED_MAX = 2**32 - 1  # jax.random.key keeps 32 bits (without x64): 2**32 is seed 0 again


class Range(NamedTuple):
  """`low <= value <= high` (`<` where open); None: unbounded; `note` follows the message."""
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  note: str = ""

  def contains(self, value: float) -> bool:
    if not math.isfinite(value):
      return False
    if self.low is not None and (value <= self.low if self.low_open else value < self.low):
      return False
    return self.high is None or (value < self.high if self.high_open else value <= self.high)

  def describe(self) -> str:
    if self.high is None:
      return f"{'>' if self.low_open else '>='} {self.low}"
    return (f"in {'(' if self.low_open else '['}{self.low}, {self.high}"
            f"{')' if self.high_open else ']'}")


POSITIVE, NON_NEGATIVE = Range(1), Range(0)

RANGES: dict[str, Range] = {
    "seed": Range(0, SEED_MAX, note="jax.random.key keeps 32 bits"),
    "rounds": POSITIVE,
    "num_clients": POSITIVE,
    "dataset.num_train": Range(0, note="0: all"),
    "dataset.num_test": Range(0, note="0: all"),
    "dataset.max_length": POSITIVE,
    "dataset.synthetic_size": POSITIVE,
    "dataset.synthetic_classes": Range(2),
    "dataset.synthetic_noise": NON_NEGATIVE,
    "partition.alpha": Range(0, low_open=True),
    "partition.min_partition_size": NON_NEGATIVE,
    "partition.classes_per_client": POSITIVE,
    "partition.shards_per_client": POSITIVE,
    "partition.min_label_count": NON_NEGATIVE,
    "partition.max_per_client": POSITIVE,
    "partition.min_client_size": NON_NEGATIVE,
    "partition.max_clients": Range(0, note="0: all"),
    "client.learning_rate": Range(0, low_open=True),
    "client.weight_decay": NON_NEGATIVE,
    "client.momentum": Range(0, 1, high_open=True),
    "client.batch_size": POSITIVE,
    "client.local_epochs": POSITIVE,
    "client.divergence_factor": Range(0, note="0: off"),
    "simulation.clients_per_chunk": Range(0, note="0: one chunk"),
    "eval.batch_size": POSITIVE,
    "eval.max_test_inputs": POSITIVE,
    "provenance.decay": Range(0, 1, low_open=True),
    "provenance.per_label": POSITIVE,
    "provenance.max_faulty_inputs": POSITIVE,
    "provenance.clients_per_chunk": Range(0, note="0: all"),
    "provenance.top_k": POSITIVE,
    "provenance.feddebug_inputs": POSITIVE,
    "provenance.feddebug_threshold": NON_NEGATIVE,
    "dp.noise_multiplier": NON_NEGATIVE,
    "dp.clip_norm": Range(0, low_open=True),
    "dp.delta": Range(0, 1, low_open=True, high_open=True),
    "checkpoint.every": Range(0, note="0: only at the end"),
    "client.prox_mu": NON_NEGATIVE,
    "aggregation.trim_beta": Range(0, 0.5, high_open=True),
    "aggregation.num_byzantine": NON_NEGATIVE,
    "aggregation.num_selected": POSITIVE,
    "server.learning_rate": Range(0, low_open=True),
    "server.momentum": Range(0, 1, high_open=True),
    "server.b1": Range(0, 1, high_open=True),
    "server.b2": Range(0, 1, high_open=True),
    "server.eps": Range(0, low_open=True),
    "attribution.explain_inputs": POSITIVE,
    "attribution.federations_per_chunk": Range(0, note="0: all"),
    "attribution.round_decay": Range(0, 1),
}


def _datasets() -> list[str]:
  from tracefl_jax.data import available_datasets  # pylint: disable=g-import-not-at-top
  return available_datasets()


def _models() -> list[str]:
  from tracefl_jax.models import available_models  # pylint: disable=g-import-not-at-top
  return available_models()


CHOICES: dict[str, tuple[str, ...] | Callable[[], list[str]]] = {
    "dataset.name": _datasets,
    "partition.method": PARTITION_METHODS,
    "client.optimizer": OPTIMIZERS,
    "aggregation.weighting": WEIGHTINGS,
    "simulation.strategy": STRATEGIES,
    "simulation.compute_dtype": ("float32", "bfloat16"),
    "provenance.mode": PROVENANCE_MODES,
    "provenance.kernel": KERNELS,
    "provenance.block_mask": ("parity", "fixed"),
    "client.loss": LOSSES,
    "aggregation.rule": RULES,
    "server.optimizer": SERVER_OPTIMIZERS,
    "provenance.score": SCORES,
}

# Checked by `cross_field_errors` (their validity depends on other fields or on the disk).
CROSS_FIELD = frozenset({
    "clients_per_round", "dataset.synthetic_shape", "dataset.vocab_size", "dataset.data_dir",
    "dataset.tokenizer", "model.name", "model.hf_path", "model.torchvision_weights",
    "provenance.rounds", "provenance.store_rounds", "faulty.clients", "faulty.flip",
    "faulty.every_round", "attribution.subsets", "attribution.noise_seed",
    "provenance.use_size_factor"})

# Booleans and free text: only their type is checked.
FREE = frozenset({
    "imports", "dataset.download", "partition.self_balancing", "partition.fixup",
    "provenance.enabled", "provenance.use_decay", "provenance.multi_round",
    "attribution.enabled", "attribution.setting", "attribution.per_round",
    "provenance.shard_clients", "provenance.counterfactual", "provenance.feddebug",
    "dp.enabled", "dp.parity", "checkpoint.resume", "checkpoint.overwrite"})


def _get(c: ml_collections.ConfigDict, field: str) -> Any:
  node = c
  for part in field.split("."):
    node = node[part]
  return node


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def type_errors(c: ml_collections.ConfigDict, defaults: dict[str, Any]) -> list[str]:
  """A field whose value is not of its default's type (`defaults`: `config_fields` of
  `base_config()`); None defaults are placeholders for a string."""
  errors = []
  for field, default in defaults.items():
    try:
      value = _get(c, field)
    except (KeyError, AttributeError):
      continue  # a config file's own layout; the fields it lacks are not this check's
    if isinstance(default, bool):
      ok = isinstance(value, bool)
      kind = "true or false"
    elif isinstance(default, int):
      ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
      kind = "an integer"
    elif isinstance(default, float):
      ok = _is_number(value)
      kind = "a number"
    else:  # str, or a None placeholder of a string
      ok = value is None or isinstance(value, str)
      kind = "a string"
    if not ok:
      errors.append(f"{field}={value!r} must be {kind}")
  return errors


def range_errors(c: ml_collections.ConfigDict) -> list[str]:
  """Numbers outside their `RANGES` rule (NaN and infinities are outside every rule); the
  types are checked first (`type_errors`)."""
  errors = []
  for field, rule in RANGES.items():
    value = _get(c, field)
    if not rule.contains(value):
      note = f" ({rule.note})" if rule.note else ""
      errors.append(f"{field}={value!r} must be {rule.describe()}{note}")
  return errors


def choice_errors(c: ml_collections.ConfigDict) -> list[str]:
  errors = []
  for field, valid in CHOICES.items():
    names = tuple(valid() if callable(valid) else valid)
    value = _get(c, field)
    if value not in names:
      errors.append(f"{field}={value!r} is not one of {', '.join(names)}")
  return errors


def _shape_errors(c: ml_collections.ConfigDict) -> list[str]:
  text = str(c.dataset.synthetic_shape)
  try:
    shape = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
  except ValueError:
    shape = ()
  name = c.dataset.name
  if not shape or min(shape) < 1:
    return [f"dataset.synthetic_shape={text!r} must be positive integers 'H,W,C' (images) or "
            f"'seq_len' (synthetic_text)"]
  if name == "synthetic_structured" and (len(shape) != 3 or min(shape[:2]) < 2):
    return [f"dataset.synthetic_shape={text!r} must be 'H,W,C' with H, W >= 2 for "
            f"dataset.name='synthetic_structured'"]
  return []


def _path_errors(c: ml_collections.ConfigDict) -> list[str]:
  errors = []
  for field, want in (("dataset.tokenizer", "directory"), ("model.hf_path", "directory"),
                      ("model.torchvision_weights", "file")):
    value = _get(c, field)
    if value is None:
      continue
    path = Path(value).expanduser()
    if not value or not (path.is_dir() if want == "directory" else path.is_file()):
      errors.append(f"{field}={value!r} is not an existing {want}")
  if c.dataset.data_dir is not None and not str(c.dataset.data_dir):
    errors.append("dataset.data_dir='' must be a directory or unset (TRACEFL_DATA_DIR)")
  return errors


def cross_field_errors(c: ml_collections.ConfigDict) -> list[str]:
  """The fields in CROSS_FIELD but the round lists and faulty settings (config.validate)."""
  errors = []
  if not 1 <= c.clients_per_round <= c.num_clients:
    errors.append(f"clients_per_round={c.clients_per_round} must be in [1, num_clients="
                  f"{c.num_clients}]")
  if 0 < c.partition.max_clients < c.clients_per_round:
    errors.append(f"partition.max_clients={c.partition.max_clients} is below "
                  f"clients_per_round={c.clients_per_round}")
  if c.dataset.vocab_size != 0 and c.dataset.vocab_size < 2:
    errors.append(f"dataset.vocab_size={c.dataset.vocab_size} must be 0 (from the data) or "
                  f">= 2")
  if not c.model.hf_path and c.model.name not in _models():
    errors.append(f"model.name={c.model.name!r} is not one of {', '.join(_models())}")
  return errors + _attribution_errors(c) + _shape_errors(c) + _path_errors(c)


def _attribution_errors(c: ml_collections.ConfigDict) -> list[str]:
  errors = []
  if c.provenance.score == "first_order" and c.provenance.use_size_factor:
    errors.append("provenance.score='first_order' weighs clients by their aggregation weights;"
                  " provenance.use_size_factor=True applies to score='tracefl' only")
  a = c.attribution
  if a.subsets < 0 or 0 < a.subsets < 3:
    errors.append(f"attribution.subsets={a.subsets} must be 0 (no LDS) or >= 3 (the LDS "
                  f"needs at least 3 subsets)")
  if a.noise_seed < 0 or (a.enabled and a.noise_seed == 0):
    errors.append(f"attribution.noise_seed={a.noise_seed} must be >= 1 (0 retrains the base "
                  f"federation with its own seed; the noise floor needs another seed)")
  return errors


def flip_errors(flip: dict[int, int]) -> list[str]:
  bad = sorted({v for pair in flip.items() for v in pair if v < 0})
  return [f"faulty.flip labels {bad} must be >= 0"] if bad else []


def uncovered_fields(fields: list[str]) -> list[str]:
  """Fields of `fields` that no rule here covers (the coverage test's question)."""
  covered = set(RANGES) | set(CHOICES) | CROSS_FIELD | FREE
  return [f for f in fields if f not in covered]


def trace_arg_errors(top_k: Any, out: str | None) -> list[str]:
  """Problems of `python -m tracefl_jax trace`'s `--top_k` and `--out`, found before tracing
  (cli._trace_main calls this first): top_k must be an int >= 1; out, when given, a file path
  whose directory exists and is writable and that is not itself a directory."""
  errors = []
  if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
    errors.append(f"--top_k={top_k} must be >= 1 (top clients listed per input)")
  if out is not None:
    path = Path(out).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    if not str(out) or path.is_dir():
      errors.append(f"--out={out!r} is a directory; give the path of a file to write, e.g. "
                    f"--out={path / 'attribution.jsonl'}")
    elif not parent.is_dir():
      errors.append(f"--out={out!r}: the directory {parent} does not exist; create it first")
    elif not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
      errors.append(f"--out={out!r} is not writable")
  return errors
