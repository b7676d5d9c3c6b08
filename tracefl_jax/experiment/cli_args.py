"""The run's command-line flags and their parsing: `--name=value` flags and
`--config.FIELD=VALUE` overrides of the config file's fields (cli.py runs what they ask)."""

from __future__ import annotations

import difflib
from typing import Any, NamedTuple

import ml_collections

from tracefl_jax.experiment.configfile import FALSE, TRUE, field_type, load_config, set_field

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
  if flags["overwrite"]:
    config.checkpoint.overwrite = True
  return Args(config, spec, flags)


def _parse_flag_bool(name: str, text: str | None) -> bool:
  if text is None or text.lower() in TRUE:
    return True
  if text.lower() in FALSE:
    return False
  raise ValueError(f"--{name}={text}: takes true or false")
