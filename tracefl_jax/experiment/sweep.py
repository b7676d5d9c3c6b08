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

Memory: before each run, `memory.plan_chunks` predicts its peak from the runs measured so far
(bytes per participant of the run with the most clients per round) and, when the prediction
exceeds the memory available, bounds the client-stacked computations to the clients that fit
(`simulation.strategy="chunked"` with `simulation.clients_per_chunk`, and
`provenance.clients_per_chunk`); a config that sets either itself is left as it is. The choice
is recorded in the run's row (`memory_plan`).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from tqdm.auto import tqdm

from tracefl_jax.experiment import memory
from tracefl_jax.experiment.checkpointing import finished_summary

Grid = Mapping[str | tuple[str, ...], Sequence[Any]]


def _grids(grid: Grid | Sequence[Grid]) -> list[Grid]:
  return [grid] if isinstance(grid, Mapping) else list(grid)


def load_sweep(config_path: str, preset: str = "") -> Grid | list[Grid]:
  """Calls `get_sweep(preset)` of the config file at `config_path`."""
  spec = importlib.util.spec_from_file_location("_sweep_config", config_path)
  if spec is None or spec.loader is None:
    raise ValueError(f"cannot load config file {config_path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{config_path} declares no sweep: add get_sweep(preset) returning "
                     "{'dotted.field': [values, ...]}")
  grids = _grids(module.get_sweep(preset))
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
  plan (`memory` module docstring); a config that chose its own chunking is kept."""
  per = memory.bytes_per_participant(measured)
  k = config.clients_per_round
  chunk = memory.plan_chunks(k, per, budget)
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


def run_sweep(config: ml_collections.ConfigDict, grid: Grid | Sequence[Grid],
              workdir: str | Path, *, progress: bool = True,
              memory_budget: int | None = None,
              deadline: float | None = None) -> list[dict[str, Any]]:
  """Runs every point of the grid; returns one row per run (overrides + summary).

  `memory_budget` (bytes) bounds what a run may plan to use; default `BUDGET_FRACTION` of the
  memory available when the run starts. `deadline` (a `time.perf_counter()` value): no run
  starts after it; the rows and tables then cover the runs done, in grid order.
  """
  from tracefl_jax.experiment import runner as experiment  # pylint: disable=g-import-not-at-top
  from tracefl_jax.experiment import results  # pylint: disable=g-import-not-at-top

  workdir = Path(workdir)
  points = expand_grid(grid)
  configs = [apply_overrides(config, p) for p in points]  # fail on a bad field before running
  rows: list[dict[str, Any]] = []
  bar = tqdm(list(zip(points, configs)), desc="sweep", unit="run", disable=not progress)
  for overrides, run_config in bar:
    if deadline is not None and time.perf_counter() > deadline:
      break
    run_dir = workdir / run_name(overrides)
    bar.set_postfix_str(run_dir.name)
    summary = _finished(run_dir, run_config)
    skipped = summary is not None
    plan = None
    if summary is None:
      budget = memory_budget
      if budget is None:
        available = memory.available_bytes()
        budget = None if available is None else int(memory.BUDGET_FRACTION * available)
      run_config, plan = plan_memory(run_config, rows, budget)
      summary = experiment.run(run_config, run_dir, progress=False)
    rows.append({"run": run_dir.name, **overrides, "skipped_existing": skipped,
                 "memory_plan": plan, **summary})
  if rows:
    results.write_sweep_results(rows, grid_fields(grid), workdir)
    results.plot_run(workdir / rows[0]["run"])
  return rows
