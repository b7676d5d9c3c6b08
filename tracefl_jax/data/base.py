"""What every dataset loader shares, and nothing that loads: the `Dataset` type, the
`Normalization` of uint8 images, the error for missing files, the default data directory, the
reachability check before a download and the paper's normalisation constants.

Loader modules (datasets.py, image_files.py, text.py, digits_builder.py) import from here and
never from each other's internals, so no import circle runs through the data package.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np

from tracefl_jax.data.checks import check_finite

# digits: pixel values 0..16 scaled to [0, 1], then standardised with the mean and std of all
# 1,797 images' pixels (computed once: 0.30526 and 0.37605), as MNIST uses 0.1307 / 0.3081.
DIGITS_MEAN, DIGITS_STD = 0.30526, 0.37605
DIGITS_NUM_TRAIN = 1437  # a seeded permutation: 1,437 train / 360 test (80 / 20)
# The paper's normalisation (spec section 4), applied after resizing to 32x32 RGB in [0, 1].
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
MEDMNIST_MEAN, MEDMNIST_STD = 0.5, 0.5
IMAGE_SIZE = 32


class DatasetNotFoundError(FileNotFoundError):
  """A dataset whose files are not in the data directory."""


def default_data_dir() -> Path:
  return Path(os.environ.get("TRACEFL_DATA_DIR", Path.home() / ".cache" / "tracefl_jax" / "tfds"))


def check_network(host: str, port: int = 443, timeout: float = 5.0) -> None:
  """Fails at once, naming the host, when it cannot be reached (rather than letting a
  library retry for minutes)."""
  try:
    socket.create_connection((host, port), timeout=timeout).close()
  except OSError as e:
    raise DatasetNotFoundError(
        f"download asked for, but {host}:{port} is unreachable ({e}); prepare the data on a "
        f"machine with network access and copy it into --config.dataset.data_dir") from e


@dataclasses.dataclass(frozen=True)
class Normalization:
  """`(x / pixel_max - mean) / std` in float32, per channel (the last axis): torchvision's
  `ToTensor()` then `Normalize(mean, std)`. Jitted, XLA computes it with reciprocals (and
  fused multiply-adds), which differs from NumPy's result by about one float32 rounding.

  Image datasets keep their pixels as uint8 (a quarter of float32's memory, on the host and
  on the device) and carry this; it is applied to a batch where the batch is used: inside the
  jitted client step, to the evaluator's test set, to provenance inputs. Hashable (a static
  argument of the jitted round). Works on NumPy and JAX arrays alike.
  """
  mean: tuple[float, ...]
  std: tuple[float, ...]
  pixel_max: float = 255.0

  def __post_init__(self):
    for field in ("mean", "std"):
      value = np.asarray(getattr(self, field), np.float64).reshape(-1)
      object.__setattr__(self, field, tuple(float(v) for v in value))
    if not self.mean or len(self.mean) != len(self.std) or min(self.std) <= 0:
      raise ValueError(f"Normalization needs as many means as positive stds, got mean="
                       f"{self.mean}, std={self.std}")

  def __call__(self, x: Any) -> Any:
    shape = (1,) * (x.ndim - 1) + (-1,)  # explicit ranks (no implicit rank promotion)
    mean = np.asarray(self.mean, np.float32).reshape(shape)
    std = np.asarray(self.std, np.float32).reshape(shape)
    return (x.astype(np.float32) / np.float32(self.pixel_max) - mean) / std


def _is_int(dtype: np.dtype) -> bool:
  return np.issubdtype(dtype, np.integer) and dtype != np.bool_


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A labelled train/test split in memory, checked on construction.

  Build one from your own arrays with `Dataset(name, x_train, y_train, x_test, y_test,
  num_classes)`, or with `Dataset.from_arrays(...)`, which casts common dtypes (float64
  images, int64 labels) and infers `num_classes`.

  Attributes:
    name: a label for logs and results.
    x_train, x_test: `[N, ...]` finite float32 inputs (normalised NHWC images, features),
      int32 token ids `[N, seq_len]` (>= 0), or uint8 images with a `normalization`; both
      splits share the per-example shape and the dtype.
    y_train, y_test: `[N]` int32 labels in `[0, num_classes)`.
    num_classes: number of classes K (>= 2).
    normalization: for uint8 images, what turns them into the model's float inputs
      (`normalize`); None for inputs used as they are.
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  normalization: Normalization | None = None

  def __post_init__(self):
    # Plain NumPy inside (jax arrays and lists are accepted, then held as NumPy): the data
    # layer slices and partitions on the host, and a device array would pin accelerator memory.
    for field in ("x_train", "y_train", "x_test", "y_test"):
      object.__setattr__(self, field, np.asarray(getattr(self, field)))
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"Dataset name must be a non-empty string, got {self.name!r}")
    if (isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer))
        or self.num_classes < 2):
      raise ValueError(f"dataset {self.name!r}: num_classes must be an int >= 2, got "
                       f"{self.num_classes!r}")
    for split in ("train", "test"):
      self._check_split(split)
    if self.x_train.shape[1:] != self.x_test.shape[1:]:
      raise ValueError(f"dataset {self.name!r}: x_train examples have shape "
                       f"{self.x_train.shape[1:]} but x_test examples {self.x_test.shape[1:]}; "
                       f"both splits must share the per-example shape")
    norm = self.normalization
    if norm is not None and not isinstance(norm, Normalization):
      raise TypeError(f"dataset {self.name!r}: normalization must be a Normalization, got "
                      f"{type(norm).__name__}")
    if norm is not None and len(norm.mean) not in (1, self.x_train.shape[-1]):
      raise ValueError(f"dataset {self.name!r}: normalization has {len(norm.mean)} channel "
                       f"means but the inputs have {self.x_train.shape[-1]} channels")
    if self.x_train.dtype != self.x_test.dtype:
      raise ValueError(f"dataset {self.name!r}: x_train is {self.x_train.dtype} but x_test is "
                       f"{self.x_test.dtype}; both splits must share one dtype")

  def _check_split(self, split: str) -> None:
    x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
    where = f"dataset {self.name!r}"
    if x.ndim < 2:
      raise ValueError(f"{where}: x_{split} must be [N, ...] with at least one feature axis, "
                       f"got shape {x.shape}")
    if x.dtype == np.uint8 and self.normalization is None:
      raise ValueError(f"{where}: x_{split} holds uint8 pixels but the dataset has no "
                       f"normalization; pass normalization=Normalization(mean, std), or "
                       f"float32 inputs")
    if self.normalization is not None and x.dtype not in (np.uint8, np.float32):
      raise ValueError(f"{where}: a normalization applies to uint8 or float32 pixels, but "
                       f"x_{split} has dtype {x.dtype}")
    if x.dtype not in (np.float32, np.int32, np.uint8):
      hint = "np.float32" if np.issubdtype(x.dtype, np.floating) else "np.int32"
      raise ValueError(f"{where}: x_{split} has dtype {x.dtype}; inputs must be float32 "
                       f"(images, features) or int32 (token ids): pass "
                       f"x_{split}.astype({hint}), or build with Dataset.from_arrays")
    check_finite(x, f"{where}: x_{split}")
    if x.dtype == np.int32 and x.size and x.min() < 0:
      raise ValueError(f"{where}: x_{split} holds token id {x.min()} < 0; token ids index a "
                       f"vocabulary and must be >= 0")
    if y.ndim != 1:
      raise ValueError(f"{where}: y_{split} must be [N] integer labels, got shape {y.shape}")
    if y.dtype != np.int32:
      raise ValueError(f"{where}: y_{split} has dtype {y.dtype}; labels must be int32 "
                       f"(pass y_{split}.astype(np.int32), or build with Dataset.from_arrays)")
    if len(x) != len(y):
      raise ValueError(f"{where}: x_{split} has {len(x)} examples but y_{split} has {len(y)}")
    if len(y) == 0:
      raise ValueError(f"{where}: the {split} split is empty")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= self.num_classes:
      raise ValueError(f"{where}: y_{split} has labels in [{low}, {high}], outside "
                       f"[0, num_classes={self.num_classes}); relabel to 0..K-1 or raise "
                       f"num_classes")

  @classmethod
  def from_arrays(cls, name: str, x_train: Any, y_train: Any, x_test: Any, y_test: Any,
                  num_classes: int | None = None) -> Dataset:
    """A Dataset from arrays of common dtypes: floating inputs become float32, integer inputs
    (token ids) and labels int32; `num_classes` defaults to the largest label + 1."""
    def inputs(x):
      x = np.asarray(x)
      if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32, copy=False)
      if _is_int(x.dtype):
        return x.astype(np.int32, copy=False)
      raise ValueError(f"dataset {name!r}: inputs of dtype {x.dtype} are neither floating "
                       f"point nor integer token ids")

    def labels(y):
      y = np.asarray(y)
      if not _is_int(y.dtype):
        raise ValueError(f"dataset {name!r}: labels must be integers, got dtype {y.dtype}")
      if y.ndim == 2 and y.shape[1] == 1:  # MedMNIST and Keras-style column labels
        y = y[:, 0]
      return y.astype(np.int32, copy=False)

    y_train, y_test = labels(y_train), labels(y_test)
    if num_classes is None:
      num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    return cls(name, inputs(x_train), y_train, inputs(x_test), y_test, num_classes)

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.x_train.shape[1:])

  def normalize(self, x: Any) -> Any:
    """`x` (e.g. a slice of `x_test`) as the model's inputs: `normalization(x)`, or `x`."""
    return x if self.normalization is None else self.normalization(x)
