"""Local copies of MNIST and CIFAR-10 in their original release formats, read offline without
TensorFlow; the dataset registry; Dataset's checks. Every file is written here, small."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest

from tracefl_jax.data import (Dataset, DatasetNotFoundError, available_datasets, datasets,
                              image_files, load_dataset, register_dataset)

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def _reference(x_uint8):
  """The paper's resizing written plainly, as torchvision's PIL Resize returns it: grey ->
  RGB, bilinear to 32x32, rounded back to uint8 pixels. `x_uint8`: [N, H, W] or [N, H, W, 3]."""
  x = x_uint8.astype(np.float32)
  if x.ndim == 3:
    x = np.stack([x] * 3, axis=-1)
  if x.shape[1:3] != (32, 32):
    x = np.asarray(jax.image.resize(x, (len(x), 32, 32, 3), "bilinear"))
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _normalised(pixels, mean, std):
  """ToTensor then Normalize: (pixels / 255 - mean) / std."""
  return (pixels.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(
      std, np.float32)


def _check_images(ds, x_tr, x_te, mean, std):
  """uint8 pixels as the reference resizes them, and the dataset's normalisation."""
  assert ds.x_train.dtype == np.uint8 and ds.x_test.dtype == np.uint8
  np.testing.assert_array_equal(ds.x_train, _reference(x_tr))
  np.testing.assert_array_equal(ds.x_test, _reference(x_te))
  assert ds.normalization.mean == pytest.approx(np.broadcast_to(mean, len(ds.normalization.mean)))
  np.testing.assert_allclose(ds.normalize(ds.x_test), _normalised(_reference(x_te), mean, std),
                             atol=1e-5)


@pytest.fixture(scope="module")
def mnist():
  """(x_train [24, 28, 28], y_train, x_test [12, 28, 28], y_test) uint8, labels in no order."""
  rng = np.random.default_rng(0)
  return (rng.integers(0, 256, (24, 28, 28), dtype=np.uint8),
          rng.integers(0, 10, 24).astype(np.uint8),
          rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
          rng.integers(0, 10, 12).astype(np.uint8))


def _check_mnist(ds, arrays):
  x_tr, y_tr, x_te, y_te = arrays
  assert ds.name == "mnist" and ds.num_classes == 10
  assert ds.x_train.shape == (24, 32, 32, 3) and ds.x_test.shape == (12, 32, 32, 3)
  assert ds.y_train.dtype == np.int32
  assert ds.y_train.tolist() == y_tr.tolist() and ds.y_test.tolist() == y_te.tolist()
  _check_images(ds, x_tr, x_te, MNIST_MEAN, MNIST_STD)


def _idx(array: np.ndarray) -> bytes:
  """An IDX file: 0, 0, type 0x08 (uint8), rank, big-endian dims, then the data."""
  return (struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
          + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes())


def _write_idx(folder, arrays, gz):
  folder.mkdir(parents=True, exist_ok=True)
  for name, array in zip(IDX_NAMES, arrays):
    data = _idx(array)
    if gz:
      (folder / f"{name}.gz").write_bytes(gzip.compress(data))
    else:
      (folder / name).write_bytes(data)


