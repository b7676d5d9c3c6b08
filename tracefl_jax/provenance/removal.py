"""Removing one client from a round, by the round's own server side (spec section 8, for any
algorithm).

The leave-one-client-out model G_t^{-k} is the round re-run without client k: its aggregation
rule over the other K - 1 client models, then its server optimizer from the round's starting
state (`RoundOutput.reaggregate(weights)` with w_k = 0). Three ways to get it, named in every
summary that reports a truth or score built on it (`counterfactual_removal`):

  "closed_form"     FedAvg's G_{-k} = (W G - w_k theta_k) / (W - w_k): exact for the weighted
                    mean without a server optimizer (`RoundOutput.closed_form_exact`), and the
                    fast path there (no re-aggregation).
  "rule"            the round's own rule and server step, re-run K times (`reaggregate`):
                    exact for every rule and server optimizer (median, trimmed mean, Krum,
                    FedAdam, ...).
  "dp_closed_form"  DP-FedAvg: FedAvg's closed form applied to the traced model; the clipping
                    and the noise are not re-run, so it is the pre-noise mean's removal, not an
                    exact truth for the noised model.

`map_removals` evaluates a function of the K + 1 models (G re-computed, then each G^{-k}) in
one program, chunked to bound memory. G is re-computed beside its variants so that a client
whose removal changes nothing (Krum: any client but the chosen one, mostly) differs from it
by exactly 0, not by the rounding between two programs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tracefl_jax.fl.algorithm import RoundOutput

# weights [K] -> the round's global model with those weights (`RoundOutput.reaggregate`).
Reaggregate = Callable[[jax.Array], Any]


def round_removal(output: RoundOutput) -> tuple[Reaggregate | None, str]:
  """`(reaggregate, kind)` for a round: `reaggregate` None where FedAvg's closed form is
  used ("closed_form", exact; "dp_closed_form", DP's pre-noise approximation), else the
  round's own server side ("rule")."""
  if output.reaggregate is None:
    return None, "dp_closed_form"
  if output.closed_form_exact:
    return None, "closed_form"
  return output.reaggregate, "rule"


def removal_kind(reaggregate: Any, aggregation: str | None) -> str:
  """The `counterfactual_removal` label for a removal given as (reaggregate, aggregation).

  Raises:
    ValueError: no `reaggregate` for a round whose server side is not FedAvg's mean (and not
      DP): the closed form would be silently wrong there.
  """
  if reaggregate is not None:
    return "rule"
  if aggregation == "dp_fedavg":
    return "dp_closed_form"
  if aggregation not in (None, "mean"):
    raise ValueError(
        f"the round's server side is {aggregation!r}, where FedAvg's closed-form removal of a "
        f"client is not the round's own: pass reaggregate=output.reaggregate (the round's "
        f"RoundOutput) so that each client is removed by the round's rule and server step")
  return "closed_form"


def removal_masks(weights: jax.Array) -> jax.Array:
  """`[K + 1, K]` aggregation weights: row 0 the round's own, row k + 1 without client k."""
  w = jnp.asarray(weights, jnp.float32)
  without = w[None, :] * (1.0 - jnp.eye(w.shape[0], dtype=jnp.float32))
  return jnp.concatenate([w[None], without])


def map_removals(fn: Callable[[Any], Any], reaggregate: Reaggregate, weights: jax.Array,
                 clients_per_chunk: int | None = None) -> Any:
  """`fn` of the round's models re-computed with `removal_masks(weights)`: leading axis
  K + 1 (index 0: G, index k + 1: G^{-k}). See `map_models`."""
  return map_models(fn, reaggregate, removal_masks(weights), clients_per_chunk)


def map_models(fn: Callable[[Any], Any], reaggregate: Reaggregate, masks: jax.Array,
               clients_per_chunk: int | None = None) -> Any:
  """`fn` of the round's models re-computed with each row of `masks [R, K]`: leading axis R.

  `fn(models)` takes a batch of models (leaves `[c, ...]`) and returns a pytree whose leaves
  have the batch axis first. With `clients_per_chunk`, that many models are built and used
  at a time (`lax.map`; the last chunk is filled with copies of row 0, dropped here).
  """
  rows, k = masks.shape

  def chunk(m):
    return fn(jax.vmap(reaggregate)(m))

  if not clients_per_chunk or clients_per_chunk >= rows:
    return chunk(masks)
  c = int(clients_per_chunk)
  pad = (-rows) % c
  masks = jnp.concatenate([masks, jnp.broadcast_to(masks[:1], (pad, k))])
  out = jax.lax.map(chunk, masks.reshape(-1, c, k))
  return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:])[:rows], out)
