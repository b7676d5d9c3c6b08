"""The command line's words (cli.py runs what they ask): the commands and their usage, run's
`--name=value` flags and `--config.FIELD=VALUE` overrides of the config file's fields, their
parsing, the multi-process flags' checks, trace's flags and their checks, and the help."""

from __future__ import annotations

import argparse
import difflib
import json
import numbers
import os
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections

from tracefl_jax.experiment.config import FIELDS, base_config, config_fields
from tracefl_jax.experiment.config_checks import Choices
from tracefl_jax.experiment.configfile import FALSE, TRUE, field_type, load_config, set_field

# Each command's usage line; `run` is the command when none is named.
COMMANDS = {
    "run": "python -m tracefl_jax [run] --config=PATH.py[:PRESET] --workdir=DIR [flags] "
           "[--config.FIELD=VALUE ...]\n       python -m tracefl_jax [run] --config=PATH.py"
           "[:PRESET] --workdir=DIR --sweep [--sweep_shard=I/N | --collect]",
    "compare": "python -m tracefl_jax compare --config=PATH.py:PRESET --workdir=DIR "
               "[--quiet] [--config.FIELD=VALUE ...]",
    "trace": "python -m tracefl_jax trace --workdir=DIR --inputs=X.npy [--round=R] [--out=F]  "
             "(trace --help)",
    "config": "python -m tracefl_jax config [--config=PATH.py[:PRESET]] "
              "[--config.FIELD=VALUE ...]",
}
USAGE = "usage: " + "\n       ".join(COMMANDS.values())
HELP = ("-h", "--help", "--helpshort", "--helpfull")

# Flags of a run: name -> (metavar of its value, or "" for a bool flag; help).
FLAGS = {
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
    "sweep_shard": ("I/N", "with --sweep: run only share I of N of the grid (a job array's "
                           "task; default from SLURM_ARRAY_TASK_ID and _COUNT when set)"),
    "collect": ("", "with the sweep's config: merge the finished runs under --workdir into "
                    "results.csv, results.md and plots, naming the runs not finished"),
    "distributed": ("", "join a multi-process run (jax.distributed.initialize; on a cluster "
                        "it reads SLURM / Open MPI / ... environment variables)"),
    "coordinator": ("HOST:PORT", "multi-process run: process 0's address (implies "
                                 "--distributed)"),
    "num_processes": ("N", "multi-process run: number of processes"),
    "process_id": ("I", "multi-process run: this process's index, 0..N-1"),
    "heartbeat_timeout": ("SECONDS", "multi-process run: a process silent this long is dead "
                                     "and the run stops with an error (default 60)"),
    "join_timeout": ("SECONDS", "multi-process run: how long a process waits for all the "
                                "others to join before it stops with an error (default 300)"),
    "compilation_cache": ("DIR", "keep compiled XLA programs in DIR (JAX's persistent cache; "
                                 "default $JAX_COMPILATION_CACHE_DIR, else none): a resume, a "
                                 "rerun or a sweep's next run loads them instead of compiling"),
}


class Args(NamedTuple):
  config: ml_collections.ConfigDict
  config_spec: str
  flags: dict[str, Any]


def parse_args(argv: list[str], *, need_workdir: bool = True) -> Args:
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
  flags: dict[str, Any] = {name: None if meta else False for name, (meta, _) in FLAGS.items()}
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
        if (field_type(config, field) is not bool and i < len(argv)
            and not argv[i].startswith("--")):
          text, i = argv[i], i + 1
        else:
          text = None
      set_field(config, field, text)
      continue
    negated = name.startswith("no") and name[2:] in FLAGS and not FLAGS[name[2:]][0]
    key = name[2:] if negated else name
    if key not in FLAGS:
      close = difflib.get_close_matches(key, list(FLAGS), n=1)
      raise ValueError(f"unknown flag --{name}" + (f"; did you mean --{close[0]}?" if close
                                                    else "") +
                       f" (flags: {', '.join('--' + f for f in FLAGS)})")
    if FLAGS[key][0]:
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
  if flags["sweep_shard"] is not None and (flags["collect"] or not flags["sweep"]):
    raise ValueError(
        f"--sweep_shard={flags['sweep_shard']} runs one share of a sweep's grid: it needs "
        f"--sweep" + (" and not --collect (which merges every share's runs): drop one"
                      if flags["collect"] else
                      " (without it the config's own run would go into the sweep's "
                      "--workdir): add --sweep, or drop --sweep_shard"))
  if flags["overwrite"]:
    config.checkpoint.overwrite = True
  return Args(config, spec, flags)


class Join(NamedTuple):
  """A multi-process run's flags, checked (`join_flags`); None fields: JAX's cluster
  detection (`--distributed`) finds them."""
  coordinator: str | None
  num_processes: int | None
  process_id: int | None
  heartbeat_timeout: int
  join_timeout: int


