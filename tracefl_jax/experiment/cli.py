"""Command line.

  python -m tracefl_jax --config=configs/demo.py:quick --workdir=runs/demo
      runs an experiment; any config field can be overridden with `--config.a.b=value` (the
      config is locked, so a misspelt field is an error). The logic is `experiment.runner.run`.
  python -m tracefl_jax --help
      lists the flags and every config field with its default and meaning.
  python -m tracefl_jax config [--config=configs/demo.py:quick] [--config.a.b=value ...]
      prints the resolved config's fields, values and meanings.
  python -m tracefl_jax trace --workdir=runs/demo --inputs=x.npy [--round=R] [--out=F]
      traces new inputs against a round the run stored (`provenance.store_rounds`).

Config files are Python files with `get_config(preset)` (big_vision style): `path.py:preset`.
Every mistake on the command line (a misspelt field, a value of the wrong type, an unknown
preset, a missing file, a workdir that would mix or lose results) is one `error: ...` line on
stderr with exit code 2, naming the bad input and the way out.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections

_USAGE = """\
usage: python -m tracefl_jax --config=PATH.py[:PRESET] --workdir=DIR [flags] [--config.FIELD=VALUE ...]
       python -m tracefl_jax config [--config=PATH.py[:PRESET]] [--config.FIELD=VALUE ...]
       python -m tracefl_jax trace --workdir=DIR --inputs=X.npy [--round=R] [--out=F]  (trace --help)"""

# Flags of a run: name -> (metavar of its value, or "" for a bool flag; help).
_FLAGS = {
    "config": ("PATH.py[:PRESET]", "experiment config file, optionally with a preset (e.g. "
                                   "configs/demo.py:quick)"),
    "workdir": ("DIR", "directory of the run's results (config.json, metrics.jsonl, "
                       "provenance.jsonl, summary.json, checkpoints/); one run per workdir"),
    "quiet": ("", "no progress bar"),
    "sweep": ("", "run the grid the config file declares in get_sweep(preset), one run per "
                  "sub-directory of --workdir, then write the sweep's table and plots"),
    "overwrite": ("", "move a previous run in --workdir to WORKDIR/previous/<time>/ and start "
                      "afresh (= --config.checkpoint.overwrite=True)"),
    "allow_cwd": ("", "allow --workdir to be the current directory"),
}


class _Args(NamedTuple):
  config: ml_collections.ConfigDict
  config_spec: str
  flags: dict[str, Any]


def _fail(message: str, code: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`get_config(preset)` of the config file `spec` = `PATH.py[:PRESET]`, locked."""
  path, _, preset = spec.partition(":")
  hint = "--config takes PATH.py[:PRESET], e.g. --config=configs/demo.py:quick"
  if not path:
    raise ValueError(f"--config is empty; {hint}")
  if not Path(path).is_file():
    what = "is a directory" if Path(path).is_dir() else "does not exist"
    raise ValueError(f"config file {path!r} {what}; {hint}")
  module_spec = importlib.util.spec_from_file_location(f"_tracefl_config_{Path(path).stem}",
                                                       path)
  if module_spec is None or module_spec.loader is None:
    raise ValueError(f"config file {path!r} is not a Python file; {hint}")
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # a config file may raise anything while it is imported
    raise ValueError(f"cannot load config file {path!r}: {type(e).__name__}: {e}") from e
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


def _closest_field(name: str, fields: list[str]) -> str | None:
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


_TRUE, _FALSE = ("true", "t", "1", "yes"), ("false", "f", "0", "no")


def _parse_value(field: str, text: str | None, kind: type) -> Any:
  flag = f"--config.{field}" + ("" if text is None else f"={text}")
  if kind is bool:
    if text is None or text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise ValueError(f"{flag}: {field} takes true or false, got {text!r}")
  if text is None:
    raise ValueError(f"{flag}: {field} needs a value, e.g. --config.{field}=VALUE")
  if kind is int:
    try:
      return int(text)
    except ValueError:
      raise ValueError(f"{flag}: {field} takes an integer, got {text!r}") from None
  if kind is float:
    try:
      return float(text)
    except ValueError:
      raise ValueError(f"{flag}: {field} takes a number, got {text!r}") from None
  if kind is str:
    return text
  try:
    return ast.literal_eval(text)
  except (SyntaxError, ValueError):
    return text


