r"""One cell of the comparison of attribution methods against retrained federations
(configs/attribution.py).

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

The runner (`experiment.runner.run`, for a config with `attribution.enabled`) runs one cell;
`experiment/attribution.py` runs every cell of a sweep and writes the table and figure.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tracefl_jax.experiment import resume, stages
from tracefl_jax.experiment.config import validate
from tracefl_jax.experiment.io import write_atomic
from tracefl_jax.experiment.workdir import WorkdirLock, check_workdir, plan_run
from tracefl_jax.fl.rounds import run_rounds
from tracefl_jax.experiment import comparison_methods as methods
from tracefl_jax.provenance import protocol, retrained, retraining, round_callback
from tracefl_jax.provenance.multiround import MultiRoundAccumulator
from tracefl_jax.provenance.removal import round_removal
from tracefl_jax.provenance.selection import select_faulty_inputs

METHODS = ("tracefl", "first_order", "multi_round", "loo_last", "banzhaf", "datamodel",
           "largest", "random")  # banzhaf and datamodel: with >= 3 subsets


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


def _setup(c: ml_collections.ConfigDict):
  """The runner's own stages: data, model, the configured algorithm (client objective, rule,
  server optimizer, DP, compute dtype) and the evaluator. Buffers are not donated: the
  initial variables are trained again by the retrained federations."""
  d = stages.load_data(c)
  m = stages.build_model(c, d)
  algorithm = stages.build_algorithm(c, m, d, donate=False)
  evaluator = stages.build_evaluator(c, m, d)
  return d.data, m.model, m.variables, algorithm, evaluator, d.faulty, d.flip


def _settings(c, score: str, faulty) -> protocol.ProtocolSettings:
  """The run's protocol settings (`stages.protocol_settings`) for one score, with the
  leave-one-out truth and without FedDebug."""
  settings = stages.protocol_settings(c, list(faulty))
  return dataclasses.replace(settings, counterfactual=True, feddebug=False, score=score,
                             use_size_factor=settings.use_size_factor and score == "tracefl")


def _train(c, data, model, variables, algorithm, evaluator, faulty):
  """The base run: per-round accuracy and (optionally) both scores traced every round."""
  acc = MultiRoundAccumulator(variables["params"], data.num_clients, c.attribution.round_decay)
  kept: dict[str, Any] = {}
  curve: list[dict[str, Any]] = []
  callbacks: list[Any] = [evaluator]
  if c.attribution.per_round:
    for score in ("tracefl", "first_order"):
      callbacks.append(_tagged(score, round_callback.provenance_callback(
          model, evaluator, _settings(c, score, faulty))))

  def keep(info):
    out = info.output
    acc.update(out.clients.variables, out.traced, out.weights, out.client_ids,
               reaggregate=round_removal(out)[0],
               clients_per_chunk=c.provenance.clients_per_chunk or None)
    kept["last"] = out
    curve.append({"round": info.round, "accuracy": info.metrics["accuracy"],
                  **{k: v for k, v in info.metrics.items() if k.startswith("prov_")}})

  state, _ = run_rounds(algorithm, algorithm.init(variables), data, rounds=c.rounds,
                        clients_per_round=c.clients_per_round, seed=c.seed,
                        callbacks=[*callbacks, keep],
                        always_sampled=faulty if c.faulty.every_round else ())
  return state.variables, kept["last"], acc, curve


def _tagged(score: str, callback):
  def run(info):
    out = callback(info)
    if not out or out["provenance"].get("skipped"):
      return None
    p = out["provenance"]
    keys = ("accuracy", "counterfactual_top1", "counterfactual_accuracy")
    return {f"prov_{score}_{k}": p.get(k) for k in keys}
  return run


def _explained(c, evaluator, final, flip) -> np.ndarray:
  pred = evaluator.predictions(final)
  if c.provenance.mode == "faulty":
    return select_faulty_inputs(pred, evaluator.y, flip, c.attribution.explain_inputs)
  return np.flatnonzero(pred == evaluator.y)[: c.attribution.explain_inputs]


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
  data, model, init, algorithm, evaluator, faulty, flip = _setup(c)
  final, last, acc, curve = _train(c, data, model, init, algorithm, evaluator, faulty)
  t_train = time.perf_counter() - t0
  idx = _explained(c, evaluator, final, flip)
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
  settings = _settings(c, "tracefl", faulty)
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
      "rows": methods.grade(c, scores, truth, loo_top, rule, np.asarray(last.client_ids),
                            sampled),
      "topk": topk,
      "curve": curve,
      "seconds": {"train": t_train, "methods": t_methods, "retrain": t_retrain, "topk": t_topk,
                  "total": time.perf_counter() - t0},
  }
  return summary
