"""The device side of a round, built from the algorithm's pieces (`algorithm.py` assembles them).

  make_aggregate      the server side: aggregation rule or DP-FedAvg, then the server optimizer;
  make_server_update  that side as a jitted pure function of the clients' models and weights
                      (`FederatedAlgorithm.server_update`, the leave-one-client-out model);
  make_round_program  local training of every client plus the server side, ONE jitted program
                      (the in-program strategies vmap, chunked, scan, sharded);
  make_loop_program   the same from the host, one jitted program per client ("loop").

A round program is positional in the data, `(variables, x, y, indices, counts, client_ids, key,
weights, lanes=None, normalization=None, opt_state=None, table=None, max_steps=None,
rows=None, shared=None, num_clients=None) -> (G_t, clients, traced, metrics, steps_executed,
opt_state[, table])`, so federations vmap over it (`federation.py` scans it over rounds).
A per-client state on the device comes in as `table` (`[C, ...]`) and goes out as the new
table; one on the host (`client_state.HostTable`) comes in as the round's `rows` (`[K, ...]`),
its `shared` value and `num_clients` (C), and goes out as `(new rows, new shared)`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tracefl_jax.fl import client_state as cstate
from tracefl_jax.fl import privacy, qffl
from tracefl_jax.fl.client import ClientOutput, ClientUpdate
from tracefl_jax.fl.privacy import DPSettings
from tracefl_jax.fl.robust import aggregate_models
from tracefl_jax.fl.server import server_step
from tracefl_jax.fl.strategies import fold_client_keys, simulate_clients_with_steps
from tracefl_jax.fl.types import Metrics, OptState, PRNGKey, Stacked, Variables

# Client keys fold in client ids (< 2**31 - 1); the DP noise key folds in a value no id takes.
_DP_NOISE_STREAM = 2**31 - 1


class ServerSide(NamedTuple):
  """What the server side of a round gives."""
  variables: Variables    # G_t
  traced: Variables       # the model provenance explains: G_t, or DP's pre-noise aggregate
  metrics: Metrics        # {"dp_update_norm": [K]} under DP, else {}
  opt_state: OptState     # the server optimizer's state after the round


Aggregate = Callable[[ClientOutput, jax.Array, Variables, PRNGKey, OptState], ServerSide]


def make_aggregate(aggregator, server_optimizer, dp: DPSettings | None) -> Aggregate:
  """`aggregate(clients, weights [K], G_{t-1}, key, opt_state) -> ServerSide`."""

  def aggregate(out, weights, previous, key, opt_state):
    if dp is None:
      info = None if out.num_steps is None else {
          "num_steps": out.num_steps, "num_examples": out.num_examples, "losses": out.loss}
      if info is not None and out.start_loss is not None:
        info["start_loss"] = out.start_loss
      agg = aggregate_models(aggregator, out.variables, weights, previous, info)
      clean, metrics = agg, {}
    else:
      collections = ("params", "batch_stats") if dp.noise_batch_stats else ("params",)
      dp_agg = privacy.dp_fedavg(
          out.variables, weights, previous, jax.random.fold_in(key, _DP_NOISE_STREAM),
          clip_norm=dp.clip_norm, noise_multiplier=dp.noise_multiplier,
          clients_per_round=dp.clients_per_round, collections=collections)
      agg, clean, metrics = dp_agg.noisy, dp_agg.clean, {"dp_update_norm": dp_agg.update_norms}
    new, opt_state = server_step(server_optimizer, previous, agg, opt_state)
    traced = clean if dp is not None and dp.trace_clean else new
    return ServerSide(new, traced, metrics, opt_state)

  return aggregate


def make_server_update(aggregate: Aggregate) -> Callable[..., tuple[Variables, OptState]]:
  """Jitted `server_update(G_{t-1}, client_variables [K, ...], weights [K], key,
  opt_state=None, client_info=None) -> (G_t, opt_state)`; `client_info` is the clients'
  `(losses, num_examples, num_steps[, start_loss])` `[K]`, for rules that read them."""

  def server_update(variables, client_variables, weights, key, opt_state=None,
                    client_info=None):
    out = ClientOutput(client_variables, *(client_info or (None, None, None)))
    side = aggregate(out, jnp.asarray(weights, jnp.float32), variables, key, opt_state)
    return side.variables, side.opt_state

  return jax.jit(server_update)


def make_round_program(client_update: ClientUpdate, aggregate: Aggregate, *, strategy: str,
                       clients_per_chunk: int, client_state: cstate.ClientStatePiece | None,
                       donate: bool, start_loss: bool = False) -> Callable[..., tuple]:
  """The jitted round program of an in-program strategy (module docstring); with a
  `client_state` it takes the table (or a host table's rows) and returns the new one (rows) as
  a seventh value. `max_steps`
  (static, "scan" only) caps each client's scanned local loop (`strategies`). `start_loss`:
  the clients' objective at G_{t-1} (`qffl.start_losses`) is computed for the rule."""

  def program(variables, x, y, indices, counts, client_ids, key, weights, lanes=None,
              normalization=None, opt_state=None, table=None, max_steps=None, rows=None,
              shared=None, num_clients=None):
    keys = fold_client_keys(key, client_ids)
    if client_state is None:
      contexts = None
    elif rows is not None:  # a host table: the round's rows only
      contexts = cstate.ClientContext(rows, shared, client_ids)
    else:
      contexts = cstate.gather(client_state, table, client_ids, variables)
    out, executed = simulate_clients_with_steps(
        client_update, variables, x, y, indices, counts, keys, strategy=strategy,
        clients_per_chunk=clients_per_chunk, lanes=lanes, normalization=normalization,
        contexts=contexts, max_steps=max_steps)
    if start_loss:
      out = out._replace(start_loss=qffl.start_losses(
          client_update, variables, x, y, indices, counts, keys, normalization=normalization,
          one_at_a_time=strategy == "scan"))
    side = aggregate(out, weights, variables, key, opt_state)
    result = side.variables, out, side.traced, side.metrics, executed, side.opt_state
    if client_state is None:
      return result
    contexts = cstate.run_local(client_state, client_update, variables, x, y, indices, counts,
                                keys, contexts, normalization)
    if rows is not None:
      return (*result, cstate.finish_host_rows(client_state, contexts, rows, variables["params"],
                                               out.variables["params"], out.num_steps,
                                               num_clients))
    return (*result, cstate.scatter(client_state, table, contexts, variables["params"],
                                    out.variables["params"], out.num_steps, weights))

  return jax.jit(program, donate_argnums=(0,) if donate else (),
                 static_argnames=("lanes", "normalization", "max_steps"))


def make_loop_program(client_update: ClientUpdate, aggregate: Aggregate,
                      start_loss: bool = False) -> Callable[..., tuple]:
  """The "loop" strategy's round: clients dispatched one by one from the host (each its own
  jitted program), then the jitted server side; the round program's arguments and results."""
  aggregate_jit = jax.jit(aggregate)
  keys_fn = jax.jit(fold_client_keys)
  losses_jit = jax.jit(functools.partial(qffl.start_losses, client_update),
                       static_argnames="normalization")

  def execute(variables, x, y, indices, counts, client_ids, key, weights, lanes=None,
              normalization=None, opt_state=None, table=None):
    del lanes, table  # one client at a time; no per-client state under "loop"
    out, executed = simulate_clients_with_steps(
        client_update, variables, x, y, indices, counts, keys_fn(key, client_ids),
        strategy="loop", normalization=normalization)
    if start_loss:
      out = out._replace(start_loss=losses_jit(variables, x, y, indices, counts,
                                               keys_fn(key, client_ids),
                                               normalization=normalization))
    side = aggregate_jit(out, weights, variables, key, opt_state)
    return side.variables, out, side.traced, side.metrics, executed, side.opt_state

  return execute
