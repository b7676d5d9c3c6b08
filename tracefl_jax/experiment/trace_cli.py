"""`python -m tracefl_jax trace`: new inputs against a round a run stored (`stored.py`).

Everything that can be checked before tracing is: the output path (`--out` in a directory
that exists, not itself a directory) and the inputs (one .npy array, not an .npz archive).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _fail(message: str, code: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def check_out(out: str | None) -> None:
  """A one-line `ValueError` when `--out` cannot be written: a directory, or in a directory
  that does not exist."""
  if out is None:
    return
  path = Path(out)
  if path.is_dir():
    raise ValueError(f"--out={out} is a directory; give a file name for the JSONL rows, e.g. "
                     f"--out={path / 'attribution.jsonl'}")
  if not path.parent.is_dir():
    raise ValueError(f"--out={out}: directory {path.parent} does not exist; create it or "
                     f"write elsewhere")


def load_inputs(name: str):
  """The `--inputs` array: a .npy file (an .npz archive is named as such, with its keys)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  try:
    x = np.load(name, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read inputs {name!r} as a .npy array ({e})") from e
  if isinstance(x, np.lib.npyio.NpzFile):
    keys = ", ".join(x.files)
    x.close()
    raise ValueError(f"inputs {name!r} is an .npz archive (arrays: {keys}); --inputs takes one "
                     f".npy array [N, *input_shape]: save the one to trace with np.save")
  return x


def main(argv: list[str]) -> None:
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
  from tracefl_jax.experiment.checkpoints import CheckpointError  # pylint: disable=g-import-not-at-top
  try:
    check_out(args.out)
    x = load_inputs(args.inputs)
    result, round_ = stored.trace_stored_round(args.workdir, x, args.round, kernel=args.kernel)
    rows = stored.attribution_rows(result, round_.round, args.top_k)
    if args.out:
      with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
  except (ValueError, OSError, CheckpointError) as e:
    _fail(str(e))
  report.print_attribution(rows, args.workdir, args.out)
