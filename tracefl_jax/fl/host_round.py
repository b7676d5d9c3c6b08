"""The host side of a round: its checks, the round's data laid out, the round program called,
and what it produced gathered into a `RoundOutput` (`algorithm.py` assembles the round)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.data.federated import FederatedData
from tracefl_jax.fl import aggregation
from tracefl_jax.fl import client_state as cstate
from tracefl_jax.fl.client import ClientOutput, ClientUpdate
from tracefl_jax.fl.hyperparameters import Hyperparameters
from tracefl_jax.fl.server import ServerState
from tracefl_jax.fl.strategies import round_lanes
from tracefl_jax.fl.types import Metrics, OptState, PRNGKey, Stacked, Variables


class RoundOutput(NamedTuple):
  """Everything one round produced (client-indexed fields stacked `[K, ...]`)."""
  variables: Variables     # the new global model G_t, which training continues from
  clients: ClientOutput    # the round's client models, losses, example and step counts
  client_ids: np.ndarray   # [K] global ids of the round's clients, in the round's order
  weights: np.ndarray      # [K] aggregation weights
  traced: Variables        # the model provenance explains (G_t, or DP's pre-noise aggregate
                           # in the original's parity mode)
  metrics: Metrics | None = None  # the round's named measurements: "dp_update_norm" [K]
                                  # (client update norms before clipping) under DP
  steps_needed: int = 0    # optimizer steps the clients need: sum of epochs * ceil(n_k / B)
  steps_executed: jax.Array | int = 0  # int32 scalar, steps computed (idle lanes included)
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
  traces_global: bool = True  # `traced` is G_t (False: DP's pre-noise aggregate)

  @property
  def closed_form_exact(self) -> bool:
    """FedAvg's closed form G_{-k} = (W G - w_k theta_k) / (W - w_k) is this round's own
    leave-one-client-out model: the weighted mean with no server optimizer and no DP."""
    return self.aggregation == "mean"


def check_key(key: PRNGKey, name: str = "key") -> None:
  """One clear error for a `key` that is not a JAX PRNG key (e.g. `key=1`)."""
  ok = isinstance(key, jax.Array) and (
      jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
      or key.dtype == jnp.uint32 and key.shape == (2,))
  if not ok:
    what = f"{type(key).__name__} {key!r}" if not isinstance(key, jax.Array) else (
        f"an array of dtype {key.dtype} and shape {key.shape}")
    raise TypeError(f"{name} must be one JAX PRNG key, jax.random.key(seed) (or a legacy "
                    f"jax.random.PRNGKey), got {what}")


def check_round(state: ServerState, client_ids: np.ndarray, data: FederatedData, *,
                needs_opt_state: bool, client_state: cstate.ClientStatePiece | None) -> None:
  """The round's arguments against the algorithm, before anything is compiled."""
  if len(client_ids) == 0 or len(set(client_ids.tolist())) != len(client_ids):
    raise ValueError(f"a round needs distinct client ids, got {client_ids.tolist()}")
  if client_ids.min() < 0 or client_ids.max() >= data.num_clients:
    raise ValueError(f"client ids must lie in [0, {data.num_clients}), got "
                     f"{client_ids.tolist()}")
  if needs_opt_state and state.opt_state is None:
    raise ValueError("this algorithm has a server optimizer but the state has no "
                     "opt_state: build the state with algorithm.init(variables) (a "
                     "restored checkpoint must restore ServerState.opt_state too)")
  rows = cstate.table_clients(state.client_state)
  if client_state is not None and rows != data.num_clients:
    raise ValueError(f"this algorithm keeps a per-client state: the state's table has "
                     f"{rows} rows for {data.num_clients} clients; build the state with "
                     f"algorithm.init(variables, num_clients=data.num_clients)")


class RoundData(NamedTuple):
  """A round's clients laid out for the program (host NumPy)."""
  indices: object          # their `ClientSlots`
  counts: np.ndarray       # [K'] example counts
  ids: np.ndarray          # [K'] int32 global ids (-1: padding)
  weights: np.ndarray      # [K'] float32 aggregation weights


