"""Sweeps: a grid declared next to its config, each run in its own workdir, finished runs
skipped, then the sweep's table and plots.

A config file that supports sweeps defines, beside `get_config(preset)`,
`get_sweep(preset) -> dict[str, list]` mapping dotted config fields to the values to try;
the sweep is their Cartesian product, in the order written. Run it with

  python -m tracefl_jax --config=configs/sweep_alpha.py:cpu --workdir=runs/alpha --sweep

A run whose workdir already holds the same config's finished run is skipped (unless
`checkpoint.overwrite`, which moves it aside and reruns it); a run that was interrupted resumes
from its last checkpoint; a run directory holding another config's results stops the sweep
with the run's workdir error.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from tqdm.auto import tqdm

from tracefl_jax.experiment.checkpointing import finished_summary

Grid = Mapping[str, Sequence[Any]]


def load_sweep(config_path: str, preset: str = "") -> dict[str, list[Any]]:
  """Calls `get_sweep(preset)` of the config file at `config_path`."""
  spec = importlib.util.spec_from_file_location("_sweep_config", config_path)
  if spec is None or spec.loader is None:
    raise ValueError(f"cannot load config file {config_path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{config_path} declares no sweep: add get_sweep(preset) returning "
                     "{'dotted.field': [values, ...]}")
  grid = module.get_sweep(preset)
  if not grid or any(not list(v) for v in grid.values()):
    raise ValueError(f"{config_path}:{preset} declares an empty sweep grid: {grid}")
  return {k: list(v) for k, v in grid.items()}


def expand_grid(grid: Grid) -> list[dict[str, Any]]:
  """The Cartesian product of the grid, one dict of overrides per run."""
  keys = list(grid)
  return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def run_name(overrides: Mapping[str, Any]) -> str:
  """A directory name for a run, e.g. `partition.alpha=0.1,seed=1`."""
  text = ",".join(f"{k}={v}" for k, v in overrides.items())
  return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text) or "base"


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted fields set; an unknown field is an error."""
  c = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = c
    for p in parents:
      if p not in node:
        raise ValueError(f"sweep field {dotted!r}: {p!r} is not a config section")
      node = node[p]
    if leaf not in node:
      raise ValueError(f"sweep field {dotted!r} is not a config field; valid fields here: "
                       f"{', '.join(sorted(node.keys()))}")
    node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
  c.lock()
  return c


def _finished(workdir: Path, config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  if config.checkpoint.overwrite:
    return None
  return finished_summary(workdir, config.to_json_best_effort(indent=2), config.rounds)


def run_sweep(config: ml_collections.ConfigDict, grid: Grid, workdir: str | Path, *,
              progress: bool = True) -> list[dict[str, Any]]:
  """Runs every point of the grid; returns one row per run (overrides + summary)."""
  from tracefl_jax.experiment import runner as experiment  # pylint: disable=g-import-not-at-top
  from tracefl_jax.experiment import results  # pylint: disable=g-import-not-at-top

  workdir = Path(workdir)
  points = expand_grid(grid)
  configs = [apply_overrides(config, p) for p in points]  # fail on a bad field before running
  rows = []
  bar = tqdm(list(zip(points, configs)), desc="sweep", unit="run", disable=not progress)
  for overrides, run_config in bar:
    run_dir = workdir / run_name(overrides)
    bar.set_postfix_str(run_dir.name)
    summary = _finished(run_dir, run_config)
    skipped = summary is not None
    if summary is None:
      summary = experiment.run(run_config, run_dir, progress=False)
    rows.append({"run": run_dir.name, **overrides, "skipped_existing": skipped, **summary})
  results.write_sweep_results(rows, list(grid), workdir)
  results.plot_run(workdir / rows[0]["run"])
  return rows
