"""Where a federation's training set lives: whole on the device, or on the host with each
round's examples gathered there and put on the device (`federate(..., placement=...)`).

"device": `x` and `y` are put on the device once and a round program reads the examples its
clients' slots index (`ClientSlots(flat [T], offsets [K])` into `[N, ...]`). The whole set
must fit in accelerator memory beside the round's work.

"host": `x` (a NumPy array, or an `np.memmap` that is never read whole) and `y` stay on the
host. A round gathers only its clients' examples, `x[flat]` and `y[flat]` (`[T, ...]`, T the
round's slot count, already up the ladder of `ladder_ceil`), puts them on the device and
hands the program its slots remapped to positions `arange(T)` with the same offsets: the
program reads the same examples in the same order, so it computes the same numbers (tested
bit for bit), and its shapes follow T as the indices' do, so no more programs compile. The
device holds one round's examples, two while the next round is prefetched
(`HostFeed.prefetch`: a one-worker thread gathers and transfers round t+1 while round t's
program runs).

"auto": "host" when `x` is an `np.memmap`, or when `x`'s bytes exceed `HOST_FRACTION` of the
device's free memory (`memory_stats()`: bytes_limit - bytes_in_use); "device" otherwise,
always on the CPU backend (its "device" is host memory) and for an `x` already on the device.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PLACEMENTS = ("auto", "device", "host")
# "auto" keeps the data on the host when it would take more than this share of the device's
# free memory: the round's models, optimizer states and activations need the rest.
HOST_FRACTION = 0.5


def resolve_placement(x: Any, placement: str) -> str:
  """`placement` ("auto" | "device" | "host") resolved to "device" or "host" for the
  training examples `x` (module docstring has the rule)."""
  if not isinstance(placement, str) or placement not in PLACEMENTS:
    raise ValueError(f"placement={placement!r}; valid: {', '.join(map(repr, PLACEMENTS))}")
  if placement != "auto":
    return placement
  if isinstance(x, np.memmap):
    return "host"
  if isinstance(x, jax.Array) or jax.default_backend() == "cpu":
    return "device"
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    return "device"
  free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  return "host" if np.asarray(x).nbytes > HOST_FRACTION * free else "device"


def _flat(indices: Any) -> np.ndarray:
  """The host int array of every slot a round's indices name (`ClientSlots.flat` or the
  `[K, M]` rows flattened)."""
  flat = indices.flat if hasattr(indices, "offsets") else indices
  return np.asarray(flat).reshape(-1)


class HostFeed:
  """Gathers rounds' examples from host arrays `x [N, ...]`, `y [N]` and puts them on the
  device; `prefetch` starts that in a one-worker thread so that it overlaps whatever runs
  before the round asks for them (`inputs`).

  `gathers` counts the rounds gathered, `prefetch_hits` those `inputs` found prefetched.
  """

  MAX_PENDING = 2  # prefetched rounds kept waiting (each holds its arrays on the device)

  def __init__(self, x: Any, y: np.ndarray):
    self.x, self.y = x, y
    self._pending: dict[bytes, concurrent.futures.Future] = {}
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._ranges: dict[int, jax.Array] = {}
    self.gathers = 0
    self.prefetch_hits = 0

  def _gather(self, flat: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """`(x[flat], y[flat])` on the device, transferred before returning."""
    xs = np.asarray(self.x[flat])  # a memmap reads only these rows
    out = jax.device_put((xs, self.y[flat]))
    return jax.block_until_ready(out)

  def prefetch(self, indices: Any) -> None:
    """Starts gathering the round laid out as `indices` (`ClientSlots` or `[K, M]` rows) in
    the background; `inputs` with the same slots takes the result."""
    flat = _flat(indices)
    key = flat.tobytes()
    if key in self._pending:
      return
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(1, "tracefl-prefetch")
    self._pending[key] = self._pool.submit(self._gather, flat)
    while len(self._pending) > self.MAX_PENDING:  # the oldest, never asked for
      self._pending.pop(next(iter(self._pending)))

  def _arange(self, t: int) -> jax.Array:
    if t not in self._ranges:  # T is on a ladder: few lengths
      self._ranges[t] = jnp.arange(t, dtype=jnp.int32)
    return self._ranges[t]

  def inputs(self, indices: Any) -> tuple[jax.Array, jax.Array, Any]:
    """A round's program inputs `(x [T, ...], y [T], indices)` on the device: the examples
    its slots name, in slot order, and the slots remapped to `arange(T)` (`ClientSlots`:
    same offsets; `[K, M]` rows: `arange(K * M)` in their shape)."""
    flat = _flat(indices)
    future = self._pending.pop(flat.tobytes(), None)
    self.gathers += 1
    if future is not None:
      self.prefetch_hits += 1
      x, y = future.result()
    else:
      x, y = self._gather(flat)
    if hasattr(indices, "offsets"):
      return x, y, indices._replace(flat=self._arange(len(flat)))
    return x, y, np.arange(flat.size, dtype=np.int32).reshape(np.shape(indices))


def feed_rounds(inputs: Callable[[Any], tuple], prefetch: Callable[[Any], None] | None,
                indices: list[Any]):
  """Yields each round's program inputs in order, prefetching the next round's while the
  caller runs this one (`prefetch` None: no prefetch). The caller must finish a round (block
  on its result) before asking for the next, or rounds queue up on the device."""
  for i, ix in enumerate(indices):
    out = inputs(ix)
    if prefetch is not None and i + 1 < len(indices):
      prefetch(indices[i + 1])
    yield out
