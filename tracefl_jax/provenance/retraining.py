"""Retrained federations as ground truth: F federations run side by side as one program.

The federations differ only in a `[F, C]` participation mask over the C clients (1: takes
part, 0: left out). Sampling is shared: round t draws `sample_clients(seed, t, C, K)` for every
federation, and a left-out client that is drawn gets aggregation weight 0, so every federation
has the same shapes and one compiled round serves them all. Client training keys are shared
too (`round_key(key(data_seed), t)` folded with client ids), so two federations with the same
mask and data seed are the same federation; a different `data_seeds[f]` retrains it under
another data order (the noise floor).

One round of all F federations is `vmap` of the algorithm's round program over a leading
federation axis of (variables, round key, weights); x, y and the round's client indices are
shared (data on the host, `federate(..., placement="host")`: gathered per round, the next
round's prefetched while this one runs, the same results). Federations are run
`federations_per_chunk` at a time when memory binds, and dealt to the devices of a 1-D mesh
(the federation axis sharded) when there are several.

Any algorithm with a round program retrains: its aggregation rule (`robust`: a robust rule
counts a client as present or absent, so only a mask's zeros matter to it), its client
objective (FedProx's anchor is each federation's own G_{t-1}), its server optimizer (each
federation carries its own state, `algorithm.init(variables).opt_state` broadcast to `[F, ...]`
and vmapped, chunked and sharded with the variables; Adam's doubles the memory per
federation) and DP-FedAvg (the noise is drawn from the federation's round key, so federations
of one data seed share their noise draws and another data seed draws other noise).

A round in which none of a federation's sampled clients takes part (every weight 0) leaves
that federation's model and server optimizer state unchanged: without its clients the round
has nothing to average.

Federations that differ only in clients the shared sampling never draws are the same
federation (such a client's mask multiplies no weight in any round): `retrain` trains each
distinct one once (`distinct_federations`) and hands every row its model. At 1,000 clients
sampled 10 per round for 20 rounds, most leave-one-out federations are the base one.

With full masks and `data_seeds == seed`, federation f reproduces `fl.rounds.run_rounds(...,
seed=seed)` on the same algorithm (tested), so the base federation is the run being explained.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.data.federated import FederatedData
from tracefl_jax.fl import aggregation
from tracefl_jax.fl.client import local_steps
from tracefl_jax.fl.rounds import round_key, sample_clients
from tracefl_jax.fl.strategies import round_lanes
from tracefl_jax.models.base import Variables
from tracefl_jax.provenance.federation_masks import FederationMasks


FEDERATION_STRATEGIES = ("vmap", "map")


@functools.lru_cache(maxsize=32)
def _step_fn(program, lanes, normalization, strategy):
  """((variables, opt_state) [F], keys [F], weights [F, K], shared round data) -> the new
  (variables, opt_state) [F]; opt_state is None without a server optimizer. One jitted step
  per (round program, lanes, normalization, strategy)."""

  def one(state, key, weights, x, y, indices, counts, ids):
    total = jnp.sum(weights)
    # All weights 0: run the round on ones (no 0 / 0 in any rule) and keep the old state.
    safe = jnp.where(total > 0, weights, jnp.ones_like(weights))
    variables, opt_state = state
    out = program(variables, x, y, indices, counts, ids, key, safe, lanes=lanes,
                  normalization=normalization, opt_state=opt_state)
    return jax.tree.map(lambda a, b: jnp.where(total > 0, a, b), (out[0], out[5]), state)

  if strategy == "vmap":
    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, None, None, None, None)))

  def mapped(state, keys, weights, *shared):
    return jax.lax.map(lambda a: one(*a, *shared), (state, keys, weights))
  return jax.jit(mapped)


def round_plan(data: FederatedData, *, rounds: int, clients_per_round: int, seed: int,
               batch_size: int, weighting: str = "examples",
               always_sampled: Sequence[int] = ()) -> list[dict[str, np.ndarray]]:
  """Per round (1..rounds), what `run_rounds` would feed the round program: the sampled
  `client_ids [K]`, `indices` (their `ClientSlots`), `counts [K]` and base aggregation
  `weights [K]`."""
  plan = []
  for r in range(1, rounds + 1):
    ids = sample_clients(seed, r, data.num_clients, clients_per_round, always_sampled)
    rd = data.round_slots(ids, batch_size)
    weights = np.asarray(aggregation.client_weights(rd.counts, weighting, batch_size),
                         np.float32)
    plan.append({"round": r, "client_ids": ids, "indices": rd.indices, "counts": rd.counts,
                 "weights": weights})
  return plan


def participation(plan: Sequence[dict[str, np.ndarray]], num_clients: int) -> np.ndarray:
  """`[R, C]` bool: client c was sampled in round r (positive weight or not)."""
  out = np.zeros((len(plan), num_clients), bool)
  for i, p in enumerate(plan):
    out[i, p["client_ids"]] = True
  return out


def distinct_federations(plan: Sequence[dict[str, np.ndarray]], masks: Any,
                         data_seeds: Any) -> tuple[np.ndarray, np.ndarray]:
  """(rows [U], inverse [F]): the federations of `masks [F, C]` (dense or
  `FederationMasks`) and `data_seeds [F]` that train different models under `plan`, as
  `rows` (the first row of each) and, per federation, the position in `rows` of the one it
  equals. Two federations are equal when they have the same data seed and the same mask on
  every client sampled in some round."""
  masks = _as_sparse(masks)
  sampled = participation(plan, masks.num_clients).any(axis=0)
  seeds = np.asarray(data_seeds, np.float64).reshape(-1)
  groups: dict[tuple, int] = {}
  rows, inverse = [], np.zeros(len(masks), np.int64)
  for f in range(len(masks)):
    clients, values = masks.entries(f)
    keep = sampled[clients]
    key = (seeds[f], clients[keep].tobytes(), (values[keep] + 0.0).tobytes())  # -0.0 == 0.0
    if key not in groups:
      groups[key] = len(rows)
      rows.append(f)
    inverse[f] = groups[key]
  return np.asarray(rows, np.int64), inverse


def _as_sparse(masks: Any) -> FederationMasks:
  return masks if isinstance(masks, FederationMasks) else FederationMasks.from_dense(masks)


def _check_masks(masks, num_clients: int) -> FederationMasks:
  """`masks` as `FederationMasks` after checking shape and values (dense `[F, C]` or
  sparse)."""
  if isinstance(masks, FederationMasks):
    shape, values = masks.shape, masks.values
  else:
    m = np.asarray(masks)
    shape, values = m.shape, m
  if len(shape) != 2 or shape[1] != num_clients or shape[0] < 1:
    raise ValueError(f"masks has shape {shape}; it must be [F, C] = [F >= 1, {num_clients}]"
                     f", one row per federation over the federation's {num_clients} clients")
  values = np.asarray(values).astype(np.float32)
  if not np.all(np.isfinite(values)) or np.any(values < 0):
    raise ValueError("masks must be finite and >= 0 (1: the client takes part, 0: left out)")
  return _as_sparse(masks)


def retrain(
    algorithm: Any,
    variables: Variables,
    data: FederatedData,
    masks: Any,
    *,
    rounds: int,
    clients_per_round: int,
    seed: int,
    batch_size: int,
    local_epochs: int,
    weighting: str = "examples",
    data_seeds: Sequence[int] | None = None,
    federations_per_chunk: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    always_sampled: Sequence[int] = (),
    clients_per_chunk: int = 0,
    federation_strategy: str = "vmap",
) -> Variables:
  """Trains F federations from the same initial `variables`; returns their final models.

  Args:
    algorithm: a `FederatedAlgorithm` with a round program (any strategy but "loop"), built
      with the same `batch_size`, `local_epochs`, `weighting` (and `clients_per_chunk` for
      "chunked") as given here.
    variables: the initial global model (the run's `model.init`).
    data: the federation's data (C clients).
    masks: `[F, C]` participation (1 / 0; any non-negative value multiplies client c's
      aggregation weight, which a robust rule reads only as present (> 0) or absent), dense
      or `FederationMasks` (`retrained.truth_masks`): only a chunk's values on a round's
      clients are ever expanded.
    rounds, clients_per_round, seed, always_sampled: as `run_rounds`; sampling is shared.
    data_seeds: `[F]` seeds of the training keys (data order, dropout); default `seed` for all.
    federations_per_chunk: run this many federations at once (0: all F); the last chunk is
      padded by repeating its last federation, so one compiled round serves every chunk.
    mesh: a 1-D device mesh to shard the federation axis over (default: all devices when
      there are several); a chunk is padded to a multiple of its size.
    federation_strategy: "vmap" (the federations' steps batched together) or "map" (a loop
      over the chunk's federations inside the one program: no batching, so a vmapped
      convolution's grouped kernels are avoided; see benchmarks/bench_retraining.py).

  Returns:
    The final global variables of every federation, leaves `[F, ...]` (a server optimizer's
    final states are not returned). Federations equal under the shared sampling
    (`distinct_federations`) are trained once.

  Raises:
    ValueError: masks not `[F, C]`, negative or non-finite; `data_seeds` not of length F; an
      algorithm without a round program (strategy "loop"); federations_per_chunk < 0. Every
      aggregation rule, client objective and server optimizer is supported, DP-FedAvg too.
  """
  masks = _check_masks(masks, data.num_clients)  # sparse: expanded per chunk and round
  f = len(masks)
  data_seeds = np.full(f, seed, np.int64) if data_seeds is None else np.asarray(data_seeds)
  if data_seeds.shape != (f,):
    raise ValueError(f"data_seeds has shape {data_seeds.shape}; it must be [F] = ({f},)")
  if algorithm.program is None:
    raise ValueError(f"algorithm.strategy={algorithm.strategy!r} has no round program to run "
                     f"over a federation axis; build it with strategy 'scan', 'vmap' or "
                     f"'chunked'")
  if federation_strategy not in FEDERATION_STRATEGIES:
    raise ValueError(f"federation_strategy={federation_strategy!r}; valid: "
                     f"{', '.join(FEDERATION_STRATEGIES)}")
  if not isinstance(federations_per_chunk, (int, np.integer)) or federations_per_chunk < 0:
    raise ValueError(f"federations_per_chunk={federations_per_chunk!r} must be an int >= 0 "
                     f"(0: all federations at once)")
  if mesh is None and jax.device_count() > 1:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("federations",))
  plan = round_plan(data, rounds=rounds, clients_per_round=clients_per_round, seed=seed,
                    batch_size=batch_size, weighting=weighting, always_sampled=always_sampled)
  distinct, inverse = distinct_federations(plan, masks, data_seeds)
  masks, data_seeds, u = masks.take(distinct), data_seeds[distinct], len(distinct)
  chunk = min(federations_per_chunk or u, u)
  if mesh is not None:
    chunk += (-chunk) % mesh.size
  outputs = []
  for start in range(0, u, chunk):
    rows = np.arange(start, start + chunk).clip(max=u - 1)  # pad with the last federation
    outputs.append(_run_chunk(algorithm, variables, data, masks.take(rows), data_seeds[rows],
                              plan, batch_size, local_epochs, clients_per_chunk, mesh,
                              federation_strategy))
  take = jnp.asarray(inverse)
  return jax.tree.map(lambda *a: jnp.concatenate(a)[:u][take], *outputs)


def _run_chunk(algorithm, variables, data, masks, data_seeds, plan, batch_size, local_epochs,
               clients_per_chunk, mesh, federation_strategy):
  f = len(masks)
  # (G_0, the server optimizer's fresh state or None), one copy per federation.
  start = (dict(variables), algorithm.init(variables).opt_state)
  state = jax.tree.map(lambda a: jnp.broadcast_to(a, (f, *jnp.shape(a))), start)
  roots = [jax.random.key(int(s)) for s in data_seeds]
  if mesh is not None:
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
    state = jax.device_put(state, sharded)
  host = data.placement == "host"
  for p, (x, y, indices) in zip(plan, data.feed([p["indices"] for p in plan])):
    keys = jnp.stack([round_key(root, p["round"]) for root in roots])
    weights = jnp.asarray(p["weights"][None, :] * masks.columns(p["client_ids"]))
    if mesh is not None:
      keys, weights = jax.device_put((keys, weights), sharded)
    steps = local_steps(p["counts"].astype(np.int64), batch_size, local_epochs)
    lanes = round_lanes(algorithm.strategy, steps, clients_per_chunk, 1)
    step = _step_fn(algorithm.program, lanes, data.normalization, federation_strategy)
    state = step(state, keys, weights, x, y, jax.device_put(indices),
                 jnp.asarray(p["counts"]), jnp.asarray(p["client_ids"].astype(np.int32)))
    if host:  # the next round's data is prefetched meanwhile; no more rounds queue up
      jax.block_until_ready(state)
  return state[0]


def retrain_sequential(algorithm: Any, variables: Variables, data: FederatedData, mask: Any,
                       *, rounds: int, clients_per_round: int, seed: int, batch_size: int,
                       local_epochs: int, weighting: str = "examples",
                       data_seed: int | None = None,
                       always_sampled: Sequence[int] = (), clients_per_chunk: int = 0
                       ) -> Variables:
  """One federation of `retrain`, round by round through the plain round program (no
  federation axis): the reference `retrain` is tested against, and the cost of one
  federation in the benchmark. A round without participants is skipped (the model and the
  server optimizer state stay as they are)."""
  mask = _check_masks(np.asarray(mask)[None], data.num_clients)[0]  # a dense row [C]
  root = jax.random.key(seed if data_seed is None else int(data_seed))
  state, opt_state = dict(variables), algorithm.init(variables).opt_state
  plan = [p for p in round_plan(data, rounds=rounds, clients_per_round=clients_per_round,
                                seed=seed, batch_size=batch_size, weighting=weighting,
                                always_sampled=always_sampled)
          if (p["weights"] * mask[p["client_ids"]]).sum() > 0]
  for p, (x, y, indices) in zip(plan, data.feed([p["indices"] for p in plan])):
    weights = p["weights"] * mask[p["client_ids"]]
    steps = local_steps(p["counts"].astype(np.int64), batch_size, local_epochs)
    lanes = round_lanes(algorithm.strategy, steps, clients_per_chunk, 1)
    out = algorithm.program(state, x, y, jax.device_put(indices),
                            jnp.asarray(p["counts"]),
                            jnp.asarray(p["client_ids"].astype(np.int32)),
                            round_key(root, p["round"]), jnp.asarray(weights), lanes=lanes,
                            normalization=data.normalization, opt_state=opt_state)
    state, opt_state = out[0], out[5]
    if data.placement == "host":  # as `_run_chunk`: one round at a time on the device
      jax.block_until_ready(state)
  return state


__all__ = ["distinct_federations", "participation", "retrain", "retrain_sequential",
           "round_plan"]
