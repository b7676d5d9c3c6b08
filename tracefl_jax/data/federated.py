"""Federated data: the training set (on the device once, or on the host: `placement.py`), each
client a list of indices into it.

`federate(x, y, partition)` builds `FederatedData` from plain arrays and a partition (from
`make_partition`, or a user's own list of index arrays). A round's clients are their
example indices laid end to end, `ClientSlots(flat [T], offsets [K])`, plus the true counts
`[K]` (`FederatedData.round_slots`): each client takes its own count rounded up to whole
batches, so a round's memory, and the shuffles and gathers over it, follow its clients' own
sizes (one client of 100,000 examples costs 100,000 slots, not K x 100,000). T is rounded up
a ladder (`ladder_ceil`: 1, 2, 3, 4, 6, 8, 12, ...) so that rounds share compiled
programs. Slots past a client's count are padding, never trained on (a client runs exactly
its own steps, `fl/client.py`).

The older layout, an index matrix `[K, M]` with every row padded to the federation's largest
client (`round_data`, `stack_client_indices`), is still accepted everywhere a `ClientSlots`
is: it is the same thing with `offsets = k * M`, and it costs `K * M`.

Image data can stay uint8 on the device with a `Normalization` (`federate(...,
normalization=...)`): the client step normalises the batch it gathers, so the device holds a
quarter of the float32 bytes and trains on the same numbers.

A training set too large for the device stays on the host (`federate(..., placement="host")`,
or "auto" for an `np.memmap` or a set over half the device's free memory): each round gathers
its clients' examples and the round program reads those (`FederatedData.round_inputs`);
`placement.py` has the rule and what the device holds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.data.base import Normalization
from tracefl_jax.data.partition import Partition
from tracefl_jax.data.placement import HostFeed, feed_rounds, resolve_placement


class RoundData(NamedTuple):
  """The round's clients as arrays: `indices` (a `ClientSlots`, or `[K, M]` int32 rows) and
  `counts [K]` int32."""
  indices: Any
  counts: np.ndarray


class ClientSlots(NamedTuple):
  """K clients' example indices end to end (a pytree of two int32 arrays).

  Client k owns `flat[offsets[k]:offsets[k + 1]]` (the last one up to T): its real indices
  first, then padding (index 0). `offsets [K]` is non-decreasing and starts at 0; an empty
  client owns no slot; an offset of T or more (clients added as padding) owns none either.
  """
  flat: Any     # [T] int32
  offsets: Any  # [K] int32

  @classmethod
  def from_rows(cls, indices: Any) -> "ClientSlots":
    """The `[K, M]` row layout seen as slots: row k at offset k * M (jnp or np)."""
    xp = jnp if isinstance(indices, jax.Array) else np
    k, m = indices.shape
    return cls(indices.reshape(-1), xp.arange(k, dtype=xp.int32) * m)

  def with_empty_clients(self, n: int) -> "ClientSlots":
    """`n` more clients that own no slot (host NumPy)."""
    end = np.full(n, len(self.flat), np.int32)
    return ClientSlots(self.flat, np.concatenate([np.asarray(self.offsets, np.int32), end]))


def ladder(limit: int) -> list[int]:
  """1, 2, 3, 4, 6, 8, 12, 16, ... (2^a and 3 * 2^a) up to `limit`, ascending: consecutive
  values at most 1.5x apart, about 2 per doubling."""
  out, a = {1}, 2
  while a <= limit:
    out.update(v for v in (a, 3 * a // 2) if v <= limit)
    a *= 2
  return sorted(out)


def ladder_ceil(n: int) -> int:
  """The smallest ladder value >= `n` (>= 1): at most 1.5x `n`."""
  n = max(int(n), 1)
  a = 1 << (n - 1).bit_length()  # the power of two >= n
  return 3 * a // 4 if a >= 4 and 3 * a // 4 >= n else a


def client_slots(counts: Any, batch_size: int) -> np.ndarray:
  """`[K]` slots each client takes in a round's `ClientSlots`: its count rounded up to a
  whole number of batches (0 for an empty client)."""
  counts = np.asarray(counts, np.int64)
  return -(-counts // batch_size) * batch_size


def pack_client_slots(client_indices: Sequence[np.ndarray], clients: Sequence[int],
                      batch_size: int) -> RoundData:
  """The chosen clients' indices end to end, each padded to whole batches; T up the ladder.

  Returns:
    `RoundData(ClientSlots(flat [T], offsets [K]), counts [K])`.
  """
  _check_batch_size(batch_size)
  chosen = [client_indices[c] for c in clients]
  counts = np.array([len(ix) for ix in chosen], np.int32)
  owned = client_slots(counts, batch_size)
  offsets = (np.cumsum(owned) - owned).astype(np.int32)
  flat = np.zeros(ladder_ceil(int(owned.sum())), np.int32)
  for start, ix in zip(offsets, chosen):
    flat[start:start + len(ix)] = ix
  return RoundData(ClientSlots(flat, offsets), counts)


def _check_batch_size(batch_size: Any) -> None:
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")


def bucket_length(max_count: int, batch_size: int) -> int:
  """Smallest `M = batch_size * 2**j` with `M >= max_count` (at least one batch)."""
  _check_batch_size(batch_size)
  steps = max(1, math.ceil(max_count / batch_size))
  return batch_size * (1 << (steps - 1).bit_length())


def stack_client_indices(
    client_indices: Sequence[np.ndarray],
    clients: Sequence[int],
    batch_size: int,
    length: int | None = None,
) -> RoundData:
  """Pads the chosen clients' index lists to one length.

  Args:
    client_indices: per client (all clients of the federation), indices into the training set.
    clients: the round's client ids, in the round's order.
    batch_size: local batch size; the padded length is a multiple of it.
    length: padded length `M`; default `bucket_length` of the largest chosen client.

  Returns:
    `RoundData(indices [K, M], counts [K])`; padding slots hold index 0 and are masked later.
  """
  _check_batch_size(batch_size)
  chosen = [np.asarray(client_indices[c], np.int64) for c in clients]
  counts = np.array([len(ix) for ix in chosen], np.int32)
  if length is None:
    length = bucket_length(int(counts.max(initial=1)), batch_size)
  if counts.max(initial=0) > length:
    raise ValueError(f"a client holds {counts.max()} examples, more than length={length}")
  indices = np.zeros((len(chosen), length), np.int32)
  for row, ix in zip(indices, chosen):
    row[: len(ix)] = ix
  return RoundData(indices, counts)


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedData:
  """A federation's training data (build it with `federate`).

  Attributes:
    x: `[N, ...]` training examples, on the device (placement "device") or the host's NumPy
      array or `np.memmap` (placement "host").
    y: `[N]` int32 labels, beside `x`.
    partition: the clients' int64 indices into `x` and their label counts (host NumPy),
      counted on `y`.
    num_classes: number of labels.
    normalization: applied to each gathered batch of `x` inside the jitted client step
      (uint8 images); None: `x` is used as it is.
  """
  x: jax.Array
  y: jax.Array
  partition: Partition
  num_classes: int
  normalization: Normalization | None = None
  placement: str = "device"  # resolved: "device" or "host" (`placement.py`)
  _feed: HostFeed | None = dataclasses.field(default=None, init=False, repr=False)

  def __post_init__(self):
    if self.placement not in ("device", "host"):
      raise ValueError(f"FederatedData.placement={self.placement!r}; valid: 'device', "
                       f"'host' (federate(..., placement='auto') resolves to one of them)")
    object.__setattr__(self, "_feed", HostFeed(self.x, self.y)
                       if self.placement == "host" else None)

  def round_inputs(self, indices: Any) -> tuple[Any, Any, Any]:
    """A laid-out round's program inputs `(x, y, indices)` (`indices`: `ClientSlots` or
    `[K, M]` rows). Placement "device": `(self.x, self.y, indices)` unchanged. "host": the
    round's examples `x[flat] [T, ...]`, `y[flat] [T]` on the device (prefetched by
    `prefetch`, or gathered now) and the slots remapped to `arange(T)`, same offsets."""
    if self._feed is None:
      return self.x, self.y, indices
    return self._feed.inputs(indices)

  def prefetch(self, indices: Any) -> None:
    """Host placement: starts gathering the round laid out as `indices` and putting it on
    the device in a background thread (`round_inputs` with the same slots takes it). Device
    placement: nothing to do."""
    if self._feed is not None:
      self._feed.prefetch(indices)

  def feed(self, indices: Sequence[Any]):
    """Yields `round_inputs` of each laid-out round in turn, prefetching the next one's
    while the caller runs this one (host placement). Finish a round (block on its result)
    before taking the next, or the device holds many rounds' data."""
    return feed_rounds(self.round_inputs, self._feed and self._feed.prefetch, list(indices))

  def require_device(self, what: str) -> None:
    """One clear error when `what` needs the whole training set on the device."""
    if self.placement != "device":
      raise ValueError(f"{what} needs the whole training set on the device; this data has "
                       f"placement={self.placement!r}: build it with federate(..., "
                       f"placement=\"device\")")

  @property
  def client_indices(self) -> tuple[np.ndarray, ...]:
    """Per client, int64 indices into `x`."""
    return self.partition.client_indices

  @property
  def label_counts(self) -> np.ndarray:
    """`[C, num_classes]` each client's label histogram: the ground truth that the paper's
    localization rule scores provenance against."""
    return self.partition.label_counts

  @property
  def num_clients(self) -> int:
    return self.partition.num_clients

  @property
  def client_sizes(self) -> np.ndarray:
    """`[C]` example counts."""
    return self.partition.client_sizes

  def round_length(self, batch_size: int) -> int:
    """`M` of every round: `bucket_length` of the federation's largest client."""
    return bucket_length(int(self.client_sizes.max(initial=1)), batch_size)

  def round_data(self, clients: Sequence[int], batch_size: int) -> "RoundData":
    """The chosen clients' indices padded to `round_length` (`stack_client_indices`): the
    `[K, M]` row layout; `round_slots` is what a round runs on."""
    return stack_client_indices(self.client_indices, clients, batch_size,
                                length=self.round_length(batch_size))

  def round_slots(self, clients: Sequence[int], batch_size: int) -> "RoundData":
    """The chosen clients' indices end to end (`pack_client_slots`): `RoundData(
    ClientSlots, counts [K])`, T slots following the clients' own sizes."""
    return pack_client_slots(self.client_indices, clients, batch_size)


