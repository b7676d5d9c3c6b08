"""Datasets behind one interface: `load_dataset(name) -> Dataset` of in-memory NumPy arrays,
and a registry of loaders by name (`register_dataset`), like the model registry.

Built-in datasets:
  digits     the embedded default: scikit-learn's handwritten digits (1,797 real 8x8 images,
             10 classes, bundled inside scikit-learn, BSD licence), prepared once by a local
             tfds builder into the data directory (about a second) and read back from it;
  mnist,     local copies of the original releases first (image_files.py: Keras' npz, the
  cifar10    IDX files, the pickles), read without TensorFlow in the source files' order;
             otherwise tfds' random-access `data_source` over PREPARED array_record data
             (which works without TensorFlow, unlike `tfds.load`); downloaded through tfds only
             when asked (`download=True`, after a 5-second reachability check: with no network
             tfds retries for minutes before failing); a missing dataset fails fast with a
             message listing the files looked for and where;
  pathmnist, MedMNIST's official 28x28 .npz files from a local directory (downloaded from
  organamnist  Zenodo with an MD5 check only when asked), resized to 32x32 RGB;
mnist, cifar10 and the MedMNIST sets keep uint8 pixels (resized to 32x32x3 and rounded, a
chunk at a time) and carry their `Normalization`, applied where a batch is used (on the
device); prepared from local files, they are cached beside them (prepared_cache.py);
  dbpedia,   local CSV / Parquet files, tokenised (text.py);
  yahoo
and `synthetic` / `synthetic_text` generate learnable datasets of any size in memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import numbers
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tracefl_jax.data import image_files, prepared_cache, text
from tracefl_jax.data.checks import check_labels, check_pixels
from tracefl_jax.data.resize import prepare_splits
from tracefl_jax.data.structured import make_structured_images
# Re-exported: these names lived here before base.py and medmnist.py held them.
from tracefl_jax.data.base import (CIFAR10_MEAN, CIFAR10_STD, DIGITS_MEAN,  # noqa: F401
                                   DIGITS_NUM_TRAIN, DIGITS_STD, IMAGE_SIZE, MEDMNIST_MEAN,
                                   MEDMNIST_STD, MNIST_MEAN, MNIST_STD, Dataset,
                                   DatasetNotFoundError, Normalization, check_network,
                                   default_data_dir)
from tracefl_jax.data.medmnist import (MEDMNIST, MEDMNIST_MD5, MEDMNIST_URL,  # noqa: F401
                                       download_medmnist, find_medmnist, read_medmnist,
                                       read_medmnist_file)


@contextlib.contextmanager
def _quiet_tfds():
  """tfds prints progress bars and warns about optional TensorFlow; keep both out."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    tfds.disable_progress_bar()
    absl_logger.setLevel(logging.ERROR)
    try:
      yield tfds
    finally:
      absl_logger.setLevel(level)


def _read_split(source: Any, where: str, num_classes: int = 10, max_value: int = 255,
                channels: tuple[int, ...] = (1, 3)) -> tuple[np.ndarray, np.ndarray]:
  """uint8 `[N, H, W, C]` images and int32 `[N]` labels of one tfds split, checked
  (checks.py; `where` names the split in messages)."""
  try:
    records = source.__getitems__(list(range(len(source))))
  except TypeError:  # tfds.testing.mock_data's sources only index one record at a time
    records = [source[i] for i in range(len(source))]
  if not records:
    raise ValueError(f"{where}: the split is empty")
  x = check_pixels(np.stack([r["image"] for r in records]), f"{where} images",
                   max_value=max_value, channels=channels)
  y = check_labels(np.array([r["label"] for r in records]), f"{where} labels", num_classes,
                   len(x))
  return x, y


def _load_digits(data_dir: Path) -> Dataset:
  from tracefl_jax.data.digits_builder import TraceflDigits  # pylint: disable=g-import-not-at-top
  with _quiet_tfds() as tfds:
    builder = TraceflDigits(data_dir=str(data_dir), file_format="array_record")
    if not builder.is_prepared():
      # Parallel runs (test workers, sweeps) may prepare at once: one prepares, others wait.
      data_dir.mkdir(parents=True, exist_ok=True)
      with open(data_dir / ".tracefl_digits.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = TraceflDigits(data_dir=str(data_dir), file_format="array_record")
        if not builder.is_prepared():
          with contextlib.redirect_stdout(io.StringIO()):  # tfds prints "Downloading and ..."
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    source = builder.as_data_source()
    (x_tr, y_tr), (x_te, y_te) = (
        _read_split(source[s], f"digits ({data_dir / 'tracefl_digits'}, {s} split)",
                    max_value=16, channels=(1,)) for s in ("train", "test"))

  def norm(x):
    return ((x.astype(np.float32) / 16.0 - DIGITS_MEAN) / DIGITS_STD).astype(np.float32)
  return Dataset("digits", norm(x_tr), y_tr, norm(x_te), y_te, 10)


def _check_size(image_size: Any) -> int:
  if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) \
      or image_size < 1:
    raise ValueError(f"image_size={image_size!r} must be an int >= 1 (pixels per side)")
  return int(image_size)


