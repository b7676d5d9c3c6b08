"""A server learning rate tuned by gradient descent through the whole training: 10 rounds of
FedAvg with a server learning rate are one differentiable function of that rate
(`fl.federation`), and `jax.grad` of the final model's validation loss steers it.

  python examples/hypergradient.py [--rounds=10] [--steps=6]

The same function vmaps over seeds and learning rates (the last lines: a sweep of 4 seeds
x 3 rates as one call). Runs in under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import tracefl_jax as tfl
from tracefl_jax.fl.federation import federation


class MLP(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)


def make_arrays(seed: int = 0, n: int = 1200, classes: int = 4):
  """Stand-in for your data: class prototypes plus noise (train, validation)."""
  rng = np.random.default_rng(seed)
  prototypes = rng.normal(size=(classes, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, classes, n).astype(np.int32)
  x = prototypes[y] + 1.5 * rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
  return x[:1000], y[:1000], x[1000:], y[1000:]


def main(rounds: int = 10, steps: int = 6, clients: int = 20, per_round: int = 5,
         seed: int = 0, start_lr: float = 0.2, step_size: float = 2.0) -> dict:
  x, y, x_val, y_val = make_arrays(seed)
  model = tfl.make_model(MLP(num_classes=4), input_shape=(8, 8, 1), num_classes=4)
  data = tfl.federate(x, y, tfl.make_partition(y, "iid", clients, seed=seed))
  variables = model.init(jax.random.key(seed))

  def build(log_lr):  # the hyperparameter enters traced: FedAvg with a server learning rate
    return tfl.federated_averaging(
        model, optax.sgd(0.05), batch_size=16, local_epochs=1, strategy="scan",
        server_optimizer=tfl.server_optimizer("sgd", jnp.exp(log_lr)))

  fed = federation(build, data, rounds=rounds, clients_per_round=per_round, batch_size=16)
  plan, key = fed.plan(seed), jax.random.key(seed)

  def val_loss(log_lr, plan=plan, key=key):
    final = fed.run(variables, log_lr, plan, key, data.x, data.y)[0].variables
    logits = model.apply(final, jnp.asarray(x_val))[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y_val)).mean()

  # Gradient descent on log(server lr): positive, and steps scale with the rate.
  value_and_grad = jax.jit(jax.value_and_grad(val_loss))
  log_lr, lrs, losses = jnp.log(jnp.float32(start_lr)), [], []
  for i in range(steps):
    loss, g = value_and_grad(log_lr)
    lrs.append(float(jnp.exp(log_lr)))
    losses.append(float(loss))
    print(f"step {i}: server lr {lrs[-1]:.3f}  validation loss {losses[-1]:.4f}  "
          f"d loss / d log lr {float(g):+.4f}")
    log_lr = log_lr - step_size * g

  # A sweep is one call too: 4 seeds x 3 server learning rates, vmapped.
  seeds = jnp.arange(4)
  sweep = jax.jit(jax.vmap(jax.vmap(val_loss, in_axes=(None, 0, 0)), in_axes=(0, None, None)))
  grid = sweep(jnp.log(jnp.asarray([0.2, 1.0, 2.0])), fed.plans(seeds.tolist()),
               jax.vmap(jax.random.key)(seeds))
  print("validation loss, server lr 0.2 / 1.0 / 2.0 (mean of 4 seeds):",
        " / ".join(f"{v:.4f}" for v in np.asarray(grid).mean(1)))
  return {"server_lrs": lrs, "val_losses": losses, "sweep": np.asarray(grid)}


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--steps", type=int, default=6)
  args = parser.parse_args()
  main(args.rounds, args.steps)