def test_mnist_from_keras_npz(tmp_path, mnist):
  x_tr, y_tr, x_te, y_te = mnist
  np.savez(tmp_path / "mnist.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
  _check_mnist(load_dataset("mnist", data_dir=tmp_path), mnist)


@pytest.mark.parametrize("folder,gz", [("", False), ("", True), ("mnist", True),
                                       ("MNIST/raw", False), ("MNIST/raw", True)])
def test_mnist_from_idx_files(tmp_path, mnist, folder, gz):
  _write_idx(tmp_path / folder, mnist, gz)
  _check_mnist(load_dataset("mnist", data_dir=tmp_path, download=False), mnist)


def test_read_idx_headers_and_errors(tmp_path):
  x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  (tmp_path / "ok").write_bytes(_idx(x))
  np.testing.assert_array_equal(image_files.read_idx(tmp_path / "ok"), x)
  # Big-endian int32 payload (type 0x0C) comes back native-endian.
  ints = np.array([1, -2, 70000], np.int32)
  (tmp_path / "ints").write_bytes(struct.pack(">BBBBI", 0, 0, 0x0C, 1, 3)
                                  + ints.astype(">i4").tobytes())
  assert image_files.read_idx(tmp_path / "ints").tolist() == [1, -2, 70000]
  (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
  with pytest.raises(ValueError, match="bad is not an IDX file"):
    image_files.read_idx(tmp_path / "bad")
  (tmp_path / "short").write_bytes(_idx(x)[:-5])
  with pytest.raises(ValueError, match=r"short: the IDX header promises shape \(2, 3, 4\)"):
    image_files.read_idx(tmp_path / "short")


def _classic_pickle(path, mnist, scale):
  """mnist.pkl.gz as released: ((train), (valid), (test)), float32 [N, 784] = pixel / scale,
  int64 labels; written with protocol 2 as the Python 2 original was."""
  x_tr, y_tr, x_te, y_te = mnist
  flat = lambda x: (x.reshape(len(x), 784) / np.float32(scale)).astype(np.float32)  # noqa: E731
  splits = ((flat(x_tr[:18]), y_tr[:18].astype(np.int64)),
            (flat(x_tr[18:]), y_tr[18:].astype(np.int64)),
            (flat(x_te), y_te.astype(np.int64)))
  with gzip.open(path, "wb") as f:
    pickle.dump(splits, f, protocol=2)


@pytest.mark.parametrize("scale,where", [(256, "mnist.pkl.gz"), (255, "mnist/mnist.pkl.gz")])
def test_mnist_from_classic_pickle(tmp_path, mnist, scale, where):
  (tmp_path / where).parent.mkdir(exist_ok=True)
  _classic_pickle(tmp_path / where, mnist, scale)
  _check_mnist(load_dataset("mnist", data_dir=tmp_path), mnist)  # train = train + valid


def test_pickles_only_rebuild_arrays(tmp_path):
  (tmp_path / "mnist.pkl").write_bytes(pickle.dumps(print, protocol=2))
  with pytest.raises(ValueError, match="refusing to load .*print: only NumPy arrays"):
    load_dataset("mnist", data_dir=tmp_path)
  x = np.full((2, 784), 0.3, np.float32)  # 0.3 * 256 and 0.3 * 255 are not whole pixels
  (tmp_path / "mnist.pkl").write_bytes(pickle.dumps(((x, [0, 1]),) * 3))
  with pytest.raises(ValueError, match="not the classic mnist.pkl.gz"):
    load_dataset("mnist", data_dir=tmp_path)


@pytest.fixture(scope="module")
def cifar():
  """Five train batches of 4 and a test batch of 6: (rows [N, 3072] uint8, labels)."""
  rng = np.random.default_rng(1)
  return [(rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist())
          for n in (4, 4, 4, 4, 4, 6)]


def _cifar_pickles(batches, str_keys=False):
  key = (lambda k: k) if str_keys else (lambda k: k.encode())
  return {name: pickle.dumps({key("batch_label"): name, key("data"): rows,
                              key("labels"): labels}, protocol=2)
          for name, (rows, labels) in zip(image_files.CIFAR10_BATCHES, batches)}


def _check_cifar(ds, batches):
  rows_tr = np.concatenate([rows for rows, _ in batches[:5]])
  rows_te = batches[5][0]
  assert ds.name == "cifar10" and ds.num_classes == 10
  assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (6, 32, 32, 3)
  assert ds.y_test.dtype == np.int32
  assert ds.y_train.tolist() == sum((labels for _, labels in batches[:5]), [])  # batches 1..5
  assert ds.y_test.tolist() == batches[5][1]
  # Rows are channel-major: value c * 1024 + h * 32 + w is pixel (h, w), channel c.
  hwc = lambda rows: rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # noqa: E731
  _check_images(ds, hwc(rows_tr), hwc(rows_te), CIFAR_MEAN, CIFAR_STD)
  # One pixel by hand: image 1, row 2, column 5, blue.
  value = rows_tr[1, 2 * 1024 + 2 * 32 + 5]
  assert ds.x_train[1, 2, 5, 2] == value
  np.testing.assert_allclose(ds.normalize(ds.x_train)[1, 2, 5, 2], (value / 255.0 - 0.4465)
                             / 0.2010, rtol=1e-5)


@pytest.mark.parametrize("folder,str_keys", [("cifar-10-batches-py", False),
                                             ("cifar10/cifar-10-batches-py", True)])
def test_cifar10_from_python_pickles(tmp_path, cifar, folder, str_keys):
  (tmp_path / folder).mkdir(parents=True)
  for name, data in _cifar_pickles(cifar, str_keys).items():
    (tmp_path / folder / name).write_bytes(data)
  _check_cifar(load_dataset("cifar10", data_dir=tmp_path), cifar)


def test_cifar10_from_unextracted_archive(tmp_path, cifar):
  with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
    for name, data in reversed(list(_cifar_pickles(cifar).items())):  # order inside irrelevant
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  _check_cifar(load_dataset("cifar10", data_dir=tmp_path), cifar)


def test_local_files_take_precedence_over_tfds(tmp_path, mnist, monkeypatch):
  x_tr, y_tr, x_te, y_te = mnist
  np.savez(tmp_path / "mnist.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
  tfds = pytest.importorskip("tensorflow_datasets")
  # tfds would serve 12 random mock examples; the local 24 must win.
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    _check_mnist(load_dataset("mnist", data_dir=tmp_path), mnist)

  def no_tfds(*args, **kwargs):
    raise AssertionError("tfds consulted although local files are present")
  monkeypatch.setattr(datasets, "_read_tfds_images", no_tfds)
  _check_mnist(load_dataset("mnist", data_dir=tmp_path, download=True), mnist)


def test_not_found_error_names_the_files_and_only_working_remedies(tmp_path, mnist):
  with pytest.raises(DatasetNotFoundError) as info:
    load_dataset("mnist", data_dir=tmp_path)
  message = str(info.value)
  for expected in ("mnist.npz", *IDX_NAMES, ".gz", str(tmp_path / "MNIST" / "raw"),
                   str(tmp_path / "mnist"), "mnist.pkl.gz", "--config.dataset.data_dir",
                   "--config.dataset.download=True"):
    assert expected in message, expected
  assert "tfds build" not in message

  # A folder with part of the IDX files is pointed out, naming what it lacks.
  _write_idx(tmp_path / "MNIST" / "raw", mnist, gz=True)
  for name in IDX_NAMES[2:]:
    (tmp_path / "MNIST" / "raw" / f"{name}.gz").unlink()
  with pytest.raises(DatasetNotFoundError, match="raw has some of the files but lacks "
                     "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"):
    load_dataset("mnist", data_dir=tmp_path)

  with pytest.raises(DatasetNotFoundError) as info:
    load_dataset("cifar10", data_dir=tmp_path)
  message = str(info.value)
  for expected in ("data_batch_1", "data_batch_5", "test_batch", "cifar-10-batches-py",
                   "cifar-10-python.tar.gz", "--config.dataset.download=True"):
    assert expected in message, expected
  assert "tfds build" not in message


def test_register_dataset_round_trip_and_duplicates(tmp_path, monkeypatch):
  monkeypatch.setattr(datasets, "_LOADERS", dict(datasets._LOADERS))  # keep the registry clean
  calls = []

  def my_loader(data_dir, scale=1.0):
    calls.append((data_dir, scale))
    x = np.full((6, 3), scale, np.float32)
    return Dataset("mine", x, np.array([0, 1, 2, 0, 1, 2], np.int32), x[:2],
                   np.array([2, 1], np.int32), 3)

  register_dataset("mine", my_loader)
  assert "mine" in available_datasets() and "mnist" in available_datasets()
  ds = load_dataset("mine", data_dir=tmp_path, scale=2.0)
  assert calls == [(tmp_path, 2.0)] and ds.x_train[0, 0] == 2.0 and ds.num_classes == 3
  load_dataset("mine")
  assert calls[-1] == (None, 1.0)  # no directory given: the loader gets None
  with pytest.raises(ValueError, match="dataset 'mine' is already registered"):
    register_dataset("mine", my_loader)
  with pytest.raises(ValueError, match="dataset 'mnist' is already registered"):
    register_dataset("mnist", my_loader)
  with pytest.raises(ValueError, match="unknown dataset 'nope'; valid datasets: .*mine"):
    load_dataset("nope")
  register_dataset("broken", lambda data_dir: {"x": 1})
  with pytest.raises(TypeError, match="'broken' returned dict, not a tracefl_jax.data.Dataset"):
    load_dataset("broken")


def _arrays():
  x = np.zeros((4, 2, 2, 1), np.float32)
  return dict(name="d", x_train=x, y_train=np.array([0, 1, 2, 1], np.int32), x_test=x[:2],
              y_test=np.array([0, 2], np.int32), num_classes=3)


@pytest.mark.parametrize("change,message", [
    (dict(x_train=np.zeros((4, 2, 2, 1))), "x_train has dtype float64.*astype.np.float32"),
    (dict(y_test=np.array([0, 2])), "y_test has dtype int64; labels must be int32"),
    (dict(y_train=np.zeros((4, 1), np.int32)), r"y_train must be \[N\] integer labels"),
    (dict(y_train=np.array([0, 1, 2], np.int32)), "x_train has 4 examples but y_train has 3"),
    (dict(y_test=np.array([0, 3], np.int32)), r"labels in \[0, 3\], outside \[0, num_classes=3"),
    (dict(y_train=np.array([-1, 1, 2, 1], np.int32)), r"labels in \[-1, 2\]"),
    (dict(x_test=np.zeros((2, 2, 3, 1), np.float32)), "x_test examples .2, 3, 1."),
    (dict(x_test=np.zeros((2, 2, 2, 1), np.int32)), "x_train is float32 but x_test is int32"),
    (dict(x_test=np.zeros((0, 2, 2, 1), np.float32), y_test=np.zeros(0, np.int32)),
     "the test split is empty"),
    (dict(x_train=np.zeros(4, np.float32)), r"x_train must be \[N, ...\]"),
    (dict(num_classes=1), "num_classes must be an int >= 2"),
    (dict(num_classes=3.0), "num_classes must be an int >= 2"),
    (dict(name=""), "name must be a non-empty string"),
])
def test_dataset_validation_errors(change, message):
  Dataset(**_arrays())  # the unchanged arrays are fine
  with pytest.raises(ValueError, match=message):
    Dataset(**{**_arrays(), **change})


def test_dataset_from_arrays_casts_and_infers_classes():
  x = np.random.default_rng(0).normal(size=(5, 3))  # float64, plain lists of labels
  ds = Dataset.from_arrays("mine", x, [0, 4, 1, 1, 2], x[:2], np.array([[3], [0]]))
  assert ds.x_train.dtype == np.float32 and ds.y_test.tolist() == [3, 0]
  assert ds.y_train.dtype == np.int32 and ds.num_classes == 5 and ds.input_shape == (3,)
  tokens = Dataset.from_arrays("tok", np.ones((3, 7), np.int64), [0, 1, 0],
                               np.ones((1, 7), np.int64), [1])
  assert tokens.x_train.dtype == np.int32 and tokens.num_classes == 2
  with pytest.raises(ValueError, match="labels must be integers"):
    Dataset.from_arrays("bad", x, x[:, 0], x, x[:, 0])


def test_import_pulls_in_no_heavy_optional_modules():
  heavy = ("tensorflow_datasets", "sklearn", "transformers", "tqdm", "matplotlib", "torch")
  code = ("import sys, tracefl_jax.data, tracefl_jax.data.image_files, tracefl_jax.data.text; "
          f"print([m for m in {heavy!r} if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
