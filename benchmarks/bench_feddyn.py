"""FedDyn against FedAvg (and SCAFFOLD) on non-IID digits (issue 34's acceptance setting).

The embedded digits set (1,437 training, 360 test images, 8x8), the registry's `mlp`, a
Dirichlet(alpha) partition over 20 clients, 5 clients sampled per round (`sample_clients`,
the same clients for every algorithm), plain SGD clients (batch 32, 2 local epochs), every
algorithm from the same initial model and round keys. Reports G's test accuracy at the last
round and its mean over the last 10 rounds, per algorithm and seed, and appends the rows to
benchmarks/results/feddyn_cpu.jsonl.

  python benchmarks/bench_feddyn.py --rounds 60 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tracefl_jax.data.datasets import load_dataset
from tracefl_jax.data.federated import federate
from tracefl_jax.data.partition import make_partition
from tracefl_jax.fl.algorithm import federated_averaging
from tracefl_jax.fl.feddyn import feddyn
from tracefl_jax.fl.rounds import round_key, sample_clients
from tracefl_jax.fl.scaffold import scaffold
from tracefl_jax.models import get_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--rounds", type=int, default=60)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--dirichlet", type=float, default=0.1)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--alphas", type=float, nargs="+", default=[0.01, 0.1])
  p.add_argument("--clients", type=int, default=20)
  p.add_argument("--per_round", type=int, default=5)
  args = p.parse_args()
  ds = load_dataset("digits")
  model = get_model("mlp", ds.input_shape, ds.num_classes)
  evaluate = jax.jit(lambda v: jnp.mean(jnp.argmax(model.apply(v, ds.x_test)[0], -1) == ds.y_test))
  common = dict(batch_size=32, local_epochs=2, strategy="vmap")
  algorithms = {"fedavg": federated_averaging(model, optax.sgd(args.lr), **common),
                "scaffold": scaffold(model, args.lr, **common)}
  for a in args.alphas:
    algorithms[f"feddyn({a})"] = feddyn(model, args.lr, a, **common)
  rows = []
  for seed in args.seeds:
    data = federate(ds.x_train, ds.y_train, make_partition(
        ds.y_train, "dirichlet", args.clients, seed=seed, alpha=args.dirichlet))
    variables = model.init(jax.random.key(seed))
    for name, alg in algorithms.items():
      t0 = time.perf_counter()
      state, accs = alg.init(variables, num_clients=data.num_clients), []
      for r in range(1, args.rounds + 1):
        clients = sample_clients(seed, r, data.num_clients, args.per_round)
        state, _ = alg.round(state, clients, data, round_key(jax.random.key(seed), r))
        accs.append(float(evaluate(state.variables)))
      row = {"bench": "feddyn", "algorithm": name, "seed": seed, "rounds": args.rounds,
             "dirichlet": args.dirichlet, "clients": args.clients, "per_round": args.per_round,
             "lr": args.lr, "final_accuracy": accs[-1],
             "last10_accuracy": float(np.mean(accs[-10:])), "curve": accs[::5],
             "seconds": time.perf_counter() - t0}
      rows.append(row)
      print(f"seed {seed} {name:14s} final {accs[-1]:.3f} last-10 mean {row['last10_accuracy']:.3f}"
            f" ({row['seconds']:.0f} s)", flush=True)
  print("\nmean over seeds (final / last-10):")
  for name in algorithms:
    mine = [r for r in rows if r["algorithm"] == name]
    print(f"  {name:14s} {np.mean([r['final_accuracy'] for r in mine]):.3f} / "
          f"{np.mean([r['last10_accuracy'] for r in mine]):.3f}")
  out = Path(__file__).parent / "results" / "feddyn_cpu.jsonl"
  env = environment()
  with open(out, "a") as f:
    for row in rows:
      f.write(json.dumps({**row, **env}) + "\n")


if __name__ == "__main__":
  main()
