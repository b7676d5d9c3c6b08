"""FedAvg as a pure function over stacked client variables `[C, ...]`.

McMahan et al. (2017), Algorithm 1: the new global model is the average of the clients'
models weighted by their example counts. TraceFL's original weights by local batch counts
(`floor(n_k / batch_size)`, spec section 4); `client_weights` offers both. DP-FedAvg is in
`privacy.py`.

Checks: shapes are static, so a weight vector of the wrong length is a `ValueError` even
under `jit`. Weight VALUES (negative, non-finite, all zero) are checked whenever they are
concrete (eagerly, and on the host before the jitted round); under a trace `fedavg` cannot
raise, so an invalid vector gives an all-NaN average instead of a plausible wrong model, and
`checked_fedavg` reports the exact cause through `jax.experimental.checkify`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.typing import ArrayLike

from tracefl_jax.fl.types import PyTree, Stacked

WEIGHTINGS = ("examples", "batches", "uniform")


def client_weights(num_examples: ArrayLike, weighting: str = "examples",
                   batch_size: int | None = None) -> np.ndarray | jax.Array:
  """FedAvg weights `[C]` from example counts `[C]` (NumPy or JAX).

  Raises ValueError for an unknown weighting, a missing or non-positive `batch_size` with
  "batches", and (when the counts are concrete) negative counts.
  """
  xp = jnp if isinstance(num_examples, jax.Array) else np
  n = xp.asarray(num_examples)
  if not isinstance(n, jax.core.Tracer) and np.any(np.asarray(n) < 0):
    counts = np.asarray(n)
    raise ValueError(f"example counts must be >= 0, got {counts.tolist()} (negative at "
                     f"positions {np.flatnonzero(counts < 0).tolist()})")
  if weighting == "examples":
    return n.astype(xp.float32)
  if weighting == "batches":
    if not batch_size or batch_size < 1:
      raise ValueError(f'weighting="batches" needs a batch_size >= 1, got {batch_size}')
    return (n // batch_size).astype(xp.float32)
  if weighting == "uniform":
    return xp.ones(n.shape, xp.float32)
  raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")


def check_weights(weights: ArrayLike) -> None:
  """Raises a clear error for a round whose aggregation weights are unusable.

  Call it on host-side (concrete) weights before the jitted round; under a trace it cannot
  inspect values and does nothing (see `checked_fedavg` for checks under `jit`).
  """
  if isinstance(weights, jax.core.Tracer):
    return
  w = np.asarray(weights, np.float64)
  if w.ndim != 1 or w.size == 0:
    raise ValueError(f"aggregation weights must be a non-empty vector [C], got shape {w.shape}")
  bad = ~np.isfinite(w) | (w < 0)
  if np.any(bad):
    raise ValueError(f"aggregation weights must be finite and >= 0, got {w.tolist()} (bad at "
                     f"positions {np.flatnonzero(bad).tolist()})")
  if w.sum() <= 0:
    raise ValueError(
        f"every client of this round has aggregation weight 0 ({w.tolist()}); nothing to "
        "average. Weights by batches give 0 to clients with fewer examples than the batch "
        "size: use weighting='examples', a smaller batch size, or drop small clients "
        "(partition fix-up).")


def _check_shapes(stacked: Stacked, weights: ArrayLike) -> None:
  """Static checks (valid under `jit`): `weights` is `[C]`, every leaf is `[C, ...]`."""
  shape = tuple(np.shape(weights))
  if len(shape) != 1:
    raise ValueError(f"aggregation weights must be a vector [C], got shape {shape}")
  leaves = jax.tree_util.tree_flatten_with_path(stacked)[0]
  if not leaves:
    raise ValueError("fedavg got a pytree without leaves; nothing to average")
  for path, leaf in leaves:
    if np.ndim(leaf) == 0 or np.shape(leaf)[0] != shape[0]:
      name = jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"
      raise ValueError(
          f"aggregation weights have length {shape[0]} but leaf {name} "
          f"has shape {tuple(np.shape(leaf))}; every leaf must be stacked [C, ...] with C = "
          f"{shape[0]}, the number of weights")


def _average(stacked: Stacked, w: jax.Array) -> PyTree:
  def mean(leaf):
    # HIGHEST: a GPU's default would round the f32 operands to TF32.
    avg = jnp.tensordot(w, leaf.astype(jnp.float32), axes=1,
                        precision=jax.lax.Precision.HIGHEST)
    if jnp.issubdtype(leaf.dtype, jnp.integer):
      return jnp.round(avg).astype(leaf.dtype)
    return avg.astype(leaf.dtype)

  return jax.tree.map(mean, stacked)


def fedavg(stacked: Stacked, weights: jax.Array) -> PyTree:
  """Weighted mean over the leading client axis of every leaf.

  Args:
    stacked: a pytree whose leaves are `[C, ...]`.
    weights: `[C]` finite non-negative weights, not all zero (zeros mark padded clients).

  Returns:
    The pytree of `[...]` weighted means, each leaf in its own dtype. Integer leaves (counters)
    are averaged in float32 and rounded back.

  Raises:
    ValueError: weights that are not a `[C]` vector matching every leaf's leading axis
      (always, also under `jit`); negative, non-finite or all-zero weights when the weights
      are concrete (`check_weights`).

  Under `jit` the weight values are unknown at trace time: an invalid vector then yields NaN
  in every float leaf (integer leaves are undefined), never a plausible wrong model. Check
  concrete weights first (`federated_averaging`'s round runs `check_weights` on the host
  before its jitted program), or use `checked_fedavg` to get the cause as an error.
  """
  _check_shapes(stacked, weights)
  check_weights(weights)
  w = jnp.asarray(weights, jnp.float32)
  total = jnp.sum(w)
  # NaN >= 0 is False, so NaN weights poison the result too; inf weights give inf / inf.
  valid = jnp.all(w >= 0) & (total > 0)
  return _average(stacked, jnp.where(valid, w / total, jnp.nan))


def _fedavg_with_checks(stacked: Stacked, weights: jax.Array) -> PyTree:
  w = jnp.asarray(weights, jnp.float32)
  checkify.check(jnp.all(jnp.isfinite(w) & (w >= 0)),
                 "aggregation weights must be finite and >= 0, got {w}", w=w)
  checkify.check(jnp.sum(w) > 0, "aggregation weights are all 0 ({w}); nothing to average",
                 w=w)
  return fedavg(stacked, weights)


def checked_fedavg(stacked: Stacked, weights: jax.Array) -> tuple[checkify.Error, PyTree]:
  """`fedavg` with its weight-value checks made jittable: returns `(error, average)`.

  `err, g = jax.jit(checked_fedavg)(stacked, w); err.throw()` raises
  `checkify.JaxRuntimeError` (a ValueError) naming the weights when they are negative,
  non-finite or all zero; `g` is then all NaN, as from `fedavg`.
  """
  return checkify.checkify(_fedavg_with_checks)(stacked, weights)
