"""`[F, C]` participation masks of retrained federations, described sparsely.

A retraining truth over C clients runs F = 2 + C + M federations (`retrained.truth_masks`):
as a dense float matrix that is 40 GB at C = 100,000. Almost every entry is 1 (the client
takes part), so `FederationMasks` keeps, per federation, only the clients whose value is not
1 (a left-out client: 0; any other non-negative value multiplies its aggregation weight), in
compressed sparse rows: federation f's exceptions are `clients[indptr[f]:indptr[f + 1]]`
(ascending) with `values[...]`. Leave-one-out rows hold one entry each, a half subset C / 2.
`retraining.retrain` expands only what a chunk of federations needs: their values on the
round's K clients (`columns`), `[F_chunk, K]`.

It reads like the dense matrix where that is cheap: `len(masks)`, `masks.shape`, `masks[f]`
(a dense row `[C]`), `masks[rows]` (the chosen federations, still sparse) and
`np.asarray(masks)` (dense: only for small C).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class FederationMasks:
  """F federations' masks over C clients: 1 except the listed `(client, value)` entries."""

  def __init__(self, num_clients: int, indptr: Any, clients: Any, values: Any):
    self.num_clients = int(num_clients)
    self.indptr = np.asarray(indptr, np.int64)
    self.clients = np.asarray(clients, np.int64)
    self.values = np.asarray(values, np.float32)
    if self.indptr.ndim != 1 or len(self.indptr) < 1 or self.indptr[0] != 0 or (
        self.indptr[-1] != len(self.clients) or len(self.clients) != len(self.values)) or (
            np.any(np.diff(self.indptr) < 0)):
      raise ValueError("FederationMasks: indptr must rise from 0 to len(clients) == "
                       "len(values)")
    if self.clients.size and (self.clients.min() < 0 or self.clients.max() >= num_clients):
      raise ValueError(f"FederationMasks: client ids must lie in [0, {num_clients})")

  @classmethod
  def leave_out(cls, num_clients: int, left_out: Sequence[Any]) -> "FederationMasks":
    """One federation per entry of `left_out`: those clients (ids) at 0, the others at 1."""
    rows = [np.unique(np.asarray(r, np.int64)) for r in left_out]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    clients = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return cls(num_clients, indptr, clients, np.zeros(len(clients), np.float32))

  @classmethod
  def from_dense(cls, masks: Any) -> "FederationMasks":
    """The sparse description of a dense `[F, C]` float mask (its entries != 1)."""
    masks = np.asarray(masks, np.float32)
    rows, clients = np.nonzero(masks != 1.0)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(masks)))])
    return cls(masks.shape[1], indptr, clients, masks[rows, clients])

  @staticmethod
  def concatenate(parts: Sequence["FederationMasks"]) -> "FederationMasks":
    """The federations of `parts` one after the other (same C)."""
    ends = np.cumsum([0] + [len(p.clients) for p in parts[:-1]])
    indptr = np.concatenate([[0]] + [p.indptr[1:] + e for p, e in zip(parts, ends)])
    return FederationMasks(parts[0].num_clients, indptr,
                           np.concatenate([p.clients for p in parts]),
                           np.concatenate([p.values for p in parts]))

  @property
  def shape(self) -> tuple[int, int]:
    return (len(self.indptr) - 1, self.num_clients)

  def __len__(self) -> int:
    return len(self.indptr) - 1

  def entries(self, f: int) -> tuple[np.ndarray, np.ndarray]:
    """Federation f's exceptions: `(clients, values)`."""
    lo, hi = self.indptr[f], self.indptr[f + 1]
    return self.clients[lo:hi], self.values[lo:hi]

  def take(self, rows: Any) -> "FederationMasks":
    """The federations `rows` (ints, in that order; repeats allowed), still sparse."""
    rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows,
                                                                                 np.int64)
    lo, hi = self.indptr[rows], self.indptr[rows + 1]
    take = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)] or [np.zeros(0, int)])
    indptr = np.concatenate([[0], np.cumsum(hi - lo)])
    return FederationMasks(self.num_clients, indptr, self.clients[take], self.values[take])

  def columns(self, clients: Any) -> np.ndarray:
    """`[F, len(clients)]` float32: every federation's value on `clients` (distinct ids)."""
    clients = np.asarray(clients, np.int64)
    where = np.full(self.num_clients, -1, np.int64)
    where[clients] = np.arange(len(clients))
    out = np.ones((len(self), len(clients)), np.float32)
    row = np.repeat(np.arange(len(self)), np.diff(self.indptr))
    col = where[self.clients]
    hit = col >= 0
    out[row[hit], col[hit]] = self.values[hit]
    return out

  def dense(self) -> np.ndarray:
    """`[F, C]` float32 (small C only)."""
    out = np.ones(self.shape, np.float32)
    out[np.repeat(np.arange(len(self)), np.diff(self.indptr)), self.clients] = self.values
    return out

  def __getitem__(self, item: Any) -> Any:
    if isinstance(item, (int, np.integer)):
      f = int(item) + (len(self) if item < 0 else 0)
      if not 0 <= f < len(self):
        raise IndexError(f"federation {item} of {len(self)}")
      row = np.ones(self.num_clients, np.float32)
      clients, values = self.entries(f)
      row[clients] = values
      return row
    return self.take(item)

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    del copy
    out = self.dense()
    return out if dtype is None else out.astype(dtype)

  def __repr__(self) -> str:
    return (f"FederationMasks({len(self)} federations x {self.num_clients} clients, "
            f"{len(self.clients)} entries != 1)")
