"""Images brought to the models' input: uint8 `[N, H, W, C]` -> uint8 `[N, size, size, 3]`,
bilinear and rounded, one helper for every source of the same dataset (local files, tfds, the
MedMNIST release). The paper's normalisation (spec section 4, `(x / 255 - mean) / std`)
travels with the dataset as a `Normalization` and runs on the device, batch by batch.

Resizing goes a chunk of images at a time into the preallocated uint8 result, so that a
dataset's preparation peaks at about its uint8 size plus one chunk's float work, not the
whole dataset's float copy; each image's pixels are those of the
one-call resize, bit for bit (tests/test_data_cache.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tracefl_jax.data.base import IMAGE_SIZE
from tracefl_jax.data.prepared_cache import Arrays

RESIZE_CHUNK = 4096  # images resized at once: a chunk's float work is tens of MB


def resize_rgb(x: np.ndarray, size: int, chunk: int = RESIZE_CHUNK) -> np.ndarray:
  """uint8 `[N, H, W, C]` -> uint8 `[N, size, size, 3]`: `jax.image.resize` bilinear, rounded
  and clipped back to uint8 (as torchvision's PIL `Resize` returns uint8 images), grey repeated
  to RGB, `chunk` images at a time. Bilinear resizing acts on each channel alone, so grey is
  resized once and then repeated: the pixels of repeating first, for a third of the work."""
  if chunk < 1:
    raise ValueError(f"chunk={chunk} must be >= 1")
  n, height, width, channels = x.shape
  out = np.empty((n, size, size, 3), np.uint8)
  if (height, width) == (size, size):
    out[...] = x  # broadcasts grey [..., 1] to RGB
    return out
  import jax  # pylint: disable=g-import-not-at-top
  for start in range(0, n, chunk):
    part = x[start:start + chunk].astype(np.float32)
    resized = np.asarray(jax.image.resize(part, (len(part), size, size, channels), "bilinear"))
    out[start:start + len(part)] = np.clip(np.round(resized), 0, 255)  # [.., 1] repeats
  return out


def prepare_images(x: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
  """uint8 `[N, H, W, C]` -> uint8 `[N, size, size, 3]` (`resize_rgb`)."""
  return resize_rgb(x, size)


def prepare_splits(arrays: Sequence[np.ndarray], size: int = IMAGE_SIZE) -> Arrays:
  """(x_train, y_train, x_test, y_test, ...) -> the same four with both image splits
  prepared (anything after the four, such as `ImageArrays.source`, is dropped)."""
  x_tr, y_tr, x_te, y_te = arrays[:4]
  return prepare_images(x_tr, size), y_tr, prepare_images(x_te, size), y_te
