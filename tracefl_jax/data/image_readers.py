"""Readers of MNIST's and CIFAR-10's original release files, in the order of the source files:
the order the original TraceFL saw through Hugging Face / torchvision, which keep it (tfds'
prepared splits are in another order). Where each dataset's files are looked for is
image_files.py.

  read_mnist_npz        Keras' `mnist.npz` (x_train [60000, 28, 28] uint8, y_train, x_test,
                        y_test);
  read_mnist_idx        the four original IDX files from one folder (each plain or `.gz`; the
                        dotted spelling `train-images.idx3-ubyte` also works);
  read_mnist_pickle     the classic `mnist.pkl.gz` (or `mnist.pkl`): ((x_train, y_train),
                        (x_valid, y_valid), (x_test, y_test)) with float images [N, 784] in
                        [0, 1], undone exactly to pixels; train = train + valid (60,000, file
                        order);
  read_cifar10_batches  the python release's pickles `data_batch_1` .. `data_batch_5` and
                        `test_batch` (b"data" [N, 3072] uint8 channel-major, b"labels");
                        train = batches 1..5 in order;
  read_cifar10_archive  the same, from the unextracted `cifar-10-python.tar.gz`, in memory.
Readers return uint8 images `[N, H, W, C]` and int32 labels `[N]` (`ImageArrays`); resizing
(resize.py) and normalisation belong to the loader (datasets.py), which applies the same helper
to the tfds path and caches what it prepared from these files (prepared_cache.py).

IDX files and pickles are decoded in file_formats.py (pickles with an unpickler that only
rebuilds NumPy arrays, so a tampered file cannot run code). Every array read is checked
(checks.py: integer pixels 0..255 of the right shape, integer labels in [0, 10), one per
image); a truncated or corrupt file (a cut zip, gzip or tar, a broken pickle) is one
`DataFileError` naming the file and the key or member.
"""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tracefl_jax.data.base import DatasetNotFoundError
from tracefl_jax.data.checks import DataFileError, check_labels, check_pixels, read_npz
from tracefl_jax.data.file_formats import read_idx, unpickle_arrays

__all__ = ["ImageArrays", "read_idx", "read_mnist_npz", "read_mnist_idx", "read_mnist_pickle",
           "read_cifar10_batches", "read_cifar10_archive", "MNIST_IDX_FILES", "CIFAR10_BATCHES"]

NUM_CLASSES = 10  # MNIST and CIFAR-10


class ImageArrays(NamedTuple):
  """One dataset's raw images, in the source files' order.

  Attributes:
    x_train, x_test: uint8 `[N, H, W, C]` images.
    y_train, y_test: int32 `[N]` labels.
    source: the file or folder they were read from.
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  source: Path


# ---------------------------------------------------------------------------------------------
# The releases' layouts (the byte formats are decoded in file_formats.py).


def _images(x: Any, where: str, size: int | None = None) -> np.ndarray:
  """uint8 `[N, H, W, 1]` from grey `[N, H, W]` or `[N, H, W, 1]` pixels (checks.py)."""
  return check_pixels(x, where, size=size, channels=(1,))


def _labels(y: Any, n: int, where: str) -> np.ndarray:
  """int32 `[N]` labels in [0, 10), one per image (checks.py)."""
  return check_labels(y, where, NUM_CLASSES, n)


def read_mnist_npz(path: str | Path) -> ImageArrays:
  """Keras' `mnist.npz`: x_train [60000, 28, 28] uint8, y_train, x_test, y_test."""
  path = Path(path)
  arrays = read_npz(path, ("x_train", "y_train", "x_test", "y_test"), "Keras' mnist.npz")
  x_tr = _images(arrays["x_train"], f"{path}[x_train]", 28)
  x_te = _images(arrays["x_test"], f"{path}[x_test]", 28)
  return ImageArrays(x_tr, _labels(arrays["y_train"], len(x_tr), f"{path}[y_train]"),
                     x_te, _labels(arrays["y_test"], len(x_te), f"{path}[y_test]"), path)


MNIST_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                   "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_file(folder: Path, name: str) -> Path | None:
  dotted = name.replace("-idx", ".idx")  # how some mirrors spell them
  for stem in (name, dotted):
    for candidate in (folder / stem, folder / f"{stem}.gz"):
      if candidate.is_file():
        return candidate
  return None


def read_mnist_idx(folder: str | Path) -> ImageArrays:
  """The four original MNIST IDX files from one folder (each plain or `.gz`)."""
  folder = Path(folder)
  paths = [_idx_file(folder, name) for name in MNIST_IDX_FILES]
  missing = [name for name, p in zip(MNIST_IDX_FILES, paths) if p is None]
  if missing:
    raise DatasetNotFoundError(f"{folder}: missing MNIST IDX files {', '.join(missing)} "
                               f"(plain or .gz)")
  x_tr, y_tr, x_te, y_te = (read_idx(p) for p in paths)
  x_tr, x_te = _images(x_tr, str(paths[0]), 28), _images(x_te, str(paths[2]), 28)
  return ImageArrays(x_tr, _labels(y_tr, len(x_tr), str(paths[1])),
                     x_te, _labels(y_te, len(x_te), str(paths[3])), folder)


