"""Partitioning a training set over clients: pure NumPy functions of (labels, clients, seed).

Every partition carries its per-client label histogram `label_counts [C, num_classes]`: the
ground truth that provenance is scored against (a trace is correct when the traced client
holds the input's label).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

PARTITION_METHODS = ("iid", "dirichlet", "pathological", "shards", "heavy_tailed")


@dataclasses.dataclass(frozen=True)
class Partition:
  """`client_indices[c]`: int64 indices into the training set; `label_counts [C, K]`."""
  client_indices: tuple[np.ndarray, ...]
  label_counts: np.ndarray

  @property
  def num_clients(self) -> int:
    return len(self.client_indices)

  @functools.cached_property
  def client_sizes(self) -> np.ndarray:
    """`[C]` example counts (computed once: a million clients' lengths take 0.1 s)."""
    return np.fromiter(map(len, self.client_indices), np.int64, len(self.client_indices))

  @classmethod
  def from_indices(cls, parts: Sequence[Sequence[int]], labels: np.ndarray,
                   num_classes: int | None = None) -> Partition:
    """A partition from per-client index lists (integers in `[0, len(labels))`), its label
    counts taken from `labels` (`[N]` integers in `[0, num_classes)`).

    Vectorised over clients (a million clients' index arrays in about a second): the lists
    are laid end to end once, checked and counted there, and each client's `int64` array is
    a view of that one buffer (a copy: the caller's arrays are not aliased)."""
    labels, k = check_labels(labels, num_classes)
    return cls._from_flat(*_concatenate_indices(parts, len(labels)), labels, k)

  @classmethod
  def _from_flat(cls, flat: np.ndarray, sizes: np.ndarray, labels: np.ndarray,
                 k: int) -> Partition:
    """From checked int64 `flat` indices, client after client, `sizes [C]` long each."""
    owner = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    counts = np.bincount(owner * k + labels[flat], minlength=len(sizes) * k)
    ends = np.cumsum(sizes).tolist()
    indices = tuple(flat[start:end] for start, end in zip([0, *ends[:-1]], ends))
    return cls(indices, counts.reshape(len(sizes), k).astype(np.int64))


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_labels(labels: Any, num_classes: int | None = None) -> tuple[np.ndarray, int]:
  """`(labels as an [N] integer array, K)`, K = `num_classes` or `max(labels) + 1`.

  Raises:
    ValueError: naming the argument, for labels that are not an integer vector, a negative
      label, `num_classes` that is not a positive int, or a label >= `num_classes`.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be a vector [N] of class ids, got shape {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_:
    raise ValueError(f"labels must be integer class ids 0..K-1, got dtype {labels.dtype} "
                     f"(first values {labels[:3].tolist()}); floats are not truncated, pass "
                     f"labels.astype(int) if they are whole numbers")
  if len(labels) and labels.min() < 0:
    i = int(np.argmin(labels))
    raise ValueError(f"labels must be class ids >= 0, got {labels[i]} at index {i}")
  largest = int(labels.max(initial=-1))
  if num_classes is None:
    return labels, largest + 1
  if not _is_int(num_classes) or num_classes < 1:
    raise ValueError(f"num_classes={num_classes!r} must be a positive int (or None: "
                     f"max(labels) + 1)")
  if largest >= num_classes:
    i = int(np.argmax(labels))
    raise ValueError(f"labels hold class {largest} (at index {i}) but num_classes="
                     f"{num_classes}: labels must lie in [0, {num_classes})")
  return labels, int(num_classes)


def _client_indices(part: Any, client: int, n: int) -> np.ndarray:
  ix = np.asarray(part).reshape(-1)
  if ix.size and (not np.issubdtype(ix.dtype, np.integer) or ix.dtype == np.bool_):
    raise ValueError(f"client {client}'s indices must be integers, got dtype {ix.dtype}")
  if ix.size and not 0 <= ix.min() <= ix.max() < n:
    raise ValueError(f"client {client}'s indices span [{ix.min()}, {ix.max()}], outside the "
                     f"{n} examples' [0, {n})")
  return ix.astype(np.int64)


def _concatenate_indices(parts: Sequence[Any], n: int) -> tuple[np.ndarray, np.ndarray]:
  """`(flat int64 [sum of sizes], sizes [C])`: every client's indices end to end, checked as
  `_client_indices` checks one client (the first offending client is named)."""
  arrays = [np.asarray(p).reshape(-1) for p in parts]
  sizes = np.fromiter(map(len, arrays), np.int64, len(arrays))
  nonempty = [a for a in arrays if a.size]
  kinds = {a.dtype for a in nonempty}
  if any(not np.issubdtype(d, np.integer) or d == np.bool_ for d in kinds):
    for c, a in enumerate(arrays):  # name the first offending client
      _client_indices(a, c, n)
  flat = (np.concatenate([a.astype(np.int64, copy=False) for a in nonempty]) if nonempty
          else np.zeros(0, np.int64))
  if flat.size and not 0 <= flat.min() <= flat.max() < n:
    first = int(np.argmax((flat < 0) | (flat >= n)))
    client = int(np.searchsorted(np.cumsum(sizes), first, side="right"))
    _client_indices(arrays[client], client, n)
  return flat, sizes


def _make(parts: Sequence[Sequence[int]], labels: np.ndarray,
          num_classes: int | None) -> Partition:
  return Partition.from_indices(parts, labels, num_classes)


def _check(labels: np.ndarray, num_clients: int, seed: Any = 0,
           num_classes: int | None = None) -> tuple[np.ndarray, int]:
  """`(labels, K)` after checking every argument every partitioner shares."""
  labels, k = check_labels(labels, num_classes)
  if not _is_int(num_clients) or num_clients < 1:
    raise ValueError(f"num_clients={num_clients!r} must be an int >= 1")
  if num_clients > len(labels):
    raise ValueError(f"num_clients={num_clients} exceeds the {len(labels)} training examples")
  if not _is_int(seed) or seed < 0:
    raise ValueError(f"seed={seed!r} must be a non-negative int")
  return labels, k


def partition_iid(labels: np.ndarray, num_clients: int, seed: int,
                  num_classes: int | None = None) -> Partition:
  """A seeded shuffle split into `num_clients` near-equal parts."""
  labels, k = _check(labels, num_clients, seed, num_classes)
  perm = np.random.default_rng(seed).permutation(len(labels))
  sizes = np.full(num_clients, len(labels) // num_clients, np.int64)
  sizes[:len(labels) % num_clients] += 1  # as np.array_split cuts
  return Partition._from_flat(perm, sizes, labels, k)  # pylint: disable=protected-access


def partition_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int, *,
                        num_classes: int | None = None, self_balancing: bool = True,
                        min_partition_size: int = 0, max_tries: int = 11,
                        shuffle: bool = True) -> Partition:
  """Label-skewed partition, index for index flwr-datasets 0.6.1's `DirichletPartitioner`.

  `partition_dirichlet(y, C, alpha, seed)` gives the same client index lists, in the same
  order, as `DirichletPartitioner(num_partitions=C, partition_by="label", alpha=alpha,
  seed=seed, self_balancing=..., min_partition_size=..., shuffle=...)` on a dataset whose
  "label" column is `y` (checked against the installed package in tests/test_partition_flwr.py).
  With `rng = np.random.default_rng(seed)`, one generator for everything:

  1. Classes are visited in SORTED order of their values (flwr sorts `Dataset.unique`, which
     itself lists classes by first appearance); for ints that is numeric order, for string
     labels in flwr it would be lexicographic ("10" < "2"), so encode strings to ints by
     their sorted order before calling this.
  2. Per class k: `p = rng.dirichlet(alpha * 1_C)`. With `self_balancing`, every client that
     already holds MORE than `len(y) / C` examples gets share 0 and `p` is divided by its
     sum, summed left to right in float64 as flwr's Python `sum` does (numpy's pairwise
     `p.sum()` can differ in the last bit, and when the trailing clients are zeroed that bit
     decides whether `cumsum` reaches exactly 1 and so who gets the class's last example).
     Without `self_balancing`, `p` is used as drawn.
  3. The class's indices `nonzero(y == k)` (dataset order) are cut at
     `(cumsum(p) * n_k).astype(int)[:-1]`, chunk c appended to client c.
  4. If the smallest client holds fewer than `min_partition_size` examples, everything is
     drawn again (continuing the same generator); flwr makes at most 11 draws (its counter
     runs 0..10), hence `max_tries=11`; after that a ValueError. flwr also warns on every
     failed draw; we do not.
  5. With `shuffle`, each client's list is shuffled in place (`rng.shuffle` on the Python
     list), client 0 first.

  Returns `Partition` with `client_indices[c]` in that final order and `label_counts [C, K]`.
  """
  labels, _ = _check(labels, num_clients, seed, num_classes)
  if not 0 < alpha < math.inf:
    raise ValueError(f"alpha={alpha} must be > 0 (and finite)")
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)  # sorted, as flwr's sorted(Dataset.unique(...))
  members_of = [np.nonzero(labels == k)[0] for k in classes]
  average = len(labels) / num_clients
  concentration = np.full(num_clients, float(alpha))
  for _ in range(max_tries):
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for k, members in zip(classes, members_of):
      p = rng.dirichlet(concentration)
      if self_balancing:
        p = np.where([len(part) > average for part in parts], 0.0, p)
        total = sum(p.tolist())  # sequential float64 sum, not numpy's pairwise p.sum()
        if total == 0.0:  # flwr would divide 0/0 here and split at garbage indices
          raise ValueError(
              f"Dirichlet partition: class {k!r} drew share 0.0 for every client not yet "
              f"above the average size (alpha={alpha} underflows); raise alpha.")
        p = p / total
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
  labels, k = _check(labels, num_clients, seed, num_classes)
  if not _is_int(classes_per_client) or not 1 <= classes_per_client <= k:
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
  labels, _ = _check(labels, num_clients, seed, num_classes)
  if not _is_int(shards_per_client) or shards_per_client < 1:
    raise ValueError(f"shards_per_client={shards_per_client} must be >= 1")
  num_shards = num_clients * shards_per_client
  if num_shards > len(labels):
    raise ValueError(f"{num_shards} shards exceed the {len(labels)} training examples")
  rng = np.random.default_rng(seed)
  by_label = np.argsort(labels, kind="stable")
  shards = np.array_split(by_label, num_shards)
  deal = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
  return _make([np.concatenate([shards[s] for s in row]) for row in deal], labels, num_classes)


SIZE_DISTRIBUTIONS = ("zipf", "lognormal")


def heavy_tailed_sizes(total: int, num_clients: int, seed: int, distribution: str = "zipf",
                       exponent: float = 1.0, sigma: float = 1.5,
                       min_size: int = 1) -> np.ndarray:
  """`[C]` client sizes summing to `total`, each at least `min_size`, the rest shared in
  proportion to heavy-tailed weights: "zipf" (rank^-exponent, the ranks dealt to clients
  in a seeded random order; FedScale and LEAF report such tails) or "lognormal"
  (exp(sigma * N(0, 1))). Rounded by largest remainder, a function of the arguments."""
  if distribution not in SIZE_DISTRIBUTIONS:
    raise ValueError(f"unknown size distribution {distribution!r}; valid: "
                     f"{', '.join(SIZE_DISTRIBUTIONS)}")
  if not _is_int(min_size) or min_size < 0 or min_size * num_clients > total:
    raise ValueError(f"min_size={min_size!r} must be an int >= 0 with min_size * "
                     f"num_clients <= {total} examples")
  if not (0 < exponent < math.inf and 0 < sigma < math.inf):
    raise ValueError(f"exponent={exponent} and sigma={sigma} must be > 0 (and finite)")
  rng = np.random.default_rng([seed, 0x5123])
  if distribution == "zipf":
    weights = (rng.permutation(num_clients) + 1.0) ** -float(exponent)
  else:
    weights = np.exp(float(sigma) * rng.standard_normal(num_clients))
  share = (total - min_size * num_clients) * weights / weights.sum()
  sizes = np.floor(share).astype(np.int64)
  short = total - min_size * num_clients - int(sizes.sum())
  sizes[np.argsort(-(share - sizes), kind="stable")[:short]] += 1
  return sizes + min_size


def partition_heavy_tailed(labels: np.ndarray, num_clients: int, seed: int,
                           num_classes: int | None = None, **options: Any) -> Partition:
  """IID labels, heavy-tailed client sizes (`heavy_tailed_sizes(len(labels), ...)`,
  options `distribution`, `exponent`, `sigma`, `min_size`): a seeded shuffle cut at
  those sizes. Real federations' sizes look like this (LEAF's FEMNIST, Shakespeare, Stack
  Overflow); the engine's cost follows each client's own steps."""
  labels, k = _check(labels, num_clients, seed, num_classes)
  sizes = heavy_tailed_sizes(len(labels), num_clients, seed, **options)
  perm = np.random.default_rng(seed).permutation(len(labels))
  return Partition._from_flat(perm, sizes, labels, k)  # pylint: disable=protected-access


def fixup_partition(partition: Partition, labels: np.ndarray, *, min_label_count: int = 10,
                    max_per_client: int = 2048, min_client_size: int = 32) -> Partition:
  """The original TraceFL's per-client clean-up (spec section 4), in this order: drop each
  client's labels with fewer than `min_label_count` examples, keep its first `max_per_client`
  examples, drop clients left with fewer than `min_client_size` and renumber the rest (order
  kept)."""
  labels, _ = check_labels(labels, partition.label_counts.shape[1])
  for name, value, low in (("min_label_count", min_label_count, 0),
                           ("max_per_client", max_per_client, 1),
                           ("min_client_size", min_client_size, 0)):
    if not _is_int(value) or value < low:
      raise ValueError(f"{name}={value!r} must be an int >= {low}")
  # Vectorised over clients: every example tagged with its client, filtered, ranked
  # within its client, counted.
  k = partition.label_counts.shape[1]
  flat, sizes = _concatenate_indices(partition.client_indices, len(labels))
  owner = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
  cell = owner * k + labels[flat]  # (client, label) of every example
  counts = np.bincount(cell, minlength=len(sizes) * k)
  flat, owner = _keep(flat, owner, counts[cell] >= min_label_count)
  del cell
  held = np.bincount(owner, minlength=len(sizes))
  starts = np.cumsum(held) - held  # each client's first kept example
  flat, owner = _keep(flat, owner, np.arange(len(flat)) - starts[owner] < max_per_client)
  sizes = np.bincount(owner, minlength=len(sizes))
  kept = sizes >= min_client_size
  flat, _ = _keep(flat, owner, kept[owner])
  return Partition._from_flat(flat, sizes[kept], labels, k)  # pylint: disable=protected-access


def _keep(flat: np.ndarray, owner: np.ndarray,
          mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return flat[mask], owner[mask]


def make_partition(labels: np.ndarray, method: str, num_clients: int, seed: int,
                   num_classes: int | None = None, **options: Any) -> Partition:
  """Dispatches by name to the partitioners above; `options` are the method's own."""
  fns = {"iid": partition_iid, "dirichlet": partition_dirichlet,
         "pathological": partition_pathological, "shards": partition_shards,
         "heavy_tailed": partition_heavy_tailed}
  if method not in fns:
    raise ValueError(f"unknown partition method {method!r}; valid: "
                     f"{', '.join(PARTITION_METHODS)}")
  try:
    return fns[method](labels, num_clients, seed=seed, num_classes=num_classes, **options)
  except TypeError as e:
    raise ValueError(f"partition method {method!r}: {e}") from e
