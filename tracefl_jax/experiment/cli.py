"""The command line: one entrance per experiment, the config parsed once.

  python -m tracefl_jax [run] --config=configs/demo.py:quick --workdir=runs/demo
      runs an experiment (`run` may be left out); any config field can be overridden with
      `--config.a.b=value` (the config is locked, so a misspelt field is an error). The logic
      is `experiment.runner.run`.
  python -m tracefl_jax compare --config=configs/attribution.py:cpu --workdir=runs/attribution
      the comparison of attribution methods against retrained federations: every cell of the
      preset's sweep, each under the run's workdir checks, lock and plan
      (`experiment.comparison.run_cells`).
  python -m tracefl_jax trace --workdir=runs/demo --inputs=x.npy [--round=R] [--out=F]
      traces new inputs against a round the run stored (`provenance.store_rounds`).
  python -m tracefl_jax config [--config=configs/demo.py:quick] [--config.a.b=value ...]
      prints the resolved config's fields, values and meanings.
  python -m tracefl_jax --help
      lists the commands, the flags and every config field with its default and meaning.
  python -m tracefl_jax run ... --sweep [--sweep_shard=I/N | --collect]
      runs a sweep's grid (or one job-array shard of it), or merges the shards' results.
  python -m tracefl_jax run ... --coordinator=HOST:PORT --num_processes=N --process_id=I
      one process of a multi-process run (`--distributed` on a cluster: docs/cluster.md).

The installed `tracefl-jax` command is the same (`tracefl_jax.__main__.main`). Config files
are Python files with `get_config(preset)` (big_vision style): `path.py:preset`. Every
mistake on the command line (a misspelt field, a value of the wrong type, an unknown preset,
a missing file, a workdir that would mix or lose results) is one `error: ...` line on stderr
with exit code 2, naming the bad input and the way out.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from typing import Any

from tracefl_jax.experiment.cli_args import (COMMANDS, HELP, Args, describe_config, join_flags,
                                             parse_args, print_help, trace_arg_errors,
                                             trace_parser)
from tracefl_jax.experiment.configfile import set_field


def _fail(message: str, code: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _fail_run(message: str, workdir: str | None, code: int = 2) -> None:
  """The run's one error line; what orbax's threads print while the process ends (tracebacks
  of futures on a closed event loop) goes to WORKDIR/run.log, not the terminal."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  if workdir and os.path.isdir(workdir):
    try:
      log = os.open(os.path.join(workdir, "run.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                    0o644)
      os.dup2(log, 2)
      os.close(log)
    except OSError:
      pass
  sys.exit(code)


def _join(args: Args) -> None:
  """Joins the processes of a multi-process run before anything else uses JAX (the flags
  checked first: `cli_args.join_flags`), refuses processes started with different configs,
  then turns on the compilation cache."""
  from tracefl_jax.experiment import distributed  # pylint: disable=g-import-not-at-top
  flags = args.flags
  join = join_flags(flags)
  if join is not None:
    distributed.initialize(join.coordinator, join.num_processes, join.process_id,
                           heartbeat_timeout=join.heartbeat_timeout,
                           initialization_timeout=join.join_timeout)
    same = ("workdir", "sweep", "sweep_shard", "collect", "overwrite", "allow_cwd")
    distributed.check_same_run(json.dumps({
        "config": json.loads(args.config.to_json_best_effort()),
        "flags": {k: flags[k] for k in same}}))
  distributed.use_compilation_cache(flags["compilation_cache"])


def _exit_if_peer_lost(e: BaseException) -> None:
  """With several processes, an error that a lost process causes (a collective, or a
  checkpoint's, failing) is reported as that process's loss, naming it and its last
  heartbeat (`distributed.exit_if_lost`), and ends this process at once; other errors keep
  their own line."""
  import jax  # pylint: disable=g-import-not-at-top
  from tracefl_jax.experiment import distributed  # pylint: disable=g-import-not-at-top
  from tracefl_jax.experiment.checkpoints import CheckpointError, first_line  # pylint: disable=g-import-not-at-top
  from tracefl_jax.experiment.io import WorkdirError  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1 or isinstance(e, WorkdirError):
    return
  chain, cause = [], e
  while cause is not None and len(chain) < 8:
    chain.append(cause)
    cause = cause.__cause__ or cause.__context__
  runtime = any(isinstance(c, jax.errors.JaxRuntimeError) for c in chain)
  if runtime or any(isinstance(c, CheckpointError) or "Gloo" in str(c) for c in chain):
    distributed.exit_if_lost()
  if runtime:  # no process is silent, yet the runtime failed: JAX's shutdown would abort
    distributed.exit_now(f"process {jax.process_index()} of {jax.process_count()} lost the others "
                   f"({first_line(e)}); a process died or was stopped: run the same command "
                   f"again on every process to resume from the last checkpoint", 3)


# errno values of a full disk or quota, or a file grown past its limit.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _os_error_line(e: OSError, workdir: str | None) -> str:
  """An OSError as one line with the way out (a write's own message names neither)."""
  where = f" {e.filename}" if e.filename else f" in {workdir}" if workdir else ""
  if e.errno in _NO_ROOM:
    return (f"cannot write{where}: {e.strerror or e} (the disk or quota is full); the rows "
            f"and checkpoints written so far are kept: make room and run the same command "
            f"again to resume from the last checkpoint")
  return str(e)


def _sweep_shard(flags: dict[str, Any]) -> tuple[int, int] | None:
  """`--sweep_shard=i/n`, else a job array's index from the environment (SLURM), else None."""
  from tracefl_jax.experiment import sweep  # pylint: disable=g-import-not-at-top
  if flags["sweep_shard"] is not None:
    return sweep.parse_shard(flags["sweep_shard"])
  return sweep.shard_from_environment(os.environ)


def _run_main(argv: list[str]) -> None:
  from tracefl_jax.experiment.distributed import StoppedByPrimary  # pylint: disable=g-import-not-at-top
  try:
    args = parse_args(argv)
    _join(args)
  except StoppedByPrimary:
    sys.exit(2)  # process 0 prints the line
  except ValueError as e:
    _fail(str(e))
  config, workdir, flags = args.config, args.flags["workdir"], args.flags
  from tracefl_jax.experiment import report  # pylint: disable=g-import-not-at-top
  from tracefl_jax.experiment import runner as experiment  # pylint: disable=g-import-not-at-top
  from tracefl_jax.experiment.checkpoints import CheckpointError  # pylint: disable=g-import-not-at-top
  from tracefl_jax.experiment.distributed import is_primary  # pylint: disable=g-import-not-at-top
  try:
    if flags["sweep"] or flags["collect"]:
      from tracefl_jax.experiment import sweep  # pylint: disable=g-import-not-at-top
      path, _, preset = args.config_spec.partition(":")
      grid = sweep.load_sweep(path, preset)
      if flags["collect"]:
        rows, missing = sweep.collect(config, grid, workdir)
        report.print_sweep(rows, workdir, missing=missing)
        if missing:
          _fail(f"{len(missing)} of the sweep's {len(rows) + len(missing)} runs are not "
                f"finished: {', '.join(missing)}; run their shards, then --collect again "
                f"(the tables above cover the finished runs)", 3)
        return
      rows = sweep.run_sweep(config, grid, workdir, progress=not flags["quiet"],
                             shard=_sweep_shard(flags), allow_cwd=flags["allow_cwd"])
      report.print_sweep(rows, workdir)
      return
    summary = experiment.run(config, workdir, progress=not flags["quiet"],
                             allow_cwd=flags["allow_cwd"], figures=True)
  except StoppedByPrimary:
    sys.exit(2)  # process 0 prints the line
  except (ValueError, OSError, CheckpointError, experiment.TrainingDivergedError) as e:
    from tracefl_jax.experiment.io import WorkdirError  # pylint: disable=g-import-not-at-top
    _exit_if_peer_lost(e)
    # A refused workdir (the current directory, another run's, ...) gets no run.log.
    _fail_run(_os_error_line(e, workdir) if isinstance(e, OSError) else str(e),
              None if isinstance(e, WorkdirError) else workdir)
  except KeyboardInterrupt:
    _fail_run("interrupted; run the same command again to resume from the last checkpoint",
              workdir, 130)
  except Exception as e:  # pylint: disable=broad-except
    _exit_if_peer_lost(e)  # several processes and a runtime error: one line, and the end
    raise
  if is_primary():
    report.print_summary(summary, workdir)


def _config_main(argv: list[str]) -> None:
  """`python -m tracefl_jax config [--config=PATH.py[:PRESET]] [--config.FIELD=VALUE ...]`."""
  if any(a in HELP for a in argv):
    print(f"usage: {COMMANDS['config']}\nprints the resolved config: every field, its value "
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
        set_field(config, name[len("config."):], text if eq else None)
  except ValueError as e:
    _fail(str(e))
  print("\n".join(describe_config(config)))


def compare(argv: list[str]) -> None:
  """`compare --config=PATH.py:PRESET --workdir=DIR [--config.FIELD=VALUE ...]`: every cell of
  the preset's sweep (`comparison.run_cells`), then the table (WORKDIR/table.md, also
  printed) and its figure (WORKDIR/attribution.png); parsed by the same flags and config
  overrides as `run`. A bad argument is one line on stderr and exit code 2."""
  from tracefl_jax.experiment import comparison, comparison_methods as methods  # pylint: disable=g-import-not-at-top
  from tracefl_jax.fl.rounds import TrainingDivergedError  # pylint: disable=g-import-not-at-top
  try:
    args = parse_args(argv)
    other = sorted(k for k, v in args.flags.items()
                   if v and k not in ("config", "workdir", "quiet"))
    if other:
      raise ValueError(f"--{other[0]} is a flag of python -m tracefl_jax, not of the "
                       f"comparison; it takes --config, --workdir and --config.FIELD=VALUE")
  except ValueError as e:
    _fail(str(e))
  try:
    cells, _ = comparison.run_cells(args.config_spec, args.flags["workdir"], base=args.config)
  except (ValueError, OSError, TrainingDivergedError) as e:  # WorkdirError is a ValueError
    _fail(str(e))
  print(methods.table(cells))
  if methods.topk_table(cells):
    print(f"\nTop-k removal:\n\n{methods.topk_table(cells)}")


def trace(argv: list[str]) -> None:
  """`trace --workdir=DIR --inputs=X.npy [--round=R] [--kernel=K] [--top_k=K] [--out=F]`: new
  inputs against a round a run stored (`stored.trace_stored_round`). Everything that can be
  checked before tracing is: `--top_k` and the output path (`cli_args.trace_arg_errors`:
  `--out` in a directory that exists, not itself a directory) and the inputs
  (`data.checks.read_npy`: one .npy array, not an .npz archive)."""
  args = trace_parser().parse_args(argv)
  from tracefl_jax.experiment import report, stored  # pylint: disable=g-import-not-at-top
  from tracefl_jax.experiment.checkpoints import CheckpointError  # pylint: disable=g-import-not-at-top
  from tracefl_jax.data.checks import read_npy  # pylint: disable=g-import-not-at-top
  problems = trace_arg_errors(args.top_k, args.out)
  if problems:
    _fail("; ".join(problems))
  try:
    x = read_npy(args.inputs, "--inputs")
    result, round_ = stored.trace_stored_round(args.workdir, x, args.round, kernel=args.kernel)
    rows = stored.attribution_rows(result, round_.round, args.top_k)
    if args.out:
      with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
  except (ValueError, OSError, CheckpointError) as e:
    _fail(str(e))
  report.print_attribution(rows, args.workdir, args.out)


def _command(argv: list[str]) -> tuple[str, list[str]]:
  """(the command, its arguments); no command is `run`, and a word that is not a command is
  named with the closest one."""
  if argv and argv[0] in COMMANDS:
    return argv[0], argv[1:]
  if argv and not argv[0].startswith("-"):
    import difflib  # pylint: disable=g-import-not-at-top
    close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
    _fail(f"unknown command {argv[0]!r}" + (f"; did you mean {close[0]}?" if close else "")
          + f" (commands: {', '.join(COMMANDS)}; python -m tracefl_jax --help)")
  return "run", argv


def main(argv: list[str] | None = None) -> None:
  """`python -m tracefl_jax` and the installed `tracefl-jax`: `argv` defaults to
  `sys.argv[1:]`."""
  # JAX's backend probing would log "Unable to initialize backend 'tpu'" at WARNING.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
  command, args = _command(sys.argv[1:] if argv is None else list(argv))
  wants_help = any(a in HELP for a in args)
  if command == "trace":
    trace(args)
  elif command == "config":
    _config_main(args)
  elif command == "compare" and wants_help:
    print(f"usage: {COMMANDS['compare']}\nruns every cell of the preset's sweep (a finished "
          f"cell of the same config is read back), then writes WORKDIR/table.md and "
          f"WORKDIR/attribution.png and prints the table")
  elif command == "compare":
    compare(args)
  elif not args or wants_help:
    print_help()
    if not args:
      _fail("--config and --workdir are required (usage above)")
  else:
    _run_main(args)
