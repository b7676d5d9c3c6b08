"""The one place the client axis is added: K clients' local training as one call.

Strategies (one API, chosen per backend by measurement; see benchmarks/bench_round.py):
  "vmap"     all clients in one vmapped program;
  "chunked"  `lax.map` over clients with `batch_size=clients_per_chunk` (vmap inside a chunk,
             sequential across chunks): memory bounded by the chunk, not by K;
  "scan"     `lax.map` one client at a time inside one compiled program;
  "loop"     a host Python loop dispatching one jitted single-client program per client
             (asynchronous dispatch, no host sync), results stacked on device.
  "sharded"  vmap with the client axis sharded over all devices (a 1-D `jax.sharding.Mesh`
             named "clients"); K must be a multiple of the device count (the server pads
             with empty, zero-weight clients).
  "auto"     "scan" on CPU for models with convolutions (XLA lowers per-client convolutions
             under vmap to grouped convolutions, 1.2-2.8x slower there), else "vmap".
             Measured (benchmarks/bench_round.py, LeNet, 2 CPU cores): scan was the fastest
             strategy at K = 10, 100, 1000 and 5000 (the loop 2-6% behind in steady state, but
             its first call at K = 5000 took 200 s against scan's 56 s).

Every strategy computes the same numbers: each client's work is `client_update` on its own
indices, count and key; the equality is tested against a plain Python loop.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.fl.client import ClientOutput, ClientUpdateFn
from tracefl_jax.models.base import Variables

STRATEGIES = ("auto", "vmap", "chunked", "scan", "loop", "sharded")
CLIENT_AXIS = "clients"


def client_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: all) whose axis is the client axis."""
  devices = devices if devices is not None else jax.devices()
  return jax.sharding.Mesh(np.asarray(devices), (CLIENT_AXIS,))


def _shard_clients(tree: Any, mesh: jax.sharding.Mesh) -> Any:
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


def simulate_clients(
    client_update: ClientUpdateFn,
    variables: Variables,
    x: jax.Array,
    y: jax.Array,
    indices: jax.Array,
    counts: jax.Array,
    keys: jax.Array,
    *,
    strategy: str = "vmap",
    clients_per_chunk: int = 0,
) -> ClientOutput:
  """Trains K clients from the same `variables`; returns their outputs stacked `[K, ...]`.

  Args:
    client_update: the single-client function from `client.make_client_update`.
    variables: global variables every client starts from.
    x, y: device-resident training set.
    indices: `[K, M]` int32 example indices per client; `counts`: `[K]` real counts.
    keys: `[K]` per-client PRNG keys.
    strategy: a concrete strategy name (see module docstring); "auto" is resolved here.
    clients_per_chunk: chunk size for "chunked" (0 means all clients in one chunk).
  """
  strategy = resolve_strategy(strategy, variables)
  one = functools.partial(client_update, variables, x, y)
  if strategy == "vmap":
    return jax.vmap(one)(indices, counts, keys)
  if strategy == "sharded":
    mesh = client_mesh()
    if indices.shape[0] % mesh.size:
      raise ValueError(f"sharded strategy: {indices.shape[0]} clients do not divide over "
                       f"{mesh.size} devices; pad the round (server.make_round_fn does)")
    out = jax.vmap(one)(*_shard_clients((indices, counts, keys), mesh))
    return _shard_clients(out, mesh)
  if strategy in ("chunked", "scan"):
    size = 1 if strategy == "scan" else (clients_per_chunk or indices.shape[0])
    return jax.lax.map(lambda a: one(*a), (indices, counts, keys), batch_size=size)
  # "loop": only meaningful outside jit; under a trace it would unroll K programs.
  if isinstance(indices, jax.core.Tracer):
    raise ValueError('strategy "loop" runs clients from the host; call it outside jax.jit')
  outs = [_jit_one(client_update)(variables, x, y, indices[k], counts[k], keys[k])
          for k in range(indices.shape[0])]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outs)


@functools.lru_cache(maxsize=32)
def _jit_one(client_update: ClientUpdateFn) -> Any:
  return jax.jit(client_update)


def fold_client_keys(round_key: jax.Array, clients: jax.Array) -> jax.Array:
  """Per-client keys `[K]`: the round key folded with each client's global id.

  Folding the id (not the position in the round) makes a client's randomness independent of
  which other clients were sampled with it.
  """
  return jax.vmap(lambda c: jax.random.fold_in(round_key, c))(clients)


