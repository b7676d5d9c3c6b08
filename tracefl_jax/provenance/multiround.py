r"""Multi-round provenance: which client is responsible for the FINAL model's prediction,
over every round of training, not only the last.

Derivation. Let G_r be the global model after round r = 1..R, S_r the round's clients, theta_k^r
client k's model in round r and w_k^r its aggregation weight (W^r = sum_{j in S_r} w_j^r), so
G_r = sum_k w_k^r theta_k^r / W^r. Leaving k out of round r alone moves the aggregate by

    delta_k^r = G_r^{-k} - G_r = w_k^r / (W^r - w_k^r) * (G_r - theta_k^r)        (exact).

Rounds r+1..R map G_r to G_R by a function Phi_r (local training, then averaging); to first
order the final model moves by J_r delta_k^r, J_r = dPhi_r / dG_r, and the explained logit s_n
of the final model drops by

    -<grad s_n(G_R), J_r delta_k^r> = w_k^r / (W^r - w_k^r) <J_r^T grad s_n(G_R), theta_k^r - G_r>.

Leaving k out of every round it took part in is, to first order, the sum of these over its
rounds. Approximating J_r by gamma^{R - r} I (gamma = `round_decay`, 1 by default: a
perturbation of G_r is carried to G_R unchanged, gamma < 1: later training shrinks it):

    MR[n, k] = sum_{r : k in S_r} gamma^{R - r} w_k^r / (W^r - w_k^r)
                                  * <grad s_n(G_R), theta_k^r - G_r>,

restricted to the traced units. The inner products are TraceFL's kernels applied to the final
model with "client parameters" D_k = sum_r gamma^{R - r} w_k^r / (W^r - w_k^r) (theta_k^r - G_r)
(the units are linear in their parameters), so the method needs one [C, P] accumulator over
all C clients, updated online after every round (`MultiRoundAccumulator.update`, touching
only the round's rows) or from stored rounds (`multi_round_scores`), and one trace of the
final model. With R = 1 (or gamma = 0) it is the weight-aware single-round score
(`trace_clients(score="first_order")`) of the last round.

Any server side. The derivation only needs each round's removal delta_k^r = G_r^{-k} - G_r,
and FedAvg's closed form above is one way to get it. Under any other rule or server optimizer
(median, trimmed mean, Krum, FedAdam) `update(..., reaggregate=output.reaggregate)` takes it
from the round's own server side re-run without k (`removal.py`), so D_k sums
gamma^{R - r} (G_r - G_r^{-k}) exactly for each round. What stays assumed is the carry from
round r to R (J_r ~ gamma^{R - r} I): a server optimizer's state (Adam's moments) also
remembers round r's update and rescales later steps, which J_r ~ I ignores, as it ignores
the other clients' reaction.

What it approximates: the leave-one-client-out-of-training drop (`retrained.py`'s LOO
retraining truth), to first order in each round's removal. When it fails:
  * J_r is not the identity: local training pulls a perturbed model back toward the data's
    optimum (many local steps, strongly curved loss, a converged model), so early rounds'
    effects are over-counted (gamma < 1 models a uniform contraction, not the true one);
    adaptive optimizers (Adam) rescale perturbations per parameter.
  * Removing k also changes what the OTHER clients learn in later rounds (they start from a
    different G); only J_r's linear part of that is counted, and J_r ~ I ignores it.
  * A client holding most of a round's weight (W^r - w_k^r small) makes delta_k^r large and
    the first-order expansion poor; a round where k holds all the weight is skipped (its
    removal leaves nothing to average).
  * Cross-terms between rounds (removing k from rounds r and r' together) are second order.
  * Only the traced units' parameters move in D (embeddings, non-traced layers are ignored),
    and only affine units are supported (a whole-block unit is not linear in its parameters).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.models.base import ModelDef, Variables
from tracefl_jax.provenance.attribution import ProvenanceResult, is_affine, trace_clients
from tracefl_jax.provenance.removal import map_removals


# D is updated in place: the table's buffer is donated and only the round's K rows are read
# and written (a scatter), so a round costs K rows, not the [C, P] table.
@functools.partial(jax.jit, donate_argnums=(0,))
def _accumulate(table, client_params, global_params, weights, client_ids, scale):
  w = weights.astype(jnp.float32)
  rest = jnp.sum(w) - w
  factor = jnp.where(rest > 0, w / jnp.where(rest > 0, rest, 1.0), 0.0)  # [K]

  def leaf(d, c, g):
    shift = (c.astype(jnp.float32) - g.astype(jnp.float32)[None])
    shift = shift * factor.reshape(-1, *([1] * g.ndim))
    return _rows_update(d, client_ids, scale, shift)

  return jax.tree.map(leaf, table, client_params, global_params)


@functools.partial(jax.jit, static_argnames=("clients_per_chunk",), donate_argnums=(0,))
def _accumulate_by_rule(table, reaggregate, weights, client_ids, scale, *, clients_per_chunk):
  # [K + 1, ...] params of G re-computed (row 0) and every G_r^{-k}: D_k += G_r - G_r^{-k}.
  models = map_removals(lambda m: m["params"], reaggregate, weights, clients_per_chunk)

  w = weights.astype(jnp.float32)
  alone = jnp.sum(w) - w <= 0  # removing k leaves nothing to aggregate: the round is skipped

  def leaf(d, m):
    shift = m[:1].astype(jnp.float32) - m[1:].astype(jnp.float32)
    shift = jnp.where(alone.reshape(-1, *([1] * (shift.ndim - 1))), 0.0, shift)
    return _rows_update(d, client_ids, scale, shift)

  return jax.tree.map(leaf, table, models)


def _rows_update(d, ids, scale, shift):
  """Rows `ids` of `d` times `scale [K]` (the decay they missed), plus `shift [K, ...]`."""
  decayed = d.at[ids].multiply(scale.reshape(-1, *([1] * (d.ndim - 1))), mode="drop")
  return decayed.at[ids].add(shift, mode="drop")


@jax.jit
def _decayed(table, scale):
  return jax.tree.map(lambda d: d * scale.reshape(-1, *([1] * (d.ndim - 1))), table)


class MultiRoundAccumulator:
  """Online multi-round provenance: `update` after every round, `scores` at any time.

  Holds D `[C, ...]` (float32, the shape of the model's params per client). Rounds must be
  given in order; `round_decay` gamma multiplies what was accumulated before each new round.

  Sparse in the rounds: a round reads and writes only its participants' rows, in place. The
  decay is applied lazily: each row is stored as of the last round its client took part in
  (`last_round [C]`, host) and brought forward by gamma^(rounds missed) when the client next
  takes part or when D is read (`directions`). With gamma = 1 (the default) this is today's
  table exactly; with gamma < 1 a row decayed over n rounds is multiplied once by gamma^n
  instead of n times by gamma (equal up to float32 rounding, about 1e-7 relative).
  """

  def __init__(self, params: Any, num_clients: int, round_decay: float = 1.0):
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
      raise ValueError(f"num_clients={num_clients!r} must be a positive int")
    if not 0 <= round_decay <= 1:
      raise ValueError(f"round_decay={round_decay} must be in [0, 1]")
    self.num_clients = int(num_clients)
    self.round_decay = float(round_decay)
    self._table = jax.tree.map(
        lambda a: jnp.zeros((self.num_clients, *np.shape(a)), jnp.float32), params)
    self.last_round = np.zeros(self.num_clients, np.int64)
    self.rounds = 0

  def _decay(self, rounds_missed: np.ndarray) -> np.ndarray:
    """gamma ** n in float32 (0 ** 0 = 1: a row brought forward by no round is unchanged)."""
    return np.power(self.round_decay, rounds_missed.astype(np.float64)).astype(np.float32)

  @property
  def directions(self) -> Any:
    """D `[C, ...]` as of the last round (a new array each time it is read)."""
    if self.round_decay == 1.0:
      return jax.tree.map(jnp.copy, self._table)
    return _decayed(self._table, jnp.asarray(self._decay(self.rounds - self.last_round)))

  def update(self, client_vars: Variables, global_vars: Variables, weights: Any,
             client_ids: Any, *, reaggregate: Any = None,
             clients_per_chunk: int | None = None) -> None:
    """Adds one round: its client models (leaves `[K, ...]`), the aggregate G_r they formed,
    the aggregation weights `[K]` and the clients' global ids `[K]` in [0, C).

    `reaggregate` (`RoundOutput.reaggregate`): remove each client by the round's own rule and
    server step (`clients_per_chunk` models at a time) instead of FedAvg's closed form, which
    is exact only for the weighted mean without a server optimizer (module docstring)."""
    ids = np.asarray(client_ids)
    if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 1 or (
        ids.size and (ids.min() < 0 or ids.max() >= self.num_clients)):
      raise ValueError(f"client_ids={ids.tolist()} must be a vector of integer ids in "
                       f"[0, {self.num_clients})")
    w = np.asarray(weights, np.float32)
    if w.shape != ids.shape or not np.all(np.isfinite(w) & (w >= 0)):
      raise ValueError(f"weights={w.tolist()} must be [K] = {ids.shape} finite values >= 0")
    now = self.rounds + 1
    # Each row's missed decay, once per client (a repeated id adds its shifts, as a scatter).
    first = np.zeros(ids.shape, bool)
    first[np.unique(ids, return_index=True)[1]] = True
    scale = jnp.asarray(np.where(first, self._decay(now - self.last_round[ids]), 1.0)
                        .astype(np.float32))
    if reaggregate is not None:
      self._table = _accumulate_by_rule(
          self._table, reaggregate, jnp.asarray(w), jnp.asarray(ids, jnp.int32), scale,
          clients_per_chunk=int(clients_per_chunk) if clients_per_chunk else None)
    else:
      self._table = _accumulate(self._table, client_vars["params"], global_vars["params"],
                                jnp.asarray(w), jnp.asarray(ids, jnp.int32), scale)
    self.last_round[ids] = now
    self.rounds = now

  def scores(self, model: ModelDef, global_vars: Variables, x: jax.Array, *,
             target: jax.Array | None = None, kernel: str = "auto",
             clients_per_chunk: int | None = None,
             mesh: jax.sharding.Mesh | None = None,
             output: str = "logit") -> ProvenanceResult:
    """MR `[N, C]` for the prediction of `global_vars` (the final model G_R) on `x`: a
    `ProvenanceResult` whose columns are the C global client ids (`scores` MR, `probs` its
    softmax, `traced_client` the argmax). Clients never sampled score 0. `output`: the
    explained output s_n (`trace_clients`: "logit", "margin" or "log_prob")."""
    if not is_affine(model):
      raise ValueError(f"multi-round provenance needs affine traced units; model "
                       f"{model.name!r} has whole-block units")
    if self.rounds == 0:
      raise ValueError("no round was added: call update() after each round first")
    table = self._table if self.round_decay == 1.0 else self.directions
    return trace_clients(model, global_vars, {"params": table}, x, target=target,
                         kernel=kernel, use_decay=False, clients_per_chunk=clients_per_chunk,
                         mesh=mesh, output=output)


def multi_round_scores(model: ModelDef, final_vars: Variables,
                       rounds: Iterable[tuple[Variables, Variables, Any, Any]], x: jax.Array,
                       num_clients: int, *, round_decay: float = 1.0,
                       target: jax.Array | None = None, kernel: str = "auto",
                       clients_per_chunk: int | None = None) -> ProvenanceResult:
  """MR from stored rounds: `rounds` yields `(client_vars, global_vars, weights, client_ids)`
  of rounds 1..R in order (G_r the round's aggregate); see the module docstring."""
  acc = MultiRoundAccumulator(final_vars["params"], num_clients, round_decay)
  for client_vars, global_vars, weights, client_ids in rounds:
    acc.update(client_vars, global_vars, weights, client_ids)
  return acc.scores(model, final_vars, x, target=target, kernel=kernel,
                    clients_per_chunk=clients_per_chunk)
