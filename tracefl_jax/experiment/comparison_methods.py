"""The attribution comparison's methods and their grading (one cell: `comparison.py`).

`method_scores` gives every method's additive `[N, C]` scores of the explained output;
`grade` scores them against the retraining truths with intervals and the paired difference to
TraceFL (`provenance.intervals`), each method naming its top client among the clients that
could be responsible (`candidates`); `topk` retrains without each method's top k clients
(`provenance.topk_removal`).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from tracefl_jax.provenance import intervals, retrained, retraining, topk_removal, trace_clients
from tracefl_jax.provenance.counterfactual import leave_one_out
from tracefl_jax.provenance.removal import round_removal


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
          for name in scores}


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
