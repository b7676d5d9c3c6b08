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

from tracefl_jax.data.base import Dataset, Normalization

NAME = "synthetic_structured"
PIXELS = ("float32", "uint8")  # how the images are stored


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
                           max_shift: int = 1, pixels: str = "float32",
                           chunk: int = 1 << 14) -> Dataset:
  """Smooth prototypes, per example shifted (circularly), rescaled and noised; deterministic
  by seed. Returns float32 `[N, H, W, C]` images (prototypes have zero mean, unit std), or
  with `pixels="uint8"` the same images quantised (`quantise`) with the `Normalization`
  that maps them back (a quarter of the memory: 1.5 GB for 24 M 8x8 images).

  Examples are made `chunk` at a time from one generator drawn in the same order as a single
  pass (labels, shifts, contrasts, then the noise), so the images do not depend on `chunk`
  and the float32 temporaries stay `chunk` examples long (16,384 8x8 images: 4 MB, in cache)."""
  if num_train < 1 or num_test < 1 or num_classes < 2:
    raise ValueError("structured images need num_train >= 1, num_test >= 1, num_classes >= 2")
  if len(image_shape) != 3 or min(image_shape[:2]) < 2 or grid < 2:
    raise ValueError(f"image_shape {image_shape} must be (H, W, C) with H, W >= 2; grid >= 2")
  if pixels not in PIXELS:
    raise ValueError(f"pixels={pixels!r}; valid: {', '.join(PIXELS)}")
  if not isinstance(chunk, (int, np.integer)) or chunk < 1:
    raise ValueError(f"chunk={chunk!r} must be an int >= 1")
  h, w, channels = image_shape
  rng = np.random.default_rng(seed)
  field = rng.normal(size=(num_classes, channels, grid, grid))
  protos = np.moveaxis(_upsample(field, (h, w)), 1, -1)          # [classes, H, W, C]
  protos = ((protos - protos.mean(axis=(1, 2, 3), keepdims=True)) / protos.std(
      axis=(1, 2, 3), keepdims=True)).astype(np.float32)
  n = num_train + num_test
  y = _draw(n, chunk, lambda m: rng.integers(0, num_classes, size=m).astype(np.int32))
  shifts = _draw(n, chunk, lambda m: rng.integers(-max_shift, max_shift + 1, size=(m, 2))
                 .astype(np.int16))
  contrast = _draw(n, chunk, lambda m: rng.uniform(0.7, 1.3, size=m).astype(np.float32))
  rolled = {(dy, dx): np.roll(protos, (dy, dx), axis=(1, 2))
            for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)}
  # uint8 steps per unit: +-(the largest contrasted prototype value + 5 noise stds) fits.
  scale = 127.0 / (1.3 * float(np.abs(protos).max()) + 5.0 * float(noise))
  x = np.empty((n, h, w, channels), np.float32 if pixels == "float32" else np.uint8)
  for start in range(0, n, chunk):
    part = slice(start, min(start + chunk, n))
    block = np.empty((part.stop - start, h, w, channels), np.float32)
    shift, label = shifts[part], y[part]
    for (dy, dx), image in rolled.items():  # one vectorised gather per shift
      sel = np.nonzero((shift[:, 0] == dy) & (shift[:, 1] == dx))[0]
      block[sel] = image[label[sel]]
    block *= contrast[part, None, None, None]
    z = rng.standard_normal(size=block.shape, dtype=np.float32)
    z *= np.float32(noise)
    block += z
    x[part] = block if pixels == "float32" else quantise(block, scale)
  norm = None if pixels == "float32" else Normalization((128.0 / 255,), (scale / 255,))
  return Dataset(NAME, x[:num_train], y[:num_train], x[num_train:], y[num_train:],
                 num_classes, normalization=norm)


def quantise(x: np.ndarray, scale: float) -> np.ndarray:
  """`round(x * scale + 128)` clipped to uint8: `Normalization((128/255,), (scale/255,))`
  maps it back to `x` within half a step (1 / (2 scale)) where not clipped."""
  x = x * np.float32(scale)
  x += 128
  return np.clip(np.rint(x, out=x), 0, 255, out=x).astype(np.uint8)


def _draw(n: int, chunk: int, draw) -> np.ndarray:
  """`draw(m)` for consecutive pieces of at most `chunk` of `n` values, concatenated (one
  generator drawn in order gives what `draw(n)` would)."""
  return np.concatenate([draw(min(chunk, n - start)) for start in range(0, n, chunk)])
