"""Command line.

  python -m tracefl_jax --config=configs/demo.py:quick --workdir=runs/demo
      runs an experiment; any config field can be overridden with `--config.a.b=value` (the
      config is locked, so a misspelt field is an error). The logic is `experiment.runner.run`.
  python -m tracefl_jax trace --workdir=runs/demo --inputs=x.npy [--round=R] [--out=F]
      traces new inputs against a round the run stored (`provenance.store_rounds`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with a preset: path.py:preset.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics.jsonl and results.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bar.")
_SWEEP = flags.DEFINE_bool(
    "sweep", False, "Run the grid the config file declares in get_sweep(preset), one run per "
    "sub-directory of --workdir, then write the sweep's table and plots.")


def _main(argv: list[str]) -> None:
  # absl's handler would print JAX's backend probing ("Unable to initialize backend 'tpu'").
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from tracefl_jax.experiment import runner as experiment, report  # pylint: disable=g-import-not-at-top
  from tracefl_jax.experiment.checkpointing import CheckpointError  # pylint: disable=g-import-not-at-top
  try:
    if _SWEEP.value:
      from tracefl_jax.experiment import sweep  # pylint: disable=g-import-not-at-top
      path, _, preset = config_flags.get_config_filename(flags.FLAGS["config"]).partition(":")
      rows = sweep.run_sweep(_CONFIG.value, sweep.load_sweep(path, preset), _WORKDIR.value,
                             progress=not _QUIET.value)
      report.print_sweep(rows, _WORKDIR.value)
      return
    summary = experiment.run(_CONFIG.value, _WORKDIR.value, progress=not _QUIET.value)
  except (ValueError, FileNotFoundError, CheckpointError, experiment.TrainingDivergedError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  from tracefl_jax.experiment import results  # pylint: disable=g-import-not-at-top
  results.plot_run(_WORKDIR.value)
  report.print_summary(summary, _WORKDIR.value)


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
  except (ValueError, FileNotFoundError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  rows = stored.attribution_rows(result, round_.round, args.top_k)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)
  report.print_attribution(rows, args.workdir, args.out)


def main() -> None:
  if sys.argv[1:2] == ["trace"]:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    _trace_main(sys.argv[2:])
    return
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_main)
