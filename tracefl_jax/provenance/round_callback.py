"""The paper's protocol as a callback of the training loop (`fl.rounds.run_rounds`): each
round (or the chosen ones) traced with `protocol.trace_round`, FedDebug beside it in faulty
mode, and the multi-round attribution kept up to date."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.models.base import ModelDef
from tracefl_jax.provenance.feddebug import feddebug_round
from tracefl_jax.provenance.multiround import MultiRoundAccumulator
from tracefl_jax.provenance.protocol import (ProtocolSettings, TracedRound, passes_rule,
                                             trace_round)
from tracefl_jax.provenance.removal import round_removal


def provenance_callback(
    model: ModelDef,
    evaluator: Any,
    settings: ProtocolSettings = ProtocolSettings(),
    *,
    rounds: Sequence[int] | None = None,
    on_trace: Callable[[int, TracedRound], None] | None = None,
    seed: int = 0,
    feddebug_normalize: Callable[[jax.Array], jax.Array] | None = None,
    multi_round: MultiRoundAccumulator | None = None,
) -> Callable[[Any], dict[str, Any] | None]:
  """A `run_rounds` callback tracing each round (or those in `rounds`) with the protocol.

  Args:
    evaluator: the server test set and G's predictions on it (`fl.rounds.GlobalEvaluator`).
    on_trace: called with `(round, TracedRound)` after each traced round (e.g. to log rows).
    seed, feddebug_normalize: faulty mode with `settings.feddebug`: FedDebug's random inputs
      come from `fold_in(key(seed), round)` and are normalised like the dataset's test inputs.

    multi_round: an accumulator over all the federation's clients, updated after EVERY
      round (traced or not) with the round's clients, aggregate and weights; in traced rounds
      the inputs are also attributed over all rounds so far (`multiround.py`) and the summary
      gains `multiround_accuracy` (by the mode's rule, the responsible client being any
      client of the federation) and `multiround_clients` (per input, the responsible global id).

  The callback adds `provenance` (the round's summary) and `provenance_seconds` to the row.
  Two accuracies, two meanings: `row["provenance"]["accuracy"]` is TraceFL's localization
  accuracy (the share of traced inputs whose responsible client it names correctly, beside
  `random_baseline` and `largest_client_baseline`); `row["accuracy"]` is the global model's
  test accuracy (`GlobalEvaluator`).
  """
  wanted = None if not rounds else set(int(r) for r in rounds)

  def callback(info) -> dict[str, Any] | None:
    out = info.output
    reaggregate, _ = round_removal(out)  # None where FedAvg's closed form is used
    if multi_round is not None:
      multi_round.update(out.clients.variables, out.traced, out.weights, out.client_ids,
                         reaggregate=reaggregate,
                         clients_per_chunk=settings.clients_per_chunk or None)
    if wanted is not None and info.round not in wanted:
      return None
    t0 = time.perf_counter()
    traced = trace_round(
        model, out.traced, out.clients.variables, client_ids=out.client_ids,
        client_sizes=np.asarray(out.clients.num_examples), label_counts=info.data.label_counts,
        x_test=evaluator.x, y_test=evaluator.y, predictions=evaluator.predictions(
            out.traced, info.round if out.traces_global else None),
        settings=settings, weights=out.weights, reaggregate=reaggregate,
        aggregation=out.aggregation)
    if (settings.mode == "faulty" and settings.feddebug and not traced.summary["skipped"]
        and not jnp.issubdtype(model.input_dtype, jnp.integer)):
      faulty = [k for k, c in enumerate(out.client_ids) if int(c) in settings.faulty_clients]
      if 0 < len(faulty) < len(out.client_ids):
        traced.summary.update(feddebug_round(
            model, out.clients.variables, faulty,
            jax.random.fold_in(jax.random.key(seed), info.round),
            num_inputs=settings.feddebug_inputs, threshold=settings.feddebug_threshold,
            normalize=feddebug_normalize,
            clients_per_chunk=settings.clients_per_chunk or None))
    if multi_round is not None and len(traced.inputs):
      mr = multi_round.scores(model, out.traced, jnp.take(evaluator.x, traced.inputs, axis=0),
                              clients_per_chunk=settings.clients_per_chunk or None,
                              output=settings.output)
      mr_clients = np.asarray(mr.traced_client)
      ok = np.asarray(mr.attributable)
      counts = np.asarray(info.data.label_counts)
      right = passes_rule(settings, np.maximum(mr_clients, 0), traced.labels, counts,
                          np.arange(len(counts)))
      traced.summary["multiround_accuracy"] = float(np.mean(right & ok))
      traced.summary["multiround_clients"] = mr_clients.tolist()
    if on_trace is not None:
      on_trace(info.round, traced)
    return {"provenance": traced.summary, "provenance_seconds": time.perf_counter() - t0}

  return callback
