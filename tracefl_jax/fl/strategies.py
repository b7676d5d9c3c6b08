"""The one place the client axis is added: K clients' local training as one call.

Strategies (one API, chosen per backend by measurement; see benchmarks/bench_round.py):
  "vmap"     clients packed into vmapped lanes (below), as many lanes as keep them busy;
  "chunked"  the same with `clients_per_chunk` lanes: memory bounded by the lanes, not by K;
  "scan"     `lax.map` one client at a time inside one compiled program;
  "loop"     a host Python loop dispatching one jitted single-client program per client
             (asynchronous dispatch, no host sync), results stacked on device.
  "sharded"  the clients dealt over all devices (a 1-D `jax.sharding.Mesh` named "clients",
             `shard_map`), each device packing its share into its own lanes; K must be a
             multiple of the device count (the server pads with empty, zero-weight clients).
  "auto"     "scan" on CPU for models with convolutions (XLA lowers per-client convolutions
             under vmap to grouped convolutions, slower there), else "vmap"; the measurements
             are in benchmarks/README.md, "One federated round".

Cost follows the clients' own sizes. The in-program strategies lay the round out once
(`ClientUpdate.schedule_slots`: one sort of the round's `ClientSlots`, each client its own
length) and every client reads its batches from it; the `[K, M]` row layout is accepted as
slots at `offsets = k * M`. One client of 100,000 examples among 1,000 of 64 costs its own
steps, not K rows of its length (benchmarks/bench_populations.py).

No work on padding. Under "scan" and "loop" a client runs `client_update`'s loop, which
runs exactly the client's own steps. Vmapped clients cannot do that (a batched trip count runs
every lane to the largest; a batched `cond` runs both branches), so "vmap", "chunked" and
"sharded" pack clients into W lanes, a work queue (`fl/packing.py`): the round's clients
sorted by step count, longest first, each lane training one client at a time and taking the
next from the queue when its client is done (longest-processing-time scheduling). The only
steps computed for nothing are idle lanes in the last iterations: `steps_executed = W *
iterations` against `steps_needed = sum of the clients' own steps`, and `packed_steps`
computes the same count from the sizes alone. The lane loop follows the client's
`local_loop`: a fixed-trip scan ("scan", the default: reverse mode crosses it) or a while
loop ("while"), the same numbers. W is static (one compiled program per W); `auto_lanes`
picks, from the round's step counts, the most lanes that compute at most 1.1x the needed
steps, among 1, 2, 3, 4, 6, 8, 12, ... and K, so a run compiles a handful of programs at most
(the step ratios on a paper-shaped partition: benchmarks/README.md, "Uneven clients").

Every strategy computes the same numbers: each client's work is `client_update` on its own
indices, count and key, whichever lane or device runs it; the equality is tested against a
plain Python loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.data.base import Normalization
from tracefl_jax.data.federated import ClientSlots, bucket_length
from tracefl_jax.fl.client import ClientOutput, ClientUpdate, ClientUpdateFn
from tracefl_jax.fl.client_state import ClientContext
# The lane plans are host-side NumPy (lanes.py), importable beside the strategies using them.
from tracefl_jax.fl.lanes import (LANE_EFFICIENCY, PACKED, _deal_ranks,  # noqa: F401
                                  auto_lanes, executed_steps, packed_steps, round_lanes)
from tracefl_jax.fl.packing import context_row, pack
from tracefl_jax.fl.types import Stacked, Variables

STRATEGIES = ("auto", "vmap", "chunked", "scan", "loop", "sharded")
CLIENT_AXIS = "clients"


def client_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: all) whose axis is the client axis."""
  devices = devices if devices is not None else jax.devices()
  return jax.sharding.Mesh(np.asarray(devices), (CLIENT_AXIS,))


def _shard_clients(tree: Stacked, mesh: jax.sharding.Mesh) -> Stacked:
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(CLIENT_AXIS))
  return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)


def _has_conv(variables: Variables) -> bool:
  return any(getattr(leaf, "ndim", 0) == 4 for leaf in jax.tree.leaves(variables["params"]))


def resolve_strategy(strategy: str, variables: Variables, backend: str | None = None) -> str:
  """Maps "auto" to a concrete strategy for this backend and model; validates the name."""
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown client strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
  if strategy != "auto":
    return strategy
  backend = backend or jax.default_backend()
  if backend == "cpu" and _has_conv(variables):
    return "scan"
  return "vmap"


# -------------------------------------------------------------------------- entry points

