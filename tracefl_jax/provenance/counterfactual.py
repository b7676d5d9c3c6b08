"""The exact leave-one-client-out counterfactual: a ground truth for TraceFL (spec section 8).

With FedAvg weights w_k and W = sum_k w_k, the global model without client k is
G_{-k} = (W G - w_k theta_k) / (W - w_k). Removing client k changes the explained logit by
drop[n, k] = s_n(G) - s_n(G_{-k}) (positive: k pushed the prediction up). To first order,
drop[n, k] ~ (w_k / (W - w_k)) < grad s_n(G), theta_k - G >, which is TraceFL's score up to a
shift common to all clients when weights are equal, no decay is applied and every layer is
traced: TraceFL's argmax is the first-order counterfactual. Here the counterfactual is exact:
every G_{-k} is built from the stacked client parameters and evaluated in one vmapped (or
client-chunked) call, K eval-mode forward passes of the input batch.

That closed form is FedAvg's. For any other server side (a robust rule, a server optimizer),
`leave_one_out(reaggregate=output.reaggregate)` removes k by the round's own rule and server
step (`removal.py`): G and every G_{-k} are re-computed in one program, K + 1 re-aggregations
and forward passes.

`spearman` and `counterfactual_agreement` compare any client scores `[N, K]` (TraceFL's T or
P) with the drops.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.fl.aggregation import check_weights, fedavg
from tracefl_jax.models.base import ModelDef, Variables
from tracefl_jax.provenance.capture import OUTPUTS, explained, target_logits
from tracefl_jax.provenance.removal import map_removals


class CounterfactualResult(NamedTuple):
  """Leave-one-client-out answers for N inputs over the round's K clients (positions)."""
  drops: jax.Array         # [N, K] float32 s_n(G) - s_n(G_{-k})
  top_client: jax.Array    # [N] int32 argmax_k drops (first on ties)
  predicted: jax.Array     # [N] int32 G's eval-mode argmax
  target_logit: jax.Array  # [N] float32 s_n(G), the explained logit
  loo_logit: jax.Array     # [N, K] float32 s_n(G_{-k}), the same class's logit without k


def remove_client(global_vars: Any, client: Any, weight: jax.Array, total: jax.Array) -> Any:
  """G_{-k} = (W G - w_k theta_k) / (W - w_k) for every leaf of every collection.

  BatchNorm statistics are averaged by FedAvg like parameters, so they are removed the same
  way. Integer leaves are computed in float32 and rounded back, as `fedavg` does.
  """
  def leaf(g, c):
    out = (total * g.astype(jnp.float32) - weight * c.astype(jnp.float32)) / (total - weight)
    if jnp.issubdtype(g.dtype, jnp.integer):
      out = jnp.round(out)
    return out.astype(g.dtype)

  return jax.tree.map(leaf, global_vars, client)


@functools.partial(jax.jit, static_argnames=("model", "clients_per_chunk", "output"))
def _leave_one_out(model, client_vars, weights, x, target, global_vars, reaggregate, *,
                   clients_per_chunk, output):
  weights = weights.astype(jnp.float32)
  total = jnp.sum(weights)
  if global_vars is None:
    global_vars = fedavg(client_vars, weights) if reaggregate is None else reaggregate(weights)
  s, predicted = target_logits(model.logits(global_vars, x), target, output)
  classes = predicted if target is None else target.astype(jnp.int32)

  def explained_logit(variables):
    return explained(model.logits(variables, x), classes, output)  # [N]

  def without(args):
    client, weight = args
    return explained_logit(remove_client(global_vars, client, weight, total))

  s = s.astype(jnp.float32)
  if reaggregate is not None:  # the round's own rule: [K + 1, N], row 0 G re-computed
    both = map_removals(jax.vmap(explained_logit), reaggregate, weights, clients_per_chunk)
    both = both.astype(jnp.float32)
    loo = jnp.transpose(both[1:])
    drops = both[0][:, None] - loo
  else:
    if clients_per_chunk:
      loo = jax.lax.map(without, (client_vars, weights), batch_size=clients_per_chunk)
    else:
      loo = jax.vmap(without)((client_vars, weights))
    loo = jnp.transpose(loo).astype(jnp.float32)  # [N, K]
    drops = s[:, None] - loo
  top = jnp.argmax(drops, axis=1).astype(jnp.int32)  # first on ties
  return CounterfactualResult(drops, top, predicted, s, loo)


