"""Aggregation rules: pure functions of stacked client models `[K, ...]` and weights `[K]`.

A rule maps the round's stacked client variables (every leaf `[K, ...]`) and aggregation
weights `[K]` to one aggregate (leaves `[...]`). It is jit- and vmap-safe: vmapping it over a
`[F, K]` weight matrix aggregates F federations at once (a left-out client is a weight of 0).

  weighted_mean()            FedAvg (McMahan et al. 2017): `aggregation.fedavg`, bit for bit.
  median()                   coordinate-wise median (Yin et al., ICML 2018; Flower FedMedian).
  trimmed_mean(beta)         coordinate-wise mean after cutting floor(beta * m) of the m
                             values from each end (Yin et al. 2018; Flower FedTrimmedAvg).
  krum(num_byzantine, m)     the client (m > 1: mean of the m clients) whose updates are
                             closest to their n - f - 2 nearest neighbours (Blanchard et al.,
                             NeurIPS 2017; Flower Krum).

Weights and robust rules: the robust rules are unweighted among the PRESENT clients, those of
weight > 0 (as Flower's); a weight-0 client counts as absent, exactly as if it had not taken
part (padded clients, and a counterfactual federation that leaves a client out). Integer
leaves (counters) are aggregated in float32 and rounded back, as `fedavg` does.

The shipped rules commute with shifts (rule(theta + c) = rule(theta) + c), so they run on the
client models themselves and the updates theta_k - G never need to be formed. A user's rule
can be any function `rule(stacked_updates, weights) -> update`; `federated_averaging` hands a
plain function the updates theta_k - G_{t-1} and adds the result to G_{t-1}.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.fl.aggregation import _check_shapes, check_weights, fedavg
from tracefl_jax.fl.types import PyTree, Stacked

RULES = ("mean", "median", "trimmed_mean", "krum")


@dataclasses.dataclass(frozen=True)
class AggregationRule:
  """A named aggregation rule: `rule(stacked [K, ...], weights [K]) -> aggregate [...]`.

  `shift_equivariant` rules (every shipped one) are applied to the client models directly;
  any other function is applied to the updates theta_k - G (see `aggregate_models`).
  """
  name: str
  fn: Callable[[Stacked, jax.Array], PyTree]
  shift_equivariant: bool = True

  def __call__(self, stacked: Stacked, weights: jax.Array, **client_info: jax.Array) -> PyTree:
    _check_shapes(stacked, weights)
    check_weights(weights)
    return self.fn(stacked, jnp.asarray(weights, jnp.float32),
                   **rule_info(self.fn, client_info))


def _leafwise(stat: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]):
  """A rule applying `stat(sorted [K, ...], present_count, k_axis_ranks)` leaf by leaf to the
  values of the present clients sorted along the client axis (absent ones sorted last)."""
  def rule(stacked: Stacked, weights: jax.Array) -> PyTree:
    present = weights > 0
    m = jnp.sum(present).astype(jnp.int32)

    def leaf(a):
      x = a.astype(jnp.float32)
      p = present.reshape((-1,) + (1,) * (x.ndim - 1))
      s = jnp.sort(jnp.where(p, x, jnp.inf), axis=0)
      ranks = jnp.arange(x.shape[0]).reshape(p.shape)
      out = jnp.where(m > 0, stat(s, m, ranks), jnp.nan)
      if jnp.issubdtype(a.dtype, jnp.integer):
        return jnp.round(out).astype(a.dtype)
      return out.astype(a.dtype)
    return jax.tree.map(leaf, stacked)
  return rule


def _median(s: jax.Array, m: jax.Array, ranks: jax.Array) -> jax.Array:
  del ranks
  lo = jnp.take(s, jnp.maximum((m - 1) // 2, 0), axis=0)
  hi = jnp.take(s, jnp.maximum(m // 2, 0), axis=0)
  return (lo + hi) / 2


def weighted_mean() -> AggregationRule:
  """FedAvg's weighted mean (`aggregation.fedavg`); the default rule."""
  return AggregationRule("mean", fedavg)