def simulate_clients_with_steps(
    client_update: ClientUpdateFn,
    variables: Variables,
    x: jax.Array,
    y: jax.Array,
    indices: ClientSlots | jax.Array,
    counts: jax.Array,
    keys: jax.Array,
    *,
    strategy: str = "vmap",
    clients_per_chunk: int = 0,
    lanes: int | None = None,
    normalization: Normalization | None = None,
    contexts: ClientContext | None = None,
    max_steps: int | None = None,
) -> tuple[ClientOutput, jax.Array]:
  """`simulate_clients`, plus the optimizer steps computed (int32 scalar): the clients' own
  steps under "scan" and "loop", `lanes * iterations` (idle lanes included) when packed.

  `contexts`: the round's `client_state.ClientContext` (state rows `[K, ...]`, the shared
  value, ids `[K]`) for a stateful objective, or None; "vmap", "chunked" and "scan" only.
  `max_steps` (static): a cap on any client's steps for the scanned loops: each client's
  under "scan" (`ClientUpdate.train`), the lane loop's trip bound under the packed
  strategies (`packing.pack_trips`); default the steps of all the round's slots. Where the
  counts are batched (a vmap over federations) every client (lane) runs to the bound, so
  `num_steps` of the federation's largest client keeps the work at one client's
  (`fl/federation.py`). No client may take more steps than the cap."""
  strategy = resolve_strategy(strategy, variables)
  if contexts is not None and (strategy in ("loop", "sharded")
                               or not isinstance(client_update, ClientUpdate)):
    raise ValueError(f"client state (fl.client_state) runs under the strategies vmap, "
                     f"chunked and scan with a ClientUpdate, not {strategy!r}")
  k = counts.shape[0]
  slots = isinstance(indices, ClientSlots)
  if normalization is not None and not isinstance(client_update, ClientUpdate):
    raise ValueError("a normalization needs a ClientUpdate (make_client_update), which "
                     "normalises each batch it gathers; a plain client function gets x as "
                     "it is: normalise x first")
  if slots and not isinstance(client_update, ClientUpdate):
    raise ValueError("ClientSlots need a ClientUpdate (make_client_update), which reads its "
                     "batches from them; give a plain client function [K, M] index rows")
  extra = {} if normalization is None else {"normalization": normalization}
  one = functools.partial(client_update, variables, x, y, **extra)
  if not isinstance(client_update, ClientUpdate):
    if strategy in PACKED:
      # A plain function has no pieces to pack: one vmap, every lane to the longest client.
      out = jax.vmap(one)(indices, counts, keys)
      return out, k * jnp.max(out.num_steps, initial=0)
    if strategy == "scan":
      out = jax.lax.map(lambda a: one(*a), (indices, counts, keys))
      return out, jnp.sum(out.num_steps)
  if strategy == "loop":
    return _loop(client_update, variables, x, y, indices, counts, keys, extra)
  # Every in-program strategy: the round's epochs shuffled at once over its T slots.
  offsets = indices.offsets if slots else ClientSlots.from_rows(indices).offsets
  schedule = client_update.schedule_slots(indices, counts, keys)
  if strategy in ("vmap", "chunked"):
    if lanes is None:
      lanes = k if strategy == "vmap" else (clients_per_chunk or k)
    lanes = max(1, min(int(lanes), k))
    out, iters = pack(client_update, variables, x, y, schedule, offsets, counts, lanes,
                      normalization, contexts, max_steps)
    return out, iters * lanes
  if strategy == "sharded":
    mesh = client_mesh()
    if k % mesh.size:
      raise ValueError(f"sharded strategy: {k} clients do not divide over {mesh.size} "
                       f"devices; pad the round (federated_averaging's round does)")
    per = k // mesh.size
    lanes = max(1, min(int(lanes or per), per))
    # Deal the clients over the devices by size (balanced work), pack each device's share;
    # the laid-out round is replicated, each device reads its own clients' slots.
    order = jnp.argsort(-client_update.num_steps(counts.astype(jnp.int32)), stable=True)
    perm = order[jnp.asarray(_deal_ranks(k, mesh.size))]
    spec = jax.sharding.PartitionSpec(CLIENT_AXIS)
    rep = jax.sharding.PartitionSpec()

    def local(variables, x, y, batches, step_keys, offsets, counts):
      out, iters = pack(client_update, variables, x, y, (batches, step_keys), offsets,
                        counts, lanes, normalization, max_steps=max_steps)
      return out, iters[None]

    batches, step_keys = schedule
    out, iters = jax.shard_map(
        local, mesh=mesh, in_specs=(rep, rep, rep, rep, spec, spec, spec),
        out_specs=(spec, spec), check_vma=False)(
            variables, x, y, batches, step_keys[perm], offsets[perm], counts[perm])
    out = jax.tree.map(lambda a: a[jnp.argsort(perm)], out)
    return _shard_clients(out, mesh), jnp.sum(iters) * lanes
  # "scan": one client at a time, each its own steps, from the shared laid-out round.
  batches, step_keys = schedule
  out = jax.lax.map(
      lambda a: client_update.train(variables, x, y, batches, step_keys, offsets, a[0], a[1],
                                    normalization, context_row(contexts, a[0]),
                                    max_steps=max_steps),
      (jnp.arange(k, dtype=jnp.int32), counts.astype(jnp.int32)))
  return out, jnp.sum(out.num_steps)


