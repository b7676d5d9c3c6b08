"""Traced (input x client) pairs per second: each JAX kernel versus the original procedure.

The original procedure is the PyTorch reference from the tests (tests/torch_reference.py): a
batch-1 forward/backward per input with hooks, then a Python loop over layers x clients
evaluating each client's layer on the global layer input. Same model (the FedAvg-paper CNN or
ResNet18, the torch twin loaded with the same weights),
same weights, same inputs, same machine. JAX rows time the jitted `trace_clients` after a
warm-up (compile time reported apart); the PyTorch loop is linear in inputs, so it runs on
`--torch-pairs` pairs at most and reports its rate.

  python benchmarks/bench_provenance.py --out=benchmarks/results/provenance_cpu.jsonl
  python benchmarks/bench_provenance.py --model=resnet18 --image=32 --clients=10,100 \
      --kernels=grad,reference --torch-pairs=200

Every JAX row also records the contraction's achieved FLOP/s (2 N P K for N inputs, K clients,
P traced parameters, over the whole call's steady time, so G's forward/backward counts
against it) as a fraction of a matmul probe the script runs first ([n, n] x [n, n] float32 at
HIGHEST precision, the kernel's). `--devices=D` shards the clients over the first D devices
(`trace_clients(mesh=...)`), each device generating its own clients; on CPU, fake devices
(XLA_FLAGS=--xla_force_host_platform_device_count=D) share the same cores:

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/bench_provenance.py \
      --image=8 --clients=10000 --kernels=grad --torch-pairs=0 --devices=4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import JsonlSink, perturbed_clients, time_fn  # noqa: E402

from tracefl_jax.fl.strategies import client_mesh  # noqa: E402
from tracefl_jax.models import get_model  # noqa: E402
from tracefl_jax.models.base import get_layer  # noqa: E402
from tracefl_jax.provenance import trace_clients  # noqa: E402
from tracefl_jax.provenance.kernels import contract_blocked  # noqa: E402


def matmul_peak(n: int, repeats: int = 5) -> dict[str, float]:
  """The probe: FLOP/s of a warm [n, n] x [n, n] float32 matmul on the default device at
  HIGHEST precision (the grad kernel's contraction precision), median of `repeats`."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda u, v: jnp.dot(u, v, precision=jax.lax.Precision.HIGHEST))
  t = time_fn(lambda: f(a, b), repeats)
  return {"probe_n": n, "probe_s": t["steady_s"], "peak_flops_per_s": 2 * n**3 / t["steady_s"]}


def contraction_probe(n: int, p: int, k: int, peak: float, repeats: int = 3) -> dict[str, float]:
  """The contraction alone on random `[n, p] x [k, p]` float32: the kernel's blocked dot
  (`contract_blocked`) and one plain `jnp.einsum`, as fractions of `peak`. What XLA's own dot
  reaches on the shape a trace contracts (skinny N streams the client weights at a few GB/s
  on CPU), apart from G's forward/backward and the per-input weight gradients."""
  x = jax.random.normal(jax.random.key(0), (n, p), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (k, p), jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  blocked_fn = jax.jit(contract_blocked)
  plain_fn = jax.jit(lambda a, b: jnp.einsum("np,kp->nk", a, b, precision=hi))
  blocked = time_fn(lambda: blocked_fn(x, w), repeats)["steady_s"]
  plain = time_fn(lambda: plain_fn(x, w), repeats)["steady_s"]
  flops = 2 * n * p * k
  return {"inputs": n, "traced_params": p, "K": k, "blocked_s": blocked, "plain_s": plain,
          "blocked_fraction_of_peak": flops / blocked / peak,
          "plain_fraction_of_peak": flops / plain / peak}


def traced_params(model, params) -> int:
  """P: parameters of the traced units (the contraction's inner dimension)."""
  return sum(leaf.size for path in model.traced_layers
             for leaf in jax.tree.leaves(get_layer(params, path)))


def sharded_clients(params, k: int, mesh: jax.sharding.Mesh, seed: int = 1):
  """K noisy copies of G's params, `[K, ...]` sharded over `mesh`'s clients axis; each device
  generates its own clients (client c from key fold_in(seed_leaf, c)), so no device ever
  holds all K."""
  devices = list(mesh.devices.flat)
  if k % len(devices):
    raise ValueError(f"--devices: K = {k} must be a multiple of {len(devices)} here")
  per = k // len(devices)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for leaf, key in zip(leaves, keys):
    make = jax.jit(lambda l, kk, start: jax.lax.map(
        lambda c: l + 0.05 * jnp.std(l) * jax.random.normal(jax.random.fold_in(kk, c), l.shape),
        start + jnp.arange(per), batch_size=100))
    shards = [make(jax.device_put(leaf, d), jax.device_put(key, d), jax.device_put(i * per, d))
              for i, d in enumerate(devices)]
    out.append(jax.make_array_from_single_device_arrays((k, *leaf.shape), sharding, shards))
  return jax.tree.unflatten(treedef, out)


def setup(name, image, seed=0):
  """(model, G's variables, torch twin of G, traced torch modules, NHWC -> torch forward)."""
  import torch  # pylint: disable=g-import-not-at-top
  from tests import torch_reference as tr  # pylint: disable=g-import-not-at-top
  if name == "cnn":
    model = get_model("cnn", (image, image, 1), 10)
    g = model.init(jax.random.key(seed))
    side = image // 4
    net = tr.TorchFedAvgCNN(1, 10, flat=side * side * 64)
    tr.load_flax(net, g["params"], model.traced_layers)
    return model, g, net, net.traced(), None
  if name == "resnet18":
    from tests import torch_cnn_reference as tcr  # pylint: disable=g-import-not-at-top
    from tracefl_jax.models import torchvision_import as tvi  # pylint: disable=g-import-not-at-top
    torch.manual_seed(seed)
    net = tcr.ResNet18(10).eval()
    tcr.randomize_bn(net, seed)
    model = get_model("resnet18", (image, image, 3), 10)
    g = tvi.import_torchvision(model.init(jax.random.key(seed)), net.state_dict())
    modules = dict(net.named_modules())
    layers = [modules[tvi._torch_name("params", (*path, "kernel")).rsplit(".", 1)[0]]  # pylint: disable=protected-access
              for path in model.traced_layers]
    forward = lambda xn: net(torch.from_numpy(np.ascontiguousarray(  # noqa: E731
        xn.transpose(2, 0, 1)))[None])
    return model, g, net, layers, forward
  raise ValueError(f"unknown benchmark model {name!r}; valid: cnn, resnet18")


def torch_rate(model, clients, x, max_pairs, max_clients, net, layers, forward):
  """(inputs, seconds) for the original procedure on the first `max_clients` clients."""
  import torch  # pylint: disable=g-import-not-at-top
  from tests import torch_reference as tr  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(max(1, torch.get_num_threads()))
  k = min(jax.tree.leaves(clients)[0].shape[0], max_clients)
  host = jax.tree.map(lambda a: np.asarray(a[:k]), clients["params"])
  client_layers = [[tr.torch_layer_params(jax.tree.map(lambda a: a[c], g_l(host, p)))
                    for p in model.traced_layers] for c in range(k)]
  n = max(1, min(len(x), max_pairs // k))
  tr.original_scores(net, client_layers, x[:1], forward=forward, layers=layers)  # warm-up
  t0 = time.perf_counter()
  scores, _ = tr.original_scores(net, client_layers, x[:n], forward=forward, layers=layers)
  return n, time.perf_counter() - t0, scores


def g_l(params, path):
  for key in path:
    params = params[key]
  return params


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="cnn", help="cnn (FedAvg paper) or resnet18")
  p.add_argument("--image", type=int, default=16)
  p.add_argument("--inputs", type=int, default=20)
  p.add_argument("--clients", default="10,100,1000")
  p.add_argument("--kernels", default="grad,jvp,reference")
  p.add_argument("--torch-pairs", type=int, default=2000,
                 help="at most this many pairs through the PyTorch loop (0: skip it)")
  p.add_argument("--torch-max-clients", type=int, default=1000,
                 help="the PyTorch loop scores at most this many clients (its rate is flat "
                      "in K; each client's weights are copied to the host)")
  p.add_argument("--chunk", type=int, default=0, help="clients_per_chunk for JAX kernels")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--devices", type=int, default=0,
                 help="shard the clients over the first D devices (0: one device, unsharded)")
  p.add_argument("--probe", type=int, default=0,
                 help="matmul probe size n (0: 8192 on GPU, 2048 otherwise)")
  p.add_argument("--contraction-probe", action="store_true",
                 help="after each K, time the contraction alone on random [inputs, P] x [K, P]"
                      " (the kernel's blocked dot and one plain einsum; P x K floats twice)")
  p.add_argument("--out", default="")
  args = p.parse_args()

  sink = JsonlSink(args.out)
  if args.devices > jax.device_count():
    raise SystemExit(f"--devices={args.devices} but jax sees {jax.device_count()} devices (on "
                     f"CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  mesh = client_mesh(jax.devices()[:args.devices]) if args.devices else None
  probe = matmul_peak(args.probe or (8192 if jax.default_backend() == "gpu" else 2048))
  # Fake CPU devices share one set of cores: the mesh's peak is one probe's. Real
  # accelerators add theirs.
  peak_devices = args.devices if args.devices and jax.default_backend() != "cpu" else 1
  peak = probe["peak_flops_per_s"] * peak_devices
  sink.write({"bench": "matmul_probe", **probe})
  model, g, net, layers, forward = setup(args.model, args.image)
  x = np.random.default_rng(0).normal(size=(args.inputs, *model.input_shape)).astype(
      np.float32)
  p_traced = traced_params(model, g["params"])
  base = {"bench": "provenance", "model": args.model, "image": args.image,
          "inputs": args.inputs,
          "params": sum(l.size for l in jax.tree.leaves(g["params"])),
          "traced_params": p_traced, "devices": args.devices or 1, "sharded": bool(mesh),
          "peak_flops_per_s": peak, "peak_devices": peak_devices}
  for k in [int(v) for v in args.clients.split(",")]:
    if mesh is None:
      clients = {"params": perturbed_clients(g["params"], k)}
    else:
      clients = {"params": sharded_clients(g["params"], k, mesh)}
    torch_pairs_per_s = None
    if args.torch_pairs:
      kt = min(k, args.torch_max_clients)
      n, dt, expected = torch_rate(model, clients, x, args.torch_pairs, kt, net, layers,
                                   forward)
      # Like for like: the JAX answer on the same inputs and clients equals the original's.
      got = np.asarray(trace_clients(model, g, jax.tree.map(lambda a: a[:kt], clients),
                                     jnp.asarray(x[:n])).scores, np.float64)
      err = np.abs(got - expected).max() / np.abs(expected).max()
      if err > 1e-4:
        raise AssertionError(f"JAX and original scores differ (max rel {err:.1e})")
      torch_pairs_per_s = n * kt / dt
      sink.write({**base, "K": k, "kernel": "original_pytorch_loop", "inputs": n,
                  "clients_scored": kt, "max_rel_diff_jax": err, "steady_s": dt, "pairs_per_s": torch_pairs_per_s})
    for kernel in args.kernels.split(","):
      fn = lambda: trace_clients(model, g, clients, jnp.asarray(x), kernel=kernel,  # noqa: E731
                                 clients_per_chunk=args.chunk or None, mesh=mesh).scores
      t = time_fn(fn, args.repeats)
      rate = args.inputs * k / t["steady_s"]
      flops = 2 * args.inputs * p_traced * k
      sink.write({**base, "K": k, "kernel": kernel, **t, "pairs_per_s": rate,
                  "speedup_vs_original": rate / torch_pairs_per_s if torch_pairs_per_s else None,
                  "contraction_flops": flops, "achieved_flops_per_s": flops / t["steady_s"],
                  "fraction_of_peak": flops / t["steady_s"] / peak})
    del clients  # the probe's [K, P] operands take their place (10,000 x P: gigabytes)
    if args.contraction_probe:
      sink.write({"bench": "contraction_probe", "model": args.model, "image": args.image,
                  **contraction_probe(args.inputs, p_traced, k, peak, args.repeats)})


if __name__ == "__main__":
  main()