def _cached(name: str, data_dir: Path, files: Sequence[Path], size: int, num_classes: int,
            read: Callable[[], Sequence[np.ndarray]], cache: bool) -> prepared_cache.Arrays:
  """The prepared arrays of local source `files` (prepared_cache.py): read from the cache
  beside them, else read, prepared and cached. Keyed also by the size and by the backend
  that resizes (whose float rounding decides the pixels)."""
  import jax  # pylint: disable=g-import-not-at-top
  return prepared_cache.load_prepared(
      name, data_dir, files, f"{size}-{jax.default_backend()}", size, num_classes,
      lambda: prepare_splits(read(), size), cache=cache)


# Where tfds' builders fetch the raw files from (checked before a download starts).
TFDS_SOURCE_HOST = {"mnist": "storage.googleapis.com", "cifar10": "www.cs.toronto.edu"}


def _read_tfds_images(name: str, data_dir: Path, download: bool
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
  """(x_train, y_train, x_test, y_test) uint8/int32 from a tfds-prepared array_record
  directory (prepared here first when `download`), or None when there is none."""
  with _quiet_tfds() as tfds:
    builder = tfds.builder(name, data_dir=str(data_dir))
    if download and not builder.is_prepared():
      check_network(TFDS_SOURCE_HOST[name])
      builder.download_and_prepare(file_format="array_record")
    try:
      # Asked first, so that tfds.testing.mock_data (which patches it) also works here.
      source = {split: builder.as_data_source(split=split) for split in ("train", "test")}
    except Exception:  # pylint: disable=broad-except
      return None
    (x_tr, y_tr), (x_te, y_te) = (
        _read_split(source[s], f"tfds {name} ({data_dir / name}, {s} split)")
        for s in ("train", "test"))
  return x_tr, y_tr, x_te, y_te


def _load_image_dataset(name: str, data_dir: Path, mean: Any, std: Any,
                        download: bool = False, image_size: int = IMAGE_SIZE,
                        cache: bool = True) -> Dataset:
  """mnist / cifar10: local copies of the original files (in their order) when present, else
  tfds-prepared data, else a tfds download when asked; the same preprocessing for all. Local
  files' prepared arrays are cached beside them unless `cache=False` (prepared_cache.py)."""
  size = _check_size(image_size)
  local = image_files.locate_local_images(name, data_dir)
  if local is not None:
    arrays = _cached(name, data_dir, local.files, size, 10, local.read, cache)
  else:
    raw = _read_tfds_images(name, data_dir, download)
    if raw is None:
      raise DatasetNotFoundError(
          f"dataset {name!r}: no local copy under {data_dir} (tracefl_jax never downloads "
          f"unless asked). Looked for any one of:\n"
          f"{image_files.describe_search(name, data_dir)}\n"
          f"  - a tensorflow-datasets array_record directory {data_dir / name}/<version>/\n"
          f"Copy the files of any one of these into {data_dir} (or point "
          f"--config.dataset.data_dir, or TRACEFL_DATA_DIR, at the directory that holds "
          f"them), or pass --config.dataset.download=True on a machine with network access.")
    arrays = prepare_splits(raw, size)
  return Dataset(name, *arrays, 10, normalization=Normalization(mean, std))


def _load_medmnist(name: str, data_dir: Path, download: bool = False,
                   image_size: int = IMAGE_SIZE, cache: bool = True) -> Dataset:
  """MedMNIST's official 28x28 `.npz` release, checked (medmnist.py), resized to 32x32 RGB
  (cached beside it unless `cache=False`) and normalised with 0.5 / 0.5 as in the paper."""
  size = _check_size(image_size)
  path = find_medmnist(name, data_dir, download)
  arrays = _cached(name, data_dir, (path,), size, MEDMNIST[name],
                   lambda: read_medmnist_file(name, path), cache)
  return Dataset(name, *arrays, MEDMNIST[name],
                 normalization=Normalization(MEDMNIST_MEAN, MEDMNIST_STD))


def make_synthetic(num_train: int = 1000, num_test: int = 200,
                   image_shape: tuple[int, ...] = (28, 28, 1), num_classes: int = 10,
                   seed: int = 0, noise: float = 1.0) -> Dataset:
  """Class prototypes plus Gaussian noise: learnable, any size, deterministic by seed."""
  if num_train < 1 or num_test < 1 or num_classes < 2:
    raise ValueError("synthetic data needs num_train >= 1, num_test >= 1, num_classes >= 2")
  rng = np.random.default_rng(seed)
  prototypes = rng.normal(size=(num_classes, *image_shape)).astype(np.float32)
  n = num_train + num_test
  y = rng.integers(0, num_classes, size=n).astype(np.int32)
  x = prototypes[y] + noise * rng.standard_normal(size=(n, *image_shape), dtype=np.float32)
  return Dataset("synthetic", x[:num_train], y[:num_train], x[num_train:], y[num_train:],
                 num_classes)


def _load_text(name: str, data_dir: Path, tokenizer: str | None = None,
               max_length: int = 128, download: bool = False, **_: Any) -> Dataset:
  if download:
    raise ValueError(f"dataset {name!r} is not downloaded by tracefl_jax (its official "
                     f"releases are archives behind Google Drive / the Hugging Face hub): put "
                     f"its CSV or Parquet files in --config.dataset.data_dir and set "
                     f"--config.dataset.download=False")
  if not tokenizer:
    raise ValueError(f"dataset {name!r} needs a tokenizer directory "
                     "(--config.dataset.tokenizer=PATH, a Hugging Face tokenizer saved locally)")
  tok = text.load_tokenizer(tokenizer)
  (tr, y_tr), (te, y_te) = (text.read_split(name, data_dir, s) for s in ("train", "test"))
  return Dataset(name, text.tokenize(tok, tr, max_length), y_tr,
                 text.tokenize(tok, te, max_length), y_te, text.TEXT_DATASETS[name])


def _synthetic_text(**options: Any) -> Dataset:
  classes = options.get("num_classes", 4)
  x_tr, y_tr, x_te, y_te = text.make_synthetic_text(**options)
  return Dataset("synthetic_text", x_tr, y_tr, x_te, y_te, classes)


def _or_default(data_dir: Path | None) -> Path:
  return data_dir if data_dir is not None else default_data_dir()


# name -> loader(data_dir: Path | None, **options) -> Dataset. The built-ins fall back to
# default_data_dir(); a registered loader receives None when no directory was given.
_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": lambda data_dir, **_: _load_digits(_or_default(data_dir)),
    "mnist": lambda data_dir, download=False, image_size=IMAGE_SIZE, cache=True, **_:
        _load_image_dataset("mnist", _or_default(data_dir), MNIST_MEAN, MNIST_STD, download,
                            image_size, cache),
    "cifar10": lambda data_dir, download=False, image_size=IMAGE_SIZE, cache=True, **_:
        _load_image_dataset("cifar10", _or_default(data_dir), CIFAR10_MEAN, CIFAR10_STD,
                            download, image_size, cache),
    "synthetic": lambda data_dir, **options: make_synthetic(**options),
    "synthetic_structured": lambda data_dir, **options: make_structured_images(**options),
    **{name: (lambda data_dir, name=name, download=False, image_size=IMAGE_SIZE, cache=True,
              **_: _load_medmnist(name, _or_default(data_dir), download, image_size, cache))
       for name in MEDMNIST},
    "dbpedia": lambda data_dir, **options: _load_text("dbpedia", _or_default(data_dir),
                                                      **options),
    "yahoo": lambda data_dir, **options: _load_text("yahoo", _or_default(data_dir), **options),
    "synthetic_text": lambda data_dir, **options: _synthetic_text(**options),
}


