"""Your own Flax model and your own arrays: simulate FedAvg, then ask which client is
responsible for each prediction. No config, no registry, no files.

  python examples/own_model.py [--rounds=5] [--clients=20] [--per_round=5]

Runs in about half a minute on 2 CPU cores; a test runs it at a smaller size.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import numpy as np
import optax

import tracefl_jax as tfl


class SmallCNN(nn.Module):
  """A plain Flax classifier: standard BatchNorm and dropout, nothing project-specific."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(16, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


def make_arrays(seed: int = 0, n: int = 1200, classes: int = 4):
  """Stand-in for your data: class prototypes plus noise, as plain NumPy arrays."""
  rng = np.random.default_rng(seed)
  prototypes = rng.normal(size=(classes, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, classes, n).astype(np.int32)
  x = prototypes[y] + rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
  return x[:1000], y[:1000], x[1000:], y[1000:]


def main(rounds: int = 5, clients: int = 20, per_round: int = 5, seed: int = 0) -> dict:
  x, y, x_test, y_test = make_arrays(seed)
  model = tfl.make_model("small_cnn", SmallCNN(num_classes=4), input_shape=(8, 8, 1),
                         num_classes=4)

  # Label-skewed clients (flwr-datasets' Dirichlet semantics), then the federation's data.
  partition = tfl.make_partition(y, "dirichlet", clients, seed=seed, alpha=0.3)
  data = tfl.federate(x, y, partition)

  algorithm = tfl.federated_averaging(model, optax.adam(1e-3), batch_size=32, local_epochs=2)
  state = algorithm.init(model.init(jax.random.key(seed)))

  # Per-round work is a callback: global accuracy, then TraceFL on the paper's protocol.
  evaluator = tfl.GlobalEvaluator(model, x_test, y_test)
  provenance = tfl.provenance_callback(model, evaluator, tfl.ProtocolSettings())
  kept = {}
  keep_last = lambda info: kept.update(last=info.output)  # noqa: E731
  state, history = tfl.run_rounds(algorithm, state, data, rounds=rounds,
                                  clients_per_round=per_round, seed=seed,
                                  callbacks=[evaluator, provenance, keep_last])
  for row in history:
    prov = row["provenance"]
    print(f"round {row['round']}: global accuracy {row['accuracy']:.3f}, TraceFL "
          f"localization {prov.get('accuracy', float('nan')):.3f} on {prov['inputs']} inputs "
          f"(random participant {prov.get('random_baseline', float('nan')):.3f})")

  # Any input, any time: which of the last round's clients is responsible for G's prediction?
  out = kept["last"]
  result = tfl.trace_clients(model, out.traced, out.clients.variables, x_test[:5],
                             client_ids=out.client_ids)
  print(f"last round's participants: {out.client_ids.tolist()}")
  for n in range(5):
    holds = data.label_counts[result.traced_client[n], y_test[n]]
    print(f"  test input {n} (label {y_test[n]}, predicted {result.predicted[n]}) -> client "
          f"{result.traced_client[n]} (p = {result.probs[n].max():.2f}; it holds {holds} "
          f"examples of label {y_test[n]})")
  return {"history": history, "state": state, "result": result, "last": out}


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--clients", type=int, default=20)
  parser.add_argument("--per_round", type=int, default=5)
  args = parser.parse_args()
  main(args.rounds, args.clients, args.per_round)
