"""FedAvg as a pure function over stacked client variables `[C, ...]`.

McMahan et al. (2017), Algorithm 1: the new global model is the average of the clients'
models weighted by their example counts. TraceFL's original weights by local batch counts
(`floor(n_k / batch_size)`, spec section 4); `client_weights` offers both.
"""

from __future__ import annotations

from typing import Any, NamedTuple

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


# --- DP-FedAvg with server-side fixed clipping (spec section 4; flwr's
# DifferentialPrivacyServerSideFixedClipping) -------------------------------------------------


class DPAggregate(NamedTuple):
  """DP-FedAvg result: the noisy model training continues from, and the pre-noise aggregate.

  The original traced `clean` while training continued from `noisy` (a defect); tracefl_jax
  traces `noisy` unless its parity switch asks for the original's behaviour.
  """
  noisy: Any               # G_t = FedAvg(clipped) + N(0, sigma^2) on the noised collections
  clean: Any               # FedAvg(clipped), before noise
  update_norms: jax.Array  # [C] L2 norm of each client's update before clipping
  noise_std: jax.Array     # sigma = z * C / clients_per_round


def _norm(tree: Any) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(l.astype(jnp.float32))) for l in leaves))


def clip_update(update: Any, clip_norm: float) -> tuple[Any, jax.Array]:
  """Scales `update` by min(1, C / ||update||_2), the norm taken over the whole pytree.

  Returns `(clipped, norm_before)`. Updates with norm <= C are returned unchanged.
  """
  norm = _norm(update)
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
  return jax.tree.map(lambda l: (l * scale).astype(l.dtype), update), norm


def dp_fedavg(
    stacked: Any,
    weights: jax.Array,
    previous: Any,
    key: jax.Array,
    *,
    clip_norm: float,
    noise_multiplier: float,
    clients_per_round: int,
    collections: tuple[str, ...] = ("params",),
) -> DPAggregate:
  """DP-FedAvg over stacked client variables `[C, ...]` (a dict of collections).

  For each client, update = theta_k - G_{t-1} over the collections in `collections` is clipped
  to norm `clip_norm`; the clipped models G_{t-1} + clip(update) are averaged with FedAvg;
  Gaussian noise of std z * C / clients_per_round is added to every averaged entry of those
  collections. Other collections (BatchNorm statistics) are averaged as plain FedAvg, untouched
  by clipping and noise; `collections=("params", "batch_stats")` reproduces the original,
  which clipped and noised the BatchNorm counters too.
  """
  private = {k: stacked[k] for k in collections if k in stacked}
  prev = {k: previous[k] for k in private}
  updates = jax.tree.map(lambda s, p: s - p[None], private, prev)
  clipped, norms = jax.vmap(lambda u: clip_update(u, clip_norm))(updates)
  clipped_models = jax.tree.map(lambda u, p: (p[None] + u).astype(p.dtype), clipped, prev)
  clean = fedavg({**stacked, **clipped_models}, weights)
  sigma = jnp.float32(noise_multiplier * clip_norm / clients_per_round)
  leaves, treedef = jax.tree.flatten({k: clean[k] for k in private})
  keys = jax.random.split(key, max(len(leaves), 1))
  noised = [l + (sigma * jax.random.normal(k, l.shape)).astype(l.dtype)
            if jnp.issubdtype(l.dtype, jnp.floating) else l for l, k in zip(leaves, keys)]
  noisy = {**clean, **jax.tree.unflatten(treedef, noised)}
  return DPAggregate(noisy, clean, norms, sigma)
