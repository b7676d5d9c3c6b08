"""FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021) in one line: FedAvg's
aggregate becomes a pseudo-gradient for an optax optimizer on the server, whose state lives in
`ServerState` and is saved and restored with it.

  python examples/fedadam.py [--rounds=10] [--clients=20] [--per_round=5]

FedAvgM, FedYogi and FedAdagrad are the same line with optax.sgd(lr, momentum=0.9),
optax.yogi(...) or optax.adagrad(...). Runs in about 20 seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import flax.linen as nn
import flax.serialization
import jax
import numpy as np
import optax

import tracefl_jax as tfl


class MLP(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)


def make_arrays(seed: int = 0, n: int = 1200, classes: int = 4):
  """Stand-in for your data: class prototypes plus noise, as plain NumPy arrays."""
  rng = np.random.default_rng(seed)
  prototypes = rng.normal(size=(classes, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, classes, n).astype(np.int32)
  x = prototypes[y] + 1.5 * rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
  return x[:1000], y[:1000], x[1000:], y[1000:]


def main(rounds: int = 10, clients: int = 20, per_round: int = 5, seed: int = 0) -> dict:
  x, y, x_test, y_test = make_arrays(seed)
  model = tfl.make_model(MLP(num_classes=4), input_shape=(8, 8, 1), num_classes=4)
  data = tfl.federate(x, y, tfl.make_partition(y, "dirichlet", clients, seed=seed, alpha=0.5))
  evaluator = tfl.GlobalEvaluator(model, x_test, y_test)
  variables = model.init(jax.random.key(seed))
  run = dict(data=data, clients_per_round=per_round, seed=seed, callbacks=[evaluator])

  histories, final = {}, {}
  for name, server in (("FedAvg", None),
                       ("FedAdam", optax.adam(0.01, b1=0.9, b2=0.99, eps=1e-3))):
    algorithm = tfl.federated_averaging(model, optax.sgd(0.05), batch_size=16, local_epochs=1,
                                        server_optimizer=server)
    final[name], histories[name] = tfl.run_rounds(algorithm, algorithm.init(variables),
                                                  rounds=rounds, **run)
    accuracies = ", ".join(f"{row['accuracy']:.2f}" for row in histories[name])
    print(f"{name}: accuracy per round {accuracies}")

  # The server optimizer's state is part of ServerState: save it halfway, restore, continue.
  half, _ = tfl.run_rounds(algorithm, algorithm.init(variables), rounds=rounds // 2, **run)
  path = Path(tempfile.mkdtemp()) / "state.msgpack"
  path.write_bytes(flax.serialization.to_bytes(half))
  restored = flax.serialization.from_bytes(algorithm.init(variables), path.read_bytes())
  resumed, _ = tfl.run_rounds(algorithm, restored, rounds=rounds, **run)
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(resumed),
                                                  jax.tree.leaves(final["FedAdam"])))
  print(f"resumed from round {rounds // 2} equals the uninterrupted run: {same}")
  return {"histories": histories, "resumed_equal": same}


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--clients", type=int, default=20)
  parser.add_argument("--per_round", type=int, default=5)
  args = parser.parse_args()
  main(args.rounds, args.clients, args.per_round)
