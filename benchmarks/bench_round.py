"""Client updates per second of one federated round, per client-axis strategy.

For K clients per round (each with `--samples` synthetic examples) this times the jitted round
(local training of every client + FedAvg) for each strategy, with compile time apart from the
steady state, and the limit the issue asks to compare against: the same total samples trained
as ONE big batch stream through ONE model (same FLOPs, no per-client weights).

  python benchmarks/bench_round.py --out=benchmarks/results/round_cpu.jsonl
  python benchmarks/bench_round.py --clients=10,100,1000 --strategies=vmap,loop,chunked

Each row: bench, model, K, samples_per_client, strategy, compile_s, steady_s,
client_updates_per_s, samples_per_s, temp_bytes (XLA's working memory of the compiled round;
None for the host loop), peak_bytes (device peak where reported: GPU), device and versions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import JsonlSink, memory, time_fn  # noqa: E402

from tracefl_jax.fl import aggregation  # noqa: E402
from tracefl_jax.fl.client import make_client_update  # noqa: E402
from tracefl_jax.data import load_dataset  # noqa: E402
from tracefl_jax.data.federated import federate  # noqa: E402
from tracefl_jax.models import get_model  # noqa: E402
from tracefl_jax.fl.rounds import federated_averaging, round_key  # noqa: E402


def big_batch_limit(model, optimizer, variables, x, y, k, samples, batch_size, epochs):
  """The K clients' samples through ONE model: each step one batch of K * batch_size, as
  many steps as one client takes (same FLOPs as the round, no per-client weights)."""
  update = jax.jit(make_client_update(model, optimizer, k * batch_size, epochs))
  total = k * (-(-samples // batch_size) * batch_size)
  idx = jnp.arange(total, dtype=jnp.int32) % x.shape[0]
  count = jnp.int32(total)
  return lambda: update(variables, x, y, idx, count, jax.random.key(0))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="lenet")
  p.add_argument("--image", type=int, default=28, help="square image side")
  p.add_argument("--clients", default="10,100,1000", help="K values")
  p.add_argument("--samples", type=int, default=64, help="examples per client")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--strategies", default="vmap,chunked,scan,loop")
  p.add_argument("--chunk", type=int, default=100, help="clients_per_chunk for chunked")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default="")
  args = p.parse_args()

  sink = JsonlSink(args.out)
  ks = [int(k) for k in args.clients.split(",")]
  ds = load_dataset("synthetic", num_train=max(ks) * args.samples, num_test=10,
                    image_shape=(args.image, args.image, 1), num_classes=10, seed=0)
  x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  model = get_model(args.model, ds.input_shape, ds.num_classes)
  variables = model.init(jax.random.key(0))
  optimizer = optax.adam(1e-3)
  base = {"bench": "round", "model": args.model, "image": args.image,
          "samples_per_client": args.samples, "batch_size": args.batch,
          "local_epochs": args.epochs}

  for k in ks:
    parts = np.split(np.arange(k * args.samples), k)
    clients = np.arange(k)
    data = federate(x[: k * args.samples], y[: k * args.samples], parts)
    round_data = data.round_data(clients, args.batch)
    weights = aggregation.client_weights(round_data.counts)
    for strategy in args.strategies.split(","):
      if strategy == "chunked" and args.chunk >= k:
        continue
      algorithm = federated_averaging(model, optimizer, batch_size=args.batch,
                                      local_epochs=args.epochs, strategy=strategy,
                                      clients_per_chunk=args.chunk)
      state = algorithm.init(variables)
      fn = lambda: algorithm.round(state, clients=clients, data=data,  # noqa: E731
                                   key=round_key(jax.random.key(0), 1))[0].variables
      t = time_fn(fn, args.repeats)
      jitted_args = (variables, data.x, data.y, jnp.asarray(round_data.indices),
                     jnp.asarray(round_data.counts), jnp.asarray(clients),
                     round_key(jax.random.key(0), 1), jnp.asarray(weights, jnp.float32))
      mem = memory(algorithm.program, *jitted_args)
      sink.write({**base, "K": k, "strategy": strategy, **mem,
                  "clients_per_chunk": args.chunk if strategy == "chunked" else None, **t,
                  "client_updates_per_s": k / t["steady_s"],
                  "samples_per_s": k * args.samples * args.epochs / t["steady_s"]})
    t = time_fn(big_batch_limit(model, optimizer, variables, x, y, k, args.samples,
                                args.batch, args.epochs), args.repeats)
    sink.write({**base, "K": k, "strategy": "big_batch_limit", **t,
                "client_updates_per_s": k / t["steady_s"],
                "samples_per_s": k * args.samples * args.epochs / t["steady_s"]})


if __name__ == "__main__":
  main()