def _unit_floats_to_uint8(x: np.ndarray, where: str) -> np.ndarray:
  """Undoes the pickle's scaling exactly: the classic file stores pixel / 256 (so 255 ->
  0.99609375); pixel / 255 is accepted too. Anything else is not the released file, and
  guessing would silently change the data."""
  if x.dtype == np.uint8:
    return x
  if not np.issubdtype(x.dtype, np.floating):
    raise DataFileError(f"{where}: pixels have dtype {x.dtype}; the classic mnist.pkl.gz "
                        f"holds float32 values in [0, 1]")
  if not np.isfinite(x).all():
    raise DataFileError(f"{where}: images hold NaN or inf; this is not the classic "
                        f"mnist.pkl.gz")
  for scale in (256, 255):
    pixels = _scaled_pixels(x, np.float32(scale))
    if pixels is not None:
      return pixels
  raise DataFileError(f"{where}: pixel values are not whole multiples of 1/256 or 1/255 in "
                   f"[0, 1]; this is not the classic mnist.pkl.gz")


def _scaled_pixels(x: np.ndarray, scale: np.float32, rows: int = 8192) -> np.ndarray | None:
  """uint8 `x * scale` when every value is within 1e-3 of a whole pixel in 0..255, else None;
  `rows` at a time, so that the float work is one block's, not the file's."""
  out = np.empty(x.shape, np.uint8)
  for start in range(0, len(x), rows):
    scaled = x[start:start + rows].astype(np.float32) * scale
    pixels = np.rint(scaled)
    if not (np.abs(scaled - pixels).max(initial=0) < 1e-3 and 0 <= pixels.min(initial=0)
            and pixels.max(initial=0) <= 255):
      return None
    out[start:start + rows] = pixels
  return out


def read_mnist_pickle(path: str | Path) -> ImageArrays:
  """The classic `mnist.pkl.gz`: ((x_train, y_train), (x_valid, y_valid), (x_test, y_test)),
  float images [N, 784] in [0, 1]; train = train + valid, in file order (60,000)."""
  path = Path(path)
  splits = unpickle_arrays(path.read_bytes(), path)
  try:
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = splits
  except (TypeError, ValueError) as e:
    raise DataFileError(f"{path}: expected ((x_train, y_train), (x_valid, y_valid), (x_test, "
                        f"y_test))") from e

  def images(x, split):
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != 784 or not len(x):
      raise DataFileError(f"{path}: {split} images must be [N, 784] with N >= 1, got "
                          f"{x.shape}")
    where = f"{path} ({split} images)"
    return _images(_unit_floats_to_uint8(x, where).reshape(-1, 28, 28), where, 28)

  x_train = np.concatenate([images(x_tr, "train"), images(x_va, "valid")])
  y_train = np.concatenate([_labels(y_tr, len(y_tr), f"{path} (train labels)"),
                            _labels(y_va, len(y_va), f"{path} (valid labels)")])
  x_test = images(x_te, "test")
  return ImageArrays(x_train, _labels(y_train, len(x_train), f"{path} (train + valid)"),
                     x_test, _labels(y_te, len(x_test), f"{path} (test labels)"), path)


CIFAR10_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                   "data_batch_5", "test_batch")


def _cifar_batch(data: bytes, where: Path) -> tuple[np.ndarray, np.ndarray]:
  """One pickled batch -> (uint8 [N, 32, 32, 3], int32 [N])."""
  batch = unpickle_arrays(data, where)
  if not isinstance(batch, dict):
    raise DataFileError(f"{where}: not a CIFAR-10 batch (a dict with data and labels)")
  get = lambda key: batch.get(key, batch.get(key.encode()))  # noqa: E731  (str or bytes keys)
  if get("data") is None or get("labels") is None:
    raise DataFileError(f"{where}: not a CIFAR-10 batch (a dict with data and labels)")
  x = np.asarray(get("data"))
  if x.ndim != 2 or x.shape[1] != 3072 or not len(x):
    raise DataFileError(f"{where}[data]: must be uint8 [N, 3072] with N >= 1, got {x.dtype} "
                        f"{x.shape}")
  # Rows are channel-major (1024 red, 1024 green, 1024 blue values, each row-major 32x32).
  x = check_pixels(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), f"{where}[data]", size=32,
                   channels=(3,))
  return np.ascontiguousarray(x), _labels(get("labels"), len(x), f"{where}[labels]")


def _cifar_arrays(batches: list[tuple[np.ndarray, np.ndarray]], source: Path) -> ImageArrays:
  x_tr = np.concatenate([x for x, _ in batches[:5]])
  y_tr = np.concatenate([y for _, y in batches[:5]])
  return ImageArrays(x_tr, y_tr, *batches[5], source)


def read_cifar10_batches(folder: str | Path) -> ImageArrays:
  """The python release's extracted folder `cifar-10-batches-py`: train = data_batch_1..5 in
  order, test = test_batch."""
  folder = Path(folder)
  missing = [name for name in CIFAR10_BATCHES if not (folder / name).is_file()]
  if missing:
    raise DatasetNotFoundError(f"{folder}: missing CIFAR-10 batches {', '.join(missing)}")
  return _cifar_arrays([_cifar_batch((folder / n).read_bytes(), folder / n)
                        for n in CIFAR10_BATCHES], folder)


def read_cifar10_archive(path: str | Path) -> ImageArrays:
  """The unextracted python release `cifar-10-python.tar.gz`, read in memory."""
  path = Path(path)
  batches, member = [], None
  try:
    with tarfile.open(path, "r:*") as tar:
      members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
      missing = [n for n in CIFAR10_BATCHES if n not in members]
      if missing:
        raise DataFileError(f"{path}: the archive lacks {', '.join(missing)}")
      for member in CIFAR10_BATCHES:
        batches.append(_cifar_batch(tar.extractfile(members[member]).read(), path / member))
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    part = f" (reading {member})" if member else ""
    raise DataFileError(f"{path}{part}: not a readable tar archive, or a truncated one "
                        f"({type(e).__name__}: {e})") from e
  return _cifar_arrays(batches, path)
