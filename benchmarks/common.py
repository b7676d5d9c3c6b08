"""Shared benchmark plumbing: timing with warm-up, environment description, JSONL rows, and
the paper-shaped client sizes."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.data import fixup_partition, partition_dirichlet


def environment() -> dict[str, Any]:
  """Device and versions, recorded in every row."""
  dev = jax.devices()[0]
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
    try:
      versions[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      pass
  return {
      "backend": jax.default_backend(),
      "device": getattr(dev, "device_kind", str(dev)),
      "num_devices": jax.device_count(),
      "host": platform.node(),
      "cpu_count": __import__("os").cpu_count(),
      "python": platform.python_version(),
      "versions": versions,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def block(tree: Any) -> Any:
  return jax.block_until_ready(tree)


def time_fn(fn: Callable[[], Any], repeats: int = 3) -> dict[str, float]:
  """First call (compile + run) apart from the median of `repeats` steady-state calls."""
  t0 = time.perf_counter()
  block(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t0)
  steady = statistics.median(times)
  return {"first_call_s": first, "compile_s": max(first - steady, 0.0), "steady_s": steady,
          "steady_min_s": min(times)}


def memory(jitted: Any = None, *args: Any, **kwargs: Any) -> dict[str, int | None]:
  """XLA's temporary-buffer bytes of `jitted(*args, **kwargs)` as compiled (any backend), and
  the device's peak bytes in use so far where the backend reports it (GPU; None on CPU)."""
  out: dict[str, int | None] = {"temp_bytes": None, "peak_bytes": None}
  if jitted is not None:
    analysis = jitted.lower(*args, **kwargs).compile().memory_analysis()
    out["temp_bytes"] = getattr(analysis, "temp_size_in_bytes", None)
  stats = jax.devices()[0].memory_stats() or {}
  out["peak_bytes"] = stats.get("peak_bytes_in_use")
  return out


def paper_client_sizes(seed: int = 0) -> np.ndarray:
  """Client sizes of the paper-shaped partition: MNIST-sized labels (60,000 over 10 classes,
  6,000 each, shuffled with `seed`), Dirichlet 0.3 over 100 clients, then the partition
  fix-up with its defaults (clients of 32 to 2,048 examples; about 100 remain)."""
  labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(10), 6000))
  return fixup_partition(partition_dirichlet(labels, 100, 0.3, seed=seed), labels).client_sizes


def draw_client_sizes(k: int, seed: int = 0) -> np.ndarray:
  """`[K]` sizes from `paper_client_sizes(seed)`: K of its clients without replacement when
  K <= its client count, with replacement above; seeded, so every run draws the same."""
  sizes = paper_client_sizes(seed)
  rng = np.random.default_rng([seed, k])
  return rng.choice(sizes, size=k, replace=k > len(sizes)).astype(np.int64)


class JsonlSink:
  """Appends rows to a JSONL file and echoes a short line per row."""

  def __init__(self, path: str | Path | None):
    self.path = Path(path) if path else None
    if self.path:
      self.path.parent.mkdir(parents=True, exist_ok=True)
    self.env = environment()

  def write(self, row: dict[str, Any]) -> None:
    row = {**row, **self.env}
    if self.path:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    short = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
             if k not in self.env}
    print(json.dumps(short), flush=True)


def perturbed_clients(params: Any, k: int, seed: int = 1) -> Any:
  """K copies of G's params with 5% noise, stacked `[K, ...]`, generated 100 at a time
  (bounded temporaries)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  make = jax.jit(lambda l, kk: jax.lax.map(
      lambda c: l + 0.05 * jnp.std(l) * jax.random.normal(c, l.shape),
      jax.random.split(kk, k), batch_size=100))
  return jax.tree.unflatten(treedef, [make(l, kk) for l, kk in zip(leaves, keys)])
