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
  """
  init: Callable[[Any], Any]
  finish: Callable[..., Any]
  shared: Callable[[Any, Any], Any] | None = None
  server: Callable[..., Any] | None = None


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
