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
             under vmap to grouped convolutions, 1.2-2.8x slower there), else "vmap".
             Measured (benchmarks/bench_round.py, LeNet, 2 CPU cores, equal client sizes):
             scan was the fastest strategy at K = 10, 100, 1000 and 5000 (the loop 2-6% behind
             in steady state, but its first call at K = 5000 took 200 s against scan's 56 s).

No work on padding. Under "scan" and "loop" a client is `client_update` itself, whose
`while_loop` runs exactly the client's own steps. Vmapped clients cannot do that (a batched
trip count runs every lane to the largest; a batched `cond` runs both branches), so "vmap",
"chunked" and "sharded" pack clients into W lanes, a work queue: the round's clients are sorted
by step count, longest first; each lane trains one client at a time, one optimizer step per
iteration for all lanes together, and a lane whose client is done writes that client's result
to its row and takes the next client from the queue (longest-processing-time scheduling). The
loop ends when the queue is empty and every lane idle, so the only steps computed for nothing
are idle lanes in the last iterations: `steps_executed = W * iterations` against
`steps_needed = sum of the clients' own steps`, and `packed_steps` computes the same count from
the sizes alone. W is static (one compiled program per W); `auto_lanes` picks, from the
round's step counts, the most lanes that compute at most 1.1x the needed steps, among 1, 2, 3,
4, 6, 8, 12, ... and K, so a run compiles a handful of programs at most. On the paper-shaped
partition (MNIST-sized labels, Dirichlet 0.3, fix-up, batch 32, two epochs, 50 rounds) auto
lanes compute 1.06x the needed steps at K = 10 and 100, where one vmap over all K clients
computes 2.1x and 3.3x (and the former power-of-two padding 2.6x and 3.4x).

