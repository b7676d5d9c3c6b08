"""Forward cost of the scanned local loop against the while loop (issue 35, item 1).

Local training loops a client's steps either with a `lax.while_loop` (its own steps, forward
only) or a fixed-trip `lax.scan` over its padded steps under `lax.cond` (`fl/local_loop.py`:
reverse mode crosses it). For each model and K this times, in one process, the two loops on
the same work, repetitions interleaved (while, scan, while, scan, ...) after a warm-up whose
time (compile + first run) is recorded apart, and checks that both give the same numbers:

  scan_strategy  the "scan" client strategy (one client at a time in one program: the "auto"
                 strategy on CPU for convolutional models), clients as `ClientSlots`: each
                 client's scan is capped by all T slots of the round, not its own, so most of
                 its trip is skipped chunks;
  vmap_rows      `jax.vmap` of the single-client function over `[K, M]` rows padded to the
                 federation's bucketed length (what the strategies do for a plain client
                 function): batched, a `cond` computes both branches, so every lane runs the
                 M padded steps where the batched while loop runs the round's longest client;
  vmap_packed    the "vmap" strategy (packed lanes, `fl/packing.py`): its lane loop follows
                 the client's `local_loop`, a while loop or the fixed-trip scan;
  vmap_seeds     `jax.vmap` of the "scan" strategy over 2 seeds' client keys `[2, K]`, counts
                 shared (what `provenance.retraining` does over its federations): the
                 `cond`s' predicates stay unbatched and skip;
  vmap_federations  `jax.vmap` of the "scan" strategy over 2 federations' counts `[2, K]`
                 (`algorithm.py`'s federation axis): batched counts, so each client's scan
                 runs all the round's T slots' steps (a batched `cond` skips nothing).

Client sizes: the paper-shaped partition's (`draw_client_sizes`), adam, batch 32, 2 epochs.

  python benchmarks/bench_local_loop.py --clients=10,50 --repeats=5 \
      --out=benchmarks/results/local_loop_cpu.jsonl
  python benchmarks/bench_local_loop.py --models= --memory=1,2,4 \
      --out=benchmarks/results/local_loop_cpu.jsonl

The recorded rows (2 shared CPU cores, other jobs running: `load`) stop before LeNet's
vmap_federations (minutes; the MLP row shows the cost), and LeNet's scan_strategy at K = 10
was rerun with `--repeats=11` (the last row; its 5-repeat row read 1.13, pairs 1.25).

With `--memory=1,2,4`, rows "reverse_memory": XLA's temporary bytes of the compiled
`jax.grad` of a validation loss through R rounds (FedAvg, the "scan" strategy, MLP), with the
client's training rematerialised (the default) and without (`remat_client` off), beside the
model's bytes and the bytes of one round's local-step states (steps x model).

Row: bench, path, model, K, steps_needed, while_s / scan_s (medians), ratio (scan / while),
pair_ratio (median of per-repetition ratios), while_cpu_s / scan_cpu_s / cpu_ratio (process
CPU seconds, medians: less sensitive to other jobs on the machine), first_call_s of each,
equal (bit for bit), load (1-minute load average), device and versions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import JsonlSink, block, draw_client_sizes  # noqa: E402

from tracefl_jax.data import load_dataset  # noqa: E402
from tracefl_jax.data.federated import federate  # noqa: E402
from tracefl_jax.fl.client import local_steps, make_client_update  # noqa: E402
from tracefl_jax.fl.local_loop import LOCAL_LOOPS  # noqa: E402
from tracefl_jax.fl.strategies import (fold_client_keys, round_lanes,  # noqa: E402
                                       simulate_clients_with_steps)
from tracefl_jax.models import get_model  # noqa: E402

POOL = 16384


def client_partition(sizes, pool):
  """Per client, `sizes[c]` consecutive example indices, wrapping around the pool."""
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  return [np.arange(s, s + n) % pool for s, n in zip(starts, sizes)]


def make_run(path, update, variables, data, clients, batch, keys):
  """A no-argument function running one round's local training by `path`."""
  x, y = data.x, data.y
  if path == "vmap_rows":
    rows = data.round_data(clients, batch)
    idx, counts = jnp.asarray(rows.indices), jnp.asarray(rows.counts)
    fn = jax.jit(jax.vmap(update, in_axes=(None, None, None, 0, 0, 0)))
    return lambda: fn(variables, x, y, idx, counts, keys).variables
  slots = data.round_slots(clients, batch)
  idx, counts = jax.device_put(slots.indices), jnp.asarray(slots.counts)
  strategy = "vmap" if path == "vmap_packed" else "scan"
  lanes = round_lanes(strategy, local_steps(slots.counts, batch, update.local_epochs))

  def local(variables, idx, counts, keys):
    return simulate_clients_with_steps(update, variables, x, y, idx, counts, keys,
                                       strategy=strategy, lanes=lanes)[0].variables
  fn = local
  if path == "vmap_federations":
    fn, counts = jax.vmap(fn, in_axes=(None, None, 0, None)), jnp.stack([counts, counts])
  if path == "vmap_seeds":
    keys = jnp.stack([keys, jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)])
    fn = jax.vmap(fn, in_axes=(None, None, None, 0))
  fn = jax.jit(fn)
  return lambda: fn(variables, idx, counts, keys)


