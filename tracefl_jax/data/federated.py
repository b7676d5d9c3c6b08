"""Client data on device: per-client example indices padded to a common, bucketed length.

The training set lives on the device once (`x [N, ...]`, `y [N]`). A round's clients are an
index matrix `[K, M]` into it plus the true counts `[K]`; slots past a client's count are
padding and are masked out of every loss. `M` is a multiple of the batch size rounded up to a
power of two number of steps, so that rounds with similar client sizes share one compiled
program (shape bucketing: at most log2 distinct shapes over a run).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np


class RoundData(NamedTuple):
  """The round's clients as arrays: `indices [K, M]` int32 and `counts [K]` int32."""
  indices: np.ndarray
  counts: np.ndarray


def bucket_length(max_count: int, batch_size: int) -> int:
  """Smallest `M = batch_size * 2**j` with `M >= max_count` (at least one batch)."""
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
