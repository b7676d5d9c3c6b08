"""Speed of light: the library against hand-written JAX on the same work (issue 21).

For each model, client-size shape and K, times in ONE process, interleaved (library,
reference, library, reference, ...), with the first call (compile + run) apart:

  round       `federated_averaging(...).round` (host work included: the round's index rows,
              weights, lanes) against `references.reference_round` (vmap over clients of a
              scan of SGD steps on pre-shaped `[K, S, ...]` client data, weighted mean), the
              same clients, keys and shuffles: G_t is compared (max_rel_diff);
  provenance  `trace_clients(kernel=auto|grad|jvp).scores` against `references.einsum_scores`
              (the kernels' formula as plain einsums) and `references.jvp_scores` (one plain
              jvp per client): T [N, K] is compared.

Models: "mlp" (64-32-10, inputs [64]) and "cnn" (the FedAvg CNN, `--image` square, 1
channel). Client sizes: "equal" (`--samples` each) and "paper" (the paper-shaped partition's
sizes, `common.draw_client_sizes`, scaled to a mean of `--samples`: the same unevenness at a
size a CPU round can hold). Every row records the library's and the reference's medians, their
ratio (library / reference; < 1 is faster than the reference), the median of the per-pair
ratios, both compile times, XLA's bytes of both compiled programs (arguments + outputs +
temporaries: the peak a program can hold, on any backend), the load average and the usual
device and versions.

  python benchmarks/bench_reference.py --out=benchmarks/results/reference_cpu.jsonl
  python benchmarks/bench_reference.py --parts=provenance --models=mlp --clients=10000
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import references  # noqa: E402
from common import JsonlSink, block, draw_client_sizes  # noqa: E402

from tracefl_jax.data.federated import federate  # noqa: E402
from tracefl_jax.fl.rounds import federated_averaging, round_key  # noqa: E402
from tracefl_jax.fl.strategies import fold_client_keys  # noqa: E402
from tracefl_jax.models import get_model, make_model  # noqa: E402
from tracefl_jax.models.cnn import MLP  # noqa: E402
from tracefl_jax.provenance import trace_clients  # noqa: E402


def build_model(name: str, image: int):
  if name == "mlp":
    return make_model("mlp_64_32_10", MLP(num_classes=10, hidden=(32,)), (64,), 10)
  if name == "cnn":
    return get_model("cnn", (image, image, 1), 10)
  raise ValueError(f"--models: unknown {name!r}; valid: mlp, cnn")


def interleaved(fns: dict, repeats: int) -> dict:
  """First call of each (compile + run), then `repeats` rounds calling each once in turn
  (the order rotating), so every function sees the same load. name -> stats."""
  first, times = {}, {name: [] for name in fns}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    block(fn())
    first[name] = time.perf_counter() - t0
  names = list(fns)
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      block(fns[name]())
      times[name].append(time.perf_counter() - t0)
  out = {}
  for name in names:
    med = statistics.median(times[name])
    out[name] = {"median_s": med, "min_s": min(times[name]), "first_s": first[name],
                 "compile_s": max(first[name] - med, 0.0), "times": times[name]}
  return out


def xla_bytes(jitted, *args, **kwargs) -> int | None:
  """Arguments + outputs + temporaries of the compiled program (None where unavailable)."""
  try:
    m = jitted.lower(*args, **kwargs).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def compare(lib: dict, ref: dict, lib_bytes, ref_bytes) -> dict:
  pairs = [a / b for a, b in zip(lib["times"], ref["times"])]
  return {"library_s": lib["median_s"], "reference_s": ref["median_s"],
          "ratio": lib["median_s"] / ref["median_s"],
          "ratio_median_of_pairs": statistics.median(pairs),
          "library_compile_s": lib["compile_s"], "reference_compile_s": ref["compile_s"],
          "compile_ratio": lib["compile_s"] / max(ref["compile_s"], 1e-9),
          "library_bytes": lib_bytes, "reference_bytes": ref_bytes,
          "memory_ratio": lib_bytes / ref_bytes if lib_bytes and ref_bytes else None}


def client_sizes(kind: str, k: int, samples: int, seed: int = 0) -> np.ndarray:
  if kind == "equal":
    return np.full(k, samples, np.int64)
  s = draw_client_sizes(k, seed).astype(np.float64)
  return np.maximum(1, np.round(s * samples / s.mean())).astype(np.int64)


def bench_round(model, sizes, args, rng):
  """(library stats, reference stats, bytes, max_rel_diff) for one round of K clients."""
  k, b = len(sizes), args.batch
  total = int(sizes.sum())
  x = rng.normal(size=(total, *model.input_shape)).astype(np.float32)
  y = rng.integers(0, 10, total).astype(np.int32)
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  data = federate(x, y, [np.arange(s, s + n) for s, n in zip(starts, sizes)], num_classes=10)
  variables = model.init(jax.random.key(0))
  algorithm = federated_averaging(model, optax.sgd(args.lr), batch_size=b,
                                  local_epochs=args.epochs)
  state = algorithm.init(variables)
  key = round_key(jax.random.key(0), 1)
  clients = np.arange(k)

  def library():
    return algorithm.round(state, clients=clients, data=data, key=key)[0].variables["params"]

  s_pad = -(-int(sizes.max()) // b) * b
  rows = np.minimum(starts[:, None] + np.arange(s_pad)[None], total - 1)
  real = np.arange(s_pad)[None] < sizes[:, None]
  xs = jnp.asarray(np.where(real.reshape(*real.shape, *[1] * (x.ndim - 1)), x[rows], 0))
  ys = jnp.asarray(np.where(real, y[rows], 0))
  counts = jnp.asarray(sizes, jnp.int32)
  keys = fold_client_keys(key, jnp.asarray(clients, jnp.int32))
  ref_jit = jax.jit(functools.partial(references.reference_round, lr=args.lr, batch_size=b,
                                      epochs=args.epochs))
  params = variables["params"]

  def reference():
    return ref_jit(params, xs, ys, counts, keys)

  stats = interleaved({"library": library, "reference": reference}, args.repeats)
  got, want = library(), reference()
  diff = max(float(jnp.max(jnp.abs(a - w)) / (jnp.max(jnp.abs(w)) + 1e-30))
             for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  lanes = None
  if algorithm.program is not None and args.memory:
    from tracefl_jax.fl.strategies import round_lanes  # pylint: disable=g-import-not-at-top
    lanes = round_lanes(algorithm.strategy, algorithm_steps(sizes, b, args.epochs))
    rd = data.round_data(clients, b)
    from tracefl_jax.fl import aggregation  # pylint: disable=g-import-not-at-top
    weights = jnp.asarray(aggregation.client_weights(rd.counts), jnp.float32)
    lib_bytes = xla_bytes(algorithm.program, variables, data.x, data.y,
                          jnp.asarray(rd.indices), jnp.asarray(rd.counts),
                          jnp.asarray(clients, jnp.int32), key, weights, lanes=lanes)
  else:
    lib_bytes = None
  ref_bytes = xla_bytes(ref_jit, params, xs, ys, counts, keys) if args.memory else None
  return stats, lib_bytes, ref_bytes, diff, {"strategy": algorithm.strategy, "lanes": lanes}


def algorithm_steps(sizes, b, epochs):
  return epochs * ((np.asarray(sizes) + b - 1) // b)


def noisy_clients(params, k: int, seed: int = 1):
  """K copies of G's params with 5% noise, stacked `[K, ...]` (one small program per leaf)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  make = jax.jit(lambda l, kk: l + 0.05 * jnp.std(l) * jax.random.normal(kk, (k, *l.shape)))
  return jax.tree.unflatten(treedef, [make(l, kk) for l, kk in zip(leaves, keys)])


