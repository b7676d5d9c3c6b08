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

from tracefl_jax.models import get_model  # noqa: E402
from tracefl_jax.provenance import trace_clients  # noqa: E402


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
  p.add_argument("--out", default="")
  args = p.parse_args()

  sink = JsonlSink(args.out)
  model, g, net, layers, forward = setup(args.model, args.image)
  x = np.random.default_rng(0).normal(size=(args.inputs, *model.input_shape)).astype(
      np.float32)
  base = {"bench": "provenance", "model": args.model, "image": args.image,
          "inputs": args.inputs,
          "params": sum(l.size for l in jax.tree.leaves(g["params"]))}
  for k in [int(v) for v in args.clients.split(",")]:
    clients = {"params": perturbed_clients(g["params"], k)}
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
                                 clients_per_chunk=args.chunk or None).scores
      t = time_fn(fn, args.repeats)
      rate = args.inputs * k / t["steady_s"]
      sink.write({**base, "K": k, "kernel": kernel, **t, "pairs_per_s": rate,
                  "speedup_vs_original": rate / torch_pairs_per_s if torch_pairs_per_s else None})


if __name__ == "__main__":
  main()
