"""Heavy-tailed populations (issue 36, item 1): a round costs its clients' steps.

Two rows (MLP on 64 features, SGD, batch 32, one epoch, FedAvg, strategy auto = vmap packed
lanes on CPU), each the median of interleaved repetitions after a warm-up (compile timed
apart):

  heavy_vs_equal  K clients drawn from a Zipf-sized federation (`make_partition(...,
                  "heavy_tailed")`) against K equal clients holding the same total steps.
                  Target: heavy / equal <= 1.3.
  one_large       10,000 clients of 64 examples, 1,000 per round, client 0 always sampled
                  with 100,000 examples, against the same round with client 0 at 1,000
                  examples plus the extra steps' time (client 0 alone at 100,000 minus
                  alone at 1,000). Target (issue 36's acceptance): ratio <= 1.5.

Client indices wrap around a pool of examples (`client_partition`): the work is the
clients' steps, not distinct data.

  python benchmarks/bench_populations.py --out=benchmarks/results/populations_cpu.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import JsonlSink, block  # noqa: E402
from tracefl_jax.data.federated import federate  # noqa: E402
from tracefl_jax.data.partition import heavy_tailed_sizes  # noqa: E402
from tracefl_jax.fl.client import local_steps  # noqa: E402
from tracefl_jax.fl.lanes import round_lanes  # noqa: E402
from tracefl_jax.fl.rounds import federated_averaging, round_key  # noqa: E402
from tracefl_jax.models import get_model  # noqa: E402

POOL, FEATURES, CLASSES = 20_000, 64, 10


def client_partition(sizes):
  """Per client, `sizes[c]` consecutive example indices, wrapping around the pool."""
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  return [np.arange(s, s + n) % POOL for s, n in zip(starts, sizes)]


def make_round(sizes, clients, args, model, variables, pool):
  """A zero-argument function running one round of `clients` of a federation of `sizes`,
  its first call (compile) timed, and the round's steps and lanes."""
  x, y = pool
  data = federate(x, y, client_partition(sizes), CLASSES)
  algorithm = federated_averaging(model, optax.sgd(0.05), batch_size=args.batch,
                                  local_epochs=1, strategy="auto")
  state = algorithm.init(variables)
  key = round_key(jax.random.key(0), 1)

  def run():
    return algorithm.round(state, clients=clients, data=data, key=key)[1].variables

  t0 = time.perf_counter()
  block(run())
  steps = local_steps(np.asarray(sizes)[clients], args.batch, 1)
  return run, {"first_call_s": time.perf_counter() - t0, "steps": int(steps.sum()),
               "longest": int(steps.max()),
               "lanes": round_lanes(algorithm.strategy, steps)}


def interleaved(runs, repeats):
  """Median seconds of each run, the runs taking turns."""
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, fn in runs.items():
      t0 = time.perf_counter()
      block(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", default="heavy_vs_equal,one_large")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--heavy_clients", type=int, default=2_000)
  p.add_argument("--heavy_mean", type=int, default=128, help="mean examples per client")
  p.add_argument("--heavy_k", type=int, default=200)
  p.add_argument("--exponent", type=float, default=0.8, help="Zipf exponent of the sizes")
  p.add_argument("--clients", type=int, default=10_000)
  p.add_argument("--k", type=int, default=1_000)
  p.add_argument("--small", type=int, default=64)
  p.add_argument("--large", default="1000,100000", help="client 0's sizes: base, large")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="")
  args = p.parse_args()
  rng = np.random.default_rng(0)
  pool = (rng.normal(size=(POOL, FEATURES)).astype(np.float32),
          rng.integers(0, CLASSES, POOL).astype(np.int32))
  model = get_model("mlp", (FEATURES,), CLASSES)
  variables = model.init(jax.random.key(0))
  writer = JsonlSink(args.out or None)
  rows = args.rows.split(",")
  load = lambda: __import__("os").getloadavg()[0]  # noqa: E731

  if "heavy_vs_equal" in rows:
    sizes = heavy_tailed_sizes(args.heavy_clients * args.heavy_mean, args.heavy_clients, 0,
                               "zipf", exponent=args.exponent, min_size=2)
    clients = np.sort(rng.choice(args.heavy_clients, args.heavy_k, replace=False))
    steps = int(local_steps(sizes[clients], args.batch, 1).sum())
    per = -(-steps // args.heavy_k)  # equal clients: the same total steps (rounded up)
    equal = np.full(args.heavy_k, per * args.batch)
    heavy_run, heavy = make_round(sizes, clients, args, model, variables, pool)
    equal_run, eq = make_round(equal, np.arange(args.heavy_k), args, model, variables, pool)
    t = interleaved({"heavy": heavy_run, "equal": equal_run}, args.repeats)
    row = {"bench": "populations", "row": "heavy_vs_equal", "k": args.heavy_k,
           "clients": args.heavy_clients, "zipf_exponent": args.exponent,
           "heavy": {**heavy, "steady_s": t["heavy"]}, "equal": {**eq, "steady_s": t["equal"]},
           "ratio": t["heavy"] / t["equal"], "target": 1.3, "load": load()}
    print(f"heavy_vs_equal: heavy {t['heavy']:.3f} s ({heavy['steps']} steps, longest "
          f"{heavy['longest']}, {heavy['lanes']} lanes) vs equal {t['equal']:.3f} s "
          f"({eq['steps']} steps, {eq['lanes']} lanes): {row['ratio']:.2f}x")
    writer.write(row)

  if "one_large" in rows:
    base_n, large_n = (int(v) for v in args.large.split(","))
    runs, info = {}, {}
    for name, n0, k in (("base", base_n, args.k), ("large", large_n, args.k),
                        ("alone_base", base_n, 1), ("alone_large", large_n, 1)):
      sizes = np.full(args.clients, args.small)
      sizes[0] = n0
      clients = np.concatenate([[0], np.sort(rng.choice(np.arange(1, args.clients), k - 1,
                                                        replace=False))])
      runs[name], info[name] = make_round(sizes, clients, args, model, variables, pool)
    t = interleaved(runs, args.repeats)
    extra = t["alone_large"] - t["alone_base"]
    row = {"bench": "populations", "row": "one_large", "clients": args.clients, "k": args.k,
           "small": args.small, "large_examples": large_n, "base_examples": base_n,
           **{name: {**info[name], "steady_s": t[name]} for name in runs},
           "extra_steps_s": extra, "ratio": t["large"] / (t["base"] + extra), "target": 1.5,
           "load": load()}
    print(f"one_large: large {t['large']:.3f} s vs base {t['base']:.3f} s + extra steps "
          f"{extra:.3f} s: {row['ratio']:.2f}x (lanes {info['large']['lanes']} / "
          f"{info['base']['lanes']}, first calls {info['large']['first_call_s']:.1f} / "
          f"{info['base']['first_call_s']:.1f} s)")
    writer.write(row)


if __name__ == "__main__":
  main()