def available_datasets() -> list[str]:
  """Built-in and registered dataset names, sorted."""
  return sorted(_LOADERS)


def register_dataset(name: str, loader: Callable[..., Dataset]) -> None:
  """Adds `loader(data_dir: Path | None, **options) -> Dataset` under `name`, so that
  `load_dataset(name, data_dir=..., **options)` and `--config.dataset.name=name` reach it.

  `data_dir` is the `data_dir` given to `load_dataset` as a Path, or None; `options` are
  passed through unchanged (the experiment runner passes none for a registered name).
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"a dataset name must be a non-empty string, got {name!r}")
  if not callable(loader):
    raise TypeError(f"dataset {name!r}: the loader must be callable "
                    f"(data_dir, **options) -> Dataset, got {type(loader).__name__}")
  if name in _LOADERS:
    raise ValueError(f"dataset {name!r} is already registered")
  _LOADERS[name] = loader


def load_dataset(name: str, *, data_dir: str | Path | None = None, **options: Any) -> Dataset:
  """Loads dataset `name` (see `available_datasets()`).

  `options`: for `synthetic`/`synthetic_text` their generator's arguments; for the text
  datasets `tokenizer` (a local tokenizer directory) and `max_length` (default 128); for
  mnist, cifar10, pathmnist and organamnist `download=True` fetches missing data into
  `data_dir` first (off by default: nothing is downloaded unless asked), `image_size` (default
  32) sets the side of the RGB images, and `cache=False` neither reads nor writes the cache of
  prepared arrays kept beside local files (`data_dir/.tracefl_cache/`); for a registered
  dataset whatever its loader takes. The built-ins read `data_dir`, else TRACEFL_DATA_DIR,
  else ~/.cache/tracefl_jax/tfds.
  """
  if name not in _LOADERS:
    raise ValueError(f"unknown dataset {name!r}; valid datasets: "
                     f"{', '.join(available_datasets())}")
  ds = _LOADERS[name](Path(data_dir) if data_dir else None, **options)
  if not isinstance(ds, Dataset):
    raise TypeError(f"the loader of dataset {name!r} returned {type(ds).__name__}, not a "
                    f"tracefl_jax.data.Dataset")
  return ds
