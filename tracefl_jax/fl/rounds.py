"""Federated rounds without a config: client sampling, global evaluation, and a small loop
helper with per-round callbacks around an algorithm's `round` (`algorithm.py`).

No step is computed for padding under scan and loop; the packed strategies compute a few
idle-lane steps, and every round reports `steps_executed` against `steps_needed`. Client
sampling is a host-side function of (seed, round), so a resumed run draws exactly the clients
an uninterrupted one would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.data.federated import FederatedData
# The algorithm and its state, importable beside the loop that runs them.
from tracefl_jax.fl.algorithm import (FederatedAlgorithm, RoundOutput,  # noqa: F401
                                      federated_averaging, leave_one_out_variables)
from tracefl_jax.fl.server import ServerState  # noqa: F401
from tracefl_jax.fl.types import PyTree, Variables
from tracefl_jax.models.base import ModelDef


class TrainingDivergedError(FloatingPointError):
  """Raised when a round's training diverged: a non-finite client loss, a mean client loss
  that exploded (`run_rounds(divergence_factor=...)`), or non-finite global parameters."""


def sample_clients(seed: int, round_idx: int, num_clients: int, k: int,
                   always: Sequence[int] = ()) -> np.ndarray:
  """The round's participants: `k` distinct client ids, uniform, sorted; a function of
  (seed, round) only.

  `always` (e.g. a faulty client that must take part in every round) are included, and the
  other `k - len(always)` are drawn uniformly from the rest; without it the draw is unchanged.
  """
  if not 0 < k <= num_clients:
    raise ValueError(f"cannot sample {k} of {num_clients} clients")
  rng = np.random.default_rng([seed, round_idx])
  fixed = np.unique(np.asarray(always, np.int64))
  if not fixed.size:
    return np.sort(rng.choice(num_clients, size=k, replace=False))
  if fixed.size > k or fixed.min() < 0 or fixed.max() >= num_clients:
    raise ValueError(f"always={fixed.tolist()} must be at most k={k} ids in [0, {num_clients})")
  rest = np.setdiff1d(np.arange(num_clients), fixed)
  return np.sort(np.concatenate([fixed, rng.choice(rest, size=k - fixed.size, replace=False)]))


def round_key(root_key: jax.Array, round_idx: int) -> jax.Array:
  """The key of round `round_idx` (rounds count from 1; the model init uses fold_in 0)."""
  return jax.random.fold_in(root_key, round_idx)


def make_predict_fn(model: ModelDef, batch_size: int = 512) -> Callable[[Variables, jax.Array],
                                                                         jax.Array]:
  """Returns jitted `predict(variables, x) -> [N]` eval-mode argmax labels, in batches."""

  @jax.jit
  def predict(variables, x):
    n = x.shape[0]
    b = min(batch_size, n)
    pad = (-n) % b
    xp = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    batches = xp.reshape(-1, b, *x.shape[1:])
    preds = jax.lax.map(lambda xb: jnp.argmax(model.logits(variables, xb), -1), batches)
    return preds.reshape(-1)[:n].astype(jnp.int32)

  return predict


# Per leaf: are all its values finite (integer leaves trivially are)? One small program.
_finite_leaves = jax.jit(lambda tree: jax.tree.map(
    lambda a: jnp.all(jnp.isfinite(a)) if jnp.issubdtype(a.dtype, jnp.inexact)
    else jnp.array(True), tree))


def _check_diverged(round_idx: int, mean_loss: float, losses: np.ndarray, limit: float,
                    factor: float, variables: Variables) -> None:
  if factor and mean_loss > limit:
    raise TrainingDivergedError(
        f"round {round_idx}: training diverged, mean client loss {mean_loss:.4g} exceeds "
        f"{factor:g} x ln(classes) = {limit:.4g} (client losses "
        f"{', '.join(f'{v:.3g}' for v in losses.tolist())}). Lower the learning rate.")
  finite = jax.device_get(_finite_leaves(variables))
  bad = [jax.tree_util.keystr(path, simple=True, separator="/")
         for path, ok in jax.tree_util.tree_flatten_with_path(finite)[0] if not ok]
  if bad:
    raise TrainingDivergedError(
        f"round {round_idx}: the global model has non-finite parameters in "
        f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} (mean client loss "
        f"{mean_loss:.4g}). Lower the learning rate.")


class GlobalEvaluator:
  """The global model on the server's test set: a per-round callback adding `accuracy` (G's
  test accuracy; `row["provenance"]["accuracy"]` is TraceFL's localization accuracy), and
  the predictions other callbacks need (computed once per round).

  `x` is held as the model's inputs: `normalization(x)` when given (uint8 test images), so
  that whoever takes `evaluator.x` (the provenance protocol) gets normalised floats.
  """

  def __init__(self, model: ModelDef, x: PyTree, y: np.ndarray, batch_size: int = 512,
               normalization: Callable[[jax.Array], jax.Array] | None = None):
    x = jnp.asarray(x)
    self.x = x if normalization is None else jax.jit(normalization)(x)
    self.y = np.asarray(y)
    self._predict = make_predict_fn(model, batch_size)
    self._round: tuple[int, np.ndarray] | None = None  # (round, G_t's predictions)

  def predictions(self, variables: Variables, round_idx: int | None = None) -> np.ndarray:
    """`[M]` the eval-mode predictions of `variables` on the test set. With `round_idx`,
    `variables` is that round's G_t in the run this evaluator is a callback of: the
    predictions its call of the round computed are returned (callbacks after it share them)."""
    if round_idx is not None and self._round is not None and self._round[0] == round_idx:
      return self._round[1]
    return np.asarray(self._predict(variables, self.x))

  def __call__(self, info: "RoundInfo") -> dict[str, float]:
    self._round = (info.round, self.predictions(info.state.variables))
    return {"accuracy": float(np.mean(self._round[1] == self.y))}


class RoundInfo(NamedTuple):
  """What a per-round callback sees."""
  round: int
  state: ServerState        # after the round
  output: RoundOutput
  data: FederatedData
  metrics: dict[str, Any]   # the round's row so far; earlier callbacks' results included


# callback(info) -> a dict merged into the round's metrics row, or None.
Callback = Callable[[RoundInfo], Mapping[str, Any] | None]


def run_rounds(
    algorithm: FederatedAlgorithm,
    state: ServerState,
    data: FederatedData,
    *,
    rounds: int,
    clients_per_round: int,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
    divergence_factor: float = 1e3,
    always_sampled: Sequence[int] = (),
    allow_nonfinite_clients: bool = False,
) -> tuple[ServerState, list[dict[str, Any]]]:
  """Runs rounds `state.round + 1 .. rounds`; returns the final state and one row per round.

  Round t samples `clients_per_round` clients with `sample_clients(seed, t, ...)` and uses the
  key `round_key(jax.random.key(seed), t)`, so a run resumed from a saved state continues
  exactly as an uninterrupted one; `always_sampled` clients take part in every round
  (`sample_clients(..., always=...)`). Each row holds `round`, `clients`, `client_loss`
  (example-weighted mean), `train_seconds`, `steps_executed`, `steps_needed` and `step_ratio`
  (optimizer steps computed / needed, 1.0 when no step is spent on padding; see
  `strategies`), the round's metrics (a scalar as it is, `[K]` values as their mean
  `NAME_mean`: `dp_update_norm_mean` under DP), then whatever the callbacks return, called in
  order after the round.

  `divergence_factor` (0: off) stops a run whose round's mean client loss exceeds
  `divergence_factor * ln(num_classes)`, a multiple of the cross-entropy of a uniform guess
  (an untrained model's loss): a function of the round alone, so a resumed run stops where an
  uninterrupted one would. The check runs before the callbacks, so the diverged round leaves
  no row, checkpoint or trace.

  `allow_nonfinite_clients=True` lets clients whose training loss is not finite (a Byzantine
  client sending NaN, an attack simulation) reach the aggregation rule, which then decides (a
  median or trimmed mean over them stays finite, a mean does not); the row names them
  (`nonfinite_clients`), the mean loss is over the finite ones, and a non-finite global
  model still stops the run.

  Data on the host (`federate(..., placement="host")`): round t+1's clients are sampled
  (the same draw: a function of (seed, t+1)) and their examples gathered and put on the
  device in a background thread while round t runs (`FederatedData.prefetch`); an algorithm
  without `hyperparameters` (its batch size) gathers each round when it starts.

  Raises:
    TrainingDivergedError: a client's training loss is not finite (unless
      `allow_nonfinite_clients`), the mean client loss
      exploded, or the new global model has non-finite parameters.
  """
  root = jax.random.key(seed)
  loss_limit = divergence_factor * math.log(max(data.num_classes, 2))
  history: list[dict[str, Any]] = []
  hp = algorithm.hyperparameters
  prefetch = getattr(data, "placement", "device") == "host" and hp is not None
  for r in range(state.round + 1, rounds + 1):
    t0 = time.perf_counter()
    clients = sample_clients(seed, r, data.num_clients, clients_per_round, always_sampled)
    if prefetch and r < rounds:  # queued behind this round's own gather, if any
      data.prefetch(data.round_slots(sample_clients(
          seed, r + 1, data.num_clients, clients_per_round, always_sampled),
          hp.batch_size).indices)
    state, out = algorithm.round(state, clients=clients, data=data, key=round_key(root, r))
    losses = np.asarray(out.clients.loss)
    finite = np.isfinite(losses)
    if not np.all(finite) and not allow_nonfinite_clients:
      bad = clients[~finite].tolist()
      raise TrainingDivergedError(
          f"round {r}: non-finite training loss on clients {bad}. Lower the learning rate or "
          f"check the data for NaN/inf values (run_rounds(allow_nonfinite_clients=True) lets "
          f"such clients reach a robust aggregation rule, for attack simulations).")
    counts = np.asarray(out.clients.num_examples)
    mean_loss = (float(np.average(losses[finite], weights=np.maximum(counts[finite], 1e-9)))
                 if finite.any() else float("nan"))
    _check_diverged(r, mean_loss, losses, loss_limit, divergence_factor, state.variables)
    row: dict[str, Any] = {
        "round": r,
        "client_loss": mean_loss,
        "clients": clients.tolist(),
        "train_seconds": time.perf_counter() - t0,
    }
    if not finite.all():
      row["nonfinite_clients"] = clients[~finite].tolist()
    executed, needed = int(out.steps_executed), int(out.steps_needed)
    row.update(steps_executed=executed, steps_needed=needed,
               step_ratio=executed / needed if needed else 1.0)
    for name, value in (out.metrics or {}).items():  # [K] values: their mean, "name_mean"
      value = np.asarray(value)
      row[name if value.ndim == 0 else f"{name}_mean"] = float(np.mean(value))
    info = RoundInfo(r, state, out, data, row)
    for callback in callbacks:
      extra = callback(info)
      if extra:
        row.update(extra)
    history.append(row)
  return state, history
