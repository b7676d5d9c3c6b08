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
provenance and the stored round see the models alone.

Where the table lives (`init_table(..., placement=)`, `algorithm.init(..., placement=)`):
  "device"  a pytree of `[C, ...]` device arrays, an argument and a result of the round
            program (gathered and scattered inside it);
  "host"    a `HostTable`: the rows in host NumPy arrays, updated in place. The host gathers
            the round's K rows, the program takes and returns `[K, ...]` rows only, the host
            writes them back. The shared value is kept beside the rows (`HostTable.shared`)
            and moved by `piece.shared_update` from the round's old and new rows, so the
            program never sees the whole table (SCAFFOLD: c += (sum new - sum old) / C).
  "auto"    "host" where the table's bytes exceed `HOST_FRACTION` of the device's free
            memory, "device" otherwise: always on the CPU backend (its device memory is host
            memory), inside a trace (`federation.py`), and for a piece that cannot keep its
            shared value on the host (a `shared` without `shared_update`, or a `server`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PLACEMENTS = ("auto", "device", "host")
# "auto" puts the table on the host when it would take more than this share of the device's
# free memory: the round's client models, optimizer states and activations need the rest.
HOST_FRACTION = 0.25


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
           Device tables only.
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
  shared_update: Callable[..., Any] | None = None
  # `(shared, old_rows [K, ...], new_rows [K, ...], num_clients) -> shared`: the shared value
  # after the round's rows changed, without the table (a host table needs it with `shared`).


class HostTable(NamedTuple):
  """A per-client table on the host (module docstring): `rows` a pytree of NumPy arrays, every
  leaf `[C, ...]`, written in place by each round (the state a round started from shares
  them); `shared` the piece's shared value as of these rows (device arrays), or None."""
  rows: Any
  shared: Any = None


def table_rows(table: Any) -> Any:
  """The `[C, ...]` rows of a device table or a `HostTable`."""
  return table.rows if isinstance(table, HostTable) else table


def host_ready(piece: ClientStatePiece) -> str | None:
  """Why `piece`'s table cannot live on the host, or None."""
  if piece.server is not None:
    return "its `server` hook reads and writes the whole table"
  if piece.shared is not None and piece.shared_update is None:
    return "its shared value reads the whole table (give the piece a `shared_update`)"
  return None


def resolve_placement(piece: ClientStatePiece, row: Any, num_clients: int,
                      placement: str) -> str:
  """`placement` ("auto" | "device" | "host") resolved for a table of `num_clients` rows like
  `row` (module docstring has the rule)."""
  if not isinstance(placement, str) or placement not in PLACEMENTS:
    raise ValueError(f"client-state placement={placement!r}; valid: "
                     f"{', '.join(map(repr, PLACEMENTS))}")
  why = host_ready(piece)
  if placement == "host" and why:
    raise ValueError(f"this client state cannot live on the host: {why}; use "
                     f"placement='device'")
  if placement != "auto":
    return placement
  leaves = jax.tree.leaves(row)
  if why or jax.default_backend() == "cpu" or any(isinstance(a, jax.core.Tracer)
                                                  for a in leaves):
    return "device"
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    return "device"
  free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  nbytes = num_clients * sum(np.size(a) * np.dtype(a.dtype).itemsize for a in leaves)
  return "host" if nbytes > HOST_FRACTION * free else "device"


def init_table(piece: ClientStatePiece, params: Any, num_clients: int,
               placement: str = "auto", variables: Any = None) -> Any:
  """Every client's initial row: a `[C, ...]` device table, or a `HostTable` (`placement`,
  module docstring); `variables` (G_0) for the host table's first shared value."""
  if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
    raise ValueError(f"a per-client state needs num_clients (a positive int, the "
                     f"federation's C): algorithm.init(variables, num_clients=C), got "
                     f"{num_clients!r}")
  row = piece.init(params)
  if resolve_placement(piece, row, num_clients, placement) == "device":
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients, *jnp.shape(a))), row)
  rows = jax.tree.map(lambda a: np.tile(np.asarray(a)[None], (num_clients,) + (1,) * np.ndim(a)),
                      row)
  # Every row is the same: the shared value of the table is the piece's over one row of it.
  shared = None if piece.shared is None else piece.shared(
      jax.tree.map(lambda a: jnp.asarray(a)[None], row),
      {"params": params} if variables is None else variables)
  return HostTable(rows, shared)


def host_rows(table: HostTable, ids: np.ndarray) -> tuple[Any, Any]:
  """A host table's round rows `[K, ...]` of `ids [K]` on the device, and its shared value."""
  return jax.device_put(jax.tree.map(lambda a: a[ids], table.rows)), table.shared


def write_host_rows(table: HostTable, ids: np.ndarray, rows: Any, shared: Any) -> HostTable:
  """`table` with the round's new rows `[K, ...]` written into its NumPy rows in place (the
  host scatter) and the round's new shared value."""
  def write(t, r):
    t[ids] = np.asarray(r).astype(t.dtype, copy=False)
  jax.tree.map(write, table.rows, rows)
  return HostTable(table.rows, shared)


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


def finish_rows(piece: ClientStatePiece, contexts: ClientContext, global_params: Any,
                client_params: Any, num_steps: jax.Array) -> Any:
  """The round's new rows `[K, ...]`: every client's `finish`."""
  finish = jax.vmap(piece.finish, in_axes=(ClientContext(0, None, 0), None, 0, 0))
  return finish(contexts, global_params, client_params, num_steps)


def finish_host_rows(piece: ClientStatePiece, contexts: ClientContext, old_rows: Any,
                     global_params: Any, client_params: Any, num_steps: jax.Array,
                     num_clients: jax.Array) -> tuple[Any, Any]:
  """A host table's round inside the program: `(new rows [K, ...], new shared)`, the shared
  value moved by `piece.shared_update` from the round's rows before (`old_rows`, as gathered)
  and after."""
  rows = finish_rows(piece, contexts, global_params, client_params, num_steps)
  shared = contexts.shared
  if piece.shared_update is not None:
    shared = piece.shared_update(shared, old_rows, rows, num_clients)
  return rows, shared


def scatter(piece: ClientStatePiece, table: Any, contexts: ClientContext, global_params: Any,
            client_params: Any, num_steps: jax.Array, weights: jax.Array) -> Any:
  """The table after the round: every client's `finish`, then the server's write."""
  rows = finish_rows(piece, contexts, global_params, client_params, num_steps)
  if piece.server is not None:
    return piece.server(table, contexts.client_id, rows, weights)
  return jax.tree.map(lambda t, r: t.at[contexts.client_id].set(r.astype(t.dtype)), table,
                      rows)


def table_clients(table: Any) -> int | None:
  """C of a table (its leaves' leading axis), None without one."""
  leaves = jax.tree.leaves(table_rows(table))
  return None if not leaves else int(leaves[0].shape[0])
