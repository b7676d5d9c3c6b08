"""A sweep over seeds x server learning rates as one vmapped federation program against the
same runs one by one (issue 35, item 2).

S seeds x L server learning rates of R rounds of FedAvg with a server learning rate
(`server_optimizer("sgd", lr)`), the "scan" client strategy (`--strategy=vmap`: the packed
lanes, what "auto" picks for an MLP on CPU), an MLP on synthetic 8x8 images, C clients
(`--partition`: "iid", equal sizes, or "dirichlet" 0.5, ragged sizes, so seeds sample clients
of different sizes and a vmapped client runs the largest client's steps), K per round. Paths,
timed in one process, repetitions interleaved after a warm-up (compile + first run, recorded
apart):

  run_rounds        S x L `run_rounds` calls (the host loop, one jitted round program per
                    learning rate, each compiled once in the warm-up), under `--strategy`;
  run_rounds_scan   the same under the "scan" client strategy (the faster host loop for this
                    model on CPU: the sequential baseline to beat);
  federation_each   S x L calls of the jitted federation (`fl.federation`), one program;
  vmapped           one call: `jax.vmap` over learning rates of `jax.vmap` over seeds'
                    plans and keys (the default local loop "scan": the packed strategies'
                    fixed-trip lane loop, reverse-differentiable);
  vmapped_while     the same with the clients' `local_loop="while"` (the packed strategies'
                    while-loop lane loop, forward only): what the fixed trip costs;
  vmapped_uncapped  the same as vmapped without the federation's cap (`max_steps` None:
                    every client, or the lane loop, bounded by the steps of all the round's T
                    slots), the cost the cap removes;
  vmapped_grad      `jax.grad` of the sweep's mean validation loss w.r.t. the L learning
                    rates: the forward sweep and its reverse pass, one call.

Every forward path's final models are checked against `run_rounds` (max abs difference).

  python benchmarks/bench_federation.py --out=benchmarks/results/federation_cpu.jsonl
  python benchmarks/bench_federation.py --strategy=vmap --paths=run_rounds,run_rounds_scan,\
federation_each,vmapped,vmapped_while,vmapped_grad --out=benchmarks/results/federation_cpu.jsonl
  python benchmarks/bench_federation.py --partition=dirichlet \
      --out=benchmarks/results/federation_cpu.jsonl

Row: bench, path, strategy, partition, client_sizes (min, max), S, L, R, C, K, steady_s
(median), steady_min_s, cpu_s / cpu_min_s (process CPU seconds: median, min), first_call_s,
speedup (run_rounds' median / this path's), speedup_vs_scan (run_rounds_scan's median / this
path's, where timed), max_abs_diff (against run_rounds), load (1-minute load average),
device and versions; vmapped_grad rows add grad (d mean validation loss / d lr) and finite.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import JsonlSink, block  # noqa: E402

import tracefl_jax.fl.algorithm as algorithm_module  # noqa: E402
from tracefl_jax.data.federated import federate  # noqa: E402
from tracefl_jax.data.partition import make_partition  # noqa: E402
from tracefl_jax.fl.client import make_client_update  # noqa: E402
from tracefl_jax.fl.federation import federation  # noqa: E402
from tracefl_jax.fl.rounds import federated_averaging, run_rounds  # noqa: E402
from tracefl_jax.fl.server import server_optimizer  # noqa: E402
from tracefl_jax.models import get_model  # noqa: E402


def synthetic(n: int, classes: int = 4, seed: int = 0):
  rng = np.random.default_rng(seed)
  prototypes = rng.normal(size=(classes, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, classes, n).astype(np.int32)
  return prototypes[y] + 1.5 * rng.normal(size=(n, 8, 8, 1)).astype(np.float32), y


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", type=int, default=8)
  p.add_argument("--lrs", default="0.5,1.0,1.5,2.0")
  p.add_argument("--rounds", type=int, default=10)
  p.add_argument("--clients", type=int, default=20)
  p.add_argument("--partition", default="iid", help="iid (equal sizes) or dirichlet (0.5)")
  p.add_argument("--per_round", type=int, default=5)
  p.add_argument("--n", type=int, default=2000)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--strategy", default="scan", help="scan (differentiable) or vmap (packed)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--paths", default="run_rounds,federation_each,vmapped,vmapped_uncapped")
  p.add_argument("--out", default="")
  args = p.parse_args()
  sink = JsonlSink(args.out)
  x, y = synthetic(args.n)
  options = {"alpha": 0.5} if args.partition == "dirichlet" else {}
  data = federate(x, y, make_partition(y, args.partition, args.clients, seed=0, **options))
  model = get_model("mlp", (8, 8, 1), 4)
  variables = model.init(jax.random.key(0))
  seeds, lrs = list(range(args.seeds)), [float(v) for v in args.lrs.split(",")]

  def build(lr, strategy=args.strategy, loop=None):
    kwargs = dict(batch_size=args.batch, local_epochs=1, strategy=strategy,
                  server_optimizer=server_optimizer("sgd", lr))
    if loop is None:
      return federated_averaging(model, optax.sgd(0.05), **kwargs)
    # federated_averaging takes no local_loop: build its client update with this one.
    keep = algorithm_module.make_client_update
    algorithm_module.make_client_update = functools.partial(make_client_update,
                                                            local_loop=loop)
    try:
      return federated_averaging(model, optax.sgd(0.05), **kwargs)
    finally:
      algorithm_module.make_client_update = keep

  common = dict(rounds=args.rounds, clients_per_round=args.per_round, batch_size=args.batch)
  fed = federation(build, data, **common)
  uncapped = federation(build, data, **common)
  uncapped.max_steps = lambda alg: None
  fed_while = federation(functools.partial(build, loop="while"), data, **common)
  plans, keys = fed.plans(seeds), jax.vmap(jax.random.key)(jnp.asarray(seeds))
  one_plans = [fed.plan(s) for s in seeds]
  algorithms = {lr: build(lr) for lr in lrs}
  scan_algorithms = {lr: build(lr, "scan") for lr in lrs}
  lr_array = jnp.asarray(lrs, jnp.float32)
  xv, yv = synthetic(256, seed=1)
  xv, yv = jnp.asarray(xv), jnp.asarray(yv)

  def vmapped(f):
    return jax.vmap(jax.vmap(f.run, in_axes=(None, None, 0, 0, None, None)),
                    in_axes=(None, 0, None, None, None, None))

  sweeps = {"vmapped": jax.jit(vmapped(fed)), "vmapped_uncapped": jax.jit(vmapped(uncapped)),
            "vmapped_while": jax.jit(vmapped(fed_while))}

  def mean_val_loss(lrs, plans, keys, x, y):
    params = vmapped(fed)(variables, lrs, plans, keys, x, y)[0].variables
    logits = jax.vmap(jax.vmap(lambda v: model.apply(v, xv)[0]))(params)
    labels = jnp.broadcast_to(yv, logits.shape[:-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grad_sweep = jax.jit(jax.grad(mean_val_loss))

  def finals(path):  # [L][S] final params (vmapped_grad: the gradient [L])
    if path in ("run_rounds", "run_rounds_scan"):
      algs = algorithms if path == "run_rounds" else scan_algorithms
      return [[run_rounds(algs[lr], algs[lr].init(variables), data,
                          rounds=args.rounds, clients_per_round=args.per_round,
                          seed=s)[0].variables for s in seeds] for lr in lrs]
    if path == "federation_each":
      return [[fed(variables, jnp.float32(lr), one_plans[j], keys[j])[0].variables
               for j in range(len(seeds))] for lr in lrs]
    if path == "vmapped_grad":
      return grad_sweep(lr_array, plans, keys, data.x, data.y)
    out = sweeps[path](variables, lr_array, plans, keys, data.x, data.y)[0].variables
    return [[jax.tree.map(lambda a, i=i, j=j: a[i, j], out) for j in range(len(seeds))]
            for i in range(len(lrs))]

  paths = args.paths.split(",")
  first, times, results = {}, {p: [] for p in paths}, {}
  cpu = {p: [] for p in paths}  # process CPU seconds: less sensitive to other jobs' load
  for path in paths:
    t0 = time.perf_counter()
    results[path] = block(finals(path))
    first[path] = time.perf_counter() - t0
  for _ in range(args.repeats):
    for path in paths:
      c0, t0 = time.process_time(), time.perf_counter()
      block(finals(path))
      times[path].append(time.perf_counter() - t0)
      cpu[path].append(time.process_time() - c0)
  ref = results.get("run_rounds")
  base = statistics.median(times["run_rounds"]) if "run_rounds" in times else None
  base_scan = (statistics.median(times["run_rounds_scan"]) if "run_rounds_scan" in times
               else None)
  for path in paths:
    diff = None if ref is None or path == "vmapped_grad" else max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for i in range(len(lrs)) for j in range(len(seeds))
        for a, b in zip(jax.tree.leaves(results[path][i][j]), jax.tree.leaves(ref[i][j])))
    steady = statistics.median(times[path])
    row = {"bench": "federation", "path": path, "strategy": args.strategy,
           "partition": args.partition,
           "client_sizes": [int(data.client_sizes.min()), int(data.client_sizes.max())],
           "S": len(seeds), "L": len(lrs),
           "R": args.rounds, "C": args.clients, "K": args.per_round,
           "batch_size": args.batch, "steady_s": steady, "steady_min_s": min(times[path]),
           "cpu_s": statistics.median(cpu[path]), "cpu_min_s": min(cpu[path]),
           "first_call_s": first[path], "repeats": args.repeats,
           "speedup": None if base is None else base / steady,
           "speedup_vs_scan": None if base_scan is None else base_scan / steady,
           "max_abs_diff": diff, "load": os.getloadavg()[0]}
    if path == "vmapped_grad":
      row["grad"] = [float(g) for g in np.asarray(results[path])]
      row["finite"] = bool(np.all(np.isfinite(np.asarray(results[path]))))
    sink.write(row)

if __name__ == "__main__":
  main()