def interleaved(runs, repeats):
  """Per run: the first call's seconds and the steady times, the runs taking turns."""
  first, times = {}, {name: [] for name in runs}
  cpu = {name: [] for name in runs}  # process CPU seconds: less sensitive to others' load
  for name, fn in runs.items():
    t0 = time.perf_counter()
    block(fn())
    first[name] = time.perf_counter() - t0
  for _ in range(repeats):
    for name, fn in runs.items():
      c0, t0 = time.process_time(), time.perf_counter()
      block(fn())
      times[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
  return first, times, cpu


def reverse_memory(rounds_list, model, variables, data, clients, batch, epochs, sink):
  """Temp bytes of jit(grad(R rounds)) with and without the client-level checkpoint."""
  import tracefl_jax.fl.client as client_module  # noqa: PLC0415
  from tracefl_jax.fl.rounds import federated_averaging  # noqa: PLC0415
  slots = data.round_slots(clients, batch)
  counts = jnp.asarray(slots.counts)
  ids = jnp.asarray(clients, jnp.int32)
  xv, yv = data.x[:64], data.y[:64]
  model_bytes = sum(a.nbytes for a in jax.tree.leaves(variables))
  steps = int(local_steps(slots.counts, batch, epochs).sum())
  keep = client_module.remat_client
  for remat in (True, False):
    client_module.remat_client = keep if remat else (lambda fn, loop: fn)
    try:
      algorithm = federated_averaging(model, optax.sgd(0.05), batch_size=batch,
                                      local_epochs=epochs, strategy="scan")
      for rounds in rounds_list:
        def f(v, rounds=rounds, algorithm=algorithm):
          for r in range(rounds):
            v = algorithm.program(v, data.x, data.y, slots.indices, counts, ids,
                                  jax.random.key(r), counts.astype(jnp.float32))[0]
          return optax.softmax_cross_entropy_with_integer_labels(model.apply(v, xv)[0],
                                                                 yv).mean()
        t0 = time.perf_counter()
        analysis = jax.jit(jax.grad(f)).lower(variables).compile().memory_analysis()
        sink.write({"bench": "local_loop", "path": "reverse_memory", "model": "mlp",
                    "K": len(clients), "rounds": rounds, "client_remat": remat,
                    "temp_bytes": analysis.temp_size_in_bytes, "model_bytes": model_bytes,
                    "steps_per_round": steps, "round_states_bytes": steps * model_bytes,
                    "compile_s": time.perf_counter() - t0, "load": os.getloadavg()[0]})
    finally:
      client_module.remat_client = keep


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="mlp,lenet")
  p.add_argument("--paths",
                 default="scan_strategy,vmap_seeds,vmap_packed,vmap_rows,vmap_federations")
  p.add_argument("--clients", default="10,50")
  p.add_argument("--vmap_clients", default="10", help="K values of the vmapped paths")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--memory", default="", help="R values of the reverse_memory rows")
  p.add_argument("--out", default="")
  args = p.parse_args()
  sink = JsonlSink(args.out)
  ds = load_dataset("synthetic", num_train=POOL, num_test=10, image_shape=(28, 28, 1),
                    num_classes=10, seed=0)
  x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  if args.memory:
    model = get_model("mlp", ds.input_shape, ds.num_classes)
    k = int(args.vmap_clients.split(",")[0])
    sizes = draw_client_sizes(k)
    reverse_memory([int(r) for r in args.memory.split(",")], model,
                   model.init(jax.random.key(0)), federate(x, y, client_partition(sizes, POOL)),
                   np.arange(k), args.batch, args.epochs, sink)
    if not args.models:
      return
  for name in args.models.split(","):
    model = get_model(name, ds.input_shape, ds.num_classes)
    variables = model.init(jax.random.key(0))
    updates = {loop: make_client_update(model, optax.adam(1e-3), args.batch, args.epochs,
                                        local_loop=loop) for loop in LOCAL_LOOPS}
    for path in args.paths.split(","):
      ks = args.clients if path == "scan_strategy" else args.vmap_clients
      steps_factor = 2 if path in ("vmap_federations", "vmap_seeds") else 1
      for k in (int(v) for v in ks.split(",")):
        sizes = draw_client_sizes(k)
        data = federate(x, y, client_partition(sizes, POOL))
        clients = np.arange(k)
        keys = fold_client_keys(jax.random.key(1), jnp.asarray(clients))
        runs = {loop: make_run(path, updates[loop], variables, data, clients, args.batch,
                               keys) for loop in ("while", "scan")}
        first, times, cpu = interleaved(runs, args.repeats)
        outs = {loop: jax.tree.leaves(fn()) for loop, fn in runs.items()}
        equal = all(np.array_equal(a, b) for a, b in zip(outs["while"], outs["scan"]))
        med = {loop: statistics.median(t) for loop, t in times.items()}
        pairs = [s / w for w, s in zip(times["while"], times["scan"])]
        sink.write({"bench": "local_loop", "path": path, "model": name, "K": k,
                    "batch_size": args.batch, "local_epochs": args.epochs,
                    "steps_needed": steps_factor * int(local_steps(sizes, args.batch,
                                                                   args.epochs).sum()),
                    "while_s": med["while"], "scan_s": med["scan"],
                    "ratio": med["scan"] / med["while"],
                    "pair_ratio": statistics.median(pairs),
                    "while_cpu_s": statistics.median(cpu["while"]),
                    "scan_cpu_s": statistics.median(cpu["scan"]),
                    "cpu_ratio": statistics.median(cpu["scan"]) / statistics.median(cpu["while"]),
                    "while_first_call_s": first["while"], "scan_first_call_s": first["scan"],
                    "repeats": args.repeats, "equal": equal, "load": os.getloadavg()[0]})


if __name__ == "__main__":
  main()
