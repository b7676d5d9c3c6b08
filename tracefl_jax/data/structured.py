"""Class-structured synthetic images: smooth class prototypes, shifted, rescaled and noised.

`make_structured_images` is `make_synthetic`'s harder sibling for studies that need a global
model whose accuracy means something at any size, offline: each class is a smooth random
pattern (a `grid x grid` Gaussian field upsampled bilinearly to the image size, so nearby
pixels agree and a convolution has structure to find), and every example is its class's
pattern circularly shifted by up to `max_shift` pixels in each direction, multiplied by a
contrast in [0.7, 1.3] and given Gaussian pixel noise of std `noise`. The shifts make a pixel
template (a dense model) a poor fit where translation-tolerant features (a CNN) do well; the
noise bounds the best accuracy below 100%.

Registered as the dataset `synthetic_structured` (`data/datasets.py`); the experiment runner
passes it the synthetic options (size, shape, classes, noise).
"""

from __future__ import annotations


import numpy as np

from tracefl_jax.data.base import Dataset

NAME = "synthetic_structured"


def _upsample(field: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear upsampling of `[..., g, g]` to `[..., H, W]` (align-corners)."""
  g0, g1 = field.shape[-2:]
  ys, xs = np.linspace(0, g0 - 1, size[0]), np.linspace(0, g1 - 1, size[1])
  y0, x0 = np.minimum(ys.astype(int), g0 - 2), np.minimum(xs.astype(int), g1 - 2)
  wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
  f = field
  top = f[..., y0, :][..., :, x0] * (1 - wx) + f[..., y0, :][..., :, x0 + 1] * wx
  bottom = f[..., y0 + 1, :][..., :, x0] * (1 - wx) + f[..., y0 + 1, :][..., :, x0 + 1] * wx
  return top * (1 - wy) + bottom * wy


def make_structured_images(num_train: int = 1000, num_test: int = 200,
                           image_shape: tuple[int, ...] = (8, 8, 1), num_classes: int = 10,
                           seed: int = 0, noise: float = 1.0, grid: int = 4,
                           max_shift: int = 1) -> Dataset:
  """Smooth prototypes, per example shifted (circularly), rescaled and noised; deterministic
  by seed. Returns float32 `[N, H, W, C]` images (prototypes have zero mean, unit std)."""
  if num_train < 1 or num_test < 1 or num_classes < 2:
    raise ValueError("structured images need num_train >= 1, num_test >= 1, num_classes >= 2")
  if len(image_shape) != 3 or min(image_shape[:2]) < 2 or grid < 2:
    raise ValueError(f"image_shape {image_shape} must be (H, W, C) with H, W >= 2; grid >= 2")
  h, w, channels = image_shape
  rng = np.random.default_rng(seed)
  field = rng.normal(size=(num_classes, channels, grid, grid))
  protos = np.moveaxis(_upsample(field, (h, w)), 1, -1)          # [classes, H, W, C]
  protos = (protos - protos.mean(axis=(1, 2, 3), keepdims=True)) / protos.std(
      axis=(1, 2, 3), keepdims=True)
  n = num_train + num_test
  y = rng.integers(0, num_classes, size=n).astype(np.int32)
  shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
  contrast = rng.uniform(0.7, 1.3, size=(n, 1, 1, 1)).astype(np.float32)
  x = np.empty((n, h, w, channels), np.float32)
  for dy in range(-max_shift, max_shift + 1):  # one vectorised roll per shift
    for dx in range(-max_shift, max_shift + 1):
      sel = np.nonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))[0]
      x[sel] = np.roll(protos, (dy, dx), axis=(1, 2))[y[sel]]
  x *= contrast
  x += noise * rng.standard_normal(size=x.shape, dtype=np.float32)
  return Dataset(NAME, x[:num_train], y[:num_train], x[num_train:], y[num_train:],
                 num_classes)

