"""Checks that every loader runs on what it read, before anything is resized or trained on.

A loader hands each array to one of these with `where`, a description of its origin (a file
and the key inside it, `"/data/mnist.npz[x_train]"`; a CSV file and line, `"train.csv:7"`;
a tfds split), so that a bad file fails at once with one line naming the file, the key or
line, the bad value and what is valid, instead of a NumPy cast that silently rounds, a
traceback from deep inside resizing, or a training run on garbage.

Policies (one for all loaders):
  pixels  uint8 as the releases ship them; another integer dtype is accepted when every value
          lies in [0, max_value] (the conversion is exact); floating point is refused, whatever
          its range: [0, 1] floats would have to be scaled and rounded, and guessing the scale
          silently changes the data (the one float format read, the classic mnist.pkl.gz, has
          its own exact conversion in image_readers.py);
  labels  integer dtype (bool and floats refused, even whole-valued ones), shape [N] or
          [N, 1], one per image, every value in [0, num_classes);
  floats  finite (no NaN or inf), for float inputs built or loaded in memory.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class DataFileError(ValueError):
  """A dataset file (or loaded array) whose contents are not what its loader expects; the
  message is one line naming the file and the key, column or line that is wrong."""


def _is_int(dtype: np.dtype) -> bool:
  return np.issubdtype(dtype, np.integer) and dtype != np.bool_


def _first_bad(mask: np.ndarray) -> tuple[int, ...]:
  """Index (as a tuple) of the first True of `mask`."""
  return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))


def check_pixels(x: Any, where: str, *, max_value: int = 255, size: int | None = None,
                 channels: Sequence[int] = (1, 3)) -> np.ndarray:
  """uint8 `[N, H, W, C]` images from `[N, H, W]` or `[N, H, W, C]` pixels in [0, max_value].

  Args:
    x: the array as read.
    where: its origin, for messages (file and key).
    max_value: the largest valid pixel (255; 16 for the digits).
    size: when given, H and W must both equal it.
    channels: the valid values of C (a 3-D array has C = 1).

  Raises:
    DataFileError: a non-integer dtype, a value outside [0, max_value], or a wrong shape.
  """
  x = np.asarray(x)
  if x.ndim not in (3, 4) or x.shape[0] == 0 or 0 in x.shape[1:]:
    raise DataFileError(f"{where}: expected images [N, H, W] or [N, H, W, C] with N, H, W >= 1, "
                        f"got shape {x.shape}")
  c = 1 if x.ndim == 3 else x.shape[3]
  if c not in channels:
    raise DataFileError(f"{where}: images have {c} channels (shape {x.shape}); valid: "
                        f"{' or '.join(map(str, channels))}")
  if size is not None and x.shape[1:3] != (size, size):
    raise DataFileError(f"{where}: images are {x.shape[1]}x{x.shape[2]}, expected "
                        f"{size}x{size} (shape {x.shape})")
  if x.dtype != np.uint8:
    if not _is_int(x.dtype):
      finite = np.isfinite(x) if np.issubdtype(x.dtype, np.floating) else None
      note = ""
      if finite is not None and finite.any():
        note = f" in [{x[finite].min():g}, {x[finite].max():g}]"
      if finite is not None and not finite.all():
        note += f", with NaN or inf at index {_first_bad(~finite)}"
      raise DataFileError(
          f"{where}: pixels have dtype {x.dtype}{note}; expected integer pixels 0..{max_value} "
          f"(uint8, as the release ships them). Floating-point images are not converted: "
          f"for floats in [0, 1] store np.round(x * {max_value}).astype(np.uint8)")
    bad = (x < 0) | (x > max_value)
    if bad.any():
      raise DataFileError(f"{where}: pixel {x[_first_bad(bad)]} at index {_first_bad(bad)} is "
                          f"outside 0..{max_value} (dtype {x.dtype})")
    x = x.astype(np.uint8)
  elif max_value < 255 and x.max(initial=0) > max_value:
    bad = x > max_value
    raise DataFileError(f"{where}: pixel {x[_first_bad(bad)]} at index {_first_bad(bad)} is "
                        f"outside 0..{max_value}")
  return x[..., None] if x.ndim == 3 else x


def check_labels(y: Any, where: str, num_classes: int, n: int | None = None) -> np.ndarray:
  """int32 `[N]` labels from integer `[N]` or `[N, 1]` values in [0, num_classes).

  Args:
    y: the labels as read.
    where: their origin, for messages.
    num_classes: K; every label must lie in [0, K).
    n: when given, the number of examples they label.

  Raises:
    DataFileError: a non-integer dtype, a wrong shape or count, or a label out of range.
  """
  y = np.asarray(y)
  if y.ndim == 2 and y.shape[1] == 1:  # MedMNIST and Keras-style column labels
    y = y[:, 0]
  if y.ndim != 1:
    raise DataFileError(f"{where}: labels must be [N] or [N, 1] (one class per example), got "
                        f"shape {y.shape}")
  if not _is_int(y.dtype):
    sample = ", ".join(str(v) for v in y[:3].tolist())
    raise DataFileError(f"{where}: labels must be integers in [0, {num_classes}), got dtype "
                        f"{y.dtype} (first values {sample}); whole-valued floats are not "
                        f"truncated or rounded, store y.astype(np.int64) if they are exact")
  if n is not None and len(y) != n:
    raise DataFileError(f"{where}: {len(y)} labels for {n} examples")
  bad = (y < 0) | (y >= num_classes)
  if bad.any():
    i = int(np.argmax(bad))
    raise DataFileError(f"{where}: label {y[i]} at index {i} is outside [0, {num_classes}) "
                        f"(labels span [{y.min()}, {y.max()}])")
  return y.astype(np.int32)


def check_finite(x: np.ndarray, where: str, chunk: int = 4096) -> None:
  """Raises DataFileError naming the first example of float `x [N, ...]` holding NaN or inf;
  checked `chunk` examples at a time (bounded memory on large arrays)."""
  if not np.issubdtype(x.dtype, np.floating):
    return
  for start in range(0, len(x), chunk):
    part = x[start:start + chunk]
    finite = np.isfinite(part)
    if not finite.all():
      index = _first_bad(~finite)
      raise DataFileError(f"{where}: value {part[index]} at index "
                          f"{(index[0] + start,) + index[1:]} is not finite (NaN or inf)")


# What a damaged .npz raises from np.load or from reading a key: a cut zip directory
# (BadZipFile), a bad CRC or deflate stream (BadZipFile, zlib.error), a short member (EOFError,
# ValueError), unreadable bytes (OSError).
_NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


def read_npz(path: str | Path, keys: Sequence[str], what: str) -> dict[str, np.ndarray]:
  """The arrays `keys` of the `.npz` at `path`, read fully.

  Raises:
    DataFileError: one line naming the file (and the key) for a truncated or corrupt archive,
      a missing key (with the keys the file has), or a pickled object array (never loaded).
  """
  path = Path(path)
  arrays: dict[str, np.ndarray] = {}
  key = None
  try:
    # Our own handle: np.load leaks the one it opens when the zip directory is unreadable.
    with open(path, "rb") as handle:
      f = np.load(handle, allow_pickle=False)
      if not isinstance(f, np.lib.npyio.NpzFile):
        raise DataFileError(f"{path} holds a single .npy array of shape {np.shape(f)}, not "
                            f"{what}")
      with f:
        missing = [k for k in keys if k not in f.files]
        if missing:
          held = ", ".join(f.files) or "no arrays"
          raise DataFileError(f"{path} is not {what}: it lacks the key(s) "
                              f"{', '.join(missing)} (it holds {held})")
        for key in keys:
          arrays[key] = f[key]
  except DataFileError:
    raise
  except _NPZ_ERRORS as e:
    part = f" (reading key {key!r})" if key is not None else ""
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DataFileError(f"{path}{part}: cannot be read as {what} ({type(e).__name__}: "
                        f"{reason}); a truncated or corrupt file? copy or download it again"
                        ) from e
  return arrays


def read_npy(path: str | Path, what: str = "inputs") -> np.ndarray:
  """The array in the `.npy` file at `path` (`what` names it in messages, e.g. the flag).

  Raises:
    DataFileError: one line naming the file for a missing file or a directory, an `.npz`
      archive (listing its keys), a pickled object array (never loaded), or a truncated or
      corrupt file.
  """
  path = Path(path)
  if not path.exists():
    raise DataFileError(f"{what} {str(path)!r} does not exist")
  if path.is_dir():
    raise DataFileError(f"{what} {str(path)!r} is a directory, not a .npy file")
  try:
    with open(path, "rb") as handle:
      array = np.load(handle, allow_pickle=False)
      if isinstance(array, np.lib.npyio.NpzFile):
        with array:
          keys = ", ".join(array.files) or "none"
        raise DataFileError(f"{what} {str(path)!r} is an .npz archive (keys {keys}); pass one "
                            f"array saved with np.save(PATH.npy, x)")
  except DataFileError:
    raise
  except _NPZ_ERRORS as e:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DataFileError(f"{what} {str(path)!r} cannot be read as a .npy array "
                        f"({type(e).__name__}: {reason})") from e
  return array