def _find_field(config: ml_collections.ConfigDict, field: str
                ) -> tuple[ml_collections.ConfigDict, str] | None:
  """(the section holding `field`, its leaf name), or None for an unknown field."""
  node = config
  *parents, leaf = field.split(".")
  for part in parents:
    if not isinstance(node.get(part), ml_collections.ConfigDict):
      return None
    node = node[part]
  return (node, leaf) if leaf in node else None


def apply_override(config: ml_collections.ConfigDict, field: str, text: str | None) -> None:
  """Sets the dotted `field` from its command-line text, parsed as the field's type.

  Raises:
    ValueError: one line, for an unknown field (naming the closest valid one), a section,
      or a value of the wrong type.
  """
  from tracefl_jax.experiment.config import config_fields  # pylint: disable=g-import-not-at-top
  found = _find_field(config, field)
  if found is None:
    best = _closest_field(field, list(config_fields(config)))
    section = _find_field(config, field.rpartition(".")[0]) if "." in field else (config, "")
    if best:
      hint = f"did you mean --config.{best}?"
    elif section and isinstance(section[0].get(section[1], config), ml_collections.ConfigDict):
      node = section[0][section[1]] if section[1] else config
      hint = f"valid fields here: {', '.join(sorted(node.keys()))}"
    else:
      hint = "no field is named like it"
    raise ValueError(f"unknown config field {field!r} (--config.{field}); {hint} "
                     f"(python -m tracefl_jax --help lists every field)")
  node, leaf = found
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise ValueError(f"--config.{field} is a section, not a field; set its fields, e.g. "
                     f"--config.{field}.{next(iter(node[leaf].keys()), 'FIELD')}=VALUE")
  value = _parse_value(field, text, node.get_type(leaf))
  try:
    node[leaf] = value
  except TypeError as e:
    raise ValueError(f"--config.{field}={text}: {e}") from e


def _field_type(config: ml_collections.ConfigDict, field: str) -> type | None:
  found = _find_field(config, field)
  return None if found is None else found[0].get_type(found[1])


def parse_args(argv: list[str], *, need_workdir: bool = True) -> _Args:
  """Flags and `--config.FIELD[=VALUE]` overrides (`--name=value` or `--name value`; a bool
  flag or field alone means true, `--noquiet` false).

  Raises:
    ValueError: one line naming the bad argument and what is valid.
  """
  spec = None
  for k, arg in enumerate(argv):
    if arg.startswith("--config="):
      spec = arg[len("--config="):]
    elif arg == "--config":
      spec = argv[k + 1] if k + 1 < len(argv) else ""
  if spec is None:
    raise ValueError("--config is required, e.g. --config=configs/demo.py:quick "
                     "(python -m tracefl_jax --help lists the flags and every config field)")
  config = load_config(spec)
  flags: dict[str, Any] = {name: None if meta else False for name, (meta, _) in _FLAGS.items()}
  i = 0
  while i < len(argv):
    arg = argv[i]
    i += 1
    if not arg.startswith("--") or arg == "--":
      raise ValueError(f"unexpected argument {arg!r}; flags look like --name=value "
                       f"(python -m tracefl_jax --help)")
    name, eq, text = arg[2:].partition("=")
    if name.startswith("config."):
      field = name[len("config."):]
      if not eq:  # `--config.a.b VALUE`, absl style; a bool field alone means true
        if (_field_type(config, field) is not bool and i < len(argv)
            and not argv[i].startswith("--")):
          text, i = argv[i], i + 1
        else:
          text = None
      apply_override(config, field, text)
      continue
    negated = name.startswith("no") and name[2:] in _FLAGS and not _FLAGS[name[2:]][0]
    key = name[2:] if negated else name
    if key not in _FLAGS:
      close = difflib.get_close_matches(key, list(_FLAGS), n=1)
      raise ValueError(f"unknown flag --{name}" + (f"; did you mean --{close[0]}?" if close
                                                    else "") +
                       f" (flags: {', '.join('--' + f for f in _FLAGS)})")
    if _FLAGS[key][0]:
      if not eq:
        if i >= len(argv):
          raise ValueError(f"--{key} needs a value")
        text, i = argv[i], i + 1
      flags[key] = text
    else:
      flags[key] = not negated and _parse_flag_bool(key, text if eq else None)
  if need_workdir and flags["workdir"] is None:
    raise ValueError("--workdir is required: the directory for the run's results, e.g. "
                     "--workdir=runs/demo")
  if flags["overwrite"]:
    config.checkpoint.overwrite = True
  return _Args(config, spec, flags)


