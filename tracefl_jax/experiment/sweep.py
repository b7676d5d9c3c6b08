"""Sweeps: a grid declared next to its config, each run in its own workdir, finished runs
skipped, then the sweep's table and plots.

A config file that supports sweeps defines, beside `get_config(preset)`,
`get_sweep(preset) -> dict[str, list]` mapping dotted config fields to the values to try;
the sweep is their Cartesian product, in the order written. Run it with

  python -m tracefl_jax --config=configs/sweep_alpha.py:cpu --workdir=runs/alpha --sweep

Two extensions: fields that move together are one axis, a tuple key with tuples of values
(`{("num_clients", "dataset.synthetic_size"): [(100, 12800), (1000, 128000)]}`); and
`get_sweep` may return a list of such grids, whose runs are the union in order (e.g. a main
grid and a few extra cells of another mode).

A run whose workdir already holds the same config's finished run is skipped (unless
`checkpoint.overwrite`, which moves it aside and reruns it); a run that was interrupted resumes
from its last checkpoint; a run directory holding another config's results stops the sweep
with the run's workdir error.

A cluster's job array shares the grid: `--sweep_shard=I/N` (or SLURM_ARRAY_TASK_ID and
SLURM_ARRAY_TASK_COUNT in the environment) runs cells I, I+N, I+2N, ... (`shard_points`), each
in its own run directory, and writes no table; once every shard is done,
`--sweep --collect` (`collect`) merges the finished runs into results.csv, results.md and the
plots, and names the runs that are missing.

Memory: before each run, `summary.plan_chunks` predicts its peak from the runs measured so far
(bytes per participant of the run with the most clients per round) and, when the prediction
exceeds the memory available, bounds the client-stacked computations to the clients that fit
(`simulation.strategy="chunked"` with `simulation.clients_per_chunk`, and
`provenance.clients_per_chunk`); a config that sets either itself is left as it is. The choice
is recorded in the run's row (`memory_plan`).
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from tqdm.auto import tqdm

from tracefl_jax.experiment import configfile, figures, report, runner, summary as outputs
from tracefl_jax.experiment.workdir import check_workdir, finished_summary

Grid = Mapping[str | tuple[str, ...], Sequence[Any]]


def _grids(grid: Grid | Sequence[Grid]) -> list[Grid]:
  return [grid] if isinstance(grid, Mapping) else list(grid)


def load_sweep(config_path: str, preset: str = "") -> Grid | list[Grid]:
  """Calls `get_sweep(preset)` of the config file at `config_path`."""
  grids = _grids(configfile.load_sweep(config_path, preset))
  if not grids or any(not g or any(not list(v) for v in g.values()) for g in grids):
    raise ValueError(f"{config_path}:{preset} declares an empty sweep grid: {grids}")
  return grids[0] if len(grids) == 1 else grids


def grid_fields(grid: Grid | Sequence[Grid]) -> list[str]:
  """The dotted fields a grid (or list of grids) sets, tuple axes flattened, first seen first."""
  fields: list[str] = []
  for g in _grids(grid):
    for key in g:
      for field in (key if isinstance(key, tuple) else (key,)):
        if field not in fields:
          fields.append(field)
  return fields


def expand_grid(grid: Grid | Sequence[Grid]) -> list[dict[str, Any]]:
  """The Cartesian product of each grid (a list of grids: their union, in order), one dict of
  overrides per run; a tuple key sets its fields together from tuples of values."""
  points = []
  for g in _grids(grid):
    keys = list(g)
    for values in itertools.product(*(g[k] for k in keys)):
      point: dict[str, Any] = {}
      for key, value in zip(keys, values):
        if isinstance(key, tuple):
          if not isinstance(value, (tuple, list)) or len(value) != len(key):
            raise ValueError(f"sweep axis {key}: value {value!r} does not give one value per "
                             f"field")
          point.update(zip(key, value))
        else:
          point[key] = value
      points.append(point)
  return points


def run_name(overrides: Mapping[str, Any]) -> str:
  """A directory name for a run, e.g. `partition.alpha=0.1,seed=1`."""
  text = ",".join(f"{k}={v}" for k, v in overrides.items())
  return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text) or "base"


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted fields set; an unknown field or a value of the wrong
  type is an error."""
  return configfile.with_overrides(config, dict(overrides))


