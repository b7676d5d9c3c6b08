r"""The comparison of attribution methods against retrained federations (configs/attribution.py):
every cell of a preset's sweep (each one `comparison.run_comparison`, which describes the
methods and truths), its table and its figure.

  python -m tracefl_jax.experiment.attribution --config=configs/attribution.py:cpu \
      --workdir=runs/attribution
runs every cell of the preset's sweep (skipping finished ones) and prints the table;
`--config.FIELD=VALUE` sets a field of every cell (e.g. `--config.dataset.data_dir=DIR`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections

from tracefl_jax.experiment import cli_args, sweep
from tracefl_jax.experiment.attribution_plot import plot_attribution
from tracefl_jax.experiment.comparison import METHODS, run_comparison  # noqa: F401
from tracefl_jax.experiment.configfile import load_config


def table(cells: list[tuple[str, dict[str, Any]]]) -> str:
  """A Markdown table: one line per (cell, method)."""
  def f(v):
    return "-" if v is None else f"{v:.2f}"
  lines = ["| setting | global acc | method | paper rule | LOO last top-1 | retrain top-1 | "
           "retrain Spearman | LDS | top drop > noise |", "|" + "---|" * 9]
  for name, s in cells:
    for r in s["rows"]:
      lines.append(f"| {name} | {s['global_accuracy']:.3f} | {r['method']} | "
                   f"{f(r['paper_rule'])} | {f(r['loo_last_top1'])} | {f(r['retrain_top1'])} | "
                   f"{f(r['retrain_spearman'])} | {f(r['lds'])} | "
                   f"{s['top_drop_above_noise']:.2f} |")
  return "\n".join(lines)


def run_cells(spec: str, workdir: str | Path, *, deadline: float = float("inf"),
              base: ml_collections.ConfigDict | None = None
              ) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
  """Every cell of the sweep of `spec` (`PATH.py:PRESET`) under `workdir`, a finished cell
  read back instead of rerun, then WORKDIR/table.md and WORKDIR/attribution.png. A cell not
  started by `deadline` (time.perf_counter) is left out; `base`: the preset's config with
  the user's overrides (default: the preset's). Returns `(cells, names left out)`."""
  workdir = Path(workdir)
  base = load_config(spec) if base is None else base
  path, _, preset = spec.partition(":")
  cells, left = [], []
  for overrides in sweep.expand_grid(sweep.load_sweep(path, preset)):
    setting = overrides.get("attribution.setting")
    # A cell is named by its setting (a full override list can exceed a file name's limit).
    name = sweep.run_name({"attribution.setting": setting} if setting else overrides)
    if time.perf_counter() > deadline:
      left.append(setting or name)
      continue
    out = workdir / name
    done = out / "attribution.json"
    summary = (json.loads(done.read_text()) if done.exists()
               else run_comparison(sweep.apply_overrides(base, overrides), out))
    print(f"{name}: global accuracy {summary['global_accuracy']:.3f}, "
          f"{summary['seconds']['total']:.0f} s", file=sys.stderr, flush=True)
    cells.append((setting or name, summary))
  if cells:
    (workdir / "table.md").write_text(table(cells) + "\n")
    plot_attribution(cells, workdir / "attribution.png")
  return cells, left


def main(argv: list[str]) -> None:
  """`--config=PATH.py:PRESET --workdir=DIR [--config.FIELD=VALUE ...]`: every cell of the
  preset's sweep, then the table (WORKDIR/table.md, also printed) and its figure
  (WORKDIR/attribution.png). A bad argument is one line on stderr and exit code 2."""
  try:
    args = cli_args.parse_args(argv)
    own = ("config", "workdir", "quiet")
    other = sorted(k for k, v in args.flags.items() if v and k not in own)
    if other:
      raise ValueError(f"--{other[0]} is a flag of python -m tracefl_jax, not of the "
                       f"comparison; it takes --config, --workdir and --config.FIELD=VALUE")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  cells, _ = run_cells(args.config_spec, args.flags["workdir"], base=args.config)
  print(table(cells))


if __name__ == "__main__":
  main(sys.argv[1:])
