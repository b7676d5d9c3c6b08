"""FedAvg as a pure function over stacked client variables `[C, ...]`.

McMahan et al. (2017), Algorithm 1: the new global model is the average of the clients'
models weighted by their example counts. TraceFL's original weights by local batch counts
(`floor(n_k / batch_size)`, spec section 4); `client_weights` offers both. DP-FedAvg is in
`privacy.py`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

WEIGHTINGS = ("examples", "batches", "uniform")


def client_weights(num_examples: Any, weighting: str = "examples",
                   batch_size: int | None = None) -> Any:
  """FedAvg weights `[C]` from example counts `[C]` (NumPy or JAX)."""
  xp = jnp if isinstance(num_examples, jax.Array) else np
  n = xp.asarray(num_examples)
  if weighting == "examples":
    return n.astype(xp.float32)
  if weighting == "batches":
    if not batch_size:
      raise ValueError('weighting="batches" needs a batch_size')
    return (n // batch_size).astype(xp.float32)
  if weighting == "uniform":
    return xp.ones(n.shape, xp.float32)
  raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")


def check_weights(weights: Any) -> None:
  """Raises a clear error for a round whose aggregation weights are unusable.

  Call it on host-side (concrete) weights before the jitted round; under a trace it cannot
  inspect values and does nothing.
  """
  if isinstance(weights, jax.core.Tracer):
    return
  w = np.asarray(weights, np.float64)
  if w.ndim != 1 or w.size == 0:
    raise ValueError(f"aggregation weights must be a non-empty vector, got shape {w.shape}")
  if not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueError(f"aggregation weights must be finite and >= 0, got {w}")
  if w.sum() <= 0:
    raise ValueError(
        "every client of this round has aggregation weight 0 (weights by batches give 0 to "
        "clients with fewer examples than the batch size); nothing to average. Use "
        "weighting='examples', a smaller batch size, or drop small clients (partition fix-up).")


def fedavg(stacked: Any, weights: jax.Array) -> Any:
  """Weighted mean over the leading client axis of every leaf.

  Args:
    stacked: a pytree whose leaves are `[C, ...]`.
    weights: `[C]` non-negative weights, not all zero (see `check_weights`).

  Returns:
    The pytree of `[...]` weighted means, each leaf in its own dtype. Integer leaves (counters)
    are averaged in float32 and rounded back.
  """
  check_weights(weights)
  w = jnp.asarray(weights, jnp.float32)
  w = w / jnp.sum(w)

  def mean(leaf):
    avg = jnp.tensordot(w, leaf.astype(jnp.float32), axes=1)
    if jnp.issubdtype(leaf.dtype, jnp.integer):
      return jnp.round(avg).astype(leaf.dtype)
    return avg.astype(leaf.dtype)

  return jax.tree.map(mean, stacked)