def leave_one_out(
    model: ModelDef,
    client_vars: Variables,
    weights: Any,
    x: jax.Array,
    *,
    target: jax.Array | None = None,
    global_vars: Variables | None = None,
    clients_per_chunk: int | None = None,
    reaggregate: Any = None,
    output: str = "logit",
) -> CounterfactualResult:
  """Exact effect of removing each client from the round on G's logits (spec section 8).

  Args:
    model: the `ModelDef` of G and the clients; every model runs in eval mode.
    client_vars: the round's client variables, every leaf (all collections) stacked `[K, ...]`.
    weights: `[K]` FedAvg weights w_k (the round's aggregation weights).
    x: `[N, ...]` inputs.
    target: optional `[N]` classes whose logit s is explained; default G's prediction.
    global_vars: G, when already at hand; it must be `fedavg(client_vars, weights)` (for any
      other G, e.g. a DP-noised aggregate, the formula removes w_k theta_k / W from that G).
    clients_per_chunk: evaluate this many G_{-k} at a time (`lax.map`) to bound memory.
    reaggregate: the round's server side, `RoundOutput.reaggregate` (weights -> G): each
      G_{-k} is then the round re-run without k (its rule and server optimizer), and the
      drops are taken from G re-computed in the same program (`removal.py`), so a removal
      that changes nothing drops exactly 0. Default: FedAvg's closed form, exact only for
      the weighted mean without a server optimizer (`RoundOutput.closed_form_exact`).
    output: the explained output (`capture.OUTPUTS`: "logit", "margin", "log_prob"); the
      drops, `target_logit` and `loo_logit` are of it.

  Raises:
    ValueError: a client holds all the weight (W - w_k = 0): without it nothing is left to
      average, so G_{-k} is undefined. Checked when `weights` is concrete (host-side).
  """
  num_clients = jax.tree.leaves(client_vars["params"])[0].shape[0]
  if not isinstance(weights, jax.core.Tracer):
    w = np.asarray(weights, np.float32)
    if w.shape != (num_clients,):
      raise ValueError(f"weights has shape {w.shape}; the round has {num_clients} clients")
    check_weights(w)
    alone = np.nonzero(w.sum(dtype=np.float32) - w <= 0)[0]
    if alone.size:
      raise ValueError(
          f"client position(s) {alone.tolist()} hold all the aggregation weight (W - w_k = 0):"
          f" removing one leaves no client to average, so its leave-one-out model is "
          f"undefined. Give another client positive weight or leave such rounds out.")
  if output not in OUTPUTS:
    raise ValueError(f"output={output!r}; valid: {', '.join(OUTPUTS)}")
  return _leave_one_out(model, client_vars, jnp.asarray(weights, jnp.float32), x, target,
                        global_vars, reaggregate, output=output,
                        clients_per_chunk=int(clients_per_chunk) if clients_per_chunk else None)


