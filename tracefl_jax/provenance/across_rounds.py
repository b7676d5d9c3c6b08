r"""Influence across rounds: the first-order effect on the final model's explained output of
removing a client from every round it took part in, carried to the final model by the real
training dynamics (issue 35, item 3).

A federation (`fl.federation`) is a differentiable function of its plan's aggregation
weights `w [R, K]` (round r's K sampled clients, `plan.client_ids [R, K]`). A client at
weight 0 takes no part in a round's aggregate, so removing client c from every round is the
weight path `w_t = w * (1 - t [id == c])` from t = 0 (the federation) to t = 1 (without c),
and with `s_n(G_R(w))` the explained output of test input n (`capture.explained`: logit,
margin, log_prob) the first-order drop of removing c is

    D[n, c] = s_n(G_R) - s_n(G_R^{-c}) ~ -d s_n(w_t)/dt |_0
            = sum_{r, k : id[r, k] = c}  w[r, k] * d s_n / d w[r, k].          ("tangent")

`d s_n / d w[r, k] = < lambda_r, d G_r / d w[r, k] >` with `lambda_r = d s_n / d G_r` the
cotangent of round r's model, propagated back from G_R through rounds r+1..R by reverse mode
through their real local training and server steps (not J_r = I, the assumption of
`multiround.py`). Under FedAvg's weighted mean G_r = sum_k w_k theta_k / W (any server step
affine in that mean, e.g. server SGD), `w_k d G_r / d w_k = (w_k / W) (theta_k - mean)`,
while the round's exact leave-one-out delta is `G_r - G_r^{-k} = w_k / (W - w_k) (theta_k -
mean)` (`removal.py`). `form="loo"` rescales each round's term by `W_r / (W_r - w[r, k])`,
which makes it `< lambda_r, G_r - G_r^{-k} >`, the cotangent dotted with the round's own
leave-one-out delta: for R = 1 it equals `trace_clients(score="first_order")` (and is exact
for a model linear in its parameters). For a non-affine server side (median, Krum, FedAdam)
that rescaling is not the round's removal: use the tangent form there.

Sign: D > 0 means client c pushed the output up (removing it lowers it), the convention of
`trace_clients(score="first_order")`, `leave_one_out` drops and `multiround`.

Cost and memory. Per chunk of `inputs_per_chunk` test inputs: one forward through the R
rounds (keeping one carry per round: G_r and the server optimizer's state, each round under
`jax.checkpoint`) and ONE reverse pass through the training, vmapped over the chunk's
one-hot output cotangents (`jax.jacrev`), which recomputes each round's forward once and
runs its backward `inputs_per_chunk`-wide. The result is the Jacobian `[N, R, K]` of the
outputs w.r.t. the weights, for every client at once; `[N, C]` is its scatter by
`client_ids`. Memory: R carries + one round's recomputed clients (as in `jax.grad` through
the federation) + `inputs_per_chunk` x (the cotangents of a round's K client models and
their local-loop residuals). One input's score costs about 2-3x a training run; a chunk of B
inputs costs about one forward plus B-wide backwards (B x the backward arithmetic, one pass,
one compile).

Limits. The federation must be one reverse-differentiable program: the "scan" client
strategy ("vmap"/"chunked" run forward only; "loop"/"sharded" are not programs). The weight
path is the removal only where a weight-0 client changes nothing: true for FedAvg, FedProx,
robust rules, server optimizers and DP-FedAvg's aggregate (the noise does not depend on the
weights); not for algorithms with per-client state (SCAFFOLD, FedDyn: a weight-0 client still
updates its state) nor for a rule whose behaviour depends on which clients are present beyond
their weights. It is first order: each round's removal is linearised and the rounds' terms add
(`tests/test_across_rounds.py` measures it against exact retraining).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.fl.federation import Federation, FederationPlan
from tracefl_jax.provenance.capture import OUTPUTS, explained

__all__ = ["AcrossRounds", "FORMS", "across_rounds", "scatter_clients"]

FORMS = ("tangent", "loo")


class AcrossRounds(NamedTuple):
  """Influence across rounds for N test inputs."""
  scores: np.ndarray    # [N, C] first-order drop of removing client c from every round
  per_round: np.ndarray  # [N, R, K] each (round, slot)'s term (the form's, before scatter)
  outputs: np.ndarray   # [N] s_n(G_R), the explained outputs of the final model
  form: str


def scatter_clients(per_round: jax.Array, client_ids: jax.Array, num_clients: int) -> jax.Array:
  """`[N, R, K]` terms -> `[N, C]`: summed over every (round, slot) client c took."""
  n = per_round.shape[0]
  return jnp.zeros((n, num_clients), per_round.dtype).at[
      :, jnp.asarray(client_ids).reshape(-1)].add(per_round.reshape(n, -1))


def _rescale(weights: jax.Array, form: str) -> jax.Array:
  """`[R, K]` the factor of each round's term: 1 ("tangent") or W_r / (W_r - w[r, k])
  ("loo", 0 where a client holds all of a round's weight: no leave-one-out model)."""
  if form == "tangent":
    return jnp.ones_like(weights)
  total = jnp.sum(weights, axis=1, keepdims=True)
  rest = total - weights
  return jnp.where(rest > 0, total / jnp.where(rest > 0, rest, 1), 0)


def across_rounds(fed: Federation, model, variables: Any, hparams: Any, plan: FederationPlan,
                  key: jax.Array, x: jax.Array, target: jax.Array, *, output: str = "logit",
                  form: str = "tangent", inputs_per_chunk: int | None = 32,
                  train_x: jax.Array | None = None,
                  train_y: jax.Array | None = None) -> AcrossRounds:
  """The first-order drop `[N, C]` of each test input's explained output when each client is
  removed from every round it took part in, through the real training (module docstring).

  Args:
    fed: the federation (`fl.federation`; its algorithm under the "scan" strategy).
    model: the `ModelDef` (`model.logits(variables, x)`).
    variables, hparams, plan, key: `fed.run`'s arguments (a single plan `[R, ...]`): the
      federation whose final model is explained.
    x, target: `[N, ...]` test inputs and the classes explained (e.g. the final model's
      predictions); `target` is held fixed, not an argmax.
    output: the explained output (`capture.OUTPUTS`).
    form: "tangent" (the weight-path derivative; any server side) or "loo" (each round's
      term as the cotangent dotted with FedAvg's exact leave-one-out delta; for rules affine
      in the weighted mean).
    inputs_per_chunk: inputs per reverse pass (None: all at once); the last chunk is padded.
    train_x, train_y: the training set (default `fed.data`'s).

  Returns:
    `AcrossRounds` (NumPy): `scores [N, C]`, `per_round [N, R, K]`, `outputs [N]`.
  """
  if output not in OUTPUTS:
    raise ValueError(f"output={output!r}; valid: {', '.join(OUTPUTS)}")
  if form not in FORMS:
    raise ValueError(f"form={form!r}; valid: {', '.join(FORMS)}")
  alg = fed.build(hparams)
  if alg.strategy != "scan":
    raise ValueError(f"across_rounds needs reverse mode through the training: the "
                     f"federation's algorithm runs strategy {alg.strategy!r}; build it with "
                     f"strategy=\"scan\" (the same results)")
  if np.ndim(plan.weights) != 2:
    raise ValueError(f"one plan [R, K] is explained, got weights of shape "
                     f"{np.shape(plan.weights)}")
  train_x = fed.data.x if train_x is None else train_x
  train_y = fed.data.y if train_y is None else train_y
  weights = jnp.asarray(plan.weights)
  n = int(x.shape[0])
  chunk = n if not inputs_per_chunk else min(int(inputs_per_chunk), n)
  chunks = -(-n // chunk)
  pad = chunks * chunk - n
  xs = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x
  ts = jnp.concatenate([target, jnp.repeat(target[:1], pad)]) if pad else target
  ts = ts.astype(jnp.int32)

  @jax.jit
  def one_chunk(w, xc, tc, tx, ty):
    def outputs(w):
      state, _ = fed.run(variables, hparams, plan._replace(weights=w), key, tx, ty)
      return explained(model.logits(state.variables, xc), tc, output)
    s, pullback = jax.vjp(outputs, w)
    # One reverse pass for the chunk: the pullback vmapped over one-hot cotangents.
    (jac,) = jax.vmap(pullback)(jnp.eye(xc.shape[0], dtype=s.dtype))
    return jac * w[None] * _rescale(w, form)[None], s

  terms, outs = [], []
  for i in range(chunks):
    sl = slice(i * chunk, (i + 1) * chunk)
    t, s = one_chunk(weights, xs[sl], ts[sl], train_x, train_y)
    terms.append(t)
    outs.append(s)
  per_round = jnp.concatenate(terms)[:n]
  scores = scatter_clients(per_round, plan.client_ids, fed.data.num_clients)
  return AcrossRounds(np.asarray(scores), np.asarray(per_round),
                      np.asarray(jnp.concatenate(outs)[:n]), form)