def _loop(client_update, variables, x, y, indices, counts, keys, extra):
  """"loop": one jitted single-client program per client, dispatched from the host. Only
  meaningful outside jit (under a trace it would unroll K programs). ClientSlots are cut
  into one row per client on the host, padded to `bucket_length` (a few lengths, a few
  compilations; a client's result does not depend on its padding)."""
  if isinstance(counts, jax.core.Tracer) or isinstance(indices, jax.core.Tracer) or (
      isinstance(indices, ClientSlots) and isinstance(indices.flat, jax.core.Tracer)):
    raise ValueError('strategy "loop" runs clients from the host; call it outside jax.jit')
  k = counts.shape[0]
  if isinstance(indices, ClientSlots):
    flat, offsets, n = (np.asarray(a) for a in (indices.flat, indices.offsets, counts))
    rows = []
    for i in range(k):
      row = np.zeros(bucket_length(int(n[i]), client_update.batch_size), np.int32)
      row[:n[i]] = flat[offsets[i]:offsets[i] + n[i]]
      rows.append(row)
  else:
    rows = [indices[i] for i in range(k)]
  outs = [_jit_one(client_update)(variables, x, y, rows[i], counts[i], keys[i], **extra)
          for i in range(k)]
  out = jax.tree.map(lambda *leaves: jnp.stack(leaves), *outs)
  return out, jnp.sum(out.num_steps)


def simulate_clients(
    client_update: ClientUpdateFn,
    variables: Variables,
    x: jax.Array,
    y: jax.Array,
    indices: ClientSlots | jax.Array,
    counts: jax.Array,
    keys: jax.Array,
    *,
    strategy: str = "vmap",
    clients_per_chunk: int = 0,
    lanes: int | None = None,
    normalization: Normalization | None = None,
) -> ClientOutput:
  """Trains K clients from the same `variables`; returns their outputs stacked `[K, ...]`.

  Args:
    client_update: the single-client function from `client.make_client_update`.
    variables: global variables every client starts from.
    x, y: device-resident training set.
    indices: the clients' example indices, a `ClientSlots` (`FederatedData.round_slots`: end to
      end, each client its own length) or `[K, M]` int32 rows; `counts`: `[K]` real counts.
    keys: `[K]` per-client PRNG keys.
    strategy: a concrete strategy name (see module docstring); "auto" is resolved here.
    clients_per_chunk: lanes for "chunked" (0 means K).
    lanes: lanes of the packed strategies (per device for "sharded"); default K for "vmap"
      (K / devices for "sharded"), `clients_per_chunk` for "chunked". `round_lanes` gives the
      count a round uses; it must be static under jit.
    normalization: applied to each gathered batch of `x` (uint8 images; `data.Normalization`),
      static under jit; needs a `ClientUpdate`.
  """
  return simulate_clients_with_steps(client_update, variables, x, y, indices, counts, keys,
                                     strategy=strategy, clients_per_chunk=clients_per_chunk,
                                     lanes=lanes, normalization=normalization)[0]


@functools.lru_cache(maxsize=32)
def _jit_one(client_update: ClientUpdateFn) -> Callable[..., ClientOutput]:
  if isinstance(client_update, ClientUpdate):
    return jax.jit(client_update, static_argnames=("normalization",))
  return jax.jit(client_update)


def fold_client_keys(round_key: jax.Array, clients: jax.Array) -> jax.Array:
  """Per-client keys `[K]`: the round key folded with each client's global id.

  Folding the id (not the position in the round) makes a client's randomness independent of
  which other clients were sampled with it.
  """
  return jax.vmap(lambda c: jax.random.fold_in(round_key, c))(clients)