def parse_shard(text: str) -> tuple[int, int]:
  """`"i/n"` as `(i, n)` with 0 <= i < n."""
  i, sep, n = str(text).partition("/")
  try:
    shard = (int(i), int(n))
  except ValueError:
    shard = None
  if not sep or shard is None or not 0 <= shard[0] < shard[1]:
    raise ValueError(f"--sweep_shard={text}: takes I/N with 0 <= I < N, e.g. --sweep_shard=0/4")
  return shard


def shard_from_environment(env: Mapping[str, str]) -> tuple[int, int] | None:
  """A job array's task as a shard: SLURM_ARRAY_TASK_ID (minus SLURM_ARRAY_TASK_MIN) of
  SLURM_ARRAY_TASK_COUNT; None outside a job array."""
  if "SLURM_ARRAY_TASK_COUNT" not in env or "SLURM_ARRAY_TASK_ID" not in env:
    return None
  try:
    i = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    return parse_shard(f"{i}/{int(env['SLURM_ARRAY_TASK_COUNT'])}")
  except ValueError as e:
    raise ValueError(f"SLURM_ARRAY_TASK_ID={env['SLURM_ARRAY_TASK_ID']}, "
                     f"SLURM_ARRAY_TASK_COUNT={env['SLURM_ARRAY_TASK_COUNT']}: not a shard "
                     f"({e}); pass --sweep_shard=I/N") from None


def shard_points(n_points: int, shard: tuple[int, int] | None) -> list[int]:
  """The grid indices shard `(i, n)` runs: every n-th from i (cells of one size are spread
  over the shards); all of them without a shard."""
  if shard is None:
    return list(range(n_points))
  return list(range(shard[0], n_points, shard[1]))


# The fields `plan_memory` may set: a finished run that differs only in them is the same run.
_PLANNED = (("simulation", "strategy"), ("simulation", "clients_per_chunk"),
            ("provenance", "clients_per_chunk"))