Every strategy computes the same numbers: each client's work is `client_update` on its own
indices, count and key, whichever lane or device runs it; the equality is tested against a
plain Python loop.
"""

from __future__ import annotations

import functools
import heapq
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.fl.client import ClientOutput, ClientUpdate, ClientUpdateFn, LocalState
from tracefl_jax.models.base import Variables

STRATEGIES = ("auto", "vmap", "chunked", "scan", "loop", "sharded")
PACKED = ("vmap", "chunked", "sharded")
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


# ---------------------------------------------------------------- lane plans (host, NumPy)

# Packed lanes may compute at most this many times the needed steps (auto_lanes).
LANE_EFFICIENCY = 1.1


def _lane_candidates(limit: int, per_device: int) -> list[int]:
  """1, 2, 3, 4, 6, 8, 12, 16, ... (2^a and 3 * 2^a) up to `limit`, and `per_device` itself
  when it is within `limit`; largest first."""
  out, a = {1}, 2
  while a <= limit:
    out.update(v for v in (a, 3 * a // 2) if v <= limit)
    a *= 2
  if per_device <= limit:
    out.add(per_device)
  return sorted(out, reverse=True)


def auto_lanes(steps: Any, devices: int = 1, efficiency: float = LANE_EFFICIENCY) -> int:
  """Lanes per device for packing clients whose step counts are `steps` `[K]` (K a multiple
  of `devices`): the most lanes (fewest loop iterations) whose schedule computes at most
  `efficiency` times the needed steps (one lane computes exactly them), among 1, 2, 3, 4, 6,
  8, 12, ... and K / devices, a short list so that a run compiles few programs. A
  deterministic function of the sizes."""
  steps = np.asarray(steps, np.int64).reshape(-1)
  longest, needed = int(steps.max(initial=0)), int(steps.sum())
  if longest == 0:
    return 1
  per_device = max(len(steps) // devices, 1)
  # W lanes run at least `longest` iterations: W * longest <= efficiency * needed.
  limit = min(per_device, int(efficiency * needed / (devices * longest)))
  for lanes in _lane_candidates(limit, per_device):
    if packed_steps(steps, lanes, devices) <= efficiency * needed:
      return lanes
  return 1


def round_lanes(strategy: str, steps: Any, clients_per_chunk: int = 0,
                devices: int = 1) -> int | None:
  """The lane count a round runs with: `auto_lanes` for "vmap" and "sharded" (per device),
  `clients_per_chunk` (or auto when 0) for "chunked", None for "scan" and "loop"."""
  if strategy not in PACKED:
    return None
  k = len(np.asarray(steps).reshape(-1))
  if strategy == "chunked" and clients_per_chunk:
    return max(1, min(int(clients_per_chunk), k))
  return auto_lanes(steps, devices if strategy == "sharded" else 1)


def _deal_ranks(k: int, devices: int) -> np.ndarray:
  """`[K]` ranks (in longest-first order) of each device's clients, device after device: rank
  r goes to device r % D on even rounds r // D, to D - 1 - r % D on odd ones (a snake), so
  each device gets a similar amount of work."""
  per = k // devices
  i, d = np.meshgrid(np.arange(per), np.arange(devices), indexing="ij")
  ranks = i * devices + np.where(i % 2 == 0, d, devices - 1 - d)
  return ranks.T.reshape(-1)


def packed_steps(steps: Any, lanes: int, devices: int = 1) -> int:
  """Optimizer steps a packed round computes (`lanes` per device, idle lanes included) for
  clients whose own step counts are `steps` `[K]`: the same schedule as the packed loop,
  computed from the sizes alone."""
  steps = np.asarray(steps, np.int64).reshape(-1)
  order = np.argsort(-steps, kind="stable")
  executed = 0
  for group in order[_deal_ranks(len(steps), devices)].reshape(devices, -1):
    s = steps[group]
    s = s[np.argsort(-s, kind="stable")]
    free = [(0, lane) for lane in range(lanes)]
    finish = 0
    for job in s[s > 0]:
      t, lane = heapq.heappop(free)
      heapq.heappush(free, (t + int(job), lane))
      finish = max(finish, t + int(job))
    executed += lanes * finish
  return executed


def executed_steps(strategy: str, steps: Any, lanes: int | None = None,
                   devices: int = 1) -> int:
  """Steps a round computes under `strategy` (resolved) with `lanes` (`round_lanes`)."""
  steps = np.asarray(steps, np.int64).reshape(-1)
  if strategy not in PACKED:
    return int(steps.sum())
  return packed_steps(steps, lanes or 1, devices if strategy == "sharded" else 1)


# ------------------------------------------------------------ the packed loop (in-program)

def _where_lanes(pred: jax.Array, new: Any, old: Any) -> Any:
  """Per lane `new if pred else old`; `pred` is `[W]`, leaves `[W, ...]` (or `[1, ...]`)."""
  def pick(a, b):
    p = pred.reshape(pred.shape + (1,) * (max(a.ndim, b.ndim) - 1))
    return jnp.where(p, a, b)
  return jax.tree.map(pick, new, old)


def _pack(client_update: ClientUpdate, variables: Variables, x: jax.Array, y: jax.Array,
          indices: jax.Array, counts: jax.Array, keys: jax.Array,
          lanes: int, normalization: Any = None) -> tuple[ClientOutput, jax.Array]:
  """K clients through `lanes` vmapped lanes (module docstring); returns the outputs `[K]` in
  the given order and the number of loop iterations (each computes `lanes` steps)."""
  cu = client_update
  k, w = indices.shape[0], int(lanes)
  counts = counts.astype(jnp.int32)
  total = cu.num_steps(counts)
  queue = jnp.argsort(-total, stable=True).astype(jnp.int32)
  n_work = jnp.sum(total > 0).astype(jnp.int32)
  batches, step_keys = jax.vmap(cu.schedule)(indices, counts, keys)  # [K, E, M], [K, E]
  start = cu.init(variables)
  start_1 = jax.tree.map(lambda a: a[None], start)
  # Results, row per client; a client with no steps keeps G's variables, as it would alone.
  kept = (start.params, start.model_state, start.loss_sum, start.num_steps)
  results = jax.tree.map(lambda a: jnp.broadcast_to(a, (k, *a.shape)), kept)
  lane = jnp.arange(w, dtype=jnp.int32)
  client = jnp.where(lane < n_work, queue[jnp.minimum(lane, k - 1)], k)  # k: idle lane
  state = jax.tree.map(lambda a: jnp.broadcast_to(a, (w, *a.shape)), start)
  zeros = jnp.zeros(w, jnp.int32)

  batch = jax.vmap(cu.batch, in_axes=(None, None, 0, 0, 0))
  anchor = variables["params"]  # G's params, for objectives that need them (FedProx)
  step = jax.vmap(lambda s, i, m, r: cu.step(s, x, y, i, m, r, normalization, anchor))

  if w == k:
    # One lane per client (what the queue would give): lane c trains client c and then
    # stays put, so its final state is the client's result; no queue, no per-iteration
    # write-back of results, no reset (1.3x faster at K = 1000, MLP, equal sizes).
    own = jnp.arange(k, dtype=jnp.int32)

    def body_own(carry):
      state, t, iters = carry
      active = t < total
      state = _where_lanes(active, step(state, *batch(batches, step_keys, own, counts, t)),
                           state)
      return state, t + active.astype(jnp.int32), iters + 1

    state, _, iters = jax.lax.while_loop(lambda carry: jnp.any(carry[1] < total), body_own,
                                         (state, zeros, jnp.zeros((), jnp.int32)))
    out = jax.vmap(cu.finish)(state._replace(opt_state=None), counts)
    return out, iters

  def body(carry):
    state, client, t, taken, results, iters = carry
    active = client < k
    c = jnp.minimum(client, k - 1)  # idle lanes compute a throwaway step on a valid row
    state = _where_lanes(active, step(state, *batch(batches, step_keys, c, counts[c], t)),
                         state)
    t = t + active.astype(jnp.int32)
    done = active & (t >= total[c])
    dest = jnp.where(done, c, k)  # out of range: dropped
    results = jax.tree.map(lambda r, v: r.at[dest].set(v, mode="drop"), results,
                           (state.params, state.model_state, state.loss_sum, state.num_steps))
    slot = taken + jnp.cumsum(done.astype(jnp.int32)) - 1  # freed lanes take the queue in order
    client = jnp.where(done, jnp.where(slot < n_work, queue[jnp.clip(slot, 0, k - 1)], k),
                       client)
    state = _where_lanes(done, start_1, state)
    return (state, client, jnp.where(done, 0, t), taken + jnp.sum(done).astype(jnp.int32),
            results, iters + 1)

  carry = (state, client, zeros, jnp.minimum(n_work, w), results, jnp.zeros((), jnp.int32))
  *_, results, iters = jax.lax.while_loop(lambda carry: jnp.any(carry[1] < k), body, carry)
  params, model_state, loss_sum, num_steps = results
  out = jax.vmap(cu.finish)(LocalState(params, None, model_state, loss_sum, num_steps), counts)
  return out, iters


# -------------------------------------------------------------------------- entry points

def simulate_clients_with_steps(
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
    lanes: int | None = None,
    normalization: Any = None,
) -> tuple[ClientOutput, jax.Array]:
  """`simulate_clients`, plus the optimizer steps computed (int32 scalar): the clients' own
  steps under "scan" and "loop", `lanes * iterations` (idle lanes included) when packed."""
  strategy = resolve_strategy(strategy, variables)
  k = indices.shape[0]
  if normalization is not None and not isinstance(client_update, ClientUpdate):
    raise ValueError("a normalization needs a ClientUpdate (make_client_update), which "
                     "normalises each batch it gathers; a plain client function gets x as "
                     "it is: normalise x first")
  extra = {} if normalization is None else {"normalization": normalization}
  one = functools.partial(client_update, variables, x, y, **extra)
  if strategy in PACKED and not isinstance(client_update, ClientUpdate):
    # A plain function has no pieces to pack: one vmap, every lane to the longest client.
    out = jax.vmap(one)(indices, counts, keys)
    return out, k * jnp.max(out.num_steps, initial=0)
  if strategy in ("vmap", "chunked"):
    if lanes is None:
      lanes = k if strategy == "vmap" else (clients_per_chunk or k)
    lanes = max(1, min(int(lanes), k))
    out, iters = _pack(client_update, variables, x, y, indices, counts, keys, lanes,
                       normalization)
    return out, iters * lanes
  if strategy == "sharded":
    mesh = client_mesh()
    if k % mesh.size:
      raise ValueError(f"sharded strategy: {k} clients do not divide over {mesh.size} "
                       f"devices; pad the round (federated_averaging's round does)")
    per = k // mesh.size
    lanes = max(1, min(int(lanes or per), per))
    # Deal the clients over the devices by size (balanced work), pack each device's share.
    order = jnp.argsort(-client_update.num_steps(counts.astype(jnp.int32)), stable=True)
    perm = order[jnp.asarray(_deal_ranks(k, mesh.size))]
    spec = jax.sharding.PartitionSpec(CLIENT_AXIS)
    rep = jax.sharding.PartitionSpec()

    def local(variables, x, y, indices, counts, keys):
      out, iters = _pack(client_update, variables, x, y, indices, counts, keys, lanes,
                         normalization)
      return out, iters[None]

    out, iters = jax.shard_map(local, mesh=mesh, in_specs=(rep, rep, rep, spec, spec, spec),
                               out_specs=(spec, spec), check_vma=False)(
        variables, x, y, indices[perm], counts[perm], keys[perm])
    out = jax.tree.map(lambda a: a[jnp.argsort(perm)], out)
    return _shard_clients(out, mesh), jnp.sum(iters) * lanes
  if strategy == "scan":
    out = jax.lax.map(lambda a: one(*a), (indices, counts, keys))
    return out, jnp.sum(out.num_steps)
  # "loop": only meaningful outside jit; under a trace it would unroll K programs.
  if isinstance(indices, jax.core.Tracer):
    raise ValueError('strategy "loop" runs clients from the host; call it outside jax.jit')
  outs = [_jit_one(client_update)(variables, x, y, indices[i], counts[i], keys[i], **extra)
          for i in range(k)]
  out = jax.tree.map(lambda *leaves: jnp.stack(leaves), *outs)
  return out, jnp.sum(out.num_steps)


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
    lanes: int | None = None,
    normalization: Any = None,
) -> ClientOutput:
  """Trains K clients from the same `variables`; returns their outputs stacked `[K, ...]`.

  Args:
    client_update: the single-client function from `client.make_client_update`.
    variables: global variables every client starts from.
    x, y: device-resident training set.
    indices: `[K, M]` int32 example indices per client; `counts`: `[K]` real counts.
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
def _jit_one(client_update: ClientUpdateFn) -> Any:
  if isinstance(client_update, ClientUpdate):
    return jax.jit(client_update, static_argnames=("normalization",))
  return jax.jit(client_update)


def fold_client_keys(round_key: jax.Array, clients: jax.Array) -> jax.Array:
  """Per-client keys `[K]`: the round key folded with each client's global id.

  Folding the id (not the position in the round) makes a client's randomness independent of
  which other clients were sampled with it.
  """
  return jax.vmap(lambda c: jax.random.fold_in(round_key, c))(clients)
