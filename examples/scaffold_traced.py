"""SCAFFOLD (Karimireddy et al., ICML 2020) end to end, then its last round traced: the
per-client control variates live in the algorithm's client-state table (never in the client
models), and provenance explains the global model as for FedAvg, with the exact
leave-one-client-out truth re-running the round's own server step.

  python examples/scaffold_traced.py [--rounds=10]

Prints FedAvg's and SCAFFOLD's test accuracy on strongly non-IID data, then for SCAFFOLD's
last round how often TraceFL's top client and the first-order score's top client are the
client whose removal lowers the predicted logit most. Runs in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import numpy as np
import optax

import tracefl_jax as tfl
from tracefl_jax.provenance.counterfactual import leave_one_out


class MLP(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes)(nn.relu(nn.Dense(32)(x)))


def main(rounds: int = 10, clients: int = 10, per_round: int = 5, inputs: int = 50,
         seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  prototypes = 0.6 * rng.normal(size=(5, 16)).astype(np.float32)
  y = rng.integers(0, 5, 1200).astype(np.int32)
  x = (prototypes[y] + rng.normal(size=(1200, 16))).astype(np.float32)
  x_test, y_test = x[1000:], y[1000:]
  data = tfl.federate(x[:1000], y[:1000], tfl.make_partition(
      y[:1000], "dirichlet", clients, seed=seed, alpha=0.1))  # mostly two labels a client
  model = tfl.make_model(MLP(num_classes=5), input_shape=(16,), num_classes=5)
  variables = model.init(jax.random.key(seed))

  algorithms = {
      "FedAvg": tfl.federated_averaging(model, optax.sgd(0.05), batch_size=16, local_epochs=3),
      "SCAFFOLD": tfl.scaffold(model, 0.05, batch_size=16, local_epochs=3)}
  results, last = {}, {}
  for name, alg in algorithms.items():
    state = alg.init(variables, num_clients=data.num_clients)
    state, _ = tfl.run_rounds(alg, state, data, rounds=rounds, clients_per_round=per_round,
                              seed=seed, callbacks=[lambda info: last.update(out=info.output)])
    pred = np.asarray(model.logits(state.variables, x_test)).argmax(-1)
    results[name] = float(np.mean(pred == y_test))
    print(f"{name:>9}: test accuracy {results[name]:.3f}")

  # SCAFFOLD's last round: trace the first `inputs` correctly predicted test inputs.
  out = last["out"]
  pred = np.asarray(model.logits(out.variables, x_test)).argmax(-1)
  idx = np.flatnonzero(pred == y_test)[:inputs]
  xs = x_test[idx]
  truth = leave_one_out(model, out.clients.variables, out.weights, xs,
                        reaggregate=out.reaggregate).drops          # [N, K], SCAFFOLD's own
  tracefl = tfl.trace_clients(model, out.variables, out.clients.variables, xs)
  first = tfl.trace_clients(model, out.variables, out.clients.variables, xs,
                            score="first_order", weights=out.weights,
                            reaggregate=out.reaggregate)
  top = np.asarray(truth).argmax(1)
  for name, traced in (("TraceFL", tracefl), ("first-order", first)):
    agree = float(np.mean(np.asarray(traced.scores).argmax(1) == top))
    results[f"{name} = leave-one-out"] = agree
    print(f"{name:>12}: top client = the leave-one-out client for {agree:.0%} of "
          f"{len(idx)} inputs")
  return results


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=10)
  args = parser.parse_args()
  main(args.rounds)