def federate(x: Any, y: Any, clients: Any, num_classes: int | None = None,
             normalization: Normalization | None = None,
             placement: str = "auto") -> FederatedData:
  """`FederatedData` from plain arrays.

  Args:
    x: `[N, ...]` examples (NumPy, an `np.memmap`, or JAX; float images or int token ids, or
      uint8 images with a `normalization`), put on the device as they are, or kept on the
      host (`placement`).
    y: `[N]` integer labels in `[0, num_classes)`.
    clients: a `Partition` (from `make_partition`) or a sequence of per-client index arrays.
    num_classes: default `max(y) + 1`.
    normalization: what turns a batch of `x` into model inputs (`Dataset.normalization`);
      required for uint8 `x`.
    placement: "device" (the whole set on the device), "host" (`x` and `y` stay on the host;
      each round gathers its clients' examples, `placement.py`) or "auto" ("host" for an
      `np.memmap` or a set over `HOST_FRACTION` of the device's free memory; "device" on the
      CPU backend otherwise). The same results either way.
  """
  where = resolve_placement(x, placement)
  y_host = np.asarray(y)
  if y_host.ndim != 1 or not np.issubdtype(y_host.dtype, np.integer):
    raise ValueError(f"y must be a vector of integer labels, got shape {y_host.shape} and "
                     f"dtype {y_host.dtype}")
  if normalization is not None and not isinstance(normalization, Normalization):
    raise TypeError(f"normalization must be a Normalization, got {type(normalization).__name__}")
  x = x if hasattr(x, "dtype") else np.asarray(x)
  if np.dtype(x.dtype) == np.uint8 and normalization is None:
    raise ValueError("x holds uint8 pixels: pass normalization=Normalization(mean, std) (e.g. "
                     "the dataset's), or float inputs")
  if len(x) != len(y_host):
    raise ValueError(f"x has {len(x)} examples but y has {len(y_host)} labels")
  k = int(num_classes if num_classes is not None else y_host.max(initial=-1) + 1)
  if len(y_host) and not 0 <= y_host.min() <= y_host.max() < k:
    raise ValueError(f"labels must lie in [0, {k}), got [{y_host.min()}, {y_host.max()}]")
  parts = getattr(clients, "client_indices", clients)
  indices = tuple(np.asarray(ix, np.int64).reshape(-1) for ix in parts)
  if not indices:
    raise ValueError("the partition has no clients")
  # Checked (the first client out of [0, N) named) and counted on these labels (a label flip
  # changes them), whatever partition came in.
  partition = Partition.from_indices(indices, y_host, k)
  if where == "host":  # a memmap stays one; a device array comes to the host
    return FederatedData(x if isinstance(x, np.ndarray) else np.asarray(x),
                         y_host.astype(np.int32), partition, k, normalization, "host")
  return FederatedData(jnp.asarray(x), jnp.asarray(y_host, jnp.int32), partition, k,
                       normalization, "device")


