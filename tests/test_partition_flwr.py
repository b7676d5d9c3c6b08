"""`partition_dirichlet` against the reference itself: flwr-datasets 0.6.1's DirichletPartitioner.

Every comparison is exact: the same index lists per client, in the same (shuffled) order.
flwr's indices are read through its public API by giving the dataset an "idx" column.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import datasets  # datasets, flwr-datasets and hypothesis come with the `test` extra
from flwr_datasets import partitioner as flwr_partitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from tracefl_jax.data import partition_dirichlet

datasets.disable_progress_bars()


def _flwr(labels, num_partitions, alpha, **options):
  """flwr's partitions of a dataset whose "label" column is `labels`, as index lists."""
  labels = list(labels)
  options = {"seed": 42, "self_balancing": True, "min_partition_size": 0, **options}
  part = flwr_partitioner.DirichletPartitioner(num_partitions=num_partitions,
                                               partition_by="label", alpha=alpha, **options)
  part.dataset = datasets.Dataset.from_dict({"label": labels,
                                             "idx": list(range(len(labels)))})
  return [list(part.load_partition(c)["idx"]) for c in range(num_partitions)]


def _ours(labels, num_partitions, alpha, **options):
  options = {"seed": 42, "self_balancing": True, "min_partition_size": 0, **options}
  part = partition_dirichlet(np.asarray(labels), num_partitions, alpha, **options)
  return [ix.tolist() for ix in part.client_indices]


def _assert_same(ours, ref):
  assert len(ours) == len(ref)
  for c, (a, b) in enumerate(zip(ours, ref)):
    assert sorted(a) == sorted(b), f"client {c}: different index sets"
    assert a == b, f"client {c}: same set, different order after the shuffle"


def _labels(seed, n, k=10):
  return np.random.default_rng(seed).integers(0, k, size=n)


@pytest.mark.parametrize("alpha,num_partitions,n,label_seed", [
    (0.1, 10, 6000, 0),
    (0.3, 100, 6000, 0),
    (1.0, 7, 1000, 1),
    (0.5, 20, 3000, 2),
    # Found by search: numpy's pairwise p.sum() and flwr's left-to-right sum differ in the
    # last bit here; with trailing clients zeroed by self-balancing, that bit decides whether
    # cumsum(p) reaches 1.0 and so which client gets the class's last example.
    (0.3, 100, 1000, 44),
    (0.3, 50, 1000, 17),
])
def test_same_partitions_as_flwr(alpha, num_partitions, n, label_seed):
  labels = _labels(label_seed, n)
  _assert_same(_ours(labels, num_partitions, alpha), _flwr(labels, num_partitions, alpha))


def test_flwr_iterates_classes_sorted_not_by_first_appearance():
  rng = np.random.default_rng(3)
  labels = rng.permutation(np.repeat([7, 3, 9, 0, 5, 1, 8, 2, 6, 4], 80))
  labels[:10] = [7, 3, 9, 0, 5, 1, 8, 2, 6, 4]  # first appearances out of sorted order
  first_seen = datasets.Dataset.from_dict({"label": labels.tolist()}).unique("label")
  assert first_seen == [7, 3, 9, 0, 5, 1, 8, 2, 6, 4]  # Dataset.unique does not sort...
  ref = _flwr(labels, 20, 0.5)
  _assert_same(_ours(labels, 20, 0.5), ref)  # ...but flwr sorts it, as np.unique does.
  # A partitioner visiting classes by first appearance would give other partitions: relabel
  # so first-appearance order becomes sorted order and the same draws land on other classes.
  rank = {c: r for r, c in enumerate(first_seen)}
  by_appearance = _ours([rank[c] for c in labels], 20, 0.5)
  assert by_appearance != ref


def test_string_labels_are_visited_in_lexicographic_order():
  labels = _labels(5, 1200, k=12)  # 12 classes: "10" and "11" sort before "2"
  strings = [str(c) for c in labels]
  ref = _flwr(strings, 15, 0.5)
  rank = {s: r for r, s in enumerate(sorted(set(strings)))}
  _assert_same(_ours([rank[s] for s in strings], 15, 0.5), ref)
  assert _ours(labels, 15, 0.5) != ref  # numeric order is a different partition


@pytest.mark.parametrize("options", [{"self_balancing": False}, {"shuffle": False},
                                     {"seed": 7}])
def test_options_match_flwr(options):
  labels = _labels(4, 2000)
  _assert_same(_ours(labels, 12, 0.3, **options), _flwr(labels, 12, 0.3, **options))


@pytest.mark.parametrize("min_size,draws", [(70, 3), (73, 11)])
def test_min_partition_size_redraws_like_flwr(min_size, draws):
  # Per-draw smallest partition for these labels: 34, 45, 72, 54, 49, 46, 52, 61, 47, 50, 76.
  labels = _labels(6, 1000)
  with pytest.warns(UserWarning, match="min_partition_size") as record:
    ref = _flwr(labels, 10, 0.5, min_partition_size=min_size)
  assert len(record) == draws - 1  # flwr warns once per failed draw
  _assert_same(_ours(labels, 10, 0.5, min_partition_size=min_size), ref)
  if draws == 11:  # flwr's last chance (its try counter runs 0..10): 11 draws, not 10
    with pytest.raises(ValueError, match="after 10 draws"):
      _ours(labels, 10, 0.5, min_partition_size=min_size, max_tries=10)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)
      with pytest.raises(ValueError, match="max number of attempts"):
        _flwr(labels, 10, 0.5, min_partition_size=min_size + 4)
    with pytest.raises(ValueError, match="after 11 draws"):
      _ours(labels, 10, 0.5, min_partition_size=min_size + 4)


@settings(max_examples=25, deadline=None, database=None)
@given(n=st.integers(20, 400), k=st.integers(1, 15), num_partitions=st.integers(1, 20),
       alpha=st.sampled_from([0.1, 0.3, 1.0, 5.0]), label_seed=st.integers(0, 2**31),
       self_balancing=st.booleans())
def test_random_label_arrays_match_flwr(n, k, num_partitions, alpha, label_seed,
                                        self_balancing):
  labels = _labels(label_seed, n, k)
  _assert_same(_ours(labels, num_partitions, alpha, self_balancing=self_balancing),
               _flwr(labels, num_partitions, alpha, self_balancing=self_balancing))