def bench_provenance(model, k, args, rng):
  """name -> stats for the library's kernels and the two references; bytes; diffs."""
  g = model.init(jax.random.key(0))
  clients = {"params": noisy_clients(g["params"], k)}
  x = jnp.asarray(rng.normal(size=(args.inputs, *model.input_shape)).astype(np.float32))
  fns, jitted = {}, {}
  for kernel in args.kernels.split(","):
    jitted[kernel] = jax.jit(functools.partial(
        lambda gv, cv, xx, kernel: trace_clients(model, gv, cv, xx, kernel=kernel).scores,
        kernel=kernel))
    fns[kernel] = functools.partial(
        lambda kernel: trace_clients(model, g, clients, x, kernel=kernel).scores, kernel)
  jitted["einsum"] = jax.jit(references.einsum_scores)
  fns["einsum"] = lambda: jitted["einsum"](g["params"], clients["params"], x)
  if "plain_jvp" in args.references.split(","):
    jitted["plain_jvp"] = jax.jit(references.jvp_scores)
    fns["plain_jvp"] = lambda: jitted["plain_jvp"](g["params"], clients["params"], x)
  stats = interleaved(fns, args.repeats)
  want = np.asarray(fns["einsum"](), np.float64)
  scale = np.abs(want).max() + 1e-30
  diffs = {name: float(np.abs(np.asarray(fn(), np.float64) - want).max() / scale)
           for name, fn in fns.items()}
  nbytes = dict.fromkeys(jitted)
  for name, fn in jitted.items():
    if not args.memory:
      break
    if name in ("einsum", "plain_jvp"):
      nbytes[name] = xla_bytes(fn, g["params"], clients["params"], x)
    else:
      nbytes[name] = xla_bytes(fn, g, clients, x)
  return stats, nbytes, diffs


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--parts", default="round,provenance")
  p.add_argument("--models", default="mlp,cnn")
  p.add_argument("--sizes", default="equal,paper")
  p.add_argument("--clients", default="10,100,1000", help="K for rounds")
  p.add_argument("--prov-clients", default="10,100,1000,10000", help="K for provenance")
  p.add_argument("--cnn-max-clients", type=int, default=1000,
                 help="skip CNN rows above this K (CNN clients at K = 10,000: 7.6 GB)")
  p.add_argument("--samples", type=int, default=20, help="examples per client (mean)")
  p.add_argument("--batch", type=int, default=10)
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--image", type=int, default=8, help="CNN image side")
  p.add_argument("--inputs", type=int, default=256, help="provenance inputs N")
  p.add_argument("--kernels", default="auto,grad,jvp")
  p.add_argument("--references", default="einsum,plain_jvp",
                 help="provenance references; einsum always (the values are checked against "
                      "it), plain_jvp optional (K linearised passes: minutes for the CNN at "
                      "K = 1,000)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--no-memory", dest="memory", action="store_false",
                 help="skip XLA's byte counts (each costs one more compilation)")
  p.add_argument("--out", default="")
  args = p.parse_args()

  sink = JsonlSink(args.out)
  rng = np.random.default_rng(0)
  parts = args.parts.split(",")
  for name in args.models.split(","):
    model = build_model(name, args.image)
    base = {"model": name, "image": args.image if name == "cnn" else None}
    if "round" in parts:
      for kind in args.sizes.split(","):
        for k in (int(v) for v in args.clients.split(",")):
          if name == "cnn" and k > args.cnn_max_clients:
            continue
          sizes = client_sizes(kind, k, args.samples)
          stats, lb, rb, diff, info = bench_round(model, sizes, args, rng)
          sink.write({"bench": "reference_round", **base, "sizes": kind, "K": k,
                      "examples": int(sizes.sum()), "max_client_size": int(sizes.max()),
                      "batch_size": args.batch, "local_epochs": args.epochs, **info,
                      **compare(stats["library"], stats["reference"], lb, rb),
                      "max_rel_diff": diff, "repeats": args.repeats,
                      "load": os.getloadavg()[0]})
    if "provenance" in parts:
      for k in (int(v) for v in args.prov_clients.split(",")):
        if name == "cnn" and k > args.cnn_max_clients:
          continue
        stats, nbytes, diffs = bench_provenance(model, k, args, rng)
        best = min((r for r in ("einsum", "plain_jvp") if r in stats),
                   key=lambda r: stats[r]["median_s"])
        for kernel in args.kernels.split(","):
          sink.write({"bench": "reference_provenance", **base, "K": k, "inputs": args.inputs,
                      "kernel": kernel, "reference": best,
                      **compare(stats[kernel], stats[best], nbytes[kernel], nbytes[best]),
                      "einsum_s": stats["einsum"]["median_s"],
                      "plain_jvp_s": stats.get("plain_jvp", {}).get("median_s"),
                      "max_rel_diff": diffs[kernel], "repeats": args.repeats,
                      "load": os.getloadavg()[0]})


if __name__ == "__main__":
  main()
