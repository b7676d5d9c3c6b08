"""Data off the device (issue 36 item 2): seconds per round with the training set on the
device against the same set on the host, gathered per round.

One row: C clients of `--examples` each (MLP on 64 features, SGD, batch 32, one epoch, FedAvg,
strategy auto), K per round, `run_rounds` over `--rounds` rounds from a fresh state, each
variant's median over interleaved repetitions after a warm-up run (its compile timed apart):

  device            federate(..., placement="device"): the whole set on the device
  host              placement="host": each round's x[flat], y[flat] gathered on the host and
                    put on the device, round t+1's prefetched while round t runs
  host_no_prefetch  the same rounds through `algorithm.round` in a plain loop: every gather
                    on the round's path (what the prefetch hides)
  memmap            placement "host" over an np.memmap of the same array in a temporary file
                    (in the page cache after the warm-up: this measures the gather, not a disk)

`gather_s` is one round's gather + transfer alone. The variants' final models are checked to
be equal bit for bit.

  python benchmarks/bench_placement.py --out=benchmarks/results/placement_cpu.jsonl
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import JsonlSink, block  # noqa: E402
from tracefl_jax.data.federated import federate  # noqa: E402
from tracefl_jax.fl.rounds import (federated_averaging, round_key, run_rounds,  # noqa: E402
                                   sample_clients)
from tracefl_jax.models import get_model  # noqa: E402

FEATURES, CLASSES = 64, 10


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--clients", type=int, default=10_000)
  p.add_argument("--k", type=int, default=1_000)
  p.add_argument("--examples", type=int, default=32, help="examples per client")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--rounds", type=int, default=3, help="rounds per repetition")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="")
  args = p.parse_args()
  n = args.clients * args.examples
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, FEATURES)).astype(np.float32)
  y = rng.integers(0, CLASSES, n).astype(np.int32)
  parts = np.split(rng.permutation(n), args.clients)
  tmp = tempfile.mkdtemp(prefix="bench-placement-")
  mm = np.memmap(os.path.join(tmp, "x.f32"), np.float32, "w+", shape=x.shape)
  mm[:] = x
  mm.flush()
  mm = np.memmap(os.path.join(tmp, "x.f32"), np.float32, "r", shape=x.shape)
  model = get_model("mlp", (FEATURES,), CLASSES)
  variables = model.init(jax.random.key(0))
  algorithm = federated_averaging(model, optax.sgd(0.05), batch_size=args.batch,
                                  local_epochs=1, strategy="auto")
  datas = {"device": federate(x, y, parts, placement="device"),
           "host": federate(x, y, parts, placement="host"),
           "memmap": federate(mm, y, parts, placement="host")}
  datas["host_no_prefetch"] = datas["host"]

  def run(name):
    data = datas[name]
    if name != "host_no_prefetch":
      return run_rounds(algorithm, algorithm.init(variables), data, rounds=args.rounds,
                        clients_per_round=args.k, seed=0)[0].variables
    state = algorithm.init(variables)
    for r in range(1, args.rounds + 1):
      clients = sample_clients(0, r, data.num_clients, args.k)
      state, out = algorithm.round(state, clients=clients, data=data,
                                   key=round_key(jax.random.key(0), r))
      np.asarray(out.clients.loss)  # run_rounds reads the losses each round too
    return state.variables

  first, finals = {}, {}
  for name in datas:  # warm-up: compiles (each placement its own x shape)
    t0 = time.perf_counter()
    finals[name] = block(run(name))
    first[name] = time.perf_counter() - t0
  for name in datas:
    for a, b in zip(jax.tree.leaves(finals["device"]), jax.tree.leaves(finals[name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  times = {name: [] for name in datas}
  for _ in range(args.repeats):
    for name in datas:
      t0 = time.perf_counter()
      block(run(name))
      times[name].append((time.perf_counter() - t0) / args.rounds)
  slots = datas["host"].round_slots(sample_clients(0, 1, args.clients, args.k), args.batch)
  feed = datas["host"]._feed  # pylint: disable=protected-access
  gathers = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    feed._gather(np.asarray(slots.indices.flat))  # pylint: disable=protected-access
    gathers.append(time.perf_counter() - t0)
  per_round = {name: statistics.median(t) for name, t in times.items()}
  row = {"bench": "placement", "clients": args.clients, "k": args.k,
         "examples": args.examples, "batch": args.batch, "rounds": args.rounds,
         "train_bytes": int(x.nbytes), "round_slots": int(len(slots.indices.flat)),
         "seconds_per_round": per_round, "first_call_s": first,
         "gather_s": statistics.median(gathers),
         "host_over_device": per_round["host"] / per_round["device"],
         "equal_models": True, "load": os.getloadavg()[0]}
  print(" ".join(f"{k} {v:.3f} s/round" for k, v in per_round.items())
        + f"; gather {row['gather_s'] * 1e3:.1f} ms; host/device "
          f"{row['host_over_device']:.2f}")
  JsonlSink(args.out or None).write(row)
  del mm
  for f in Path(tmp).iterdir():
    f.unlink()
  os.rmdir(tmp)


if __name__ == "__main__":
  main()
