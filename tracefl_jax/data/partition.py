"""Partitioning a training set over clients: pure NumPy functions of (labels, clients, seed).

Every partition carries its per-client label histogram `label_counts [C, num_classes]`: the
ground truth that provenance is scored against (a trace is correct when the traced client
holds the input's label).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

PARTITION_METHODS = ("iid", "dirichlet", "pathological", "shards")


@dataclasses.dataclass(frozen=True)
class Partition:
  """`client_indices[c]`: int64 indices into the training set; `label_counts [C, K]`."""
  client_indices: tuple[np.ndarray, ...]
  label_counts: np.ndarray

  @property
  def num_clients(self) -> int:
    return len(self.client_indices)

  @property
  def client_sizes(self) -> np.ndarray:
    return np.array([len(ix) for ix in self.client_indices], np.int64)


def _num_classes(labels: np.ndarray, num_classes: int | None) -> int:
  return int(num_classes if num_classes is not None else labels.max(initial=-1) + 1)


def _make(parts: Sequence[Sequence[int]], labels: np.ndarray,
          num_classes: int | None) -> Partition:
  k = _num_classes(labels, num_classes)
  indices = tuple(np.asarray(p, np.int64) for p in parts)
  counts = np.stack([np.bincount(labels[ix], minlength=k) for ix in indices]) if indices else (
      np.zeros((0, k), np.int64))
  return Partition(indices, counts.astype(np.int64))


def _check(labels: np.ndarray, num_clients: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be a vector, got shape {labels.shape}")
  if num_clients < 1:
    raise ValueError(f"num_clients={num_clients} must be >= 1")
  if num_clients > len(labels):
    raise ValueError(f"num_clients={num_clients} exceeds the {len(labels)} training examples")
  return labels


def partition_iid(labels: np.ndarray, num_clients: int, seed: int,
                  num_classes: int | None = None) -> Partition:
  """A seeded shuffle split into `num_clients` near-equal parts."""
  labels = _check(labels, num_clients)
  perm = np.random.default_rng(seed).permutation(len(labels))
  return _make(np.array_split(perm, num_clients), labels, num_classes)


def partition_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int, *,
                        num_classes: int | None = None, self_balancing: bool = True,
                        min_partition_size: int = 0, max_tries: int = 10,
                        shuffle: bool = True) -> Partition:
  """Label-skewed partition with flwr-datasets `DirichletPartitioner` semantics.

  With `rng = default_rng(seed)`, for each class in sorted order (flwr-datasets 0.6.1 sorts
  `Dataset.unique`): draw p ~ Dir(alpha * 1_C); with
  `self_balancing`, zero the share of every client already holding MORE than the average
  `len(labels) / C` examples and renormalise; split the class's indices (dataset order) at
  `(cumsum(p) * n_class).astype(int)[:-1]`. If the smallest client is below
  `min_partition_size`, draw everything again (same generator) up to `max_tries` times. Then,
  with `shuffle`, shuffle each client's indices in place, client by client.
  """
  labels = _check(labels, num_clients)
  if not alpha > 0:
    raise ValueError(f"alpha={alpha} must be > 0")
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  average = len(labels) / num_clients
  for _ in range(max_tries):
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for k in classes:
      members = np.nonzero(labels == k)[0]
      p = rng.dirichlet(np.full(num_clients, alpha))
      if self_balancing:
        full = np.array([len(part) > average for part in parts])
        p = np.where(full, 0.0, p)
        p = p / p.sum()
      cuts = (np.cumsum(p) * len(members)).astype(int)[:-1]
      for part, chunk in zip(parts, np.split(members, cuts)):
        part.extend(chunk.tolist())
    sizes = [len(part) for part in parts]
    if min(sizes) >= min_partition_size:
      break
  else:
    raise ValueError(
        f"Dirichlet partition: after {max_tries} draws the smallest client holds "
        f"{min(sizes)} < min_partition_size={min_partition_size} examples (sizes of the last "
        f"draw: min {min(sizes)}, median {int(np.median(sizes))}, max {max(sizes)}). Lower "
        f"min_partition_size, raise alpha (now {alpha}) or use fewer clients.")
  if shuffle:
    for part in parts:
      rng.shuffle(part)
  return _make(parts, labels, num_classes)


def partition_pathological(labels: np.ndarray, num_clients: int, classes_per_client: int,
                           seed: int, num_classes: int | None = None) -> Partition:
  """Each client holds `classes_per_client` classes; a class's examples are split evenly
  among the clients holding it. Class sets are assigned round-robin over a seeded class
  order, so every class is used when `num_clients * classes_per_client >= num_classes`."""
  labels = _check(labels, num_clients)
  k = _num_classes(labels, num_classes)
  if not 1 <= classes_per_client <= k:
    raise ValueError(f"classes_per_client={classes_per_client} must be in [1, {k}]")
  rng = np.random.default_rng(seed)
  order = rng.permutation(k)
  held = [[int(order[(c * classes_per_client + j) % k]) for j in range(classes_per_client)]
          for c in range(num_clients)]
  parts: list[list[int]] = [[] for _ in range(num_clients)]
  for cls in range(k):
    owners = [c for c in range(num_clients) if cls in held[c]]
    members = rng.permutation(np.nonzero(labels == cls)[0])
    for c, chunk in zip(owners, np.array_split(members, max(len(owners), 1))):
      parts[c].extend(chunk.tolist())
  return _make(parts, labels, num_classes)


def partition_shards(labels: np.ndarray, num_clients: int, shards_per_client: int,
                     seed: int, num_classes: int | None = None) -> Partition:
  """McMahan et al. (2017): sort by label, cut into `C * shards_per_client` equal shards,
  deal each client `shards_per_client` random shards."""
  labels = _check(labels, num_clients)
  if shards_per_client < 1:
    raise ValueError(f"shards_per_client={shards_per_client} must be >= 1")
  num_shards = num_clients * shards_per_client
  if num_shards > len(labels):
    raise ValueError(f"{num_shards} shards exceed the {len(labels)} training examples")
  rng = np.random.default_rng(seed)
  by_label = np.argsort(labels, kind="stable")
  shards = np.array_split(by_label, num_shards)
  deal = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
  return _make([np.concatenate([shards[s] for s in row]) for row in deal], labels, num_classes)


def fixup_partition(partition: Partition, labels: np.ndarray, *, min_label_count: int = 10,
                    max_per_client: int = 2048, min_client_size: int = 32) -> Partition:
  """The original TraceFL's per-client clean-up (spec section 4), in this order: drop each
  client's labels with fewer than `min_label_count` examples, keep its first `max_per_client`
  examples, drop clients left with fewer than `min_client_size` and renumber the rest (order
  kept)."""
  labels = np.asarray(labels)
  kept = []
  for ix in partition.client_indices:
    counts = np.bincount(labels[ix], minlength=partition.label_counts.shape[1])
    ix = ix[counts[labels[ix]] >= min_label_count][:max_per_client]
    if len(ix) >= min_client_size:
      kept.append(ix)
  return _make(kept, labels, partition.label_counts.shape[1])


def make_partition(labels: np.ndarray, method: str, num_clients: int, seed: int,
                   num_classes: int | None = None, **options: Any) -> Partition:
  """Dispatches by name to the partitioners above; `options` are the method's own."""
  fns = {"iid": partition_iid, "dirichlet": partition_dirichlet,
         "pathological": partition_pathological, "shards": partition_shards}
  if method not in fns:
    raise ValueError(f"unknown partition method {method!r}; valid: "
                     f"{', '.join(PARTITION_METHODS)}")
  try:
    return fns[method](labels, num_clients, seed=seed, num_classes=num_classes, **options)
  except TypeError as e:
    raise ValueError(f"partition method {method!r}: {e}") from e