def lay_out(data: FederatedData, client_ids: np.ndarray, hp: Hyperparameters,
            pad: Callable[[int], int]) -> RoundData:
  """The clients' indices end to end (each its own length), counts, ids and weights, with
  `pad(K)` empty clients of weight 0 after them (they leave every rule's aggregate as it is)."""
  indices, counts = data.round_slots(client_ids, hp.batch_size)
  weights = np.asarray(aggregation.client_weights(counts, hp.weighting, hp.batch_size),
                       np.float32)
  aggregation.check_weights(weights)
  rd = RoundData(indices, counts, client_ids.astype(np.int32), weights)
  n = pad(len(counts))
  if not n:
    return rd
  return RoundData(rd.indices.with_empty_clients(n),
                   np.concatenate([rd.counts, np.zeros(n, rd.counts.dtype)]),
                   np.concatenate([rd.ids, np.full(n, -1, np.int32)]),
                   np.concatenate([rd.weights, np.zeros(n, np.float32)]))


def make_host_round(program: Callable[..., tuple], client_update: ClientUpdate,
                    server_update: Callable[..., tuple[Variables, OptState]],
                    hp: Hyperparameters, *, strategy: str, keep_previous: bool,
                    needs_opt_state: bool, client_state: cstate.ClientStatePiece | None,
                    description: str) -> Callable[..., tuple[ServerState, RoundOutput]]:
  """`round(state, clients, data, key) -> (state, RoundOutput)` around a round program."""
  trace_clean = hp.dp is not None and hp.dp.trace_clean

  def reaggregate_fn(previous, client_variables, key, opt_state, client_info, weights):
    return server_update(previous, client_variables, weights, key, opt_state, client_info)[0]

  def pad(k: int) -> int:
    return (-k) % jax.device_count() if strategy == "sharded" else 0

  def round_(state: ServerState, clients: Sequence[int], data: FederatedData,
             key: PRNGKey) -> tuple[ServerState, RoundOutput]:
    check_key(key)
    client_ids = np.asarray(clients, np.int64).reshape(-1)
    check_round(state, client_ids, data, needs_opt_state=needs_opt_state,
                client_state=client_state)
    rd, k = lay_out(data, client_ids, hp, pad), len(client_ids)
    steps = client_update.num_steps(rd.counts.astype(np.int64))
    lanes = round_lanes(strategy, steps, hp.clients_per_chunk, jax.device_count())
    x, y, indices = data.round_inputs(rd.indices)  # host placement: this round's examples
    host = isinstance(state.client_state, cstate.HostTable)
    table_args = {"table": state.client_state}
    if host:  # the round's rows only; the table stays on the host
      rows, shared = cstate.host_rows(state.client_state, rd.ids)
      table_args = {"rows": rows, "shared": shared,
                    "num_clients": jnp.int32(data.num_clients)}
    new, out, traced, metrics, executed, opt_state, *table = program(
        state.variables, x, y, jax.device_put(indices), jnp.asarray(rd.counts),
        jnp.asarray(rd.ids), key, jnp.asarray(rd.weights), lanes=lanes,
        normalization=data.normalization, opt_state=state.opt_state, **table_args)
    if host:  # the host scatter: the new rows written into the table in place
      table = [cstate.write_host_rows(state.client_state, rd.ids, *table[0])]
    traced = traced if trace_clean else new
    weights = rd.weights[:k]
    if len(rd.counts) > k:
      out, metrics = jax.tree.map(lambda leaf: leaf[:k], (out, metrics))
    reaggregate = None
    if hp.dp is None:
      base = state if keep_previous else ServerState(new, state.round)  # G_{t-1} unread
      # One function object for every round: a jitted consumer compiles once.
      reaggregate = jax.tree_util.Partial(reaggregate_fn, base.variables, out.variables, key,
                                          base.opt_state,
                                          (out.loss, out.num_examples, out.num_steps,
                                           out.start_loss))
    return (ServerState(new, state.round + 1, opt_state,
                        table[0] if table else state.client_state),
            RoundOutput(new, out, client_ids, weights, traced, metrics,
                        steps_needed=int(steps.sum()), steps_executed=executed,
                        previous=state if keep_previous else None, reaggregate=reaggregate,
                        aggregation=description, traces_global=not trace_clean))

  return round_