def join_flags(flags: dict[str, Any]) -> Join | None:
  """The multi-process flags, checked before JAX starts (a malformed coordinator address
  crashes XLA natively, and a missing one is only found after JAX's own wait); None for a
  single-process run.

  Raises:
    ValueError: one line naming the flag, the value and what is valid.
  """
  ints = {k: _positive(k, flags[k], low=0 if k == "process_id" else 1)
          for k in ("num_processes", "process_id", "heartbeat_timeout", "join_timeout")}
  coordinator, n, i = flags["coordinator"], ints["num_processes"], ints["process_id"]
  if not (flags["distributed"] or coordinator is not None or (n, i) != (None, None)):
    return None
  if coordinator is not None:
    host, sep, port = str(coordinator).rpartition(":")
    if not (sep and host and port.isdigit() and 1 <= int(port) <= 65535):
      raise ValueError(f"--coordinator={coordinator} must be HOST:PORT, process 0's address "
                       f"with a port number in 1..65535, e.g. --coordinator=localhost:12345")
  if not flags["distributed"]:  # explicit: all three, or JAX would look for a cluster
    given = {"--coordinator": coordinator, "--num_processes": n, "--process_id": i}
    missing = [k for k, v in given.items() if v is None]
    if missing:
      have = " ".join(f"{k}={v}" for k, v in given.items() if v is not None)
      raise ValueError(
          f"{have} joins a multi-process run, which also needs {' and '.join(missing)}: every "
          f"process gets --coordinator=HOST:PORT (process 0's address, the same for all), "
          f"--num_processes=N and its own --process_id=I; on a cluster whose scheduler JAX "
          f"reads (SLURM, Open MPI, ...) use --distributed instead")
  if n is not None and i is not None and i >= n:
    raise ValueError(f"--process_id={i} must be in 0..{n - 1} (--num_processes={n})")
  return Join(coordinator, n, i, ints["heartbeat_timeout"] or 60, ints["join_timeout"] or 300)


def _positive(name: str, text: str | None, low: int) -> int | None:
  if text is None:
    return None
  try:
    value = int(text)
  except ValueError:
    value = None
  if value is None or value < low:
    raise ValueError(f"--{name}={text} must be an integer >= {low}")
  return value


def _parse_flag_bool(name: str, text: str | None) -> bool:
  if text is None or text.lower() in TRUE:
    return True
  if text.lower() in FALSE:
    return False
  raise ValueError(f"--{name}={text}: takes true or false")


# --- trace's flags -----------------------------------------------------------------------


def trace_parser() -> argparse.ArgumentParser:
  """`python -m tracefl_jax trace`'s flags (argparse: `trace --help`)."""
  parser = argparse.ArgumentParser(
      prog="python -m tracefl_jax trace",
      description="Trace new inputs against a round stored by a run (its last round by "
                  "default, --config.provenance.store_rounds): which client is responsible "
                  "for each prediction? The run's --config.imports are imported first.")
  parser.add_argument("--workdir", required=True, help="the run's workdir")
  parser.add_argument("--inputs", required=True,
                      help=".npy file of inputs [N, *input_shape] (or one example) in the "
                           "dataset's own form: uint8 images as raw pixels (normalised as "
                           "the run did), or already normalised floats; token ids for text. "
                           "Inputs of another form are refused with the form expected")
  parser.add_argument("--round", type=int, default=None, help="stored round (default: last)")
  parser.add_argument("--kernel", default=None, help="provenance kernel (default: the run's)")
  parser.add_argument("--top_k", type=int, default=3, help="top clients listed per input")
  parser.add_argument("--out", default=None, help="write one JSON row per input here")
  return parser


def trace_arg_errors(top_k: Any, out: str | None) -> list[str]:
  """Problems of the trace command's `--top_k` and `--out`, found before tracing: top_k must
  be an int >= 1; out, when given, a file path whose directory exists and is writable and
  that is not itself a directory."""
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


# --- the help ----------------------------------------------------------------------------


def _format_value(value: Any) -> str:
  return json.dumps(value) if isinstance(value, str) else repr(value)


def describe_config(config: ml_collections.ConfigDict) -> list[str]:
  """One line per config field: `--config.FIELD=VALUE  meaning`."""
  fields = config_fields(config)
  order = [f for f in FIELDS if f in fields] + [f for f in fields if f not in FIELDS]
  lines = []
  for field, value in ((f, fields[f]) for f in order):
    meaning = FIELDS[field].help if field in FIELDS else ""
    if field in FIELDS and isinstance(FIELDS[field].rule, Choices):
      meaning += f": {', '.join(FIELDS[field].rule.valid())}"
    lines.append(f"  {field + '=' + _format_value(value):<42} {meaning}")
  return lines


def print_help() -> None:
  """The commands, run's flags and every config field with its default and meaning."""
  print(USAGE)
  print("\ncommands:\n  run      one federated experiment with TraceFL provenance (the "
        "default); rerunning the same command resumes it\n  compare  the attribution "
        "comparison: every cell of the config's sweep, then its table and figure\n  trace    "
        "new inputs against a round a run stored\n  config   the resolved config: every field, "
        "its value and its meaning\n\nflags of run (compare takes --config, --workdir and "
        "--quiet):")
  for name, (meta, meaning) in FLAGS.items():
    print(f"  {'--' + name + ('=' + meta if meta else ''):<42} {meaning}")
  print("\nconfig fields, with the defaults of base_config() (a config file changes some; "
        "`python -m tracefl_jax config --config=PATH.py[:PRESET]` shows its values); set one "
        "with --config.FIELD=VALUE:")
  print("\n".join(describe_config(base_config())))