def _parse_flag_bool(name: str, text: str | None) -> bool:
  if text is None or text.lower() in _TRUE:
    return True
  if text.lower() in _FALSE:
    return False
  raise ValueError(f"--{name}={text}: takes true or false")


def _format_value(value: Any) -> str:
  return json.dumps(value) if isinstance(value, str) else repr(value)


def describe_config(config: ml_collections.ConfigDict) -> list[str]:
  """One line per config field: `--config.FIELD=VALUE  meaning`."""
  from tracefl_jax.experiment.config import FIELD_HELP, config_fields  # pylint: disable=g-import-not-at-top
  from tracefl_jax.data import available_datasets  # pylint: disable=g-import-not-at-top
  from tracefl_jax.models import available_models  # pylint: disable=g-import-not-at-top
  choices = {"dataset.name": available_datasets(), "model.name": available_models()}
  fields = config_fields(config)
  order = [f for f in FIELD_HELP if f in fields] + [f for f in fields if f not in FIELD_HELP]
  lines = []
  for field, value in ((f, fields[f]) for f in order):
    meaning = FIELD_HELP.get(field, "")
    if field in choices:
      meaning += f": {', '.join(choices[field])}"
    lines.append(f"  {field + '=' + _format_value(value):<42} {meaning}")
  return lines


def _print_help() -> None:
  from tracefl_jax.experiment.config import base_config  # pylint: disable=g-import-not-at-top
  print(_USAGE)
  print("\nRuns one federated experiment with TraceFL provenance; rerunning the same command "
        "resumes it.\n\nflags:")
  for name, (meta, meaning) in _FLAGS.items():
    print(f"  {'--' + name + ('=' + meta if meta else ''):<42} {meaning}")
  print("\nconfig fields, with the defaults of base_config() (a config file changes some; "
        "`python -m tracefl_jax config --config=PATH.py[:PRESET]` shows its values); set one "
        "with --config.FIELD=VALUE:")
  print("\n".join(describe_config(base_config())))


def _run_main(argv: list[str]) -> None:
  try:
    args = parse_args(argv)
  except ValueError as e:
    _fail(str(e))
  config, workdir, flags = args.config, args.flags["workdir"], args.flags
  from tracefl_jax.experiment import report, results  # pylint: disable=g-import-not-at-top
  from tracefl_jax.experiment import runner as experiment  # pylint: disable=g-import-not-at-top
  from tracefl_jax.experiment.checkpointing import (CheckpointError, check_workdir,  # pylint: disable=g-import-not-at-top
                                                    finished_summary)
  try:
    if flags["sweep"]:
      from tracefl_jax.experiment import sweep  # pylint: disable=g-import-not-at-top
      check_workdir(workdir, allow_cwd=flags["allow_cwd"])
      path, _, preset = args.config_spec.partition(":")
      rows = sweep.run_sweep(config, sweep.load_sweep(path, preset), workdir,
                             progress=not flags["quiet"])
      report.print_sweep(rows, workdir)
      return
    summary = None
    if not config.checkpoint.overwrite:
      check_workdir(workdir, allow_cwd=flags["allow_cwd"])
      summary = finished_summary(workdir, config.to_json_best_effort(indent=2), config.rounds)
    if summary is not None:  # nothing to do, and nothing is written
      print(f"nothing to do: {workdir} already holds this config's finished run "
            f"({config.rounds} rounds); its files are unchanged (a larger --config.rounds "
            f"continues it, --overwrite starts afresh)")
      report.print_summary(summary, workdir)
      return
    summary = experiment.run(config, workdir, progress=not flags["quiet"],
                             allow_cwd=flags["allow_cwd"])
    results.plot_run(workdir)
  except (ValueError, OSError, CheckpointError, experiment.TrainingDivergedError) as e:
    _fail(str(e))
  except KeyboardInterrupt:
    _fail("interrupted; run the same command again to resume from the last checkpoint", 130)
  report.print_summary(summary, workdir)


