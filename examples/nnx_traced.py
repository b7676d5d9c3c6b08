"""A Flax NNX model trained with FedAvg, its last round saved, then traced after training in a
fresh process-like setting: load_round(path, model) takes your ModelDef back.

  python examples/nnx_traced.py [--rounds=4] [--workdir=/tmp/nnx_round]

NNX layers are traced like linen's (nnx.Linear, nnx.Conv, nnx.LayerNorm in execution order);
BatchNorm statistics train and average; Dropout draws from the round's keys. Saving needs
orbax-checkpoint. Runs in about 30 seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import numpy as np
import optax
from flax import nnx

import tracefl_jax as tfl


class Net(nnx.Module):
  def __init__(self, num_classes: int, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.head = nnx.Linear(8 * 8 * 8, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    return self.head(self.dropout(x.reshape(x.shape[0], -1)))


def make_arrays(seed: int = 0, n: int = 900, classes: int = 4):
  rng = np.random.default_rng(seed)
  prototypes = rng.normal(size=(classes, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, classes, n).astype(np.int32)
  x = prototypes[y] + rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
  return x[:800], y[:800], x[800:], y[800:]


def main(rounds: int = 4, workdir: str | None = None, seed: int = 0) -> dict:
  workdir = workdir or tempfile.mkdtemp()
  x, y, x_test, y_test = make_arrays(seed)
  model = tfl.make_model(Net(4, nnx.Rngs(seed)), input_shape=(8, 8, 1), num_classes=4)
  print(f"traced layers: {model.traced_layers}; untraced: {model.untraced}")
  data = tfl.federate(x, y, tfl.make_partition(y, "dirichlet", 10, seed=seed, alpha=0.5))
  algorithm = tfl.federated_averaging(model, optax.adam(1e-2), batch_size=16, local_epochs=1)
  evaluator = tfl.GlobalEvaluator(model, x_test, y_test)
  saved = {}

  def save_last(info):
    if info.round == rounds:
      saved["path"] = tfl.save_round(f"{workdir}/round_{info.round}", info.output,
                                     round_idx=info.round, model=model)
      saved["online"] = tfl.trace_clients(model, info.output.traced,
                                          info.output.clients.variables, x_test[:8],
                                          client_ids=info.output.client_ids)

  _, history = tfl.run_rounds(algorithm, algorithm.init(model.init(jax.random.key(seed))), data,
                              rounds=rounds, clients_per_round=4, seed=seed,
                              callbacks=[evaluator, save_last])
  print(f"accuracy after {rounds} rounds: {history[-1]['accuracy']:.3f}; saved to "
        f"{saved['path']}")

  # Later: the same network definition, the saved round, new inputs.
  same_model = tfl.make_model(Net(4, nnx.Rngs(seed)), input_shape=(8, 8, 1), num_classes=4)
  stored = tfl.load_round(saved["path"], same_model)
  result = stored.trace(x_test[:8])
  for n in range(4):
    print(f"  test input {n} (label {y_test[n]}, predicted {result.predicted[n]}) -> client "
          f"{result.traced_client[n]}")
  return {"result": result, "online": saved["online"], "stored": stored, "history": history}


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--workdir", default=None)
  args = parser.parse_args()
  main(args.rounds, args.workdir)
