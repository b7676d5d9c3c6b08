"""Inside one cell of the attribution comparison (`comparison.py`): the base run, the methods,
their grading and the tables.

`train_base` trains the cell's federation, tracing every round with both scores
(`attribution.per_round`) and accumulating multi-round provenance; `explained` picks the
inputs to explain from its final model. `method_scores` gives every method's additive
`[N, C]` scores of the explained output, `across_rounds` the influence across rounds
(`provenance.across_rounds`) of the same federation re-run as one program; `grade` scores
them against the retraining truths with intervals and the paired difference to TraceFL
(`provenance.intervals`), each method naming its top client among the clients that could be
responsible (`candidates`); `topk` retrains without each method's top k clients
(`provenance.topk_removal`); `table` and `topk_table` are the compare command's Markdown.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tracefl_jax.experiment import stages
from tracefl_jax.fl.client import make_optimizer
from tracefl_jax.fl.federation import federation
from tracefl_jax.fl.rounds import federated_averaging, run_rounds
from tracefl_jax.provenance import (intervals, protocol, retrained, retraining, round_callback,
                                    topk_removal, trace_clients)
from tracefl_jax.provenance.across_rounds import across_rounds as _across_rounds
from tracefl_jax.provenance.counterfactual import leave_one_out
from tracefl_jax.provenance.multiround import MultiRoundAccumulator
from tracefl_jax.provenance.removal import round_removal
from tracefl_jax.provenance.selection import select_faulty_inputs


# --- the base run ------------------------------------------------------------------------


def setup(c: ml_collections.ConfigDict):
  """The runner's own stages: data, model, the configured algorithm (client objective, rule,
  server optimizer, DP, compute dtype) and the evaluator. Buffers are not donated: the
  initial variables are trained again by the retrained federations."""
  d = stages.load_data(c)
  m = stages.build_model(c, d)
  algorithm = stages.build_algorithm(c, m, d, donate=False)
  evaluator = stages.build_evaluator(c, m, d)
  return d.data, m.model, m.variables, algorithm, evaluator, d.faulty, d.flip


def settings(c, score: str, faulty) -> protocol.ProtocolSettings:
  """The run's protocol settings (`stages.protocol_settings`) for one score, with the
  leave-one-out truth and without FedDebug."""
  settings = stages.protocol_settings(c, list(faulty))
  return dataclasses.replace(settings, counterfactual=True, feddebug=False, score=score,
                             use_size_factor=settings.use_size_factor and score == "tracefl")


def train_base(c, data, model, variables, algorithm, evaluator, faulty):
  """The base run: per-round accuracy and (optionally) both scores traced every round."""
  acc = MultiRoundAccumulator(variables["params"], data.num_clients, c.attribution.round_decay)
  kept: dict[str, Any] = {}
  curve: list[dict[str, Any]] = []
  callbacks: list[Any] = [evaluator]
  if c.attribution.per_round:
    for score in ("tracefl", "first_order"):
      callbacks.append(_tagged(score, round_callback.provenance_callback(
          model, evaluator, settings(c, score, faulty))))

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


def explained(c, evaluator, final, flip) -> np.ndarray:
  pred = evaluator.predictions(final)
  if c.provenance.mode == "faulty":
    return select_faulty_inputs(pred, evaluator.y, flip, c.attribution.explain_inputs)
  return np.flatnonzero(pred == evaluator.y)[: c.attribution.explain_inputs]


# --- the methods and their grading -------------------------------------------------------


def _spread(values, ids, num_clients: int) -> np.ndarray:
  """`[N, K]` scores over the round's participants -> `[N, C]`, 0 for the others."""
  values = np.asarray(values, np.float64)
  out = np.zeros((values.shape[0], num_clients))
  out[:, np.asarray(ids)] = values
  return out


def method_scores(c, model, final, last, acc, x, sizes) -> dict[str, np.ndarray]:
  """Every method's additive `[N, C]` scores of the explained output (`provenance.output`):
  TraceFL enters by its T (P = softmax(T) does not add over a subset of clients)."""
  ids, num = last.client_ids, len(sizes)
  kw = dict(kernel=c.provenance.kernel, output=c.provenance.output,
            clients_per_chunk=c.provenance.clients_per_chunk or None)
  reaggregate, _ = round_removal(last)  # the last round's own rule and server step
  paper = trace_clients(model, last.traced, last.clients.variables, x, decay=c.provenance.decay,
                        use_decay=c.provenance.use_decay, client_ids=ids,
                        block_mask=c.provenance.block_mask, **kw)
  fo = trace_clients(model, last.traced, last.clients.variables, x, score="first_order",
                     weights=last.weights, client_ids=ids, reaggregate=reaggregate,
                     block_mask=c.provenance.block_mask, **kw)
  loo = leave_one_out(model, last.clients.variables, last.weights, x,
                      global_vars=last.traced, clients_per_chunk=kw["clients_per_chunk"],
                      reaggregate=reaggregate, output=c.provenance.output)
  return {"tracefl": _spread(paper.scores, ids, num),
          "first_order": _spread(fo.scores, ids, num),
          "multi_round": np.asarray(acc.scores(model, final, x, **kw).scores, np.float64),
          "loo_last": _spread(loo.drops, ids, num),
          "largest": np.broadcast_to(np.asarray(sizes, np.float64), (x.shape[0], num))}


