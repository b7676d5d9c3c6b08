"""`python -m tracefl_jax trace`: new inputs against a round a run stored (`stored.py`).

Everything that can be checked before tracing is: `--top_k` and the output path
(`config_checks.trace_arg_errors`: `--out` in a directory that exists, not itself a directory)
and the inputs (`data.checks.read_npy`: one .npy array, not an .npz archive).
"""

from __future__ import annotations

import argparse
import json
import sys


def _fail(message: str, code: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def main(argv: list[str]) -> None:
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
  args = parser.parse_args(argv)
  from tracefl_jax.experiment import report, stored  # pylint: disable=g-import-not-at-top
  from tracefl_jax.experiment.checkpoints import CheckpointError  # pylint: disable=g-import-not-at-top
  from tracefl_jax.data.checks import read_npy  # pylint: disable=g-import-not-at-top
  from tracefl_jax.experiment.config_checks import trace_arg_errors  # pylint: disable=g-import-not-at-top
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
