"""Loading at the size of the data (issue 21 item 6): images resized a chunk at a time, bit for
bit as in one call, and the cache of prepared arrays beside local files (prepared_cache.py).
Every file is written here, small."""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle

import jax
import numpy as np
import pytest

from tracefl_jax.data import datasets, image_files, load_dataset, prepared_cache, resize

CACHE_LOGGER = "tracefl_jax.data.prepared_cache"


def _whole_array_resize(x: np.ndarray, size: int) -> np.ndarray:
  """The resizing before chunks: grey repeated to RGB first, all images in one float32
  `jax.image.resize` call, rounded, clipped, cast."""
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (size, size):
    resized = np.asarray(jax.image.resize(x.astype(np.float32), (len(x), size, size, 3),
                                          "bilinear"))
    x = np.clip(np.round(resized), 0, 255)
  return x.astype(np.uint8)


@pytest.mark.parametrize("shape,size", [((11, 28, 28, 1), 32), ((11, 28, 28, 3), 32),
                                        ((9, 20, 24, 1), 16), ((7, 32, 32, 1), 32),
                                        ((7, 32, 32, 3), 32)])
@pytest.mark.parametrize("chunk", [1, 4, 11, 64])  # 4: several chunks and a partial last one
def test_chunked_resize_equals_whole_array_resize(shape, size, chunk):
  x = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
  x[0] = 0
  x[1] = 255  # the clip's ends
  got = resize.resize_rgb(x, size, chunk=chunk)
  assert got.dtype == np.uint8 and got.shape == (len(x), size, size, 3)
  np.testing.assert_array_equal(got, _whole_array_resize(x, size))


def test_grey_resized_then_repeated_is_repeated_then_resized():
  """Bilinear resizing acts on each channel alone: one grey channel resized and repeated gives
  the pixels of the three repeated channels resized together."""
  x = np.random.default_rng(3).integers(0, 256, (13, 28, 28, 1), dtype=np.uint8)
  one = np.asarray(jax.image.resize(x.astype(np.float32), (13, 32, 32, 1), "bilinear"))
  three = np.asarray(jax.image.resize(np.repeat(x, 3, -1).astype(np.float32), (13, 32, 32, 3),
                                      "bilinear"))
  np.testing.assert_array_equal(np.repeat(one, 3, -1), three)


def test_pickle_pixels_are_converted_a_block_at_a_time():
  rng = np.random.default_rng(4)
  pixels = rng.integers(0, 256, (23, 784)).astype(np.float32)
  for scale in (256, 255):
    got = image_files._scaled_pixels(pixels / np.float32(scale), np.float32(scale), rows=5)
    np.testing.assert_array_equal(got, pixels.astype(np.uint8))
  bad = pixels / np.float32(256)
  bad[-1, -1] = 0.3  # not a whole pixel, in the last (partial) block
  assert image_files._scaled_pixels(bad, np.float32(256), rows=5) is None


# ---------------------------------------------------------------------------------------------
# The cache of prepared arrays.


def _mnist_arrays(seed: int = 0):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), rng.integers(0, 10, 10),
          rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), rng.integers(0, 10, 6))