def rank_average(a: np.ndarray) -> np.ndarray:
  """Ranks 1..K along the last axis, ties sharing their average rank (float64)."""
  a = np.asarray(a)
  order = np.argsort(a, axis=-1, kind="stable")
  sorted_a = np.take_along_axis(a, order, axis=-1)
  pos = np.broadcast_to(np.arange(a.shape[-1]), a.shape)
  starts = np.ones(a.shape, bool)  # a tie group begins where the sorted value changes
  starts[..., 1:] = sorted_a[..., 1:] != sorted_a[..., :-1]
  ends = np.ones(a.shape, bool)
  ends[..., :-1] = starts[..., 1:]
  first = np.maximum.accumulate(np.where(starts, pos, 0), axis=-1)
  last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, pos, a.shape[-1]), -1), axis=-1),
                 -1)
  ranks = np.empty(a.shape, np.float64)
  np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=-1)
  return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Spearman rank correlation of every row pair `a[n], b[n]` (last axis), `[N]` (or scalar).

  Pearson correlation of average ranks (scipy.stats.spearmanr's default for ties). A row with
  constant values has no ranking: NaN, as scipy.
  """
  ra, rb = rank_average(a), rank_average(b)
  if ra.shape != rb.shape:
    raise ValueError(f"shapes differ: {ra.shape} vs {rb.shape}")
  ra = ra - ra.mean(axis=-1, keepdims=True)
  rb = rb - rb.mean(axis=-1, keepdims=True)
  num = np.sum(ra * rb, axis=-1)
  den = np.sqrt(np.sum(ra * ra, axis=-1) * np.sum(rb * rb, axis=-1))
  safe = np.where(den > 0, den, 1.0)
  return np.where(den > 0, num / safe, np.nan)


def counterfactual_agreement(scores: np.ndarray, drops: np.ndarray) -> dict[str, float]:
  """How well client scores `[N, K]` (TraceFL's T or P) predict the drops `[N, K]`.

  Returns:
    top1_agreement: fraction of inputs whose argmax score (first on ties) is the argmax drop.
    spearman_mean: mean per-input Spearman correlation over inputs where it is defined (NaN
      if none is).
  """
  scores, drops = np.asarray(scores), np.asarray(drops)
  if scores.shape != drops.shape or scores.ndim != 2:
    raise ValueError(f"scores {scores.shape} and drops {drops.shape} must both be [N, K]")
  rho = spearman(scores, drops)
  rho = rho[np.isfinite(rho)]
  return {"top1_agreement": float(np.mean(np.argmax(scores, 1) == np.argmax(drops, 1))),
          "spearman_mean": float(rho.mean()) if rho.size else float("nan")}


def counterfactual_report(scores: np.ndarray, drops: np.ndarray,
                          client_sizes: np.ndarray) -> dict[str, float | None]:
  """TraceFL and its baselines against the exact leave-one-client-out truth, for one round.

  Args:
    scores: `[N, K]` TraceFL's T for the round's attributable inputs.
    drops: `[N, K]` `leave_one_out(...).drops` for the same inputs.
    client_sizes: `[K]` the participants' example counts (the largest-client baseline).

  Returns:
    counterfactual_top1: how often TraceFL's top client is the one whose removal lowers the
      predicted logit most; counterfactual_spearman: mean rank correlation of T and the drops;
    random_top1 (1 / K) and random_spearman (0): a uniformly random ranking, in expectation;
    largest_top1 and largest_spearman: ranking clients by size.
  """
  scores, drops = np.asarray(scores, np.float64), np.asarray(drops, np.float64)
  if scores.shape[0] == 0:
    return {}
  k = scores.shape[1]
  ours = counterfactual_agreement(scores, drops)
  sizes = np.broadcast_to(np.asarray(client_sizes, np.float64), scores.shape)
  largest = counterfactual_agreement(sizes, drops)
  finite = lambda v: v if np.isfinite(v) else None  # noqa: E731  (JSON has no NaN)
  return {"counterfactual_top1": ours["top1_agreement"],
          "counterfactual_spearman": finite(ours["spearman_mean"]),
          "counterfactual_random_top1": 1.0 / k,
          "counterfactual_random_spearman": 0.0,
          "counterfactual_largest_top1": largest["top1_agreement"],
          "counterfactual_largest_spearman": finite(largest["spearman_mean"])}
