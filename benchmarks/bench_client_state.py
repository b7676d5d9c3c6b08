"""SCAFFOLD's control-variate table on the device against the same table on the host (issue 34:
a 10,000-client population with per-client state).

One row per K: C clients of `--examples` synthetic examples each (MLP on 64 features, 17,226
params, SCAFFOLD at lr 0.05, batch 8, one epoch, strategy auto), K per round, each variant
`--rounds` rounds through `algorithm.round` from a fresh state, the variants interleaved over
`--repeats` repetitions after a warm-up run (its compile timed apart):

  device  init(..., placement="device"): the `[C, P]` table an argument and a result of the
          round program (gathered, averaged for c and scattered inside it)
  host    placement="host": the table in host NumPy; the program takes and returns the round's
          `[K, P]` rows and c, the host gathers and scatters them

Memory: the round program's argument, output and temporary bytes as XLA compiled it
(`memory_analysis()`), which show the `[C, P]` table leaving the program; and each variant's
peak RSS in a fresh process of its own (`--only`: init + the rounds; on CPU the "device" is host
memory too, so RSS counts both). The variants' final models are checked equal within float32
rounding (host c is a running mean, device c the mean each round).

  python benchmarks/bench_client_state.py --out=benchmarks/results/client_state_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import JsonlSink, block  # noqa: E402
import tracefl_jax as tfl  # noqa: E402
from tracefl_jax.data.federated import federate  # noqa: E402
from tracefl_jax.fl import algorithm as algorithm_module  # noqa: E402
from tracefl_jax.fl.rounds import round_key, sample_clients  # noqa: E402
from tracefl_jax.models import get_model  # noqa: E402

FEATURES, CLASSES, VARIANTS = 64, 10, ("device", "host")


def _rss_mb() -> float:
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _setup(args):
  n = args.clients * args.examples
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, FEATURES)).astype(np.float32)
  y = rng.integers(0, CLASSES, n).astype(np.int32)
  data = federate(x, y, np.split(rng.permutation(n), args.clients), placement="device")
  model = get_model("mlp", (FEATURES,), CLASSES)
  captured = {}
  real = algorithm_module.make_round_program

  def capturing(*a, **k):  # keeps the jitted program and its last call's arguments
    program = real(*a, **k)

    def call(*pa, **pk):
      captured.update(program=program, args=pa, kwargs=pk)
      return program(*pa, **pk)
    return call
  algorithm_module.make_round_program = capturing
  alg = tfl.scaffold(model, 0.05, batch_size=args.batch, local_epochs=1)
  algorithm_module.make_round_program = real
  return data, model.init(jax.random.key(0)), alg, captured


def _run(alg, variables, data, placement, k, rounds):
  state = alg.init(variables, num_clients=data.num_clients, placement=placement)
  for r in range(1, rounds + 1):
    clients = sample_clients(0, r, data.num_clients, k)
    state, out = alg.round(state, clients, data, round_key(jax.random.key(0), r))
    np.asarray(out.clients.loss)  # run_rounds reads the losses each round too
  return block(state)


def _only(args) -> None:
  """One variant in this fresh process: its peak RSS, printed as JSON."""
  data, variables, alg, _ = _setup(args)
  base = _rss_mb()
  _run(alg, variables, data, args.only, args.k, args.rounds)
  # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent
  # across fork and exec, so the child would report the parent's peak.
  with open("/proc/self/status", encoding="ascii") as f:
    peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
  print(json.dumps({"rss_before_init_mb": base, "peak_rss_mb": peak}))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--clients", type=int, default=10_000)
  p.add_argument("--ks", default="100,1000")
  p.add_argument("--k", type=int, default=0, help="(with --only)")
  p.add_argument("--examples", type=int, default=8, help="examples per client")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--rounds", type=int, default=3, help="rounds per repetition")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--only", choices=VARIANTS, default="")
  p.add_argument("--out", default="")
  args = p.parse_args()
  if args.only:
    return _only(args)
  data, variables, alg, captured = _setup(args)
  params = sum(np.size(a) for a in jax.tree.leaves(variables["params"]))
  sink = JsonlSink(args.out or None)
  for k in (int(s) for s in args.ks.split(",")):
    first, finals, xla = {}, {}, {}
    for name in VARIANTS:  # warm-up: compiles
      t0 = time.perf_counter()
      finals[name] = _run(alg, variables, data, name, k, args.rounds)
      first[name] = time.perf_counter() - t0
      m = captured["program"].lower(*captured["args"], **captured["kwargs"]).compile()
      m = m.memory_analysis()
      xla[name] = {f: getattr(m, f"{f}_size_in_bytes", None)
                   for f in ("argument", "output", "temp")}
    for a, b in zip(jax.tree.leaves(finals["device"].variables),
                    jax.tree.leaves(finals["host"].variables)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    times = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
      for name in VARIANTS:
        t0 = time.perf_counter()
        _run(alg, variables, data, name, k, args.rounds)
        times[name].append((time.perf_counter() - t0) / args.rounds)
    rss = {}
    for name in VARIANTS:  # each variant's peak RSS in a fresh process
      cmd = [sys.executable, __file__, f"--clients={args.clients}", f"--k={k}",
             f"--examples={args.examples}", f"--batch={args.batch}",
             f"--rounds={args.rounds}", f"--only={name}"]
      out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
      rss[name] = json.loads(out.strip().splitlines()[-1])
    per_round = {name: statistics.median(t) for name, t in times.items()}
    row = {"bench": "client_state", "algorithm": "scaffold", "clients": args.clients, "k": k,
           "examples": args.examples, "batch": args.batch, "rounds": args.rounds,
           "repeats": args.repeats, "params": int(params),
           "table_bytes": int(args.clients * params * 4),
           "seconds_per_round": per_round, "first_call_s": first, "xla_bytes": xla,
           "rss_mb": rss, "host_over_device": per_round["host"] / per_round["device"],
           "models_close": True, "load": os.getloadavg()[0]}
    print(f"K={k}: " + " ".join(f"{n} {v:.3f} s/round" for n, v in per_round.items())
          + f"; XLA args device {xla['device']['argument'] / 2**20:.0f} MB, host "
            f"{xla['host']['argument'] / 2**20:.0f} MB; peak RSS device "
            f"{rss['device']['peak_rss_mb']:.0f} MB, host {rss['host']['peak_rss_mb']:.0f} MB")
    sink.write(row)


if __name__ == "__main__":
  main()
