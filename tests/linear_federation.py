"""A tiny federation for checking algorithms against plain NumPy per-client loops: softmax
regression (one Dense layer, 4 features, 3 classes) on a few clients of a few examples, and
its full-batch gradient in float64."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

import tracefl_jax as tfl

FEATURES, CLASSES = 4, 3


class Linear(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(CLASSES)(x)


def linear_federation(sizes, seed: int = 0, spread: bool = False):
  """`(model, data, variables, (x, y, parts))`: clients of `sizes` examples; `spread` scales
  the examples' features from 0.5x to 3x so that clients' update norms differ."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, CLASSES, sum(sizes)).astype(np.int32)
  if spread:
    x = rng.normal(size=(len(y), FEATURES)) * np.linspace(0.5, 3, len(y))[:, None] + y[:, None]
  else:
    x = rng.normal(size=(len(y), FEATURES)) + y[:, None] * (1 + np.arange(FEATURES))[None] / 4
  x = x.astype(np.float32)
  parts = np.split(np.arange(len(y)), np.cumsum(sizes)[:-1])
  model = tfl.make_model(Linear(), input_shape=(FEATURES,), num_classes=CLASSES)
  return model, tfl.federate(x, y, parts), model.init(jax.random.key(0)), (x, y, parts)


def stacked(variables) -> np.ndarray:
  """The Dense layer's kernel over its bias, `[FEATURES + 1, CLASSES]` float64."""
  p = variables["params"]["Dense_0"]
  return np.concatenate([np.asarray(p["kernel"], np.float64),
                         np.asarray(p["bias"], np.float64)[None]])


def grad(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Gradient of the mean cross-entropy of `x @ W + b` w.r.t. `theta = stacked (W, b)`."""
  w, b = theta[:FEATURES], theta[FEATURES]
  logits = x @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  d = (p - np.eye(CLASSES)[y]) / len(y)
  return np.concatenate([x.T @ d, d.sum(0)[None]])
