"""Retrained federations side by side (`provenance.retraining.retrain`) against one federation's
training, on the embedded digits set with the FedAvg CNN (the comparison's setting).

Row: seconds for F = M + 1 federations batched (steady state, compile apart), seconds for one
federation through the plain round program, and their ratio to F x one (the issue's bound:
at most 1.3).

  python benchmarks/bench_retraining.py --federations=5 \
      --out=benchmarks/results/retraining_cpu.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import JsonlSink, time_fn  # noqa: E402

from tracefl_jax.data import load_dataset, make_partition  # noqa: E402
from tracefl_jax.data.federated import federate  # noqa: E402
from tracefl_jax.fl.rounds import federated_averaging  # noqa: E402
from tracefl_jax.models import get_model  # noqa: E402
from tracefl_jax.provenance import retraining  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--federations", type=int, default=5)
  ap.add_argument("--clients", type=int, default=20)
  ap.add_argument("--per-round", type=int, default=20)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--model", default="cnn")
  ap.add_argument("--strategies", default="vmap,map")
  ap.add_argument("--repeats", type=int, default=1)
  ap.add_argument("--out", default="")
  a = ap.parse_args()
  ds = load_dataset("digits")
  part = make_partition(ds.y_train, "dirichlet", a.clients, 0, num_classes=10, alpha=0.3)
  data = federate(ds.x_train, ds.y_train, part)
  model = get_model(a.model, ds.input_shape, 10)
  init = model.init(jax.random.key(0))
  algorithm = federated_averaging(model, optax.adam(1e-3), batch_size=32, local_epochs=2,
                                  strategy="scan")
  kw = dict(rounds=a.rounds, clients_per_round=a.per_round, seed=0, batch_size=32,
            local_epochs=2)
  rng = np.random.default_rng(0)
  masks = (rng.random((a.federations, a.clients)) < 0.5).astype(np.float32)
  masks[0] = 1.0
  sink = JsonlSink(a.out or None)
  one = time_fn(lambda: retraining.retrain_sequential(algorithm, init, data, masks[0], **kw),
                a.repeats)
  for strategy in a.strategies.split(","):
    batched = time_fn(lambda: retraining.retrain(algorithm, init, data, masks,
                                                 federation_strategy=strategy, **kw), a.repeats)
    row = {"bench": "retraining", "model": a.model, "clients": a.clients,
           "per_round": a.per_round, "rounds": a.rounds, "federations": a.federations,
           "federation_strategy": strategy, "one_federation_s": one["steady_s"],
           "batched_s": batched["steady_s"], "batched_first_call_s": batched["first_call_s"],
           "ratio_to_F_times_one": batched["steady_s"] / (a.federations * one["steady_s"])}
    sink.write(row)


if __name__ == "__main__":
  main()
