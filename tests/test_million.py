"""A million clients (issue 36 item 5): the data path's pieces that had to scale (the
vectorised `Partition.from_indices`, the chunked and uint8 structured images, heavy-tailed
sizes from the config) and the million presets of configs/scale.py, whose toy preset runs
end to end through the sweep."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_gpu_script import _gpu_script
from tracefl_jax.data.partition import (Partition, check_labels, fixup_partition,
                                        heavy_tailed_sizes, make_partition)
from tracefl_jax.data.structured import _upsample, make_structured_images
from tracefl_jax.experiment import stages, sweep
from tracefl_jax.experiment.config import validate

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "scale.py"


def _scale():
  spec = importlib.util.spec_from_file_location("scale_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _from_indices_loop(parts, labels, num_classes):
  """The per-client loop `Partition.from_indices` was before it was vectorised."""
  labels, k = check_labels(labels, num_classes)
  indices = tuple(np.asarray(p).reshape(-1).astype(np.int64) for p in parts)
  counts = (np.stack([np.bincount(labels[ix], minlength=k) for ix in indices]) if indices
            else np.zeros((0, k), np.int64))
  return indices, counts


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_partition_equals_the_loop(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 7, 300).astype(np.int32)
  sizes = rng.integers(0, 12, 40)
  dtypes = [np.int64, np.int32, np.uint16, np.int8]
  parts = [rng.integers(0, 120 if dtypes[c % 4] == np.int8 else 300, s).astype(dtypes[c % 4])
           for c, s in enumerate(sizes)]
  parts[3] = []                              # an empty list (float64 when made an array)
  parts[5] = parts[5].tolist()               # a Python list
  parts[7] = np.asarray(parts[7]).reshape(-1, 1) if len(parts[7]) else parts[7]
  got = Partition.from_indices(parts, labels, 7)
  indices, counts = _from_indices_loop(parts, labels, 7)
  assert len(got.client_indices) == len(indices)
  for a, b in zip(got.client_indices, indices):
    assert a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(got.label_counts, counts)
  assert got.label_counts.dtype == np.int64
  np.testing.assert_array_equal(got.client_sizes, [len(ix) for ix in indices])
  empty = Partition.from_indices([], labels, 7)
  assert empty.label_counts.shape == (0, 7) and empty.num_clients == 0


def test_vectorised_partition_names_the_first_bad_client():
  labels = np.arange(20) % 3
  with pytest.raises(ValueError, match="client 2's indices must be integers"):
    Partition.from_indices([[0, 1], [], np.array([0.5]), [1.5]], labels)
  with pytest.raises(ValueError, match=r"client 1's indices span \[3, 25\]"):
    Partition.from_indices([[0, 1], [3, 25], [-1]], labels)
  with pytest.raises(ValueError, match=r"client 2's indices span \[-1, -1\]"):
    Partition.from_indices([[0, 1], [], [-1]], labels)


def _fixup_loop(part, labels, min_label_count, max_per_client, min_client_size):
  """`fixup_partition` as the per-client loop it was before it was vectorised."""
  kept = []
  for ix in part.client_indices:
    counts = np.bincount(labels[ix], minlength=part.label_counts.shape[1])
    ix = ix[counts[labels[ix]] >= min_label_count][:max_per_client]
    if len(ix) >= min_client_size:
      kept.append(ix)
  return kept


@pytest.mark.parametrize("seed", range(3))
def test_vectorised_fixup_equals_the_loop(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 6, 3000).astype(np.int32)
  part = make_partition(labels, "dirichlet", 40, seed, num_classes=6, alpha=0.3)
  for args in [(10, 2048, 32), (3, 50, 5), (0, 1, 0), (10, 2048, 10**6)]:
    got = fixup_partition(part, labels, min_label_count=args[0], max_per_client=args[1],
                          min_client_size=args[2])
    want = _fixup_loop(part, labels, *args)
    assert got.num_clients == len(want)
    for a, b in zip(got.client_indices, want):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got.label_counts, Partition.from_indices(
        want, labels, 6).label_counts)


@pytest.mark.parametrize("n,clients", [(1000, 7), (500, 500), (999, 40)])
def test_iid_and_heavy_tailed_cut_as_the_split_did(n, clients):
  labels = np.random.default_rng(n).integers(0, 5, n).astype(np.int32)
  perm = np.random.default_rng(3).permutation(n)
  for method, parts in (("iid", np.array_split(perm, clients)),
                        ("heavy_tailed", np.split(perm, np.cumsum(heavy_tailed_sizes(
                            n, clients, 3, "lognormal", sigma=1.5))[:-1]))):
    options = {"distribution": "lognormal", "sigma": 1.5} if method == "heavy_tailed" else {}
    got = make_partition(labels, method, clients, 3, **options)
    want = Partition.from_indices(parts, labels)
    for a, b in zip(got.client_indices, want.client_indices, strict=True):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got.label_counts, want.label_counts)


def test_partition_does_not_alias_the_callers_arrays():
  parts = [np.arange(5), np.arange(5, 9)]
  part = Partition.from_indices(parts, np.zeros(10, np.int32), 2)
  parts[0][0] = 7
  assert part.client_indices[0][0] == 0


def _structured_reference(num_train, num_test, image_shape, num_classes, seed, noise,
                          grid=4, max_shift=1):
  """make_structured_images as one pass (before it was chunked)."""
  h, w, channels = image_shape
  rng = np.random.default_rng(seed)
  field = rng.normal(size=(num_classes, channels, grid, grid))
  protos = np.moveaxis(_upsample(field, (h, w)), 1, -1)
  protos = (protos - protos.mean(axis=(1, 2, 3), keepdims=True)) / protos.std(
      axis=(1, 2, 3), keepdims=True)
  n = num_train + num_test
  y = rng.integers(0, num_classes, size=n).astype(np.int32)
  shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
  contrast = rng.uniform(0.7, 1.3, size=(n, 1, 1, 1)).astype(np.float32)
  x = np.empty((n, h, w, channels), np.float32)
  for dy in range(-max_shift, max_shift + 1):
    for dx in range(-max_shift, max_shift + 1):
      sel = np.nonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))[0]
      x[sel] = np.roll(protos, (dy, dx), axis=(1, 2))[y[sel]]
  x *= contrast
  x += noise * rng.standard_normal(size=x.shape, dtype=np.float32)
  return x, y


def test_structured_images_do_not_depend_on_the_chunk_and_quantise_within_half_a_step():
  args = dict(num_train=700, num_test=90, image_shape=(6, 7, 2), num_classes=5, seed=4,
              noise=1.5)
  x, y = _structured_reference(**args)
  for chunk in (1, 33, 10**6):
    d = make_structured_images(**args, chunk=chunk)
    np.testing.assert_array_equal(d.x_train, x[:700])
    np.testing.assert_array_equal(d.x_test, x[700:])
    np.testing.assert_array_equal(d.y_train, y[:700])
  u = make_structured_images(**args, pixels="uint8", chunk=50)
  assert u.x_train.dtype == np.uint8 and u.normalization is not None
  np.testing.assert_array_equal(u.y_train, y[:700])
  step = u.normalization.std[0] * 255  # pixels per unit of x
  assert np.abs(u.normalization(u.x_train) - x[:700]).max() <= 0.5 / step + 1e-5
  assert 0 < u.x_train.min() and u.x_train.max() < 255  # nothing clipped at this noise
  with pytest.raises(ValueError, match="pixels='int8'"):
    make_structured_images(10, 5, pixels="int8")


def test_heavy_tailed_sizes_come_from_the_config():
  c = _scale().get_config("million_smoke")
  labels = np.arange(c.dataset.synthetic_size) % 10
  part = stages.partition(c, labels.astype(np.int32), 10)
  sizes = part.client_sizes
  assert part.num_clients == c.num_clients and sizes.sum() == len(labels)
  assert sizes.min() >= c.partition.min_partition_size
  assert sizes.max() > 50 * np.median(sizes)  # log-normal, sigma 1.5: a heavy tail
  c.partition.sizes, c.partition.size_spread = "zipf", 0.5
  zipf = stages.partition(c, labels.astype(np.int32), 10).client_sizes
  assert not np.array_equal(np.sort(zipf), np.sort(sizes))


def test_load_data_keeps_the_million_presets_data_on_the_host():
  c = _scale().get_config("million_smoke")
  data = stages.load_data(c).data
  assert data.placement == "host" and isinstance(data.x, np.ndarray)
  assert data.x.dtype == np.uint8 and data.num_clients == c.num_clients
  c.dataset.placement = "device"
  assert stages.load_data(c).data.placement == "device"


def test_a_generated_dataset_is_built_once_per_options():
  c = _scale().get_config("million_smoke")
  first = stages.cached_dataset(c)
  assert stages.cached_dataset(c) is first and not first.x_train.flags.writeable
  c.seed += 1
  assert stages.cached_dataset(c) is not first
  c.dataset.name = "digits"
  stages.cached_dataset(c)
  assert not stages._last_generated  # pylint: disable=protected-access


def test_million_presets():
  scale = _scale()
  for preset in ("million", "million_gpu", "million_smoke"):
    c = scale.get_config(preset)
    validate(c)
    assert (c.partition.method, c.partition.fixup, c.aggregation.weighting) == (
        "heavy_tailed", False, "examples")
    assert (c.dataset.synthetic_pixels, c.dataset.placement) == ("uint8", "host")
    assert c.provenance.counterfactual and c.provenance.score == "tracefl"  # + first-order
  c = scale.get_config("million")
  assert c.num_clients == 1_000_000 and c.dataset.synthetic_size == 24_000_000
  assert [p["clients_per_round"] for p in sweep.expand_grid(scale.get_sweep("million"))] == [
      1000, 10000]


def test_million_smoke_runs_through_the_sweep(tmp_path):
  """The million presets' code paths at toy size: the first cell of :million_smoke."""
  scale = _scale()
  grid = {"clients_per_round": scale.get_sweep("million_smoke")["clients_per_round"][:1]}
  (row,) = sweep.run_sweep(scale.get_config("million_smoke"), grid, tmp_path, progress=False)
  assert row["clients"] == 2000 and row["rounds"] == 2
  prov = row["provenance"]
  assert prov["rounds_traced"] == 2 and prov["counterfactual_top1"] is not None
  assert prov["first_order_counterfactual_top1"] is not None
  assert row["memory"]["peak_rss_bytes"] > 0
  assert json.loads((tmp_path / row["run"] / "config.json").read_text())["dataset"][
      "placement"] == "host"
  with open(tmp_path / "results.csv", encoding="utf-8") as f:
    (line,) = list(csv.DictReader(f))
  assert line["cf_weight_aware_top1"] not in ("", None)
  part = json.loads((tmp_path / row["run"] / "partition.json").read_text())
  assert len(part["label_counts"]) == 2000
  # The GPU benchmark's million section runs the same cell in smoke mode (compiled already).
  gpu = _gpu_script()
  report = gpu.Report(tmp_path / "gpu", "smoke")
  gpu.million_section(report, gpu.SIZES["smoke"], gpu.Budget(600))
  (cell,) = [r for r in report.rows if r["section"] == "million"]
  assert cell["status"] == "ok" and cell["final_accuracy"] == row["final_accuracy"]
  assert cell["host_peak_gb"] > 0 and cell["first_order_cf_top1"] is not None