def _write_mnist_npz(data_dir, seed=0):
  x_tr, y_tr, x_te, y_te = _mnist_arrays(seed)
  np.savez(data_dir / "mnist.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
  return data_dir / "mnist.npz"


def _write_mnist_pickle(data_dir, seed=0):
  x_tr, y_tr, x_te, y_te = _mnist_arrays(seed)
  flat = lambda x: (x.reshape(len(x), 784) / np.float32(256)).astype(np.float32)  # noqa: E731
  splits = ((flat(x_tr[:7]), y_tr[:7]), (flat(x_tr[7:]), y_tr[7:]), (flat(x_te), y_te))
  with gzip.open(data_dir / "mnist.pkl.gz", "wb") as f:
    pickle.dump(splits, f, protocol=2)
  return data_dir / "mnist.pkl.gz"


def _write_organamnist(data_dir, seed=0):
  rng = np.random.default_rng(seed)
  np.savez(data_dir / "organamnist.npz",
           train_images=rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
           train_labels=rng.integers(0, 11, (8, 1)),
           test_images=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
           test_labels=rng.integers(0, 11, (5, 1)))
  return data_dir / "organamnist.npz"


def _write_cifar_batches(data_dir, seed=0):
  folder = data_dir / "cifar-10-batches-py"
  folder.mkdir(exist_ok=True)
  rng = np.random.default_rng(seed)
  for name in image_files.CIFAR10_BATCHES:
    batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, 3).tolist()}
    (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
  return folder / image_files.CIFAR10_BATCHES[0]


SOURCES = {"mnist.npz": ("mnist", _write_mnist_npz), "pickle": ("mnist", _write_mnist_pickle),
           "organamnist": ("organamnist", _write_organamnist),
           "cifar10 batches": ("cifar10", _write_cifar_batches)}


def _cache_files(data_dir):
  return sorted((data_dir / prepared_cache.CACHE_DIR).glob("*"))


def _same(a, b):
  for key in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert getattr(a, key).dtype == getattr(b, key).dtype


def _no_preparing(monkeypatch):
  """Any reading or resizing of the source fails the test from here on."""
  def fail(*args, **kwargs):
    raise AssertionError("prepared again although the cache holds the arrays")
  monkeypatch.setattr(datasets, "prepare_splits", fail)
  monkeypatch.setattr(resize, "resize_rgb", fail)
  monkeypatch.setattr(datasets, "read_medmnist_file", fail)


@pytest.mark.parametrize("source", list(SOURCES))
def test_second_load_reads_the_cache(tmp_path, monkeypatch, source):
  name, write = SOURCES[source]
  first_file = write(tmp_path)
  uncached = load_dataset(name, data_dir=tmp_path, cache=False)
  assert not (tmp_path / prepared_cache.CACHE_DIR).exists()  # cache=False writes nothing
  first = load_dataset(name, data_dir=tmp_path)
  _same(first, uncached)
  [cached] = _cache_files(tmp_path)
  if name != "cifar10":  # one source file: keyed by its plain SHA-256
    digest = hashlib.sha256(first_file.read_bytes()).hexdigest()
    assert cached.name == f"{name}-32-{jax.default_backend()}-{digest[:16]}.npz"
  _no_preparing(monkeypatch)
  second = load_dataset(name, data_dir=tmp_path)
  _same(second, first)
  assert second.normalization == first.normalization and second.num_classes == first.num_classes
  with pytest.raises(AssertionError, match="prepared again"):
    load_dataset(name, data_dir=tmp_path, cache=False)  # cache=False reads nothing either


@pytest.mark.parametrize("source", ["mnist.npz", "organamnist", "cifar10 batches"])
def test_changed_source_does_not_reuse_the_stale_cache(tmp_path, source):
  name, write = SOURCES[source]
  write(tmp_path, seed=0)
  old = load_dataset(name, data_dir=tmp_path)
  write(tmp_path, seed=1)
  new = load_dataset(name, data_dir=tmp_path)
  _same(new, load_dataset(name, data_dir=tmp_path, cache=False))
  assert not np.array_equal(new.x_train, old.x_train)
  assert len(_cache_files(tmp_path)) == 2


def test_idx_files_key_the_cache_together(tmp_path):
  x_tr, y_tr, x_te, y_te = _mnist_arrays()
  header = lambda a: bytes([0, 0, 8, a.ndim]) + b"".join(  # noqa: E731
      d.to_bytes(4, "big") for d in a.shape)
  for name, a in zip(image_files.MNIST_IDX_FILES, (x_tr, y_tr, x_te, y_te)):
    (tmp_path / name).write_bytes(header(a) + a.astype(np.uint8).tobytes())
  load_dataset("mnist", data_dir=tmp_path)
  labels = tmp_path / image_files.MNIST_IDX_FILES[3]
  y_te = (y_te + 1) % 10  # only the test labels change
  labels.write_bytes(header(y_te) + y_te.astype(np.uint8).tobytes())
  assert load_dataset("mnist", data_dir=tmp_path).y_test.tolist() == y_te.tolist()
  assert len(_cache_files(tmp_path)) == 2


def test_unwritable_cache_directory_still_loads(tmp_path, caplog):
  _write_mnist_npz(tmp_path)
  (tmp_path / prepared_cache.CACHE_DIR).write_text("a file where the directory would go")
  caplog.set_level(logging.INFO, logger=CACHE_LOGGER)
  ds = load_dataset("mnist", data_dir=tmp_path)
  _same(ds, load_dataset("mnist", data_dir=tmp_path, cache=False))
  assert "not caching the prepared dataset" in caplog.text


def test_failed_write_leaves_no_file_and_does_not_fail(tmp_path, monkeypatch, caplog):
  _write_mnist_npz(tmp_path)

  def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(prepared_cache.np, "savez", disk_full)
  caplog.set_level(logging.INFO, logger=CACHE_LOGGER)
  assert load_dataset("mnist", data_dir=tmp_path).x_train.shape == (10, 32, 32, 3)
  assert _cache_files(tmp_path) == [] and "No space left on device" in caplog.text


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong shape", "wrong labels",
                                    "other source", "old format"])
