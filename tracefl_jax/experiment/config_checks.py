"""The kinds of rule a config field has, and the checks `config.validate` runs with them.

Each field of `config.FIELDS` names one rule (its default and meaning sit beside it):
  Range    a number in a range, checked for every config;
  Choices  a string from a fixed set (or a registry, read after the run's `imports`);
  Parse    a string with structure ("3,7,10", "1:0,2:0"), parsed once into a typed value
           (`config.typed`) and then checked against the fields it depends on;
  CROSS    a field whose validity depends on others or on the disk (`cross_field_errors`;
           the algorithm's fields: `algorithm_checks.algorithm_errors`);
  FREE     booleans and free text: the type is the only rule;
and every field's type is checked against its default (an int field takes an int, not a bool
or a float; a placeholder string takes a string or None).

Messages name the field, the value and the valid range or choices:
`eval.batch_size=0 must be >= 1`, `seed=-5 must be in [0, 4294967295] (...)`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections

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


class Choices(NamedTuple):
  """One of `names` (a tuple, or a callable for a registry that the run's `imports` can
  extend); not checked while the field `unless` is set (e.g. a model given by its path)."""
  names: tuple[str, ...] | Callable[[], list[str]]
  unless: str | None = None

  def valid(self) -> tuple[str, ...]:
    return tuple(self.names() if callable(self.names) else self.names)


class Parse(NamedTuple):
  """Text parsed into a typed value by `parse` (a `ValueError` for text it cannot read, then
  named as "FIELD=TEXT is not WHAT"); the typed value's cross-field rules are
  `cross_field_errors`'."""
  parse: Callable[[str], Any]
  what: str


CROSS = "cross-field"  # checked by `cross_field_errors`
FREE = "free"          # booleans and free text

LOSSES = ("cross_entropy", "fedprox")  # client.loss (`stages.client_loss`)


def datasets() -> list[str]:
  from tracefl_jax.data import available_datasets  # pylint: disable=g-import-not-at-top
  return available_datasets()


def models() -> list[str]:
  from tracefl_jax.models import available_models  # pylint: disable=g-import-not-at-top
  return available_models()


# --- the string fields' parsers ----------------------------------------------------------


def parse_int_list(text: str) -> tuple[int, ...]:
  """`"3, 7,10"` -> (3, 7, 10); "" -> ()."""
  return tuple(int(t) for t in str(text).replace(" ", "").split(",") if t)


def parse_store_rounds(text: str) -> str | tuple[int, ...]:
  """`provenance.store_rounds`: "all", "last", or round numbers ("none" and "": ())."""
  text = str(text).strip()
  if text in ("all", "last"):
    return text
  return () if text == "none" else parse_int_list(text)


def parse_faulty_clients(text: str) -> tuple[int, ...] | None:
  """`faulty.clients` as ids, or None for "largest" (resolved on the partition by the run)."""
  return None if str(text).strip() == "largest" else parse_int_list(text)


def parse_flip(text: str) -> dict[int, int]:
  """`faulty.flip` "src:dst,..." as {src: dst}."""
  flip = {}
  for item in str(text).replace(" ", "").split(","):
    if not item:
      continue
    src, sep, dst = item.partition(":")
    if not sep:
      raise ValueError(f"faulty.flip entry {item!r} is not 'src:dst'")
    flip[int(src)] = int(dst)
  return flip


# --- checks --------------------------------------------------------------------------------


def get(c: ml_collections.ConfigDict, field: str) -> Any:
  node = c
  for part in field.split("."):
    node = node[part]
  return node


def type_errors(c: ml_collections.ConfigDict, defaults: dict[str, Any]) -> list[str]:
  """A field whose value is not of its default's type; None defaults are placeholders for a
  string."""
  errors = []
  for field, default in defaults.items():
    try:
      value = get(c, field)
    except (KeyError, AttributeError):
      continue  # a config file's own layout; the fields it lacks are not this check's
    if isinstance(default, bool):
      ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
      ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
      kind = "an integer"
    elif isinstance(default, float):
      ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
      kind = "a number"
    else:  # str, or a None placeholder of a string
      ok, kind = value is None or isinstance(value, str), "a string"
    if not ok:
      errors.append(f"{field}={value!r} must be {kind}")
  return errors


