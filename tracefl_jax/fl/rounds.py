"""One federated round: sample -> simulate the clients -> FedAvg; and global evaluation.

`make_round_fn` builds the round once per experiment. For the in-program strategies (vmap,
chunked, scan) the whole round, local training of every client plus aggregation, is ONE jitted
program; its shapes depend only on K and the bucketed client length, so round 2 reuses round
1's compilation. Client sampling is a host-side function of (seed, round), so a resumed run
draws exactly the clients an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tracefl_jax.fl import aggregation, privacy
from tracefl_jax.fl.client import ClientOutput, make_client_update
from tracefl_jax.models.base import ModelDef, Variables
from tracefl_jax.fl.strategies import fold_client_keys, resolve_strategy, simulate_clients


class RoundOutput(NamedTuple):
  variables: Variables     # the new global model G_t, which training continues from
  clients: ClientOutput    # the round's client models and metrics, stacked `[K, ...]`
  traced: Variables        # the model provenance explains (G_t, or DP's pre-noise aggregate
                           # in the original's parity mode)
  update_norms: jax.Array  # [K] client update norms before clipping (DP), else zeros


class DPSettings(NamedTuple):
  """DP-FedAvg with server-side fixed clipping (see `aggregation.dp_fedavg`)."""
  clip_norm: float
  noise_multiplier: float
  clients_per_round: int
  noise_batch_stats: bool = False  # original's defect: clip and noise BatchNorm statistics
  trace_clean: bool = False        # original's defect: trace the pre-noise aggregate


RoundFn = Callable[..., RoundOutput]
# Client keys fold in client ids (< 2**31 - 1); the DP noise key folds in a value no id takes.
_DP_NOISE_STREAM = 2**31 - 1


def sample_clients(seed: int, round_idx: int, num_clients: int, k: int) -> np.ndarray:
  """The round's participants: `k` distinct client ids, uniform, sorted; a function of
  (seed, round) only."""
  if not 0 < k <= num_clients:
    raise ValueError(f"cannot sample {k} of {num_clients} clients")
  rng = np.random.default_rng([seed, round_idx])
  return np.sort(rng.choice(num_clients, size=k, replace=False))


def round_key(root_key: jax.Array, round_idx: int) -> jax.Array:
  return jax.random.fold_in(root_key, round_idx)


def make_round_fn(
    model: ModelDef,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    local_epochs: int,
    strategy: str = "auto",
    clients_per_chunk: int = 0,
    example_variables: Variables | None = None,
    dp: DPSettings | None = None,
    compute_dtype: Any = jnp.float32,
    donate: bool = False,
) -> RoundFn:
  """Returns `run_round(variables, x, y, indices, counts, client_ids, key, weights)`.

  Args of the returned function:
    variables: the global model G_{t-1}.
    x, y: the device-resident training set.
    indices, counts: the round's `RoundData` (`[K, M]`, `[K]`).
    client_ids: `[K]` global ids of the round's clients (for their PRNG keys).
    key: the round's key (`round_key(root, t)`).
    weights: `[K]` FedAvg weights, validated on the host with `aggregation.check_weights`.

  With `dp`, aggregation is DP-FedAvg; its noise key is folded from the round key.
  With `donate`, the in-program strategies donate `variables` (G_{t-1}) to the round, so
  XLA may write G_t into its buffers: the caller must not use the passed variables after the
  call (the experiment runner does not; it keeps G_t).
  """
  client_update = make_client_update(model, optimizer, batch_size, local_epochs,
                                     compute_dtype=compute_dtype)
  if example_variables is None:
    example_variables = jax.eval_shape(model.init, jax.random.key(0))
  strategy = resolve_strategy(strategy, example_variables)

  def average(out, weights, previous, key):
    if dp is None:
      new = aggregation.fedavg(out.variables, weights)
      return RoundOutput(new, out, new, jnp.zeros(weights.shape, jnp.float32))
    collections = ("params", "batch_stats") if dp.noise_batch_stats else ("params",)
    agg = privacy.dp_fedavg(
        out.variables, weights, previous, jax.random.fold_in(key, _DP_NOISE_STREAM),
        clip_norm=dp.clip_norm, noise_multiplier=dp.noise_multiplier,
        clients_per_round=dp.clients_per_round, collections=collections)
    return RoundOutput(agg.noisy, out, agg.clean if dp.trace_clean else agg.noisy,
                       agg.update_norms)

  def clients_and_average(variables, x, y, indices, counts, client_ids, key, weights):
    keys = fold_client_keys(key, client_ids)
    out = simulate_clients(client_update, variables, x, y, indices, counts, keys,
                           strategy=strategy, clients_per_chunk=clients_per_chunk)
    return average(out, weights, variables, key)

  if strategy != "loop":
    jitted = jax.jit(clients_and_average, donate_argnums=(0,) if donate else ())
  else:
    average_jit = jax.jit(average)
    keys_fn = jax.jit(fold_client_keys)

    def jitted(variables, x, y, indices, counts, client_ids, key, weights):
      out = simulate_clients(client_update, variables, x, y, indices, counts,
                             keys_fn(key, client_ids), strategy="loop")
      return average_jit(out, weights, variables, key)

  def run_round(variables, x, y, indices, counts, client_ids, key, weights):
    aggregation.check_weights(weights)
    k = len(counts)
    pad = (-k) % jax.device_count() if strategy == "sharded" else 0
    if pad:  # empty clients with weight 0 leave the average unchanged
      indices = np.concatenate([indices, np.zeros((pad, indices.shape[1]), indices.dtype)])
      counts = np.concatenate([counts, np.zeros(pad, counts.dtype)])
      client_ids = np.concatenate([client_ids, np.full(pad, -1, np.asarray(client_ids).dtype)])
      weights = np.concatenate([weights, np.zeros(pad, np.float32)])
    out = jitted(variables, x, y, jnp.asarray(indices), jnp.asarray(counts),
                 jnp.asarray(client_ids), key, jnp.asarray(weights, jnp.float32))
    if pad:
      out = out._replace(clients=jax.tree.map(lambda l: l[:k], out.clients),
                         update_norms=out.update_norms[:k])
    return out

  run_round.strategy = strategy  # type: ignore[attr-defined]
  run_round.jitted = jitted  # type: ignore[attr-defined]
  return run_round


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
