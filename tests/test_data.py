"""Datasets and partitions: shapes, determinism, exact Dirichlet semantics, clear errors."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tracefl_jax.data import (DatasetNotFoundError, available_datasets, fixup_partition,
                              load_dataset, make_partition, partition_dirichlet,
                              partition_iid, partition_pathological, partition_shards)


@pytest.fixture(scope="module")
def labels():
  return np.random.default_rng(0).integers(0, 10, size=2000)


def _assigned_once(part, n):
  allix = np.concatenate(part.client_indices)
  assert len(allix) == len(np.unique(allix)), "an example is assigned twice"
  return allix


@pytest.mark.parametrize("make", [
    lambda y: partition_iid(y, 20, seed=1),
    lambda y: partition_dirichlet(y, 20, 0.3, seed=1),
    lambda y: partition_dirichlet(y, 20, 0.3, seed=1, self_balancing=False),
    lambda y: partition_shards(y, 20, 2, seed=1),
    lambda y: partition_pathological(y, 20, 2, seed=1),
])
def test_every_example_assigned_exactly_once_and_counts_add_up(labels, make):
  part = make(labels)
  allix = _assigned_once(part, len(labels))
  assert sorted(allix.tolist()) == list(range(len(labels)))
  recount = np.stack([np.bincount(labels[ix], minlength=10) for ix in part.client_indices])
  np.testing.assert_array_equal(part.label_counts, recount)
  assert part.label_counts.sum() == len(labels)


def test_seeded_reproducibility(labels):
  a = partition_dirichlet(labels, 30, 0.5, seed=7)
  b = partition_dirichlet(labels, 30, 0.5, seed=7)
  c = partition_dirichlet(labels, 30, 0.5, seed=8)
  assert all(np.array_equal(x, y) for x, y in zip(a.client_indices, b.client_indices))
  assert not np.array_equal(a.label_counts, c.label_counts)


def test_alpha_controls_skew(labels):
  global_dist = np.bincount(labels, minlength=10) / len(labels)

  def mean_tv(alpha):
    part = partition_dirichlet(labels, 10, alpha, seed=0)
    dist = part.label_counts / part.label_counts.sum(1, keepdims=True)
    return 0.5 * np.abs(dist - global_dist).sum(1).mean()

  assert mean_tv(1e4) < 0.05  # large alpha approaches IID
  assert mean_tv(0.1) > 0.5   # small alpha: clients hold few labels


def test_hand_checked_dirichlet_with_self_balancing():
  # 8 examples, 2 classes, 2 clients; replay the generator by hand.
  labels = np.array([1, 0, 0, 1, 1, 0, 1, 1])
  rng = np.random.default_rng(3)
  parts = [[], []]
  average = 8 / 2
  for k in (0, 1):  # sorted classes
    members = np.nonzero(labels == k)[0]
    p = rng.dirichlet([0.5, 0.5])
    p = np.where([len(q) > average for q in parts], 0.0, p)
    p = p / p.sum()
    for q, chunk in zip(parts, np.split(members, (np.cumsum(p) * len(members)).astype(int)[:-1])):
      q.extend(chunk.tolist())
  for q in parts:
    rng.shuffle(q)
  got = partition_dirichlet(labels, 2, 0.5, seed=3)
  assert [ix.tolist() for ix in got.client_indices] == parts

  # Self-balancing: a client already above the average receives nothing of later classes.
  labels = np.array([0] * 90 + [1] * 10)
  for seed in range(20):
    part = partition_dirichlet(labels, 2, 1.0, seed=seed, shuffle=False)
    for c in range(2):
      if part.label_counts[c, 0] > 50:
        assert part.label_counts[c, 1] == 0


def test_min_partition_size_error_is_clear(labels):
  with pytest.raises(ValueError, match="min_partition_size=500.*Lower min_partition_size"):
    partition_dirichlet(labels, 20, 0.1, seed=0, min_partition_size=500)
  with pytest.raises(ValueError, match="alpha=0 must be > 0"):
    partition_dirichlet(labels, 5, 0, seed=0)
  with pytest.raises(ValueError, match="unknown partition method 'zipf'; valid: iid"):
    make_partition(labels, "zipf", 5, 0)


def test_pathological_gives_k_classes_per_client(labels):
  part = partition_pathological(labels, 10, 3, seed=0)
  np.testing.assert_array_equal((part.label_counts > 0).sum(1), 3)


def test_fixup_drops_rare_labels_caps_and_renumbers():
  labels = np.array([0] * 15 + [1] * 5 + [2] * 40 + [3] * 3)
  parts = (np.arange(0, 20), np.arange(20, 60), np.arange(60, 63))
  from tracefl_jax.data.partition import _make  # pylint: disable=import-outside-toplevel
  part = _make(parts, labels, 4)
  fixed = fixup_partition(part, labels, min_label_count=10, max_per_client=30,
                          min_client_size=12)
  assert fixed.num_clients == 2  # client 2 (3 examples) dropped, others renumbered
  np.testing.assert_array_equal(fixed.client_indices[0], np.arange(0, 15))  # label 1 dropped
  np.testing.assert_array_equal(fixed.client_indices[1], np.arange(20, 50))  # capped at 30
  np.testing.assert_array_equal(fixed.label_counts[:, :3], [[15, 0, 0], [0, 0, 30]])


def test_digits_loads_through_tfds_and_is_reused(tmp_path):
  t0 = time.perf_counter()
  ds = load_dataset("digits", data_dir=tmp_path)
  assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_test.shape == (360, 8, 8, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert set(np.unique(ds.y_train)) == set(range(10)) and ds.num_classes == 10
  assert abs(ds.x_train.mean()) < 0.05 and 0.9 < ds.x_train.std() < 1.1
  records = sorted((tmp_path / "tracefl_digits").rglob("*.array_record*"))
  assert records, "digits must be served from prepared array_record files"
  mtimes = [r.stat().st_mtime_ns for r in records]
  again = load_dataset("digits", data_dir=tmp_path)
  assert [r.stat().st_mtime_ns for r in records] == mtimes  # reused, not re-prepared
  np.testing.assert_array_equal(again.x_train, ds.x_train)
  np.testing.assert_array_equal(again.y_test, ds.y_test)
  assert time.perf_counter() - t0 < 30


def test_missing_real_dataset_fails_fast_without_network(tmp_path):
  t0 = time.perf_counter()
  with pytest.raises(DatasetNotFoundError, match="(?s)'mnist': no local copy.*mnist.npz") as e:
    load_dataset("mnist", data_dir=tmp_path)
  assert "tfds build" not in str(e.value)  # not runnable without TensorFlow
  assert time.perf_counter() - t0 < 5


def test_synthetic_and_unknown_names():
  a = load_dataset("synthetic", num_train=300, num_test=50, image_shape=(4, 4, 2),
                   num_classes=3, seed=1)
  b = load_dataset("synthetic", num_train=300, num_test=50, image_shape=(4, 4, 2),
                   num_classes=3, seed=1)
  assert a.x_train.shape == (300, 4, 4, 2) and a.y_test.shape == (50,)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  assert set(np.unique(a.y_train)) == {0, 1, 2}
  assert "digits" in available_datasets()
  with pytest.raises(ValueError, match="unknown dataset 'imagenet'; valid datasets: cifar10"):
    load_dataset("imagenet")


@pytest.mark.parametrize("name,channels,classes", [("pathmnist", 3, 9), ("organamnist", 1, 11)])
def test_medmnist_npz_loader(tmp_path, name, channels, classes):
  rng = np.random.default_rng(0)
  shape = (28, 28, channels) if channels == 3 else (28, 28)
  np.savez(tmp_path / f"{name}.npz",
           train_images=rng.integers(0, 256, (6, *shape), dtype=np.uint8),
           train_labels=rng.integers(0, classes, (6, 1)),
           val_images=rng.integers(0, 256, (2, *shape), dtype=np.uint8),
           val_labels=rng.integers(0, classes, (2, 1)),
           test_images=np.full((3, *shape), 255, np.uint8),
           test_labels=np.array([[0], [1], [2]]))
  ds = load_dataset(name, data_dir=tmp_path)
  assert ds.x_train.shape == (6, 32, 32, 3) and ds.num_classes == classes
  assert ds.y_test.tolist() == [0, 1, 2] and ds.y_train.dtype == np.int32
  assert ds.x_test.dtype == np.uint8 and np.all(ds.x_test == 255)  # white stays white
  np.testing.assert_allclose(ds.normalize(ds.x_test), 1.0, atol=1e-6)  # (1 - 0.5) / 0.5
  with pytest.raises(DatasetNotFoundError, match=f"no {name}.npz in"):
    load_dataset(name, data_dir=tmp_path / "empty")


def test_medmnist_download_switch(tmp_path, monkeypatch):
  """download=True: unreachable host fails at once; a corrupt file (MD5) is not kept; a good
  one is verified, renamed into place and loaded. The network is stubbed, never used."""
  import hashlib  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  import socket  # pylint: disable=import-outside-toplevel
  import urllib.request  # pylint: disable=import-outside-toplevel
  from tracefl_jax.data import datasets  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  np.savez(buf, train_images=np.zeros((4, 28, 28), np.uint8),
           train_labels=np.zeros((4, 1), np.uint8),
           test_images=np.zeros((2, 28, 28), np.uint8), test_labels=np.ones((2, 1), np.uint8))
  payload = buf.getvalue()

  def unreachable(address, timeout=None):
    raise OSError(f"no route to {address[0]}")
  monkeypatch.setattr(socket, "create_connection", unreachable)
  with pytest.raises(DatasetNotFoundError, match="zenodo.org:443 is unreachable"):
    load_dataset("organamnist", data_dir=tmp_path, download=True)
  with pytest.raises(DatasetNotFoundError, match="www.cs.toronto.edu:443 is unreachable"):
    load_dataset("cifar10", data_dir=tmp_path / "tfds", download=True)

  class Response(io.BytesIO):
    headers = {"Content-Length": str(len(payload))}
  urls = []
  monkeypatch.setattr(socket, "create_connection", lambda *a, **k: io.BytesIO())
  monkeypatch.setattr(urllib.request, "urlopen",
                      lambda url, timeout=None: urls.append(url) or Response(payload))
  with pytest.raises(ValueError, match="MD5 .* expected 866b832ed4eeba67bfb9edee1d5544e6"):
    load_dataset("organamnist", data_dir=tmp_path, download=True)
  assert list(tmp_path.iterdir()) == []  # nothing half-written kept
  assert urls == ["https://zenodo.org/record/6496656/files/organamnist.npz?download=1"]
  monkeypatch.setitem(datasets.MEDMNIST_MD5, "organamnist", hashlib.md5(payload).hexdigest())
  ds = load_dataset("organamnist", data_dir=tmp_path, download=True)
  assert (tmp_path / "organamnist.npz").exists() and ds.y_test.tolist() == [1, 1]
  with pytest.raises(ValueError, match="'dbpedia' is not downloaded by tracefl_jax"):
    load_dataset("dbpedia", data_dir=tmp_path, tokenizer="x", download=True)


def _local_tokenizer(tmp_path):
  """A WordPiece tokenizer trained here on a few sentences, saved like a HF checkpoint."""
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  trainer = tokenizers.trainers.WordPieceTrainer(
      vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
  tok.train_from_iterator(["a small town in france", "an album by a rock band",
                           "what is the best way to learn math", "a river in asia"] * 5,
                          trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                              unk_token="[UNK]")
  fast.save_pretrained(tmp_path / "tok")
  return tmp_path / "tok"


def test_text_datasets_from_local_csv(tmp_path):
  import csv  # pylint: disable=import-outside-toplevel
  tok = _local_tokenizer(tmp_path)
  (tmp_path / "dbpedia").mkdir()
  (tmp_path / "yahoo").mkdir()
  for split, n in (("train", 4), ("test", 2)):
    with open(tmp_path / "dbpedia" / f"{split}.csv", "w", newline="") as f:
      csv.writer(f).writerows([[i % 14 + 1, "Title", "a small town in france " * 40]
                               for i in range(n)])
    with open(tmp_path / "yahoo" / f"{split}.csv", "w", newline="") as f:
      csv.writer(f).writerows([[10, "what is math", "a river", "best answer"]] * n)
  db = load_dataset("dbpedia", data_dir=tmp_path, tokenizer=str(tok), max_length=16)
  assert db.x_train.shape == (4, 16) and db.x_train.dtype == np.int32
  assert db.y_train.tolist() == [0, 1, 2, 3] and db.num_classes == 14   # labels from 1
  assert (db.x_train != 0).all()                                         # truncated
  ya = load_dataset("yahoo", data_dir=tmp_path, tokenizer=str(tok), max_length=16)
  assert ya.y_test.tolist() == [9, 9] and ya.num_classes == 10
  assert (ya.x_test[:, -1] == 0).all() and (ya.x_test[:, 0] != 0).all()  # padded at the end
  with pytest.raises(ValueError, match="needs a tokenizer"):
    load_dataset("dbpedia", data_dir=tmp_path)
  with pytest.raises(DatasetNotFoundError, match="no train.csv or train.parquet"):
    load_dataset("dbpedia", data_dir=tmp_path / "none", tokenizer=str(tok))


def test_synthetic_text():
  ds = load_dataset("synthetic_text", num_train=50, num_test=10, seq_len=12, vocab_size=30,
                    num_classes=3)
  assert ds.x_train.shape == (50, 12) and ds.x_train.dtype == np.int32
  assert ds.x_train.max() < 30 and (ds.x_train[:, 0] != 0).all()


@pytest.mark.parametrize("name,mean", [("mnist", 0.1307), ("cifar10", None)])
def test_tfds_image_loaders_on_mock_data(tmp_path, name, mean):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = load_dataset(name, data_dir=tmp_path)
  assert ds.x_train.shape == (12, 32, 32, 3) and ds.x_test.shape == (12, 32, 32, 3)
  assert ds.x_train.dtype == np.uint8 and ds.num_classes == 10  # normalised on the device
  assert ds.normalize(ds.x_train).dtype == np.float32
  assert ds.y_train.min() >= 0 and ds.y_train.max() < 10
  if mean is not None:  # grayscale replicated to RGB: the three channels agree
    np.testing.assert_array_equal(ds.x_train[..., 0], ds.x_train[..., 2])