def rule_errors(c: ml_collections.ConfigDict, rules: dict[str, Any]) -> list[str]:
  """Numbers outside their `Range` (NaN and infinities are outside every range) and strings
  not among their `Choices`; the types are checked first (`type_errors`)."""
  errors = []
  for field, rule in rules.items():
    value = get(c, field)
    if isinstance(rule, Range) and not rule.contains(value):
      note = f" ({rule.note})" if rule.note else ""
      errors.append(f"{field}={value!r} must be {rule.describe()}{note}")
    elif isinstance(rule, Choices) and not (rule.unless and get(c, rule.unless)):
      names = rule.valid()
      if value not in names:
        errors.append(f"{field}={value!r} is not one of {', '.join(names)}")
  return errors


def _shape_errors(c: ml_collections.ConfigDict) -> list[str]:
  text = str(c.dataset.synthetic_shape)
  try:
    shape = parse_int_list(text)
  except ValueError:
    shape = ()
  if not shape or min(shape) < 1:
    return [f"dataset.synthetic_shape={text!r} must be positive integers 'H,W,C' (images) or "
            f"'seq_len' (synthetic_text)"]
  if c.dataset.name == "synthetic_structured" and (len(shape) != 3 or min(shape[:2]) < 2):
    return [f"dataset.synthetic_shape={text!r} must be 'H,W,C' with H, W >= 2 for "
            f"dataset.name='synthetic_structured'"]
  return []


def _path_errors(c: ml_collections.ConfigDict) -> list[str]:
  errors = []
  for field, want in (("dataset.tokenizer", "directory"), ("model.hf_path", "directory"),
                      ("model.torchvision_weights", "file")):
    value = get(c, field)
    if value is None:
      continue
    path = Path(value).expanduser()
    if not value or not (path.is_dir() if want == "directory" else path.is_file()):
      errors.append(f"{field}={value!r} is not an existing {want}")
  if c.dataset.data_dir is not None and not str(c.dataset.data_dir):
    errors.append("dataset.data_dir='' must be a directory or unset (TRACEFL_DATA_DIR)")
  return errors


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


def _parsed_errors(c: ml_collections.ConfigDict, typed: Any) -> list[str]:
  """The string fields' typed values (`config.Typed`; a field that did not parse is its
  empty value here, already named) against the fields they depend on."""
  errors = []
  for field, rounds in (("provenance.rounds", typed.provenance_rounds),
                        ("provenance.store_rounds", sorted(typed.store_rounds))):
    bad = [r for r in rounds if not 1 <= r <= c.rounds]
    if bad:
      errors.append(f"{field} {bad} outside 1..{c.rounds}")
  faulty = [0] if typed.faulty_clients is None else list(typed.faulty_clients)  # "largest"
  bad = sorted({v for pair in typed.flip.items() for v in pair if v < 0})
  if bad:
    errors.append(f"faulty.flip labels {bad} must be >= 0")
  if c.provenance.mode == "faulty" and not (faulty and typed.flip):
    errors.append("provenance.mode='faulty' needs faulty.clients and faulty.flip")
  bad = [k for k in faulty if not 0 <= k < c.num_clients]
  if bad:
    errors.append(f"faulty.clients {bad} outside 0..{c.num_clients - 1}")
  if c.faulty.every_round and not faulty:
    errors.append("faulty.every_round needs faulty.clients")
  if c.faulty.every_round and len(set(faulty)) > c.clients_per_round:
    errors.append(f"faulty.every_round: {len(set(faulty))} faulty clients exceed "
                  f"clients_per_round={c.clients_per_round}")
  return errors


def cross_field_errors(c: ml_collections.ConfigDict, typed: Any) -> list[str]:
  """The rules of the CROSS fields and of the Parse fields' typed values (`typed`)."""
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
  return (errors + _attribution_errors(c) + _shape_errors(c) + _path_errors(c)
          + _parsed_errors(c, typed))
