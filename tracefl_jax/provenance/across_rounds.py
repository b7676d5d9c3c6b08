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

Two modes compute the same `[N, C]` (float rounding apart); `mode="auto"` picks the cheaper.

Reverse mode (`mode="reverse"`): per chunk of `inputs_per_chunk` test inputs, one forward
through the R rounds (keeping one carry per round: G_r and the server optimizer's state,
each round under `jax.checkpoint`) and ONE reverse pass through the training, vmapped over
the chunk's one-hot output cotangents, which recomputes each round's forward once and runs
its backward `inputs_per_chunk`-wide. The result is the Jacobian `[N, R, K]` of the outputs
w.r.t. the weights (`per_round`, each (round, slot)'s term); `[N, C]` is its scatter by
`client_ids`. Memory: R carries + one round's recomputed clients + `inputs_per_chunk` x
(the cotangents of a round's K client models and their local-loop residuals). Cost: N
cotangent lanes, each a backward through the training (about 2-3x its forward).

Forward mode (`mode="forward"`): the score is linear in a tangent on the weights,

    D[:, c] = sum_{r, k} d s / d w[r, k] * tangent_c[r, k],
    tangent_c = w * rescale * [client_ids == c],

so one Jacobian-vector product through the training per distinct sampled client gives the
column for all N inputs at once: `jax.vmap` of `jax.jvp` over a chunk of `clients_per_chunk`
tangents, the primal unbatched (computed once per chunk), no rematerialisation, no backward.
The final model's explained outputs are evaluated in chunks of `inputs_per_chunk` inputs
(`lax.map`). Memory: the primal training's + `clients_per_chunk` tangent copies of its
state (a round's client models, the optimizer state, one batch's activations). Cost: C_s
tangent lanes (C_s distinct clients sampled in some round), each about 1-2x the forward's
arithmetic. `per_round` is None: a per-(round, slot) term would take R x K tangents.

`mode="auto"` (`choose_mode`): forward when C_s <= N, else reverse: a tangent lane costs no
more than a cotangent lane, so the mode with fewer lanes wins. The attribution comparison's
digits cell (20 clients, 19 rounds, 100 inputs) runs 20 tangent lanes instead of 100
cotangent lanes (benchmarks/bench_across_rounds.py has the measurements).

Limits. The federation must be one program: reverse mode needs the "scan" client strategy;
forward mode (a JVP crosses `while_loop`s) also runs "vmap" and "chunked" ("loop" and
"sharded" are not programs). The weight path is the removal only where a weight-0 client
changes nothing: true for FedAvg, FedProx, robust rules, server optimizers and DP-FedAvg's
aggregate (the noise does not depend on the weights); not for algorithms with per-client
state (SCAFFOLD, FedDyn: a weight-0 client still updates its state) nor for a rule whose
behaviour depends on which clients are present beyond their weights. It is first order: each round's removal is linearised and the rounds' terms add
(`tests/test_across_rounds.py` measures it against exact retraining).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.fl.federation import Federation, FederationPlan
from tracefl_jax.provenance.capture import OUTPUTS, explained

__all__ = ["AcrossRounds", "FORMS", "MODES", "across_rounds", "choose_mode",
           "scatter_clients"]

FORMS = ("tangent", "loo")
MODES = ("auto", "forward", "reverse")


class AcrossRounds(NamedTuple):
  """Influence across rounds for N test inputs."""
  scores: np.ndarray    # [N, C] first-order drop of removing client c from every round
  per_round: np.ndarray | None  # [N, R, K] each (round, slot)'s term; None in forward mode
  outputs: np.ndarray   # [N] s_n(G_R), the explained outputs of the final model
  form: str
  mode: str             # "forward" or "reverse", the mode that ran


def scatter_clients(per_round: jax.Array, client_ids: jax.Array, num_clients: int) -> jax.Array:
  """`[N, R, K]` terms -> `[N, C]`: summed over every (round, slot) client c took."""
  n = per_round.shape[0]
  return jnp.zeros((n, num_clients), per_round.dtype).at[
      :, jnp.asarray(client_ids).reshape(-1)].add(per_round.reshape(n, -1))


def choose_mode(mode: str, num_sampled: int, num_inputs: int) -> str:
  """The mode that runs: `mode` itself, or for "auto" forward when the distinct sampled
  clients are no more than the inputs (`num_sampled <= num_inputs`; module docstring)."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; valid: {', '.join(MODES)}")
  if mode != "auto":
    return mode
  return "forward" if num_sampled <= num_inputs else "reverse"


def _rescale(weights: jax.Array, form: str) -> jax.Array:
  """`[R, K]` the factor of each round's term: 1 ("tangent") or W_r / (W_r - w[r, k])
  ("loo", 0 where a client holds all of a round's weight: no leave-one-out model)."""
  if form == "tangent":
    return jnp.ones_like(weights)
  total = jnp.sum(weights, axis=1, keepdims=True)
  rest = total - weights
  return jnp.where(rest > 0, total / jnp.where(rest > 0, rest, 1), 0)


def _chunks(n: int, per_chunk: int | None) -> tuple[int, int]:
  """(chunks, size) covering n items with at most `per_chunk` each, padding spread evenly."""
  per_chunk = n if not per_chunk else min(int(per_chunk), n)
  chunks = -(-n // per_chunk)
  return chunks, -(-n // chunks)


def _pad(a: jax.Array, size: int) -> jax.Array:
  """`a` with its first row repeated up to `size` rows."""
  extra = size - a.shape[0]
  return jnp.concatenate([a, jnp.repeat(a[:1], extra, axis=0)]) if extra else a


def across_rounds(fed: Federation, model, variables: Any, hparams: Any, plan: FederationPlan,
                  key: jax.Array, x: jax.Array, target: jax.Array, *, output: str = "logit",
                  form: str = "tangent", mode: str = "auto",
                  inputs_per_chunk: int | None = 32, clients_per_chunk: int | None = 32,
                  train_x: jax.Array | None = None,
                  train_y: jax.Array | None = None) -> AcrossRounds:
  """The first-order drop `[N, C]` of each test input's explained output when each client is
  removed from every round it took part in, through the real training (module docstring).

  Args:
    fed: the federation (`fl.federation`; its algorithm under the "scan" strategy for
      reverse mode).
    model: the `ModelDef` (`model.logits(variables, x)`).
    variables, hparams, plan, key: `fed.run`'s arguments (a single plan `[R, ...]`): the
      federation whose final model is explained.
    x, target: `[N, ...]` test inputs and the classes explained (e.g. the final model's
      predictions); `target` is held fixed, not an argmax.
    output: the explained output (`capture.OUTPUTS`).
    form: "tangent" (the weight-path derivative; any server side) or "loo" (each round's
      term as the cotangent dotted with FedAvg's exact leave-one-out delta; for rules affine
      in the weighted mean).
    mode: "forward" (one JVP lane per distinct sampled client), "reverse" (one cotangent
      lane per input; gives `per_round`) or "auto" (`choose_mode`).
    inputs_per_chunk: inputs per reverse pass, or per final-model evaluation in forward
      mode (None: all at once); chunks are padded to one size.
    clients_per_chunk: forward mode's tangent lanes per pass through the training (None:
      every sampled client at once); bounds its memory.
    train_x, train_y: the training set (default `fed.data`'s).

  Returns:
    `AcrossRounds` (NumPy): `scores [N, C]`, `per_round [N, R, K]` (None in forward mode),
    `outputs [N]`, the form and the mode that ran.
  """
  if output not in OUTPUTS:
    raise ValueError(f"output={output!r}; valid: {', '.join(OUTPUTS)}")
  if form not in FORMS:
    raise ValueError(f"form={form!r}; valid: {', '.join(FORMS)}")
  if np.ndim(plan.weights) != 2:
    raise ValueError(f"one plan [R, K] is explained, got weights of shape "
                     f"{np.shape(plan.weights)}")
  sampled = np.unique(np.asarray(plan.client_ids))
  mode = choose_mode(mode, len(sampled), int(x.shape[0]))
  alg = fed.build(hparams)
  if mode == "reverse" and alg.strategy != "scan":
    raise ValueError(f"across_rounds' reverse mode needs reverse mode through the training: "
                     f"the federation's algorithm runs strategy {alg.strategy!r}; build it "
                     f"with strategy=\"scan\" (the same results) or use mode=\"forward\"")
  train_x = fed.data.x if train_x is None else train_x
  train_y = fed.data.y if train_y is None else train_y
  weights = jnp.asarray(plan.weights)
  target = jnp.asarray(target).astype(jnp.int32)

  def final(w, tx, ty):
    state, _ = fed.run(variables, hparams, plan._replace(weights=w), key, tx, ty)
    return state.variables

  run = _forward if mode == "forward" else _reverse
  scores, per_round, outs = run(final, model, output, form, weights, plan.client_ids,
                                sampled, fed.data.num_clients, x, target, train_x, train_y,
                                inputs_per_chunk, clients_per_chunk)
  return AcrossRounds(np.asarray(scores), None if per_round is None else np.asarray(per_round),
                      np.asarray(outs), form, mode)


def _reverse(final, model, output, form, weights, client_ids, sampled, num_clients, x,
             target, train_x, train_y, inputs_per_chunk, clients_per_chunk):
  """Reverse mode: the Jacobian `[N, R, K]`, one reverse pass per chunk of inputs."""
  del sampled, clients_per_chunk
  n = int(x.shape[0])
  chunks, chunk = _chunks(n, inputs_per_chunk)
  xs, ts = _pad(x, chunks * chunk), _pad(target, chunks * chunk)

  @jax.jit
  def one_chunk(w, xc, tc, tx, ty):
    def outputs(w):
      return explained(model.logits(final(w, tx, ty), xc), tc, output)
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
  return (scatter_clients(per_round, client_ids, num_clients), per_round,
          jnp.concatenate(outs)[:n])


def _forward(final, model, output, form, weights, client_ids, sampled, num_clients, x,
             target, train_x, train_y, inputs_per_chunk, clients_per_chunk):
  """Forward mode: one JVP lane per distinct sampled client, vmapped over a chunk of
  clients with the primal unbatched; the final model evaluated per chunk of inputs."""
  n = int(x.shape[0])
  chunks, chunk = _chunks(len(sampled), clients_per_chunk)
  # Padding lanes carry client id -1: a zero tangent.
  lanes = np.full(chunks * chunk, -1, np.int32)
  lanes[:len(sampled)] = sampled
  batch = n if not inputs_per_chunk else min(int(inputs_per_chunk), n)
  ids = jnp.asarray(client_ids)

  @jax.jit
  def one_chunk(w, cs, xe, te, tx, ty):
    scaled = w * _rescale(w, form)
    tangents = jnp.where(ids[None] == cs[:, None, None], scaled[None], 0)
    v, dv = jax.vmap(lambda t: jax.jvp(lambda w: final(w, tx, ty), (w,), (t,)),
                     out_axes=(None, 0))(tangents)

    def per_input(xt):  # one input: its output and its [lanes] directional derivatives
      xi, ti = xt
      f = lambda v: explained(model.logits(v, xi[None]), ti[None], output)[0]  # noqa: E731
      return jax.vmap(lambda d: jax.jvp(f, (v,), (d,)), out_axes=(None, 0))(dv)
    return jax.lax.map(per_input, (xe, te), batch_size=batch)

  cols, s = [], None
  for i in range(chunks):
    s, d = one_chunk(weights, jnp.asarray(lanes[i * chunk:(i + 1) * chunk]), x, target,
                     train_x, train_y)
    cols.append(d)
  d = jnp.concatenate(cols, axis=1)[:, :len(sampled)]  # [N, C_s]
  scores = jnp.zeros((n, num_clients), d.dtype).at[:, jnp.asarray(sampled)].set(d)
  return scores, None, s
