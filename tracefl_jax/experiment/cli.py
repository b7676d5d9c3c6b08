"""Command line: `python -m tracefl_jax --config=configs/demo.py:quick --workdir=runs/demo`.

Any config field can be overridden with `--config.a.b=value`; the config is locked, so a
misspelt field is an error. The logic lives in `tracefl_jax.experiment.run`.
"""

from __future__ import annotations

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


def main() -> None:
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_main)
