"""Per-client state: a `[C, ...]` table the round gathers, hands to its clients, scatters back.

Algorithms whose clients remember something between rounds (SCAFFOLD's control variates,
FedDyn's gradients, Ditto's personal models) keep it in one table beside the global model,
`ServerState.client_state` (any pytree, every leaf `[C, ...]`, checkpointed with the state):

  round t, clients ids [K]:
    rows    = table[ids]                        gathered by global id, `[K, ...]`
    shared  = piece.shared(table, G_{t-1})      one value every client sees (SCAFFOLD's c)
    client k trains with `client=ClientContext(rows[k], shared, ids[k])` passed to its
             objective: `loss_fn(..., global_params, client=...)` (only objectives that
             declare a `client` parameter get it)
    rows[k] = piece.local(ClientContext(rows[k], shared, ids[k]), G variables, train)
             optional, the client's own extra work on its data (Ditto's personal model):
             `train(update, start_variables)` runs a `ClientUpdate` over the client's batches
             of the round from `start_variables`, anchored at G's params
    new_k   = piece.finish(ClientContext(rows[k], shared, ids[k]), G params, theta_k params,
                           num_steps_k)
    table   = piece.server(table, ids, new rows [K, ...], weights [K])   default: scatter

Clients not sampled keep their rows; nothing is copied into the client models, so aggregation,
provenance and the stored round see the models alone. The table lives on the device with the
round program (a host-resident table for very large C is not implemented yet).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class ClientContext(NamedTuple):
  """What one client knows of the state during its round (no client axis)."""
  state: Any             # the client's row of the table, leaves `[...]`
  shared: Any            # the round's shared value (`ClientStatePiece.shared`), or None
  client_id: jax.Array   # int32, the client's global id


class ClientStatePiece(NamedTuple):
  """A per-client state, as pure functions (module docstring).

  init:    `(params) -> row`, one client's initial row from G_0's params (the table is it
           broadcast to `[C, ...]`).
  finish:  `(client: ClientContext, global_params, params, num_steps) -> new row`: after the
           client's local training (`params` its trained params, `num_steps` int32 steps).
  shared:  `(table [C, ...], variables) -> value` every client of the round sees; None: none.
  server:  `(table [C, ...], ids [K], rows [K, ...], weights [K]) -> table`, the server's
           write of the round's rows; None: scatter them (`table.at[ids].set(rows)`).
  local:   `(client: ClientContext, variables, train) -> row`, or None: after local training
           and before `finish` (which sees its result as `client.state`), work on the
           client's own data: `train(update, start_variables) -> ClientOutput` runs the
           `ClientUpdate` `update` (the round's batch size and epochs, its own objective and
           optimizer) over the batches local training read, from `start_variables`, with G's
           params as the objective's `global_params`. Clients run one at a time (`lax.map`).
  """
  init: Callable[[Any], Any]
  finish: Callable[..., Any]
  shared: Callable[[Any, Any], Any] | None = None
  server: Callable[..., Any] | None = None
  local: Callable[..., Any] | None = None


def init_table(piece: ClientStatePiece, params: Any, num_clients: int) -> Any:
  """`[C, ...]` every client's initial row."""
  if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
    raise ValueError(f"a per-client state needs num_clients (a positive int, the "
                     f"federation's C): algorithm.init(variables, num_clients=C), got "
                     f"{num_clients!r}")
  row = piece.init(params)
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients, *jnp.shape(a))), row)


def gather(piece: ClientStatePiece, table: Any, ids: jax.Array,
           variables: Any) -> ClientContext:
  """The round's contexts: rows `[K, ...]` of `ids [K]`, the shared value, the ids."""
  rows = jax.tree.map(lambda a: a[ids], table)
  shared = None if piece.shared is None else piece.shared(table, variables)
  return ClientContext(rows, shared, ids)


def run_local(piece: ClientStatePiece, client_update: Any, variables: Any, x: jax.Array,
              y: jax.Array, slots: Any, counts: jax.Array, keys: jax.Array,
              contexts: ClientContext, normalization: Any = None) -> ClientContext:
  """The contexts with each client's row replaced by `piece.local`'s (unchanged without it).
  `slots`, `counts [K]`, `keys [K]`: the round's, as its local training got them, so the
  round's schedule (`ClientUpdate.schedule_slots`) is laid out again, the same batches."""
  if piece.local is None:
    return contexts
  from tracefl_jax.data.federated import ClientSlots  # pylint: disable=g-import-not-at-top
  slots = slots if hasattr(slots, "offsets") else ClientSlots.from_rows(slots)
  batches, step_keys = client_update.schedule_slots(slots, counts, keys)
  anchor = variables["params"]

  def one(args):
    row, client_id, c, count = args

    def train(update, start):
      if (update.batch_size, update.local_epochs) != (client_update.batch_size,
                                                      client_update.local_epochs):
        raise ValueError(f"a client-state piece's update runs over the round's batches: it "
                         f"needs batch_size={client_update.batch_size} and local_epochs="
                         f"{client_update.local_epochs}, got {update.batch_size}, "
                         f"{update.local_epochs}")
      return update.train(start, x, y, batches, step_keys, slots.offsets, c, count,
                          normalization, anchor=anchor)
    return piece.local(ClientContext(row, contexts.shared, client_id), variables, train)

  k = counts.shape[0]
  rows = jax.lax.map(one, (contexts.state, contexts.client_id, jnp.arange(k, dtype=jnp.int32),
                           counts.astype(jnp.int32)))
  return contexts._replace(state=rows)


def scatter(piece: ClientStatePiece, table: Any, contexts: ClientContext, global_params: Any,
            client_params: Any, num_steps: jax.Array, weights: jax.Array) -> Any:
  """The table after the round: every client's `finish`, then the server's write."""
  finish = jax.vmap(piece.finish, in_axes=(ClientContext(0, None, 0), None, 0, 0))
  rows = finish(contexts, global_params, client_params, num_steps)
  if piece.server is not None:
    return piece.server(table, contexts.client_id, rows, weights)
  return jax.tree.map(lambda t, r: t.at[contexts.client_id].set(r.astype(t.dtype)), table,
                      rows)


def table_clients(table: Any) -> int | None:
  """C of a table (its leaves' leading axis), None without one."""
  leaves = jax.tree.leaves(table)
  return None if not leaves else int(leaves[0].shape[0])