def median() -> AggregationRule:
  """Coordinate-wise median of the present clients (the mean of the two middle values for an
  even count)."""
  return AggregationRule("median", _leafwise(_median))


def trimmed_mean(beta: float = 0.2) -> AggregationRule:
  """Coordinate-wise beta-trimmed mean: of the m present values of a coordinate, the
  floor(beta * m) smallest and largest are cut and the rest averaged (scipy's `trim_mean`)."""
  if not 0.0 <= float(beta) < 0.5:
    raise ValueError(f"trimmed_mean: beta={beta} must be in [0, 0.5) (the fraction cut from "
                     f"each end)")

  def stat(s, m, ranks):
    cut = jnp.floor(beta * m.astype(jnp.float32)).astype(jnp.int32)
    keep = (ranks >= cut) & (ranks < m - cut)
    # A dot with ones, not a reduction over the client axis, which XLA:CPU runs far slower
    # (benchmarks/README.md, "Speed of light").
    kept = jnp.tensordot(jnp.ones(s.shape[0], s.dtype), jnp.where(keep, s, 0.0), axes=1,
                         precision=jax.lax.Precision.HIGHEST)
    return kept / (m - 2 * cut).astype(jnp.float32)
  return AggregationRule(f"trimmed_mean({beta:g})", _leafwise(stat))


def krum_scores(stacked: Stacked, weights: jax.Array, num_byzantine: int) -> jax.Array:
  """`[K]` Krum scores: for each present client the sum of squared L2 distances (over every
  float leaf) to its max(1, n - f - 2) nearest present clients, n the present count; inf
  for absent clients."""
  present = weights > 0
  n = jnp.sum(present).astype(jnp.int32)
  k = weights.shape[0]
  w = present.astype(jnp.float32) / jnp.maximum(jnp.sum(present), 1)
  d2 = jnp.zeros((k, k), jnp.float32)
  for a in jax.tree.leaves(stacked):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      continue
    x = a.reshape(k, -1).astype(jnp.float32)
    # Centred on the present clients' mean: models are large and close together, and the
    # Gram form of the distances would lose them to cancellation otherwise.
    x = x - jnp.tensordot(w, x, axes=1)[None]
    sq = jnp.sum(x * x, axis=1)
    gram = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
    d2 = d2 + jnp.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
  pair = present[:, None] & present[None, :] & ~jnp.eye(k, dtype=bool)
  nearest = jnp.sort(jnp.where(pair, d2, jnp.inf), axis=1)
  closest = jnp.maximum(n - num_byzantine - 2, 1)
  take = jnp.arange(k)[None, :] < closest
  scores = jnp.sum(jnp.where(take, nearest, 0.0), axis=1)
  return jnp.where(present, scores, jnp.inf)