def _finished(workdir: Path, config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  if config.checkpoint.overwrite:
    return None
  summary = finished_summary(workdir, config.to_json_best_effort(indent=2), config.rounds)
  stored = workdir / "config.json"
  if summary is None and stored.exists():  # finished with the chunking the sweep planned?
    try:
      planned = json.loads(stored.read_text())
      c = ml_collections.ConfigDict(config.to_dict())
      for section, field in _PLANNED:
        c[section][field] = planned[section][field]
    except (ValueError, KeyError, TypeError):
      return None
    summary = finished_summary(workdir, c.to_json_best_effort(indent=2), config.rounds)
  return summary


def plan_memory(config: ml_collections.ConfigDict, measured: Sequence[Mapping[str, Any]],
                budget: int | None) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """The run's config with chunking where the measured runs predict it would not fit, and the
  plan (`summary` module docstring); a config that chose its own chunking is kept."""
  per = outputs.bytes_per_participant(measured)
  k = config.clients_per_round
  chunk = outputs.plan_chunks(k, per, budget)
  plan = {"bytes_per_participant": per, "budget_bytes": budget,
          "predicted_bytes": None if per is None else per * k, "clients_per_chunk": chunk}
  chosen = (config.simulation.strategy != "auto" or config.simulation.clients_per_chunk
            or config.provenance.clients_per_chunk)
  if not chunk or chosen:
    plan["clients_per_chunk"] = 0 if not chosen else None  # None: the config's own choice
    return config, plan
  c = ml_collections.ConfigDict(config.to_dict())
  c.simulation.strategy, c.simulation.clients_per_chunk = "chunked", chunk
  c.provenance.clients_per_chunk = chunk
  c.lock()
  return c, plan


def _recorded_plan(run_dir: Path, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The chunking a finished run was given (`plan_memory`'s `clients_per_chunk`), read back
  from its config.json: None where the config chose its own."""
  if (config.simulation.strategy != "auto" or config.simulation.clients_per_chunk
      or config.provenance.clients_per_chunk):
    return {"clients_per_chunk": None}
  try:
    chunk = json.loads((run_dir / "config.json").read_text())["simulation"]["clients_per_chunk"]
  except (OSError, ValueError, KeyError, TypeError):
    chunk = None
  return {"clients_per_chunk": chunk}


def _cells(config, grid, workdir) -> list[tuple[dict[str, Any], ml_collections.ConfigDict, Path]]:
  points = expand_grid(grid)
  configs = [apply_overrides(config, p) for p in points]  # fail on a bad field before running
  return [(p, c, Path(workdir) / run_name(p)) for p, c in zip(points, configs)]


def run_sweep(config: ml_collections.ConfigDict, grid: Grid | Sequence[Grid],
              workdir: str | Path, *, progress: bool = True,
              memory_budget: int | None = None, deadline: float | None = None,
              shard: tuple[int, int] | None = None,
              allow_cwd: bool = False) -> list[dict[str, Any]]:
  """Runs every point of the grid (or shard `(i, n)`'s share); returns one row per run
  (overrides + summary).

  Without a shard the sweep's tables and plots are written at the end; a shard writes only
  its runs, and `collect` merges every shard's into the tables once they are done.
  `memory_budget` (bytes) bounds what a run may plan to use; default `BUDGET_FRACTION` of the
  memory available when the run starts. `deadline` (a `time.perf_counter()` value): no run
  starts after it; the rows and tables then cover the runs done, in grid order.
  """
  workdir = check_workdir(workdir, allow_cwd=allow_cwd)
  cells = _cells(config, grid, workdir)
  cells = [cells[j] for j in shard_points(len(cells), shard)]
  rows: list[dict[str, Any]] = []
  bar = tqdm(cells, desc="sweep", unit="run", disable=not progress)
  for overrides, run_config, run_dir in bar:
    if deadline is not None and time.perf_counter() > deadline:
      break
    bar.set_postfix_str(run_dir.name)
    summary = _finished(run_dir, run_config)
    skipped = summary is not None
    plan = _recorded_plan(run_dir, run_config) if skipped else None
    if summary is None:
      budget = memory_budget
      if budget is None:
        available = outputs.available_bytes()
        budget = None if available is None else int(outputs.BUDGET_FRACTION * available)
      run_config, plan = plan_memory(run_config, rows, budget)
      summary = runner.run(run_config, run_dir, progress=False)
    rows.append({"run": run_dir.name, **overrides, "skipped_existing": skipped,
                 "memory_plan": plan, **summary})
  if rows and shard is None:
    report.write_sweep_results(rows, grid_fields(grid), workdir)
    figures.plot_run(workdir / rows[0]["run"])
  return rows


def collect(config: ml_collections.ConfigDict, grid: Grid | Sequence[Grid],
            workdir: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
  """Merges the finished runs of a sharded sweep: writes results.csv, results.md and the
  plots over them (in grid order) and returns `(rows, names of the runs not finished)`."""
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise ValueError(f"--collect: {workdir} does not exist; run the sweep's shards first "
                     f"(--sweep --sweep_shard=I/N, --workdir={workdir})")
  rows, missing = [], []
  for overrides, run_config, run_dir in _cells(config, grid, workdir):
    summary = _finished(run_dir, run_config)
    if summary is None:
      missing.append(run_dir.name)
      continue
    rows.append({"run": run_dir.name, **overrides, "skipped_existing": True,
                 "memory_plan": _recorded_plan(run_dir, run_config), **summary})
  if rows:
    report.write_sweep_results(rows, grid_fields(grid), workdir)
    figures.plot_run(workdir / rows[0]["run"])
  return rows, missing