def flip_labels(
    y: np.ndarray,
    client_indices: Sequence[np.ndarray],
    faulty_clients: Sequence[int],
    flip: Mapping[int, int],
    x: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
  """Injects label flipping into chosen clients' training data (faulty-client mode).

  The faulty clients' examples are appended to the training set as copies whose labels are
  remapped by `flip` (labels not in `flip` are kept), and those clients' indices are pointed at
  the copies; every other client keeps reading the clean originals.

  Returns:
    `(x_aug, y_aug, client_indices_aug)`.
  """
  flip_table = np.arange(int(y.max(initial=0)) + 1 if len(y) else 0)
  for src, dst in flip.items():
    if not 0 <= src < len(flip_table):
      raise ValueError(f"flip source label {src} is not a label of this dataset")
    flip_table[src] = dst
  new_indices = [np.asarray(ix) for ix in client_indices]
  xs, ys, offset = [x], [y], len(y)
  for c in faulty_clients:
    if not 0 <= c < len(new_indices):
      raise ValueError(f"faulty client {c} does not exist (num_clients={len(new_indices)})")
    ix = new_indices[c]
    xs.append(x[ix])
    ys.append(flip_table[y[ix]].astype(y.dtype))
    new_indices[c] = np.arange(offset, offset + len(ix))
    offset += len(ix)
  return np.concatenate(xs), np.concatenate(ys), new_indices