def krum(num_byzantine: int = 0, num_selected: int = 1) -> AggregationRule:
  """Krum (`num_selected=1`): the present client with the lowest `krum_scores`; multi-Krum:
  the unweighted mean of the `num_selected` lowest-scoring present clients (all present ones
  when fewer are). Ties go to the lower position."""
  for name, value in (("num_byzantine", num_byzantine), ("num_selected", num_selected)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ValueError(f"krum: {name}={value!r} must be a whole number of clients (an int), "
                       f"got {type(value).__name__}")  # int(1.5) would run krum(1) silently
  if int(num_byzantine) < 0 or int(num_selected) < 1:
    raise ValueError(f"krum: num_byzantine={num_byzantine} must be >= 0 and "
                     f"num_selected={num_selected} >= 1")
  f, m = int(num_byzantine), int(num_selected)

  def rule(stacked, weights):
    scores = krum_scores(stacked, weights, f)
    n = jnp.sum(weights > 0)
    rank = jnp.argsort(jnp.argsort(scores, stable=True), stable=True)
    chosen = (rank < jnp.minimum(m, n)).astype(jnp.float32)
    return fedavg(stacked, jnp.where(n > 0, chosen, jnp.nan))
  return AggregationRule(f"krum({f},{m})", rule)


def make_rule(name: str, *, trim_beta: float = 0.2, num_byzantine: int = 0,
              num_selected: int = 1) -> AggregationRule:
  """A shipped rule by name: "mean", "median", "trimmed_mean" or "krum"."""
  if name == "mean":
    return weighted_mean()
  if name == "median":
    return median()
  if name == "trimmed_mean":
    return trimmed_mean(trim_beta)
  if name == "krum":
    return krum(num_byzantine, num_selected)
  raise ValueError(f"unknown aggregation rule {name!r}; valid: {', '.join(RULES)}")


# What a rule may ask for by naming it as a keyword parameter (FedNova, q-FFL): `[K]` each.
CLIENT_INFO = ("num_steps", "num_examples", "losses")


def rule_info(fn: Callable[..., PyTree],
              info: dict[str, jax.Array] | None) -> dict[str, jax.Array]:
  """The entries of `info` (`CLIENT_INFO`) that `fn` declares as parameters (or all, for
  `**kwargs`); {} for a plain `rule(stacked, weights)`."""
  if not info:
    return {}
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return {}
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return dict(info)
  return {k: v for k, v in info.items() if k in params}


def aggregate_models(rule: Callable[[Stacked, jax.Array], PyTree] | None, stacked: Stacked,
                     weights: jax.Array, previous: PyTree,
                     client_info: dict[str, jax.Array] | None = None) -> PyTree:
  """The aggregate model of one round: `rule` on the client models `[K, ...]` when it is a
  shift-equivariant `AggregationRule` (None: FedAvg, bit for bit), else
  `previous + rule(stacked - previous, weights)` on the updates.

  `client_info`: `[K]` arrays by `CLIENT_INFO` name, handed to a rule that declares them
  (`rule(updates, weights, *, num_steps)` for FedNova)."""
  if rule is None:
    return fedavg(stacked, weights)
  if isinstance(rule, AggregationRule) and rule.shift_equivariant:
    out = rule(stacked, weights, **(client_info or {}))
    check_rule_output(rule, out, previous)
    return out
  updates = jax.tree.map(lambda s, p: s - p[None], stacked, previous)
  kwargs = (client_info or {}) if isinstance(rule, AggregationRule) else rule_info(
      rule, client_info)
  update = rule(updates, weights, **kwargs)
  check_rule_output(rule, update, previous)
  return jax.tree.map(lambda p, u: (p + u).astype(p.dtype), previous, update)


def check_rule_output(rule: Callable[..., PyTree], out: PyTree, like: PyTree) -> None:
  """At trace time (once per compiled round): a rule's result has G's structure and shapes,
  one model, not `[K, ...]` (a rule that forgot to reduce over the client axis would
  otherwise broadcast G into K models)."""
  name = getattr(rule, "name", None) or getattr(rule, "__name__", type(rule).__name__)
  want = jax.tree.structure(like)
  if jax.tree.structure(out) != want:
    raise ValueError(f"aggregation rule {name} returned a pytree of structure "
                     f"{jax.tree.structure(out)}; it must return one model shaped like the "
                     f"global model ({want})")
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(out)[0], jax.tree.leaves(like)):
    if jnp.shape(a) != jnp.shape(b):
      leaf = jax.tree_util.keystr(path, simple=True, separator="/")
      raise ValueError(
          f"aggregation rule {name} returned leaf {leaf} of shape {jnp.shape(a)}, the global "
          f"model's is {jnp.shape(b)}: a rule maps stacked updates [K, ...] and weights [K] to "
          f"ONE update, reduced over the client axis (e.g. jnp.median(u, axis=0))")
