r"""The comparison of attribution methods against retrained federations (configs/attribution.py).

One cell (`run_comparison(config, workdir)`): train the federation of `config` (the base run),
trace its last round, accumulate multi-round provenance online, pick the inputs to explain
from the final model's predictions, then retrain `2 + C + M` federations side by side
(`provenance.retraining`: base, noise floor, each client left out, M half-subsets; each
distinct federation is trained once, so a client never sampled costs nothing) and score
every method against every truth. Writes `WORKDIR/summary.json` (rows, per-round curve,
timings) and returns it.

Methods (scores `[N, C]` over all C clients; a method that only sees the last round scores
the others 0):
  tracefl        the paper's T over the last round's participants
  first_order    the first-order leave-one-out score of the last round (`score="first_order"`;
                 FedAvg: the weight-aware score; any other rule or server optimizer: each
                 client removed by the round's own server side, `provenance/removal.py`)
  multi_round    `provenance.multiround` over all rounds (each round's own removal)
  across_rounds  `provenance.across_rounds`: the first-order effect of removing the client
                 from every round it took part in, carried to the final model by reverse mode
                 through the real training (the base federation re-run as one program,
                 `fl.federation`, checked to reproduce it; skipped, with the reason in the
                 summary's `across_rounds`, for algorithms where a weight-0 client is not
                 removed)
  loo_last       the exact single-round leave-one-client-out drops of the last round (its
                 own rule and server step; DP: FedAvg's closed form, `dp_closed_form`)
  banzhaf        upper bounds from the LDS's retrained subsets (with >= 3 of them): the
  datamodel      clients' Banzhaf values and linear datamodel weights; no LDS (fitted to it)
  largest        the client's example count (the largest client named for every input)
  random         a uniformly random last-round participant, in expectation
Every method and truth explains `provenance.output` (the comparison's presets: the margin,
the logit minus the log-sum-exp of the other classes). Truths: `paper_rule` (correct mode:
the named client holds the input's label; faulty mode: it is a faulty client),
`loo_last_top1` (the named client is the last round's exact LOO client), `retrain_top1` /
`retrain_spearman` (leave-one-client-out retraining, its drops averaged over
`attribution.truth_seeds` data seeds, whose own agreement is the cell's ceiling), `lds`
(Spearman over M retrained half-subsets of the summed scores). A method names its top client
among those that could be responsible (last-round methods: the last round's participants;
multi-round and largest: every client sampled in some round). Top-1 and LDS come with
bootstrap intervals (inputs; LDS: subsets) and the paired difference to TraceFL with its
p-value (`provenance.intervals`).

The federation is the config's own (`stages.build_algorithm`: client objective, rule, server
optimizer, DP, compute dtype), and the retrained federations run its round program; a field
the comparison cannot honour is refused (`comparison_errors`). The summary names the
algorithm (`aggregation`) and how its truths removed a client (`counterfactual_removal`).

Every cell of a preset's sweep (`run_cells`, the compare command): each cell checked before
any runs, each a `run_comparison` in its own directory of the workdir, then the table
(WORKDIR/table.md, `comparison_methods.table`) and its figure (WORKDIR/attribution.png).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tracefl_jax.experiment import comparison_methods as methods
from tracefl_jax.experiment import resume, sweep
from tracefl_jax.experiment.config import validate
from tracefl_jax.experiment.configfile import load_config
from tracefl_jax.experiment.figures import plot_attribution
from tracefl_jax.experiment.io import write_atomic
from tracefl_jax.experiment.workdir import WorkdirLock, check_workdir, plan_run
from tracefl_jax.provenance import protocol, retrained, retraining
from tracefl_jax.provenance.removal import round_removal

# banzhaf and datamodel: with >= 3 subsets; across_rounds: where it runs (its docstring).
METHODS = ("tracefl", "first_order", "multi_round", "across_rounds", "loo_last", "banzhaf",
           "datamodel", "largest", "random")


# Strategies whose round program cannot run the retrained federations: "loop" has none, and
# "sharded" pads a round's clients to the device count, which `retraining.retrain` does not
# (it shards the federation axis over the devices instead).
_NO_FEDERATION_AXIS = ("loop", "sharded")


def comparison_errors(c: ml_collections.ConfigDict) -> list[str]:
  """The fields the comparison cannot honour, one line each (it runs every other field of
  the config: data, model, client objective and optimizer, aggregation rule, server
  optimizer, DP, compute dtype)."""
  errors = []
  if c.attribution.topk_inputs and c.attribution.topk > c.clients_per_round:
    errors.append(f"attribution.topk={c.attribution.topk} exceeds clients_per_round="
                  f"{c.clients_per_round}: a last-round method names at most that many "
                  f"clients; lower it")
  if c.simulation.strategy in _NO_FEDERATION_AXIS:
    errors.append(f"simulation.strategy={c.simulation.strategy!r} cannot run the comparison's "
                  f"retrained federations (they run the round program over a federation "
                  f"axis): use 'auto', 'scan', 'vmap' or 'chunked', which train the same "
                  f"federation")
  return errors


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
      removal = methods.topk_table(cells)
      write_atomic(workdir / "table.md", methods.table(cells) + "\n" + (
          f"\nTop-k removal:\n\n{removal}\n" if removal else ""))
      plot_attribution(cells, workdir / "attribution.png")
  return cells, left


def run_comparison(config: ml_collections.ConfigDict, workdir: str | Path, *,
                   allow_cwd: bool = False) -> dict[str, Any]:
  """One cell of the comparison (see the module docstring) in `workdir`, under the runner's
  rules: the workdir checked and locked, and planned like a run (`workdir.plan_run`): a finished
  cell of the same config is returned as it is, a cell of another config is refused (or
  moved aside with `checkpoint.overwrite`), an interrupted one is computed again. Writes
  WORKDIR/config.json, then WORKDIR/summary.json (atomically) when done.

  Raises:
    ValueError: a field the comparison cannot honour (`comparison_errors`) or a bad value.
    WorkdirError: the workdir's checks, its lock (another run or comparison is in it), or
      results of another experiment there.
  """
  validate(config)
  errors = comparison_errors(config)
  if errors:
    raise ValueError(errors[0])
  workdir = check_workdir(workdir, allow_cwd=allow_cwd)
  with WorkdirLock(workdir):
    plan = plan_run(config, workdir)
    if plan.action == "finished":
      return plan.summary
    if plan.action == "overwrite":
      resume.move_previous(plan)
    write_atomic(workdir / "config.json", plan.config_json + "\n")
    summary = _compare(config)
    write_atomic(workdir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def _compare(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """Trains, traces, retrains and scores one cell; returns its summary."""
  t0 = time.perf_counter()
  data, model, init, algorithm, evaluator, faulty, flip = methods.setup(c)
  final, last, acc, curve = methods.train_base(c, data, model, init, algorithm, evaluator,
                                                faulty)
  t_train = time.perf_counter() - t0
  idx = methods.explained(c, evaluator, final, flip)
  if len(idx) == 0:
    raise ValueError("no test input to explain (no correct prediction, or no misprediction "
                     "matching the flip in faulty mode)")
  x = jnp.take(evaluator.x, jnp.asarray(idx), axis=0)
  target = jnp.asarray(evaluator.predictions(final)[idx], jnp.int32)
  sizes = data.partition.client_sizes
  t1 = time.perf_counter()
  scores = methods.method_scores(c, model, final, last, acc, x, sizes)
  t_methods = time.perf_counter() - t1
  num = data.num_clients
  always = faulty if c.faulty.every_round else ()
  across, across_info = methods.across_rounds(c, data, model, init, final, x, target, always)
  if across is not None:  # beside multi_round
    items = list(scores.items())
    at = list(scores).index("multi_round") + 1
    scores = dict([*items[:at], ("across_rounds", across), *items[at:]])
  truth_seeds = c.attribution.truth_seeds
  masks, seed_index = retrained.seeded_truth_masks(num, c.attribution.subsets, c.seed,
                                                   truth_seeds)
  seeds = c.seed + seed_index * c.attribution.noise_seed
  plan = retraining.round_plan(
      data, rounds=c.rounds, clients_per_round=c.clients_per_round, seed=c.seed,
      batch_size=c.client.batch_size, weighting=c.aggregation.weighting, always_sampled=always)
  # A client never sampled leaves its leave-one-out federation equal to the base one:
  # `retrain` trains each distinct federation once.
  distinct, _ = retraining.distinct_federations(plan, masks, seeds)
  t2 = time.perf_counter()
  feds = retraining.retrain(
      algorithm, init, data, masks, rounds=c.rounds,
      clients_per_round=c.clients_per_round, seed=c.seed, batch_size=c.client.batch_size,
      local_epochs=c.client.local_epochs, weighting=c.aggregation.weighting, data_seeds=seeds,
      federations_per_chunk=c.attribution.federations_per_chunk, always_sampled=always,
      clients_per_chunk=c.simulation.clients_per_chunk)
  outputs = np.asarray(retrained.explained_logits(model, feds, x, target, c.provenance.output))
  t_retrain = time.perf_counter() - t2
  truth = retrained.truth_over_seeds(outputs, num, truth_seeds,
                                     masks[truth_seeds * (1 + num):])
  base = np.asarray(retrained.explained_logits(
      model, jax.tree.map(lambda a: a[None], final), x, target, c.provenance.output))[0]
  labels = evaluator.y[idx]
  settings = methods.settings(c, "tracefl", faulty)
  everyone = np.arange(num)
  rule = lambda clients: protocol.passes_rule(  # noqa: E731
      settings, clients, labels, data.label_counts, everyone)
  loo_top = retrained.restricted_top(scores["loo_last"],
                                     np.isin(everyone, last.client_ids))
  sampled = retraining.participation(plan, num).any(0)
  scores = methods.with_valuations(scores, truth)
  topk, t_topk = [], time.perf_counter()
  if c.attribution.topk_inputs:
    topk = methods.topk(c, algorithm, init, data, model, x, target, scores, truth,
                        methods.candidates(scores, last.client_ids, sampled),
                        np.asarray(last.client_ids), always)
  t_topk = time.perf_counter() - t_topk
  summary = {
      "kind": "attribution_comparison", "setting": c.attribution.setting,
      "aggregation": last.aggregation,
      "counterfactual_removal": round_removal(last)[1],
      "global_accuracy": curve[-1]["accuracy"], "clients": num,
      "clients_per_round": c.clients_per_round, "rounds": c.rounds, "inputs": int(len(idx)),
      "mode": c.provenance.mode, "output": c.provenance.output,
      "federations": int(len(distinct)), "clients_never_sampled": int(num - sampled.sum()),
      "truth_seeds": truth_seeds, "ceiling_top1": truth.ceiling_top1,
      "ceiling_spearman": truth.ceiling_spearman,
      "federations_per_chunk": c.attribution.federations_per_chunk,
      "base_reproduced_max_abs": float(np.abs(base - truth.base_logit[0]).max()),
      "across_rounds": across_info,
      "rows": methods.grade(c, scores, truth, loo_top, rule, np.asarray(last.client_ids),
                            sampled),
      "topk": topk,
      "curve": curve,
      "seconds": {"train": t_train, "methods": t_methods,
                  "across_rounds": across_info.get("seconds"), "retrain": t_retrain,
                  "topk": t_topk, "total": time.perf_counter() - t0},
  }
  return summary