# The base federation re-run as one program must reproduce run_rounds' final model to within
# this (max abs over the parameters, relative to their largest magnitude): "scan" against
# "vmap" differ by float rounding only.
REPRODUCE_RTOL = 1e-4


def scan_fedavg(c, model):
  """The cell's FedAvg (`stages.build_algorithm`'s pieces) under the "scan" client strategy,
  reverse-differentiable (`make_optimizer`'s Adam has `eps_root`, so its derivative is finite
  where a gradient is exactly 0; `across_rounds` checks the re-run reproduces the trained
  model)."""
  cl = c.client
  optimizer = make_optimizer(cl.optimizer, cl.learning_rate, cl.weight_decay, cl.momentum)
  return federated_averaging(
      model, optimizer, dp=stages.dp_settings(c), donate=False, batch_size=cl.batch_size,
      local_epochs=cl.local_epochs, weighting=c.aggregation.weighting, strategy="scan",
      clients_per_chunk=c.simulation.clients_per_chunk,
      compute_dtype=jnp.dtype(c.simulation.compute_dtype), **stages.algorithm_pieces(c))


def across_rounds(c, data, model, init, final, x, target,
                  always) -> tuple[np.ndarray | None, dict[str, Any]]:
  """The influence across rounds `[N, C]` (`provenance.across_rounds`) of the base
  federation, re-run as one reverse-differentiable program (`fl.federation` of `scan_fedavg`,
  the same plan and keys as `run_rounds`), and what it recorded: its form, seconds, how
  closely the re-run reproduced `final`, or why the method was skipped (scores None): an
  algorithm other than FedAvg's family or adaptive clipping (a weight-0 client still moves
  their state), a re-run that does not reproduce the trained model, or non-finite scores.

  Form "loo" (each round's term the cotangent dotted with FedAvg's exact leave-one-out delta)
  where the server side is affine in the weighted mean (FedAvg's mean, no server optimizer
  or server SGD, DP-FedAvg's pre-noise mean); "tangent" (the weight-path derivative)
  otherwise. Mode "auto": forward (one JVP per sampled client) when the sampled clients are
  no more than the inputs, else reverse (one cotangent per input); `info["mode"]` says
  which ran. `info["seconds"]` includes the re-run that checks the reproduction."""
  info: dict[str, Any] = {}
  if not c.attribution.across_rounds:
    return None, {"skipped": "attribution.across_rounds=False"}
  if c.algorithm != "fedavg":
    return None, {"skipped": f"algorithm={c.algorithm!r}: a weight-0 client is not removed "
                             f"(its state or FedNova's normalisation still sees it)"}
  if stages.adaptive_clipping(c) is not None:
    return None, {"skipped": "adaptive clipping: its clip-norm update counts a weight-0 client"}
  t0 = time.perf_counter()
  fed = federation(scan_fedavg(c, model), data, rounds=c.rounds,
                   clients_per_round=c.clients_per_round, always_sampled=always)
  plan, key = fed.plan(c.seed), jax.random.key(c.seed)
  state, _ = fed(init, None, plan, key)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(state.variables), jax.tree.leaves(final), strict=True))
  scale = max(1.0, max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(final)))
  info["reproduced_max_abs"] = diff
  if not diff <= REPRODUCE_RTOL * scale:
    return None, {**info, "skipped": f"the federation re-run as one program differs from the "
                                     f"trained model by {diff:.3g} (> {REPRODUCE_RTOL:g} x "
                                     f"{scale:.3g})"}
  affine = c.aggregation.rule == "mean" and c.server.optimizer in ("none", "sgd")
  form = "loo" if affine else "tangent"
  res = _across_rounds(fed, model, init, None, plan, key, x, target,
                       output=c.provenance.output, form=form, mode="auto",
                       inputs_per_chunk=INPUTS_PER_CHUNK, clients_per_chunk=CLIENTS_PER_CHUNK)
  info.update(form=form, mode=res.mode, seconds=time.perf_counter() - t0,
              inputs_per_chunk=INPUTS_PER_CHUNK, clients_per_chunk=CLIENTS_PER_CHUNK)
  if not np.all(np.isfinite(res.scores)):
    return None, {**info, "skipped": "non-finite scores (a square root at 0 in reverse mode: "
                                     "a server optimizer's second moment?)"}
  return np.asarray(res.scores, np.float64), info