def _config_main(argv: list[str]) -> None:
  """`python -m tracefl_jax config [--config=PATH.py[:PRESET]] [--config.FIELD=VALUE ...]`."""
  if any(a in ("-h", "--help") for a in argv):
    print("usage: python -m tracefl_jax config [--config=PATH.py[:PRESET]] "
          "[--config.FIELD=VALUE ...]\nprints the resolved config: every field, its value "
          "and its meaning")
    return
  try:
    if any(a == "--config" or a.startswith("--config=") for a in argv):
      config = parse_args(argv, need_workdir=False).config
    else:
      from tracefl_jax.experiment.config import base_config  # pylint: disable=g-import-not-at-top
      config = base_config()
      for arg in argv:
        name, eq, text = arg[2:].partition("=") if arg.startswith("--config.") else ("", "", "")
        if not name:
          raise ValueError(f"unexpected argument {arg!r}; config takes --config=PATH.py[:PRESET] "
                           f"and --config.FIELD=VALUE")
        apply_override(config, name[len("config."):], text if eq else None)
  except ValueError as e:
    _fail(str(e))
  print("\n".join(describe_config(config)))


def _trace_main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m tracefl_jax trace",
      description="Trace new inputs against a round stored by a run "
                  "(--config.provenance.store_rounds): which client is responsible for "
                  "each prediction?")
  parser.add_argument("--workdir", required=True, help="the run's workdir")
  parser.add_argument("--inputs", required=True,
                      help=".npy file of inputs [N, *input_shape], preprocessed as the run's "
                           "dataset is (or one example)")
  parser.add_argument("--round", type=int, default=None, help="stored round (default: last)")
  parser.add_argument("--kernel", default=None, help="provenance kernel (default: the run's)")
  parser.add_argument("--top_k", type=int, default=3, help="top clients listed per input")
  parser.add_argument("--out", default=None, help="write one JSON row per input here")
  args = parser.parse_args(argv)
  from tracefl_jax.experiment import report, stored  # pylint: disable=g-import-not-at-top
  from tracefl_jax.experiment.checkpointing import CheckpointError  # pylint: disable=g-import-not-at-top
  try:
    import numpy as np  # pylint: disable=g-import-not-at-top
    try:
      x = np.load(args.inputs, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read inputs {args.inputs!r} as a .npy array ({e})") from e
    result, round_ = stored.trace_stored_round(args.workdir, x, args.round, kernel=args.kernel)
  except (ValueError, OSError, CheckpointError) as e:
    _fail(str(e))
  rows = stored.attribution_rows(result, round_.round, args.top_k)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)
  report.print_attribution(rows, args.workdir, args.out)


def main() -> None:
  # JAX's backend probing would log "Unable to initialize backend 'tpu'" at WARNING.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
  argv = sys.argv[1:]
  if argv[:1] == ["trace"]:
    _trace_main(argv[1:])
  elif argv[:1] == ["config"]:
    _config_main(argv[1:])
  elif not argv or any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv):
    _print_help()
    if not argv:
      _fail("--config and --workdir are required (usage above)")
  else:
    _run_main(argv)
