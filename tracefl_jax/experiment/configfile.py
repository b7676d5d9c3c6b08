"""Config files and dotted overrides: the one loader and the one coercion the command line
and sweeps share.

A config file is a Python file with `get_config(preset)` (big_vision style), named
`PATH.py[:PRESET]`; a file that supports sweeps also defines `get_sweep(preset)`. An override
sets a dotted field (`partition.alpha`) from command-line text (`"0.1"`, parsed as the field's
type) or from a Python value (a sweep grid's), checked against the field's type either way.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from pathlib import Path
from typing import Any

import ml_collections

from tracefl_jax.experiment.config import config_fields

_HINT = "--config takes PATH.py[:PRESET], e.g. --config=configs/demo.py:quick"


def load_module(path: str):
  """Imports the config file at `path` (a one-line `ValueError` for a missing, non-Python or
  failing file)."""
  if not path:
    raise ValueError(f"--config is empty; {_HINT}")
  if not Path(path).is_file():
    what = "is a directory" if Path(path).is_dir() else "does not exist"
    raise ValueError(f"config file {path!r} {what}; {_HINT}")
  spec = importlib.util.spec_from_file_location(f"_tracefl_config_{Path(path).stem}", path)
  if spec is None or spec.loader is None:
    raise ValueError(f"config file {path!r} is not a Python file; {_HINT}")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # a config file may raise anything while it is imported
    raise ValueError(f"cannot load config file {path!r}: {type(e).__name__}: {e}") from e
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`get_config(preset)` of the config file `spec` = `PATH.py[:PRESET]`, locked."""
  path, _, preset = spec.partition(":")
  module = load_module(path)
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"config file {path!r} defines no get_config(preset)")
  try:
    config = module.get_config(preset) if preset else module.get_config()
  except ValueError as e:  # the file's own message, e.g. "unknown preset 'quik'; valid: ..."
    raise ValueError(f"--config={spec}: {e}") from e
  except Exception as e:
    raise ValueError(f"--config={spec}: get_config({preset!r}) failed: "
                     f"{type(e).__name__}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"--config={spec}: get_config returned a {type(config).__name__}, not "
                     f"an ml_collections.ConfigDict")
  config.lock()
  return config


def load_sweep(path: str, preset: str = "") -> Any:
  """`get_sweep(preset)` of the config file at `path` (a grid or a list of grids)."""
  module = load_module(path)
  if not callable(getattr(module, "get_sweep", None)):
    raise ValueError(f"{path} declares no sweep: add get_sweep(preset) returning "
                     "{'dotted.field': [values, ...]}")
  return module.get_sweep(preset)


def closest_field(name: str, fields: list[str]) -> str | None:
  """The valid dotted field a misspelt `name` most likely meant, or None."""
  section, _, leaf = name.rpartition(".")
  same_leaf = [f for f in fields if f.rpartition(".")[2] == leaf]
  if len(same_leaf) == 1:  # the right name in the wrong (or no) section
    return same_leaf[0]
  in_section = [f for f in fields if f.rpartition(".")[0] == section]
  pool = in_section or fields
  close = difflib.get_close_matches(leaf, [f.rpartition(".")[2] for f in pool], n=1,
                                    cutoff=0.6)
  if close:
    return next(f for f in pool if f.rpartition(".")[2] == close[0])
  if in_section:
    return None
  close = difflib.get_close_matches(name, fields, n=1, cutoff=0.75)  # a misspelt section
  return close[0] if close else None


TRUE, FALSE = ("true", "t", "1", "yes"), ("false", "f", "0", "no")


def coerce(field: str, value: Any, kind: type, flag: str) -> Any:
  """`value` (command-line text, None for a bare flag, or a Python value) as the field's
  type `kind`; a one-line `ValueError` starting with `flag` when it is not one."""
  text = isinstance(value, str) or value is None
  if kind is bool:
    if value is None or (text and value.lower() in TRUE) or value is True:
      return True
    if (text and value.lower() in FALSE) or value is False:
      return False
    raise ValueError(f"{flag}: {field} takes true or false, got {value!r}")
  if value is None:
    raise ValueError(f"{flag}: {field} needs a value, e.g. --config.{field}=VALUE")
  if kind is int:
    try:
      number = int(value) if text else value
      if isinstance(number, bool) or int(number) != number:
        raise ValueError
      return int(number)
    except (TypeError, ValueError):
      raise ValueError(f"{flag}: {field} takes an integer, got {value!r}") from None
  if kind is float:
    try:
      if isinstance(value, bool):
        raise ValueError
      return float(value)
    except (TypeError, ValueError):
      raise ValueError(f"{flag}: {field} takes a number, got {value!r}") from None
  if kind is str:
    return value if text else str(value)
  if not text:
    return value
  try:
    return ast.literal_eval(value)
  except (SyntaxError, ValueError):
    return value


def find_field(config: ml_collections.ConfigDict, field: str
               ) -> tuple[ml_collections.ConfigDict, str] | None:
  """(the section holding `field`, its leaf name), or None for an unknown field."""
  node = config
  *parents, leaf = field.split(".")
  for part in parents:
    if not isinstance(node.get(part), ml_collections.ConfigDict):
      return None
    node = node[part]
  return (node, leaf) if leaf in node else None


def field_type(config: ml_collections.ConfigDict, field: str) -> type | None:
  found = find_field(config, field)
  return None if found is None else found[0].get_type(found[1])


def set_field(config: ml_collections.ConfigDict, field: str, value: Any,
              flag: str | None = None) -> None:
  """Sets the dotted `field` from command-line text or a Python value, as the field's type.

  Raises:
    ValueError: one line, for an unknown field (naming the closest valid one), a section,
      or a value of the wrong type; `flag` (default `--config.FIELD=VALUE`) starts it.
  """
  if flag is None:
    flag = f"--config.{field}" + ("" if value is None else f"={value}")
  found = find_field(config, field)
  if found is None:
    best = closest_field(field, list(config_fields(config)))
    section = find_field(config, field.rpartition(".")[0]) if "." in field else (config, "")
    if best:
      hint = f"did you mean --config.{best}?"
    elif section and isinstance(section[0].get(section[1], config), ml_collections.ConfigDict):
      node = section[0][section[1]] if section[1] else config
      hint = f"valid fields here: {', '.join(sorted(node.keys()))}"
    else:
      hint = "no field is named like it"
    raise ValueError(f"unknown config field {field!r} ({flag.partition('=')[0]}); {hint} "
                     f"(python -m tracefl_jax --help lists every field)")
  node, leaf = found
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise ValueError(f"--config.{field} is a section, not a field; set its fields, e.g. "
                     f"--config.{field}.{next(iter(node[leaf].keys()), 'FIELD')}=VALUE")
  parsed = coerce(field, value, node.get_type(leaf), flag)
  try:
    node[leaf] = parsed
  except TypeError as e:
    raise ValueError(f"{flag}: {e}") from e


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A locked copy of `config` with dotted fields set from Python values (a sweep's cell)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.lock()
  for field, value in overrides.items():
    set_field(c, field, value, flag=f"sweep field {field}={value!r}")
  return c
