"""A robust aggregation rule against a label-flipping client: coordinate-wise median, trimmed
mean and Krum next to FedAvg, then TraceFL on the global model's mistakes.

  python examples/robust_aggregation.py [--rounds=8]

The faulty client trains on flipped labels (every label y becomes (y + 1) % classes) and takes
part in every round. A rule is one argument of `federated_averaging`; any function
`rule(stacked_updates [K, ...], weights [K]) -> update` works too. Runs in about 30 seconds
on 2 CPU cores.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import numpy as np
import optax

import tracefl_jax as tfl


class MLP(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes)(nn.relu(nn.Dense(32)(x)))


def make_arrays(seed: int = 0, n: int = 1400, classes: int = 4):
  rng = np.random.default_rng(seed)
  prototypes = 2.0 * rng.normal(size=(classes, 16)).astype(np.float32)
  y = rng.integers(0, classes, n).astype(np.int32)
  x = prototypes[y] + rng.normal(size=(n, 16)).astype(np.float32)
  return x[:1200], y[:1200], x[1200:], y[1200:]


RULES = {"mean": lambda: None, "median": tfl.median,
         "trimmed_mean": lambda: tfl.trimmed_mean(0.2), "krum": lambda: tfl.krum(1)}


def main(rounds: int = 8, clients: int = 10, per_round: int = 5, faulty: int = 0,
         seed: int = 0, rules: tuple[str, ...] = tuple(RULES)) -> dict:
  x, y, x_test, y_test = make_arrays(seed)
  parts = np.array_split(np.random.default_rng(seed).permutation(len(y)), clients)
  y_train = y.copy()
  # The faulty client's labels are flipped, and it trains as hard as it can.
  y_train[parts[faulty]] = (y[parts[faulty]] + 1) % 4
  data = tfl.federate(x, y_train, parts, num_classes=4)
  model = tfl.make_model(MLP(num_classes=4), input_shape=(16,), num_classes=4)
  variables = model.init(jax.random.key(seed))
  evaluator = tfl.GlobalEvaluator(model, x_test, y_test)

  results = {}
  for name in rules:
    algorithm = tfl.federated_averaging(model, optax.sgd(0.1), batch_size=16, local_epochs=3,
                                        aggregator=RULES[name]())
    kept = {}
    state, history = tfl.run_rounds(
        algorithm, algorithm.init(variables), data, rounds=rounds, clients_per_round=per_round,
        seed=seed, always_sampled=[faulty],
        callbacks=[evaluator, lambda info: kept.update(last=info.output)])
    out = kept["last"]
    wrong = np.flatnonzero(evaluator.predictions(state.variables) != y_test)[:10]
    blamed = []
    if wrong.size:
      trace = tfl.trace_clients(model, out.traced, out.clients.variables, x_test[wrong],
                                client_ids=out.client_ids)
      blamed = np.asarray(trace.traced_client).tolist()
    results[name] = {"accuracy": history[-1]["accuracy"], "blamed": blamed}
    print(f"{name:>12}: final accuracy {history[-1]['accuracy']:.3f}; TraceFL names client "
          f"{faulty} for {blamed.count(faulty)} of {len(blamed)} mispredictions")
  return results


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=8)
  args = parser.parse_args()
  main(args.rounds)
