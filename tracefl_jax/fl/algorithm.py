"""A federated algorithm from pieces: client objective, client optimizer, aggregation rule,
server optimizer; `init` + one jitted `round` over explicit `ServerState`.

    algorithm = federated_averaging(model, optax.adam(1e-3), batch_size=32, local_epochs=2)
    state = algorithm.init(model.init(key))
    state, out = algorithm.round(state, clients=[3, 7, 9], data=data, key=key)

Every piece is replaceable and every default reproduces plain FedAvg bit for bit:
  loss_fn           the client objective (`losses`; `fedprox(mu)` for FedProx);
  optimizer         each client's optax optimizer (fresh state every round);
  aggregator        `robust.median()`, `trimmed_mean(beta)`, `krum(f)` or any function
                    `rule(stacked_updates [K, ...], weights [K]) -> update` (default FedAvg);
  server_optimizer  any optax transformation of the pseudo-gradient G_{t-1} - A_t, its state in
                    `ServerState.opt_state` (`server`; FedAvgM, FedAdam, FedYogi, FedAdagrad).

For the in-program strategies (vmap, chunked, scan, sharded) a round, local training of every
client plus aggregation, is ONE jitted program whose shapes depend only on K, the federation's
bucketed client length and (packed strategies) the lane count, so later rounds reuse round 1's
compilation.

Federations over different partitions: `algorithm.program` is positional in the data
(`variables, x, y, indices, counts, client_ids, key, weights`), so F federations of the same K
are one `jax.vmap(algorithm.program, in_axes=(None, None, None, 0, 0, 0, None, 0))` over
stacked `[F, K, M]` index rows, `[F, K]` counts, ids and weights (`data.round_data` of each
partition, padded to one length M); a `[F, K]` weight mask alone (a left-out client has weight
0) needs only `in_axes=(None,) * 7 + (0,)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tracefl_jax.data.federated import FederatedData
from tracefl_jax.fl import aggregation, privacy
from tracefl_jax.fl import client_state as cstate
from tracefl_jax.fl.client import ClientOutput, check_local_training, make_client_update
from tracefl_jax.fl.losses import LossFn
from tracefl_jax.fl.privacy import DPSettings
from tracefl_jax.fl.robust import AggregationRule, aggregate_models
from tracefl_jax.fl.server import ServerState, init_server, server_step
from tracefl_jax.fl.strategies import (fold_client_keys, resolve_strategy, round_lanes,
                                       simulate_clients_with_steps)
from tracefl_jax.models.base import ModelDef, Variables


class RoundOutput(NamedTuple):
  """Everything one round produced (client-indexed fields stacked `[K, ...]`)."""
  variables: Variables     # the new global model G_t, which training continues from
  clients: ClientOutput    # the round's client models, losses, example and step counts
  client_ids: np.ndarray   # [K] global ids of the round's clients, in the round's order
  weights: np.ndarray      # [K] aggregation weights
  traced: Variables        # the model provenance explains (G_t, or DP's pre-noise aggregate
                           # in the original's parity mode)
  update_norms: jax.Array | None  # [K] client update norms before clipping (DP only)
  steps_needed: int = 0    # optimizer steps the clients need: sum of epochs * ceil(n_k / B)
  steps_executed: Any = 0  # int32 scalar, steps computed (idle packed lanes included)
  previous: ServerState | None = None  # the state the round started from, kept only when
                                       # the server update reads it (server optimizer, a
                                       # rule over updates)
  reaggregate: Callable[[jax.Array], Variables] | None = None  # weights [K] -> the G_t this
                                       # round gives with them (same clients, rule, server
                                       # state); None under DP. `leave_one_out_variables`.
                                       # A `jax.tree_util.Partial`: it can be passed into a
                                       # jitted function as an argument.
  aggregation: str = "mean"  # the round's server side in words: "mean" (FedAvg), a rule's
                             # name, "+ server optimizer", or "dp_fedavg"

  @property
  def closed_form_exact(self) -> bool:
    """FedAvg's closed form G_{-k} = (W G - w_k theta_k) / (W - w_k) is this round's own
    leave-one-client-out model: the weighted mean with no server optimizer and no DP."""
    return self.aggregation == "mean"


class FederatedAlgorithm(NamedTuple):
  """`init(variables) -> ServerState`; `round(state, clients, data, key) -> (state, output)`.

  `strategy` is the resolved client-axis strategy; `program` the jitted round program
  `(variables, x, y, indices, counts, client_ids, key, weights, lanes=None,
  normalization=None, opt_state=None) -> (variables, clients, traced, update_norms,
  steps_executed, opt_state)` (`lanes` and `normalization` static; `strategies.round_lanes`
  gives a round's lanes, `data.normalization` its normalization), None for the host-side
  "loop" strategy. With a per-client state it takes `table=` (`[C, ...]`) and returns the
  new table as a seventh value.

  `server_update(variables, client_variables, weights, key, opt_state=None) -> (G_t,
  opt_state)` is the round's server side as a pure function of G_{t-1}, the stacked client
  variables `[K, ...]` and weights `[K]`: the leave-one-client-out model is
  `server_update(..., weights.at[k].set(0), ...)` for every rule (`leave_one_out_variables`).
  """
  init: Callable[[Variables], ServerState]
  round: Callable[..., tuple[ServerState, RoundOutput]]
  strategy: str
  program: Any
  server_update: Callable[..., tuple[Variables, Any]] | None = None
  aggregator: Any = None
  server_optimizer: optax.GradientTransformation | None = None


# Client keys fold in client ids (< 2**31 - 1); the DP noise key folds in a value no id takes.
_DP_NOISE_STREAM = 2**31 - 1


def check_key(key: Any, name: str = "key") -> None:
  """One clear error for a `key` that is not a JAX PRNG key (e.g. `key=1`)."""
  ok = isinstance(key, jax.Array) and (
      jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
      or key.dtype == jnp.uint32 and key.shape == (2,))
  if not ok:
    what = f"{type(key).__name__} {key!r}" if not isinstance(key, jax.Array) else (
        f"an array of dtype {key.dtype} and shape {key.shape}")
    raise TypeError(f"{name} must be one JAX PRNG key, jax.random.key(seed) (or a legacy "
                    f"jax.random.PRNGKey), got {what}")


def federated_averaging(
    model: ModelDef,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    local_epochs: int,
    weighting: str = "examples",
    strategy: str = "auto",
    clients_per_chunk: int = 0,
    dp: DPSettings | None = None,
    compute_dtype: Any = jnp.float32,
    donate: bool = False,
    loss_fn: LossFn | None = None,
    aggregator: AggregationRule | Callable[[Any, jax.Array], Any] | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    client_state: cstate.ClientStatePiece | None = None,
) -> FederatedAlgorithm:
  """FedAvg (McMahan et al. 2017) and its family, or DP-FedAvg with `dp`, over stacked clients.

  Args:
    model: the clients' and the server's model.
    optimizer: each client's local optimizer (fresh state every round, as in the original).
    batch_size, local_epochs: local training (positive ints).
    weighting: aggregation weights from example counts: "examples", "batches" (the
      original's floor(n_k / batch_size)) or "uniform" (`aggregation.client_weights`).
    strategy: how the client axis runs (`strategies.STRATEGIES`; "auto" picks per backend).
    clients_per_chunk: lanes for "chunked" (clients training side by side; 0: automatic).
    dp: DP-FedAvg settings (server-side fixed clipping and Gaussian noise; mean rule only).
    compute_dtype: `jnp.bfloat16` for mixed-precision local training.
    donate: donate G_{t-1}'s buffers to the round (the caller must not reuse the state
      passed to `round`; `run_rounds` does not). Ignored with a server optimizer, whose
      RoundOutput keeps G_{t-1} (`previous`).
    loss_fn: the client objective (`losses.LossFn`); default masked cross-entropy.
    aggregator: the aggregation rule (`robust`); default the weighted mean (FedAvg).
    server_optimizer: an optax transformation of the pseudo-gradient (`server`); None keeps
      G_t = the aggregate exactly.
    client_state: a per-client state (`client_state.ClientStatePiece`, e.g. SCAFFOLD's
      control variates): its `[C, ...]` table lives in `ServerState.client_state`
      (`init(variables, num_clients=C)`); strategies vmap, chunked and scan.

  A rule that declares `num_steps`, `num_examples` or `losses` keyword parameters gets the
  round's `[K]` values (FedNova, q-FFL: `robust.CLIENT_INFO`).
  """
  check_local_training(batch_size, local_epochs)
  check_transformation(optimizer, "optimizer", 'tfl.make_optimizer("adam", lr) or optax.adam(lr)')
  if server_optimizer is not None:
    check_transformation(server_optimizer, "server_optimizer",
                         f"tfl.server_optimizer({server_optimizer!r}, lr)"
                         if isinstance(server_optimizer, str) else "tfl.server_optimizer(name, lr)")
  aggregation.client_weights(np.ones(1, np.int64), weighting, batch_size)  # validates the name
  if aggregator is not None and not callable(aggregator):
    raise TypeError(f"aggregator must be an aggregation rule (robust.median(), ...) or a "
                    f"function (stacked_updates, weights) -> update, got {aggregator!r}")
  if dp is not None and aggregator is not None and getattr(aggregator, "name", "") != "mean":
    raise ValueError(f"DP-FedAvg averages clipped updates; it cannot use the aggregation rule "
                     f"{getattr(aggregator, 'name', aggregator)!r} (use the mean, or dp=None)")
  client_update = make_client_update(model, optimizer, batch_size, local_epochs,
                                     compute_dtype=compute_dtype, loss_fn=loss_fn)
  strategy = resolve_strategy(strategy, jax.eval_shape(model.init, jax.random.key(0)))
  if client_state is not None and (strategy in ("loop", "sharded") or dp is not None):
    raise ValueError(f"client_state runs under the strategies vmap, chunked and scan without "
                     f"DP, not strategy={strategy!r}" + (" with dp" if dp is not None else ""))

  def average(out, weights, previous, key, opt_state):
    if dp is None:
      info = None if out.num_steps is None else {
          "num_steps": out.num_steps, "num_examples": out.num_examples, "losses": out.loss}
      agg = aggregate_models(aggregator, out.variables, weights, previous, info)
      clean, norms = agg, None
    else:
      collections = ("params", "batch_stats") if dp.noise_batch_stats else ("params",)
      dp_agg = privacy.dp_fedavg(
          out.variables, weights, previous, jax.random.fold_in(key, _DP_NOISE_STREAM),
          clip_norm=dp.clip_norm, noise_multiplier=dp.noise_multiplier,
          clients_per_round=dp.clients_per_round, collections=collections)
      agg, clean, norms = dp_agg.noisy, dp_agg.clean, dp_agg.update_norms
    new, opt_state = server_step(server_optimizer, previous, agg, opt_state)
    traced = clean if dp is not None and dp.trace_clean else new
    return new, out, traced, norms, opt_state

  def server_update(variables, client_variables, weights, key, opt_state=None,
                    client_info=None):
    # client_info: (losses, num_examples, num_steps) `[K]`, for rules that read them.
    out = ClientOutput(client_variables, *(client_info or (None, None, None)))
    new, _, _, _, opt_state = average(out, jnp.asarray(weights, jnp.float32), variables, key,
                                      opt_state)
    return new, opt_state

  server_update_jit = jax.jit(server_update)

  def reaggregate_fn(previous, client_variables, key, opt_state, client_info, weights):
    return server_update_jit(previous, client_variables, weights, key, opt_state,
                             client_info)[0]

  description = describe_server(aggregator, server_optimizer, dp)

  def clients_and_average(variables, x, y, indices, counts, client_ids, key, weights,
                          lanes=None, normalization=None, opt_state=None, table=None):
    keys = fold_client_keys(key, client_ids)
    contexts = None if client_state is None else cstate.gather(client_state, table,
                                                               client_ids, variables)
    out, executed = simulate_clients_with_steps(
        client_update, variables, x, y, indices, counts, keys, strategy=strategy,
        clients_per_chunk=clients_per_chunk, lanes=lanes, normalization=normalization,
        contexts=contexts)
    if client_state is not None:
      table = cstate.scatter(client_state, table, contexts, variables["params"],
                             out.variables["params"], out.num_steps, weights)
    new, out, traced, norms, opt_state = average(out, weights, variables, key, opt_state)
    result = new, out, traced, norms, executed, opt_state
    return result if client_state is None else (*result, table)  # stateless: as before

  on_updates = aggregator is not None and not (isinstance(aggregator, AggregationRule)
                                               and aggregator.shift_equivariant)
  keep_previous = server_optimizer is not None or on_updates
  donate = donate and not keep_previous
  if strategy != "loop":
    program = jax.jit(clients_and_average, donate_argnums=(0,) if donate else (),
                      static_argnames=("lanes", "normalization"))
    execute = program
  else:
    program = None
    average_jit = jax.jit(average)
    keys_fn = jax.jit(fold_client_keys)

    def execute(variables, x, y, indices, counts, client_ids, key, weights, lanes=None,
                normalization=None, opt_state=None, table=None):
      del lanes
      out, executed = simulate_clients_with_steps(
          client_update, variables, x, y, indices, counts, keys_fn(key, client_ids),
          strategy="loop", normalization=normalization)
      new, out, traced, norms, opt_state = average_jit(out, weights, variables, key, opt_state)
      return new, out, traced, norms, executed, opt_state

  def init(variables: Variables, num_clients: int | None = None) -> ServerState:
    state = init_server(variables, server_optimizer)
    if client_state is None:
      return state
    return state._replace(client_state=cstate.init_table(
        client_state, dict(variables)["params"], num_clients))

  def round_(state: ServerState, clients: Sequence[int], data: FederatedData,
             key: jax.Array) -> tuple[ServerState, RoundOutput]:
    check_key(key)
    client_ids = np.asarray(clients, np.int64).reshape(-1)
    if len(client_ids) == 0 or len(set(client_ids.tolist())) != len(client_ids):
      raise ValueError(f"a round needs distinct client ids, got {client_ids.tolist()}")
    if client_ids.min() < 0 or client_ids.max() >= data.num_clients:
      raise ValueError(f"client ids must lie in [0, {data.num_clients}), got "
                       f"{client_ids.tolist()}")
    if server_optimizer is not None and state.opt_state is None:
      raise ValueError("this algorithm has a server optimizer but the state has no "
                       "opt_state: build the state with algorithm.init(variables) (a "
                       "restored checkpoint must restore ServerState.opt_state too)")
    if client_state is not None and cstate.table_clients(state.client_state) != (
        data.num_clients):
      raise ValueError(f"this algorithm keeps a per-client state: the state's table has "
                       f"{cstate.table_clients(state.client_state)} rows for "
                       f"{data.num_clients} clients; build the state with "
                       f"algorithm.init(variables, num_clients=data.num_clients)")
    # The clients' indices end to end, each its own length (memory and shuffles follow them).
    indices, counts = data.round_slots(client_ids, batch_size)
    weights = np.asarray(aggregation.client_weights(counts, weighting, batch_size), np.float32)
    aggregation.check_weights(weights)
    k = len(counts)
    ids = client_ids.astype(np.int32)
    pad = (-k) % jax.device_count() if strategy == "sharded" else 0
    if pad:  # empty clients with weight 0 leave every rule's aggregate unchanged
      indices = indices.with_empty_clients(pad)
      counts = np.concatenate([counts, np.zeros(pad, counts.dtype)])
      ids = np.concatenate([ids, np.full(pad, -1, np.int32)])
      weights = np.concatenate([weights, np.zeros(pad, np.float32)])
    steps = client_update.num_steps(counts.astype(np.int64))
    lanes = round_lanes(strategy, steps, clients_per_chunk, jax.device_count())
    new, out, traced, norms, executed, opt_state, *table = execute(
        state.variables, data.x, data.y, jax.device_put(indices), jnp.asarray(counts),
        jnp.asarray(ids), key, jnp.asarray(weights), lanes=lanes,
        normalization=data.normalization, opt_state=state.opt_state,
        table=state.client_state)
    table = table[0] if table else state.client_state
    if dp is None or not dp.trace_clean:
      traced = new  # one object, so per-model caches (GlobalEvaluator) see one model
    if pad:
      out = jax.tree.map(lambda leaf: leaf[:k], out)
      norms = None if norms is None else norms[:k]
      weights = weights[:k]
    previous = state if keep_previous else None
    reaggregate = None
    if dp is None:
      base = state if keep_previous else ServerState(new, state.round)  # G_{t-1} unread
      # One function object for every round: a jitted consumer compiles once.
      reaggregate = jax.tree_util.Partial(reaggregate_fn, base.variables, out.variables, key,
                                          base.opt_state,
                                          (out.loss, out.num_examples, out.num_steps))
    return (ServerState(new, state.round + 1, opt_state, table),
            RoundOutput(new, out, client_ids, weights, traced, norms,
                        steps_needed=int(steps.sum()), steps_executed=executed,
                        previous=previous, reaggregate=reaggregate, aggregation=description))

  return FederatedAlgorithm(init, round_, strategy, program, server_update_jit, aggregator,
                            server_optimizer)


def check_transformation(value: Any, name: str, fix: str) -> None:
  """One clear TypeError for an optimizer that is not an optax transformation (a string)."""
  if not (hasattr(value, "init") and hasattr(value, "update")):
    raise TypeError(f"{name} must be an optax GradientTransformation, got "
                    f"{type(value).__name__} {value!r}: use {fix}")


def describe_server(aggregator: Any, server_optimizer: Any, dp: DPSettings | None) -> str:
  """The round's server side in words (`RoundOutput.aggregation`): "mean" only for FedAvg's
  weighted mean without a server optimizer, the one case FedAvg's closed-form removal of a
  client is exact."""
  if dp is not None:
    return "dp_fedavg"
  if aggregator is None:
    rule = "mean"
  else:
    rule = getattr(aggregator, "name", None) or (
        f"custom rule {getattr(aggregator, '__name__', '')}".strip())
  return rule if server_optimizer is None else f"{rule} + server optimizer"


def leave_one_out_variables(output: RoundOutput,
                            clients_per_chunk: int | None = None) -> Variables:
  """`[K, ...]` the round's global model recomputed without each of its K clients: the
  round's own server update (`output.reaggregate`: rule, server optimizer state) with client
  k's weight set to 0, so the leave-one-client-out truth is exact for every rule (for the
  mean without a server optimizer it equals the closed form `counterfactual.remove_client`).

  `clients_per_chunk` computes that many at a time (`lax.map`) to bound memory.

  Raises:
    ValueError: a DP round (its leave-one-out keeps the closed form on the noisy model).
  """
  if output.reaggregate is None:
    raise ValueError("this round has no reaggregate (DP-FedAvg): use the closed form, "
                     "counterfactual.leave_one_out(global_vars=...)")
  weights = jnp.asarray(output.weights, jnp.float32)
  masks = weights[None, :] * (1.0 - jnp.eye(weights.shape[0], dtype=jnp.float32))
  if clients_per_chunk:
    return jax.lax.map(output.reaggregate, masks, batch_size=clients_per_chunk)
  return jax.vmap(output.reaggregate)(masks)
