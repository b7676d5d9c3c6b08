"""Ditto and q-FFL against FedAvg on non-IID digits (issue 34's acceptance setting), per client.

The setting of bench_feddyn.py (embedded digits, the registry's `mlp`, Dirichlet(alpha) over 20
clients, 5 sampled per round by `sample_clients`, plain SGD clients at lr, batch 32, 2 local
epochs, uniform weights), with each client's examples split 80/20: the clients train on
their 80%, and every model is scored on each client's own held-out 20% (Ditto's and q-FFL's
papers evaluate per client) as well as on the server's test set. Reports, per algorithm and
seed at the last round: G's test accuracy; the per-client accuracy (mean, worst client,
standard deviation over clients) of G, and for Ditto of each client's personal model.
Appends the rows to benchmarks/results/ditto_qffl_cpu.jsonl.

  python benchmarks/bench_ditto_qffl.py --rounds 40 --seeds 0 1 2
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
from tracefl_jax.fl.ditto import ditto, personal_accuracy
from tracefl_jax.fl.qffl import qffl
from tracefl_jax.fl.rounds import round_key, sample_clients
from tracefl_jax.models import get_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402


def _spread(acc: np.ndarray) -> dict[str, float]:
  acc = acc[np.isfinite(acc)]
  return {"mean": float(acc.mean()), "worst": float(acc.min()), "std": float(acc.std())}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--rounds", type=int, default=40)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--dirichlet", type=float, default=0.1)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--qs", type=float, nargs="+", default=[1.0, 5.0])
  p.add_argument("--lams", type=float, nargs="+", default=[0.1, 1.0])
  p.add_argument("--clients", type=int, default=20)
  p.add_argument("--per_round", type=int, default=5)
  args = p.parse_args()
  ds = load_dataset("digits")
  model = get_model("mlp", ds.input_shape, ds.num_classes)
  predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x)[0], -1))
  common = dict(batch_size=32, local_epochs=2, strategy="vmap", weighting="uniform")
  sgd = optax.sgd(args.lr)
  algorithms = {"fedavg": federated_averaging(model, sgd, **common)}
  for q in args.qs:
    algorithms[f"qffl({q:g})"] = federated_averaging(model, sgd, aggregator=qffl(q, 1 / args.lr),
                                                     **common)
  for lam in args.lams:
    algorithms[f"ditto({lam:g})"] = ditto(model, sgd, lam, **common)
  rows = []
  for seed in args.seeds:
    part = make_partition(ds.y_train, "dirichlet", args.clients, seed=seed, alpha=args.dirichlet)
    rng = np.random.default_rng(seed)
    train, held = [], []
    for ix in part.client_indices:
      ix = rng.permutation(np.asarray(ix))
      cut = int(round(0.8 * len(ix)))
      train.append(ix[:cut])
      held.append(ix[cut:])
    data = federate(ds.x_train, ds.y_train, train)
    variables = model.init(jax.random.key(seed))
    for name, alg in algorithms.items():
      t0 = time.perf_counter()
      state = alg.init(variables, num_clients=data.num_clients)
      for r in range(1, args.rounds + 1):
        clients = sample_clients(seed, r, data.num_clients, args.per_round)
        state, _ = alg.round(state, clients, data, round_key(jax.random.key(seed), r))
      test = float(np.mean(np.asarray(predict(state.variables, ds.x_test)) == ds.y_test))
      pred = np.asarray(predict(state.variables, ds.x_train))
      y = np.asarray(ds.y_train)
      per_client = np.array([np.mean(pred[h] == y[h]) if len(h) else np.nan for h in held])
      row = {"bench": "ditto_qffl", "algorithm": name, "seed": seed, "rounds": args.rounds,
             "dirichlet": args.dirichlet, "clients": args.clients, "per_round": args.per_round,
             "lr": args.lr, "global_test_accuracy": test,
             "global_per_client": _spread(per_client)}
      if name.startswith("ditto"):
        row["personal_per_client"] = _spread(personal_accuracy(model, state, ds.x_train,
                                                               ds.y_train, held))
      row["seconds"] = time.perf_counter() - t0
      rows.append(row)
      g = row["global_per_client"]
      line = (f"seed {seed} {name:10s} test {test:.3f}  G per client: mean {g['mean']:.3f} "
              f"worst {g['worst']:.3f} std {g['std']:.3f}")
      if "personal_per_client" in row:
        v = row["personal_per_client"]
        line += f"  personal: mean {v['mean']:.3f} worst {v['worst']:.3f} std {v['std']:.3f}"
      print(line + f" ({row['seconds']:.0f} s)", flush=True)
  print("\nmean over seeds: test | G per client mean/worst/std | personal mean/worst/std")
  for name in algorithms:
    mine = [r for r in rows if r["algorithm"] == name]
    m = lambda key, f: np.mean([r[key][f] for r in mine])  # noqa: E731
    line = (f"  {name:10s} {np.mean([r['global_test_accuracy'] for r in mine]):.3f} | "
            f"{m('global_per_client', 'mean'):.3f} / {m('global_per_client', 'worst'):.3f} / "
            f"{m('global_per_client', 'std'):.3f}")
    if "personal_per_client" in mine[0]:
      line += (f" | {m('personal_per_client', 'mean'):.3f} / "
               f"{m('personal_per_client', 'worst'):.3f} / {m('personal_per_client', 'std'):.3f}")
    print(line)
  out = Path(__file__).parent / "results" / "ditto_qffl_cpu.jsonl"
  env = environment()
  with open(out, "a") as f:
    for row in rows:
      f.write(json.dumps({**row, **env}) + "\n")


if __name__ == "__main__":
  main()
