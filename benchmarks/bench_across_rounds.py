"""Influence across rounds (`provenance.across_rounds`) in forward and reverse mode on the
attribution comparison's first quick cell (configs/attribution.py:quick, "digits 20/20": 20
digits clients all taking part for 19 rounds, the CNN, Adam, the margin, form "loo"), as the
comparison runs it (`comparison_methods.scan_fedavg`, the federation re-run as one program).

Paths, in one process, repetitions interleaved (each call builds and compiles its programs,
as the comparison's one call per cell does; compile time is measured apart from JAX's
compile events: tracing, lowering and XLA compilation):

  forward   `mode="forward"` on `--inputs` test inputs: one JVP lane per sampled client
            (20), `clients_per_chunk` 32, the final model evaluated 25 inputs at a time;
  reverse   `mode="reverse"` on `--reverse_inputs` inputs (default 25: one chunk of the
            comparison's `INPUTS_PER_CHUNK`; 100 inputs take 4 such passes, one compile);
  train     the federation's forward run alone (`fed(...)`, jitted once, steady state): the
            unit the two modes are measured in.

Before the timed calls, the forward and reverse scores are compared on the reverse path's
inputs (max abs difference relative to the largest score).

  python benchmarks/bench_across_rounds.py --out=benchmarks/results/across_rounds_cpu.jsonl

Row: bench, path, N (inputs), lanes (tangents or cotangents), R, C, K, call_s (median over
the repetitions of one whole call: what the comparison pays), compile_s, run_s (call_s -
compile_s), calls (each call's seconds), per_100_inputs_s (reverse: compile + 100 / N x run;
forward: its call, independent of N up to the final evaluation), trainings_per_lane (run_s
/ lanes / train_s: a lane's cost in federation trainings), max_abs_score, rel_diff (forward
against reverse), load (1-minute load average at each call), device and versions. The cost
of both modes is linear in the rounds (`--rounds`, default the cell's 19).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import monitoring

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import JsonlSink, block  # noqa: E402

from configs.attribution import get_config  # noqa: E402
from tracefl_jax.experiment import comparison_methods as methods  # noqa: E402
from tracefl_jax.fl.federation import federation  # noqa: E402
from tracefl_jax.provenance.across_rounds import across_rounds  # noqa: E402

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
_compile = [0.0]


def _listen(event: str, seconds: float, **_: object) -> None:
  if event in COMPILE_EVENTS:
    _compile[0] += seconds


def timed(fn):
  """(result, seconds, compile seconds) of one call."""
  _compile[0] = 0.0
  t0 = time.perf_counter()
  out = block(fn())
  return out, time.perf_counter() - t0, _compile[0]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--inputs", type=int, default=100)
  p.add_argument("--reverse_inputs", type=int, default=25)
  p.add_argument("--rounds", type=int, default=19)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--paths", default="forward,reverse")
  p.add_argument("--out", default=None)
  args = p.parse_args()
  sink = JsonlSink(args.out)
  monitoring.register_event_duration_secs_listener(_listen)

  c = get_config("quick")
  c.attribution.setting, c.clients_per_round, c.rounds = "digits 20/20", 20, args.rounds
  data, model, init, _, evaluator, _, _ = methods.setup(c)
  fed = federation(methods.scan_fedavg(c, model), data, rounds=c.rounds,
                   clients_per_round=c.clients_per_round)
  plan, key = fed.plan(c.seed), jax.random.key(c.seed)
  (state, _), _, _ = timed(lambda: fed(init, None, plan, key))
  trains = [timed(lambda: fed(init, None, plan, key))[1] for _ in range(3)]
  n = args.inputs
  x = jnp.asarray(evaluator.x[:n])
  target = jnp.asarray(evaluator.predictions(state.variables)[:n], jnp.int32)
  shape = {"R": c.rounds, "C": data.num_clients, "K": c.clients_per_round}
  sink.write({"bench": "across_rounds", "path": "train", "N": 0, "lanes": 0, **shape,
              "call_s": statistics.median(trains), "calls": trains,
              "load": os.getloadavg()[0]})

  def call(mode: str):
    m = n if mode == "forward" else args.reverse_inputs
    return across_rounds(fed, model, init, None, plan, key, x[:m], target[:m],
                         output=c.provenance.output, form="loo", mode=mode,
                         inputs_per_chunk=methods.INPUTS_PER_CHUNK,
                         clients_per_chunk=methods.CLIENTS_PER_CHUNK)

  paths = args.paths.split(",")
  calls = {path: [] for path in paths}
  results = {}
  for rep in range(args.repeats):
    for path in paths:
      res, seconds, compile_s = timed(lambda path=path: call(path))
      results[path] = res
      calls[path].append((seconds, compile_s, os.getloadavg()[0]))
  rel = None
  if {"forward", "reverse"} <= set(results):
    m = args.reverse_inputs
    ref = results["reverse"].scores
    rel = float(np.abs(results["forward"].scores[:m] - ref).max() / np.abs(ref).max())
  train_s = statistics.median(trains)
  lanes = {"forward": len(np.unique(np.asarray(plan.client_ids))),
           "reverse": args.reverse_inputs}
  for path in paths:
    total = statistics.median(s for s, _, _ in calls[path])
    compile_s = statistics.median(k for _, k, _ in calls[path])
    m = n if path == "forward" else args.reverse_inputs
    per_100 = total if path == "forward" else compile_s + 100 / m * (total - compile_s)
    sink.write({"bench": "across_rounds", "path": path, "N": m, "lanes": lanes[path], **shape,
                "call_s": total, "compile_s": compile_s, "run_s": total - compile_s,
                "per_100_inputs_s": per_100, "train_s": train_s,
                "trainings_per_lane": (total - compile_s) / lanes[path] / train_s,
                "max_abs_score": float(np.abs(results[path].scores).max()),
                "calls": [round(s, 2) for s, _, _ in calls[path]],
                "repeats": args.repeats, "rel_diff": rel,
                "load": [round(ld, 2) for _, _, ld in calls[path]]})


if __name__ == "__main__":
  main()
