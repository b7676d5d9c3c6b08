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
compilation. The pieces of a round: its server side and device program in `round_program.py`,
its host side and `RoundOutput` in `host_round.py`; `federated_averaging` assembles them.

Federations over different partitions: `algorithm.program` is positional in the data
(`variables, x, y, indices, counts, client_ids, key, weights`), so F federations of the same K
are one `jax.vmap(algorithm.program, in_axes=(None, None, None, 0, 0, 0, None, 0))` over
stacked `[F, K, M]` index rows, `[F, K]` counts, ids and weights (`data.round_data` of each
partition, padded to one length M); a `[F, K]` weight mask alone (a left-out client has weight
0) needs only `in_axes=(None,) * 7 + (0,)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tracefl_jax.fl import aggregation
from tracefl_jax.fl import client_state as cstate
from tracefl_jax.fl.client import check_local_training, make_client_update
from tracefl_jax.fl.host_round import RoundOutput, make_host_round
from tracefl_jax.fl.hyperparameters import Hyperparameters, learning_rate
from tracefl_jax.fl.losses import LossFn
from tracefl_jax.fl.privacy import DPSettings
from tracefl_jax.fl.qffl import reads_start_loss
from tracefl_jax.fl.robust import AggregationRule
from tracefl_jax.fl.round_program import (make_aggregate, make_loop_program, make_round_program,
                                          make_server_update)
from tracefl_jax.fl.server import ServerState, init_server
from tracefl_jax.fl.strategies import resolve_strategy
from tracefl_jax.fl.types import OptState, PyTree, Stacked, Variables
from tracefl_jax.models.base import ModelDef

Rule = AggregationRule | Callable[[Stacked, jax.Array], PyTree]


class FederatedAlgorithm(NamedTuple):
  """`init(variables, num_clients=None, placement="auto") -> ServerState`; `round(state,
  clients, data, key) -> (state, output)`.

  `strategy` is the resolved client-axis strategy; `program` the jitted round program
  `(variables, x, y, indices, counts, client_ids, key, weights, lanes=None,
  normalization=None, opt_state=None) -> (variables, clients, traced, metrics,
  steps_executed, opt_state)` (`lanes` and `normalization` static; `strategies.round_lanes`
  gives a round's lanes, `data.normalization` its normalization), None for the host-side
  "loop" strategy. With a per-client state it takes `table=` (`[C, ...]`) and returns the
  new table as a seventh value, or, for a host table, `rows=` (`[K, ...]`), `shared=` and
  `num_clients=` and returns `(new rows, new shared)` (`round_program.py`).

  `server_update(variables, client_variables, weights, key, opt_state=None) -> (G_t,
  opt_state)` is the round's server side as a pure function of G_{t-1}, the stacked client
  variables `[K, ...]` and weights `[K]`: the leave-one-client-out model is
  `server_update(..., weights.at[k].set(0), ...)` for every rule (`leave_one_out_variables`).

  `hyperparameters` holds the numbers it was built with (learning rates as pytree leaves
  where the optimizers expose them, `hyperparameters.py`); `optimizer`, `aggregator` and
  `server_optimizer` its pieces.
  """
  init: Callable[..., ServerState]
  round: Callable[..., tuple[ServerState, RoundOutput]]
  strategy: str
  program: Callable[..., tuple] | None
  server_update: Callable[..., tuple[Variables, OptState]] | None = None
  aggregator: Rule | None = None
  server_optimizer: optax.GradientTransformation | None = None
  hyperparameters: Hyperparameters | None = None
  optimizer: optax.GradientTransformation | None = None


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
    compute_dtype: jnp.dtype = jnp.float32,
    donate: bool = False,
    loss_fn: LossFn | None = None,
    aggregator: Rule | None = None,
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
      (`init(variables, num_clients=C, placement="auto"|"device"|"host")`: the table on the
      device, or on the host with only the round's rows on the device, `client_state.py`);
      strategies vmap, chunked and scan.

  A rule that declares `num_steps`, `num_examples` or `losses` keyword parameters gets the
  round's `[K]` values (FedNova: `robust.CLIENT_INFO`); one that declares `start_loss` gets
  each client's objective at G_{t-1}, computed for it alone (q-FFL: `qffl.start_losses`).
  """
  check_local_training(batch_size, local_epochs)
  _check_pieces(optimizer, weighting, batch_size, dp, aggregator, server_optimizer)
  hp = Hyperparameters(learning_rate(optimizer), learning_rate(server_optimizer),
                       batch_size=batch_size, local_epochs=local_epochs, weighting=weighting,
                       clients_per_chunk=clients_per_chunk, dp=dp)
  client_update = make_client_update(model, optimizer, batch_size, local_epochs,
                                     compute_dtype=compute_dtype, loss_fn=loss_fn)
  strategy = resolve_strategy(strategy, jax.eval_shape(model.init, jax.random.key(0)))
  if client_state is not None and (strategy in ("loop", "sharded") or dp is not None):
    raise ValueError(f"client_state runs under the strategies vmap, chunked and scan without "
                     f"DP, not strategy={strategy!r}" + (" with dp" if dp is not None else ""))
  on_updates = aggregator is not None and not (isinstance(aggregator, AggregationRule)
                                               and aggregator.shift_equivariant)
  keep_previous = server_optimizer is not None or on_updates
  aggregate = make_aggregate(aggregator, server_optimizer, dp)
  server_update = make_server_update(aggregate)
  start_loss = reads_start_loss(aggregator)  # q-FFL: the clients' loss at G_{t-1}
  program = None if strategy == "loop" else make_round_program(
      client_update, aggregate, strategy=strategy, clients_per_chunk=clients_per_chunk,
      client_state=client_state, donate=donate and not keep_previous, start_loss=start_loss)
  round_ = make_host_round(
      program or make_loop_program(client_update, aggregate, start_loss), client_update,
      server_update, hp, strategy=strategy, keep_previous=keep_previous,
      needs_opt_state=server_optimizer is not None, client_state=client_state,
      description=describe_server(aggregator, server_optimizer, dp))

  def init(variables: Variables, num_clients: int | None = None,
           placement: str = "auto") -> ServerState:
    state = init_server(variables, server_optimizer)
    if client_state is None:
      return state
    return state._replace(client_state=cstate.init_table(
        client_state, dict(variables)["params"], num_clients, placement, dict(variables)))

  return FederatedAlgorithm(init, round_, strategy, program, server_update, aggregator,
                            server_optimizer, hp, optimizer)


def _check_pieces(optimizer, weighting: str, batch_size: int, dp: DPSettings | None,
                  aggregator, server_optimizer) -> None:
  """Clear errors for pieces of the wrong kind, before anything is traced."""
  check_transformation(optimizer, "optimizer",
                       'optax.adam(lr) or tracefl_jax.fl.client.make_optimizer("adam", lr)')
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


def check_transformation(value: object, name: str, fix: str) -> None:
  """One clear TypeError for an optimizer that is not an optax transformation (a string)."""
  if not (hasattr(value, "init") and hasattr(value, "update")):
    raise TypeError(f"{name} must be an optax GradientTransformation, got "
                    f"{type(value).__name__} {value!r}: use {fix}")


def describe_server(aggregator: Rule | None,
                    server_optimizer: optax.GradientTransformation | None,
                    dp: DPSettings | None) -> str:
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