INPUTS_PER_CHUNK = 25  # test inputs per reverse pass through the training
CLIENTS_PER_CHUNK = 32  # forward mode: client tangents per pass through the training


# Client values estimated from the LDS's subset federations: upper bounds that see retrained
# federations. Their LDS would be measured on the very subsets they were fitted to, so it is
# not reported; their top-1 and Spearman are against the separate leave-one-out federations.
IN_SAMPLE = ("banzhaf", "datamodel")


def with_valuations(scores: dict[str, np.ndarray], truth) -> dict[str, np.ndarray]:
  """`scores` with the clients' Banzhaf values and linear datamodel weights from the subset
  federations (`retrained.banzhaf`, `retrained.datamodel`) before the baselines, when the
  cell retrained at least 3 subsets."""
  if len(truth.subset_masks) < 3:
    return scores
  values = {"banzhaf": np.nan_to_num(retrained.banzhaf(truth.subset_masks,
                                                       truth.subset_logits)),
            "datamodel": retrained.datamodel(truth.subset_masks, truth.subset_logits)}
  last = ("largest",)
  return {**{k: v for k, v in scores.items() if k not in last}, **values,
          **{k: v for k, v in scores.items() if k in last}}


def candidates(scores, participants, sampled) -> dict[str, np.ndarray]:
  """`[C]` bool per method: the clients that could be responsible (the last round's
  participants for last-round methods; every client sampled in some round for multi-round
  and the largest client)."""
  last = np.isin(np.arange(len(sampled)), participants)
  return {name: last if name in ("tracefl", "first_order", "loo_last") else sampled
          for name in scores}  # across_rounds: every sampled client, as multi_round


def grade(c, scores, truth, loo_last_top, rule, participants, sampled) -> list[dict[str, Any]]:
  """One row per method: every truth, with intervals and the paired difference to TraceFL
  (`intervals.compare_methods`), each method's top client among its candidates
  (`candidates`). `rule(clients [N]) -> [N] bool` is the paper's rule."""
  allowed = candidates(scores, participants, sampled)
  graded = intervals.compare_methods(scores, truth, allowed, draws=c.attribution.bootstrap,
                                     seed=c.seed)
  rows = []
  for name in IN_SAMPLE:  # fitted to the subsets: no LDS on them
    for key in [k for k in graded.get(name, {}) if k.startswith("lds")]:
      graded[name][key] = None
  for name, s in scores.items():
    top = retrained.restricted_top(s, allowed[name])
    rows.append({"method": name, "paper_rule": float(rule(top).mean()),
                 "loo_last_top1": float(np.mean(top == loo_last_top)), **graded[name]})
  k = len(participants)  # a uniformly random participant, in expectation
  n = len(truth.top_client)
  rule_rand = np.mean([rule(np.full(n, p)) for p in participants], axis=0)
  rows.append({"method": "random", "paper_rule": float(rule_rand.mean()),
               "loo_last_top1": 1.0 / k,
               "retrain_top1": float(np.isin(truth.top_client, participants).mean() / k),
               "retrain_spearman": None, "lds": None})
  return rows


def topk(c, algorithm, init, data, model, x, target, scores, truth, allowed,
         participants, always) -> list[dict[str, Any]]:
  """Top-k removal (`provenance.topk_removal`) for the first `attribution.topk_inputs`
  inputs: each method's top k candidates left out (k = 1, 3, 5 up to `attribution.topk`), and
  k random last-round participants, retrained under the first truth seed; drops measured
  against that seed's base federation."""
  n = min(c.attribution.topk_inputs, x.shape[0])
  ks = tuple(k for k in (1, 3, 5) if k <= c.attribution.topk)
  num = data.num_clients
  masks, rows = topk_removal.topk_masks(
      {name: s[:n] for name, s in scores.items()}, ks, num, allowed,
      random_candidates=np.isin(np.arange(num), participants), seed=c.seed)
  feds = retraining.retrain(
      algorithm, init, data, masks, rounds=c.rounds, clients_per_round=c.clients_per_round,
      seed=c.seed, batch_size=c.client.batch_size, local_epochs=c.client.local_epochs,
      weighting=c.aggregation.weighting,
      federations_per_chunk=c.attribution.federations_per_chunk, always_sampled=always,
      clients_per_chunk=c.simulation.clients_per_chunk)
  outputs, predicted = topk_removal.row_outputs(model, feds, x[:n], target[:n],
                                                jnp.asarray(rows.input), c.provenance.output)
  return topk_removal.topk_table(rows, outputs, predicted, truth.base_logit[0][:n],
                                 np.asarray(target)[:n], draws=c.attribution.bootstrap,
                                 seed=c.seed)


# --- the tables --------------------------------------------------------------------------


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
