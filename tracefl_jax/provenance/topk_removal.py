"""Counterfactual top-k removal: what a user acts on (issue 33 item 4).

A user who trusts an attribution removes the clients it names and retrains. For each input
x_n and each method, the method's top k clients (among those that could be responsible) are
left out of every round and the federation retrained; the truth is what that does to x_n:

  drop[n]  = s_n(G) - s_n(G^{-top_k(n)})     (the explained output, as every other truth)
  flip[n]  = G^{-top_k(n)} no longer predicts G's class for x_n.

Baselines remove k random candidates (seeded) or the k largest clients. Federations that
remove the same set are trained once (`retraining.retrain` trains each distinct one once),
so methods that agree cost nothing extra.

    masks, rows = topk_masks(scores, ks=(1, 3), candidates=..., num_clients=C)
    feds = retraining.retrain(algorithm, init, data, masks, ...)
    outputs, predicted = row_outputs(model, feds, x, target, rows.input, output="margin")
    table = topk_table(rows, outputs, predicted, base_outputs, target)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.models.base import ModelDef, Variables
from tracefl_jax.provenance.capture import explained
from tracefl_jax.provenance.federation_masks import FederationMasks
from tracefl_jax.provenance.intervals import mean_interval


class TopkRows(NamedTuple):
  """What each retrained federation of `topk_masks` removes, one entry per row `[F]`."""
  method: np.ndarray  # [F] str, the method whose top clients are removed
  k: np.ndarray       # [F] int
  input: np.ndarray   # [F] int, the input n whose top clients they are


def top_clients(scores: Any, k: int, candidates: Any = None) -> np.ndarray:
  """`[N, k]` the k highest-scoring candidate clients per input (first on ties)."""
  scores = np.asarray(scores, np.float64)
  if candidates is not None:
    allowed = np.broadcast_to(np.asarray(candidates, bool), scores.shape)
    scores = np.where(allowed, scores, -np.inf)
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  if candidates is not None and not np.all(np.isfinite(np.take_along_axis(scores, order, 1))):
    raise ValueError(f"an input has fewer than k={k} candidate clients")
  return order


def topk_masks(scores: dict[str, Any], ks: tuple[int, ...], num_clients: int,
               candidates: dict[str, Any] | None = None, *, random_candidates: Any = None,
               seed: int = 0) -> tuple[FederationMasks, TopkRows]:
  """One federation per (method, k, input): that method's top k clients left out.

  `scores`: method -> `[N, C]` (the largest-client baseline is a method of sizes);
  `candidates`: method -> `[C]` or `[N, C]` bool; `random_candidates` (`[C]` bool): also a
  "random" method removing k of them uniformly (seeded)."""
  candidates = candidates or {}
  left_out, method, kk, inputs = [], [], [], []
  n = next(iter(scores.values())).shape[0]
  rng = np.random.default_rng([seed, 0x70b])
  for k in ks:
    tops = {name: top_clients(s, k, candidates.get(name)) for name, s in scores.items()}
    if random_candidates is not None:
      pool = np.flatnonzero(np.asarray(random_candidates, bool))
      tops["random"] = np.stack([rng.choice(pool, k, replace=False) for _ in range(n)])
    for name, top in tops.items():
      for i in range(n):
        left_out.append(top[i])
        method.append(name)
        kk.append(k)
        inputs.append(i)
  return (FederationMasks.leave_out(num_clients, left_out),
          TopkRows(np.asarray(method), np.asarray(kk), np.asarray(inputs)))


@functools.partial(jax.jit, static_argnames=("model", "output"))
def row_outputs(model: ModelDef, federations: Variables, x: jax.Array, target: jax.Array,
                inputs: jax.Array, output: str = "logit") -> tuple[jax.Array, jax.Array]:
  """(`[F]` explained output, `[F]` predicted class) of federation f (leaves `[F, ...]`) on
  its own input `x[inputs[f]]` for class `target[inputs[f]]`."""
  def one(variables, n):
    logits = model.logits(variables, jax.lax.dynamic_slice_in_dim(x, n, 1))
    t = jax.lax.dynamic_slice_in_dim(target, n, 1)
    return explained(logits, t, output)[0], jnp.argmax(logits[0]).astype(jnp.int32)
  return jax.vmap(one)(federations, inputs)


def topk_table(rows: TopkRows, outputs: Any, predicted: Any, base_outputs: Any,
               target: Any, *, draws: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
  """Per (method, k): the mean drop of the explained output with its interval over inputs,
  and the share of predictions that flip away from G's class (`target`)."""
  outputs, predicted = np.asarray(outputs, np.float64), np.asarray(predicted)
  base, target = np.asarray(base_outputs, np.float64), np.asarray(target)
  table = []
  for name in dict.fromkeys(rows.method.tolist()):
    for k in sorted(set(rows.k[rows.method == name].tolist())):
      sel = (rows.method == name) & (rows.k == k)
      n = rows.input[sel]
      drop = mean_interval(base[n] - outputs[sel], draws=draws, seed=seed)
      flips = predicted[sel] != target[n]
      table.append({"method": name, "k": int(k), "drop": drop.value, "drop_low": drop.low,
                    "drop_high": drop.high, "flip_rate": float(flips.mean())})
  return table


__all__ = ["TopkRows", "row_outputs", "top_clients", "topk_masks", "topk_table"]
