r"""The comparison of attribution methods against retrained federations (configs/attribution.py):
every cell of a preset's sweep (each one `comparison.run_comparison`, which describes the
methods and truths), its table and its figure.

  python -m tracefl_jax compare --config=configs/attribution.py:cpu \
      --workdir=runs/attribution
runs every cell of the preset's sweep (reading finished ones back) and prints the table;
`--config.FIELD=VALUE` sets a field of every cell (e.g. `--config.dataset.data_dir=DIR`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import ml_collections

from tracefl_jax.experiment import cli_args, sweep
from tracefl_jax.experiment.figures import plot_attribution
from tracefl_jax.experiment.comparison import (METHODS, comparison_errors,  # noqa: F401
                                               run_comparison)
from tracefl_jax.experiment.config import validate
from tracefl_jax.experiment.configfile import load_config
from tracefl_jax.experiment.io import write_atomic
from tracefl_jax.experiment.workdir import WorkdirLock, check_workdir, plan_run
from tracefl_jax.fl.rounds import TrainingDivergedError


def _interval(r: dict[str, Any], key: str) -> str:
  """`0.41 [0.31, 0.51]`, and `-` when the row has no such value."""
  if r.get(key) is None:
    return "-"
  if r.get(f"{key}_low") is None:
    return f"{r[key]:.2f}"
  return f"{r[key]:.2f} [{r[f'{key}_low']:.2f}, {r[f'{key}_high']:.2f}]"


def _diff(r: dict[str, Any], key: str) -> str:
  """`+0.06 (p 0.21)` against TraceFL, and `-` for TraceFL itself and the baselines."""
  if r.get(f"{key}_diff") is None:
    return "-"
  return f"{r[f'{key}_diff']:+.2f} (p {r[f'{key}_diff_p']:.2f})"


def table(cells: list[tuple[str, dict[str, Any]]]) -> str:
  """A Markdown table: one line per (cell, method); `algorithm` is the cell's server side
  (the rule, "+ server optimizer", or dp_fedavg), which every truth and score follows;
  intervals in brackets, differences to TraceFL (paired) with their p-values, and the
  truth's own agreement between seeds (its ceiling) per cell."""
  def f(v):
    return "-" if v is None else f"{v:.2f}"
  lines = ["| setting | algorithm | global acc | method | paper rule | LOO last top-1 | "
           "retrain top-1 | vs TraceFL | retrain Spearman | LDS | vs TraceFL | "
           "ceiling top-1 / Spearman |", "|" + "---|" * 12]
  for name, s in cells:
    ceiling = f"{f(s.get('ceiling_top1'))} / {f(s.get('ceiling_spearman'))}"
    for r in s["rows"]:
      lines.append(f"| {name} | {s.get('aggregation', 'mean')} | {s['global_accuracy']:.3f} | "
                   f"{r['method']} | {f(r['paper_rule'])} | {f(r['loo_last_top1'])} | "
                   f"{_interval(r, 'retrain_top1')} | {_diff(r, 'retrain_top1')} | "
                   f"{f(r['retrain_spearman'])} | {_interval(r, 'lds')} | {_diff(r, 'lds')} | "
                   f"{ceiling} |")
  return "\n".join(lines)


def topk_table(cells: list[tuple[str, dict[str, Any]]]) -> str:
  """A Markdown table of top-k removal (cells that ran it): per method and k, the mean drop
  of the explained output with its interval and the share of predictions that flipped."""
  lines = ["| setting | method | k | drop | predictions flipped |", "|" + "---|" * 5]
  for name, s in cells:
    for r in s.get("topk") or ():
      lines.append(f"| {name} | {r['method']} | {r['k']} | "
                   f"{_interval(r, 'drop')} | {r['flip_rate']:.2f} |")
  return "\n".join(lines) if len(lines) > 2 else ""


def _cells(spec: str, base: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
  """(name, config) of every cell of the sweep of `spec`, each validated and checked for
  fields the comparison cannot honour (`comparison_errors`) before any is run."""
  path, _, preset = spec.partition(":")
  cells = []
  for overrides in sweep.expand_grid(sweep.load_sweep(path, preset)):
    setting = overrides.get("attribution.setting")
    # A cell is named by its setting (a full override list can exceed a file name's limit).
    name = sweep.run_name({"attribution.setting": setting} if setting else overrides)
    config = sweep.apply_overrides(base, overrides)
    try:
      validate(config)
      errors = comparison_errors(config)
      if errors:
        raise ValueError(errors[0])
    except ValueError as e:
      raise ValueError(f"cell {name}: {e}") from None
    cells.append((name, config))
  return cells


def _check_finished_cells(cells, workdir: Path) -> None:
  """Refuses, before anything runs, a sweep whose workdir holds a cell of another config
  (`workdir.plan_run`, as `run_comparison` applies it one cell at a time)."""
  for name, config in cells:
    if (workdir / name).is_dir():
      plan_run(config, workdir / name)


def run_cells(spec: str, workdir: str | Path, *, deadline: float = float("inf"),
              base: ml_collections.ConfigDict | None = None
              ) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
  """Every cell of the sweep of `spec` (`PATH.py:PRESET`) under `workdir` (locked for the
  sweep), each a `run_comparison` in `workdir/<cell>` (a finished cell of the same config is
  read back; one of another config refuses the whole sweep before anything runs), then
  WORKDIR/table.md and WORKDIR/attribution.png. A cell not started by `deadline`
  (time.perf_counter) is left out; `base`: the preset's config with the user's overrides
  (default: the preset's). Returns `(cells, names left out)`."""
  base = load_config(spec) if base is None else base
  todo = _cells(spec, base)
  workdir = check_workdir(workdir)
  cells, left = [], []
  with WorkdirLock(workdir):
    _check_finished_cells(todo, workdir)
    for name, config in todo:
      if time.perf_counter() > deadline:
        left.append(config.attribution.setting or name)
        continue
      summary = run_comparison(config, workdir / name)
      print(f"{name}: {summary['aggregation']}, global accuracy "
            f"{summary['global_accuracy']:.3f}, {summary['seconds']['total']:.0f} s",
            file=sys.stderr, flush=True)
      cells.append((config.attribution.setting or name, summary))
    if cells:
      removal = topk_table(cells)
      write_atomic(workdir / "table.md", table(cells) + "\n" + (
          f"\nTop-k removal:\n\n{removal}\n" if removal else ""))
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
  try:
    cells, _ = run_cells(args.config_spec, args.flags["workdir"], base=args.config)
  except (ValueError, OSError, TrainingDivergedError) as e:  # WorkdirError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  print(table(cells))
  if topk_table(cells):
    print(f"\nTop-k removal:\n\n{topk_table(cells)}")


if __name__ == "__main__":
  main(sys.argv[1:])
