"""Client updates per second of one federated round, per client-axis strategy.

For K clients per round this times the jitted round (local training of every client + FedAvg)
for each strategy, with compile time apart from the steady state, and the limit to compare
against: the same examples trained as ONE big batch stream through ONE model (batches of
K x batch, as many steps as that takes: the FLOPs of the steps the clients need, no
per-client weights).

Client sizes (`--sizes`):
  equal      every client holds `--samples` examples;
  dirichlet  sizes drawn from the paper-shaped partition (MNIST-sized labels: 60,000 over 10
             classes, Dirichlet 0.3, 100 clients, `fixup_partition` defaults): K of its
             clients without replacement for K <= its client count, with replacement above.
             Uneven sizes are where padding used to cost (see `step_ratio`).

  python benchmarks/bench_round.py --out=benchmarks/results/round_cpu.jsonl
  python benchmarks/bench_round.py --sizes=dirichlet --clients=10,100,1000 --strategies=vmap,scan

Each row: bench, model, image side and channels, sizes, K, examples (total), mean/max client
size, strategy, lanes (packed strategies), compile_s, steady_s, client_updates_per_s,
samples_per_s (examples trained per second, epochs included), steps_needed / steps_executed /
step_ratio (optimizer steps computed over those the clients need; 1.0 means none spent on
padding), limit_fraction (samples_per_s over the big-batch limit's), standalone_step_ms (the
same optimizer step, model, batch and optimizer, jitted alone on a fixed batch),
in_round_step_ms (steady_s / steps_executed: the round's cost per step, client setup and
FedAvg included) and step_cost_ratio (their ratio; issue 12's target: at most 1.3),
temp_bytes (XLA's working memory of the compiled round; None for the host loop), peak_bytes
(device peak where reported: GPU), device and versions.
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
from common import JsonlSink, draw_client_sizes, memory, time_fn  # noqa: E402

from tracefl_jax.fl import aggregation  # noqa: E402
from tracefl_jax.fl.client import local_steps, make_client_update  # noqa: E402
from tracefl_jax.data import load_dataset  # noqa: E402
from tracefl_jax.data.federated import federate  # noqa: E402
from tracefl_jax.fl.strategies import round_lanes  # noqa: E402
from tracefl_jax.models import get_model  # noqa: E402
from tracefl_jax.fl.rounds import federated_averaging, round_key  # noqa: E402

# Clients index a pool of at most this many synthetic examples (wrapping around), so that
# K = 1000 paper-sized clients (~560 examples each) need no 0.5 M-image training set.
POOL = 65536


def big_batch_limit(model, optimizer, variables, x, y, k, sizes, batch_size, epochs):
  """The K clients' examples through ONE model in batches of K * batch_size: as many examples
  as the clients' own steps hold (each client's count rounded up to whole batches), so the
  same FLOPs as the round's needed steps, without per-client weights."""
  update = jax.jit(make_client_update(model, optimizer, k * batch_size, epochs))
  total = int(local_steps(np.asarray(sizes), batch_size, 1).sum()) * batch_size
  length = -(-total // (k * batch_size)) * k * batch_size
  idx = jnp.arange(length, dtype=jnp.int32) % x.shape[0]
  count = jnp.int32(total)
  return lambda: update(variables, x, y, idx, count, jax.random.key(0))


def standalone_step(model, optimizer, variables, x, y, batch_size, steps=20):
  """The round's optimizer step (same model, batch size, optimizer) jitted alone on a fixed
  batch: `steps` calls, each state fed to the next, as `time_fn` times them."""
  cu = make_client_update(model, optimizer, batch_size, 1)
  step = jax.jit(cu.train_step)
  xb, yb = x[:batch_size], y[:batch_size]
  mask, rng = jnp.ones(batch_size, bool), jax.random.key(0)
  start = cu.init(variables)

  def run():
    state = start
    for _ in range(steps):
      state = step(state, xb, yb, mask, rng)
    return state.params
  return run


def client_partition(sizes, pool):
  """Per client, `sizes[c]` consecutive example indices, wrapping around the pool."""
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  return [np.arange(s, s + n) % pool for s, n in zip(starts, sizes)]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="lenet")
  p.add_argument("--image", type=int, default=28, help="square image side")
  p.add_argument("--channels", type=int, default=1, help="image channels")
  p.add_argument("--clients", default="10,100,1000", help="K values")
  p.add_argument("--sizes", default="equal", choices=("equal", "dirichlet"),
                 help="client sizes: --samples each, or the paper-shaped partition's")
  p.add_argument("--samples", type=int, default=64, help="examples per client (equal sizes)")
  p.add_argument("--seed", type=int, default=0, help="partition and draw seed (dirichlet)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--strategies", default="vmap,chunked,scan,loop")
  p.add_argument("--chunk", type=int, default=100, help="clients_per_chunk for chunked")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default="")
  args = p.parse_args()

  sink = JsonlSink(args.out)
  ks = [int(k) for k in args.clients.split(",")]
  all_sizes = {k: (np.full(k, args.samples, np.int64) if args.sizes == "equal"
                   else draw_client_sizes(k, args.seed)) for k in ks}
  pool = min(POOL, max(int(s.sum()) for s in all_sizes.values()))
  ds = load_dataset("synthetic", num_train=pool, num_test=10,
                    image_shape=(args.image, args.image, args.channels), num_classes=10,
                    seed=0)
  x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  model = get_model(args.model, ds.input_shape, ds.num_classes)
  variables = model.init(jax.random.key(0))
  optimizer = optax.adam(1e-3)
  base = {"bench": "round", "model": args.model, "image": args.image,
          "channels": args.channels, "sizes": args.sizes, "batch_size": args.batch,
          "local_epochs": args.epochs}
  step_alone = standalone_step(model, optimizer, variables, x, y, args.batch)

  for k in ks:
    sizes = all_sizes[k]
    examples = int(sizes.sum())
    data = federate(x, y, client_partition(sizes, pool))
    clients = np.arange(k)
    round_data = data.round_data(clients, args.batch)
    weights = aggregation.client_weights(round_data.counts)
    steps = local_steps(sizes, args.batch, args.epochs)
    size_info = {"K": k, "examples": examples, "mean_client_size": float(sizes.mean()),
                 "max_client_size": int(sizes.max()),
                 "samples_per_client": args.samples if args.sizes == "equal" else None,
                 "steps_needed": int(steps.sum())}
    t = time_fn(big_batch_limit(model, optimizer, variables, x, y, k, sizes, args.batch,
                                args.epochs), args.repeats)
    limit_rate = examples * args.epochs / t["steady_s"]
    sink.write({**base, **size_info, "strategy": "big_batch_limit", **t,
                "client_updates_per_s": k / t["steady_s"], "samples_per_s": limit_rate,
                "steps_executed": None, "step_ratio": None, "limit_fraction": 1.0})
    for strategy in args.strategies.split(","):
      if strategy == "chunked" and args.chunk >= k:
        continue
      # Timed next to each round, so that both see the same load on a shared machine.
      alone = time_fn(step_alone, args.repeats)["steady_s"] / 20
      algorithm = federated_averaging(model, optimizer, batch_size=args.batch,
                                      local_epochs=args.epochs, strategy=strategy,
                                      clients_per_chunk=args.chunk)
      state = algorithm.init(variables)
      last = {}

      def fn(algorithm=algorithm, state=state, last=last):
        _, last["out"] = algorithm.round(state, clients=clients, data=data,
                                         key=round_key(jax.random.key(0), 1))
        return last["out"].variables

      t = time_fn(fn, args.repeats)
      executed = int(last["out"].steps_executed)
      lanes = round_lanes(algorithm.strategy, steps, args.chunk, jax.device_count())
      jitted_args = (variables, data.x, data.y, jnp.asarray(round_data.indices),
                     jnp.asarray(round_data.counts), jnp.asarray(clients),
                     round_key(jax.random.key(0), 1), jnp.asarray(weights, jnp.float32))
      mem = memory(algorithm.program, *jitted_args, lanes=lanes)
      rate = examples * args.epochs / t["steady_s"]
      in_round = t["steady_s"] / max(executed, 1)
      sink.write({**base, **size_info, "strategy": strategy, "lanes": lanes, **mem,
                  "standalone_step_ms": alone * 1e3, "in_round_step_ms": in_round * 1e3,
                  "step_cost_ratio": in_round / alone,
                  "clients_per_chunk": args.chunk if strategy == "chunked" else None, **t,
                  "client_updates_per_s": k / t["steady_s"], "samples_per_s": rate,
                  "steps_executed": executed, "step_ratio": executed / max(int(steps.sum()), 1),
                  "limit_fraction": rate / limit_rate})
      print(f"K={k} {args.sizes} {strategy}: step alone {alone * 1e3:.2f} ms, in the round "
            f"{in_round * 1e3:.2f} ms ({in_round / alone:.2f}x); {rate:,.0f} examples/s = "
            f"{rate / limit_rate:.2f} of the big-batch limit", flush=True)


if __name__ == "__main__":
  main()