def test_corrupt_or_malformed_cache_is_ignored_and_rewritten(tmp_path, caplog, damage):
  _write_mnist_npz(tmp_path)
  good = load_dataset("mnist", data_dir=tmp_path)
  [path] = _cache_files(tmp_path)
  arrays = dict(np.load(path))
  if damage == "garbage":
    path.write_bytes(b"not a zip file")
  elif damage == "truncated":
    path.write_bytes(path.read_bytes()[:-100])
  else:
    if damage == "wrong shape":
      arrays["x_train"] = arrays["x_train"][:, :16, :16]
    elif damage == "wrong labels":
      arrays["y_test"] = arrays["y_test"] + 10
    elif damage == "other source":
      arrays["source_sha256"] = np.str_("0" * 64)
    else:
      arrays["format"] = np.int64(prepared_cache.FORMAT - 1)
    np.savez(path, **arrays)
  caplog.set_level(logging.INFO, logger=CACHE_LOGGER)
  _same(load_dataset("mnist", data_dir=tmp_path), good)
  assert "ignoring the prepared-dataset cache" in caplog.text
  assert prepared_cache.read_cache(path, str(np.load(path)["source_sha256"]), 32, 10) \
      is not None  # written anew
  assert _cache_files(tmp_path) == [path]  # and no temporary file left


def test_image_size_option(tmp_path):
  _write_mnist_npz(tmp_path)
  x_tr = _mnist_arrays()[0][..., None]
  small = load_dataset("mnist", data_dir=tmp_path, image_size=16)
  assert small.x_train.shape == (10, 16, 16, 3)
  np.testing.assert_array_equal(small.x_train, _whole_array_resize(x_tr, 16))
  native = load_dataset("mnist", data_dir=tmp_path, image_size=28)  # no resizing: RGB only
  np.testing.assert_array_equal(native.x_train, np.repeat(x_tr, 3, -1))
  assert load_dataset("mnist", data_dir=tmp_path).x_train.shape == (10, 32, 32, 3)
  assert len(_cache_files(tmp_path)) == 3  # one per size
  _same(load_dataset("mnist", data_dir=tmp_path, image_size=16), small)  # from the cache
  for bad in (0, -3, 2.5, True, "32"):
    with pytest.raises(ValueError, match="image_size=.* must be an int >= 1"):
      load_dataset("mnist", data_dir=tmp_path, image_size=bad)
