"""Round shapes planned on the host (NumPy): lane counts of the packed strategies and the
ladder that rounds slot lengths, so that a run compiles few, known round programs.

A round program's static shape is (K, T, W): K clients, T slots of their concatenated
example indices (`data.federated.ClientSlots`, each client padded only to a whole number of
its own batches, T rounded up the ladder 1, 2, 3, 4, 6, 8, 12, ...) and W lanes for the
packed strategies (`auto_lanes`, from the same ladder and K). K is fixed per run, so the
round programs a run compiles are at most the ladder's T values between its smallest and
largest possible round times the lane values: `program_bound`.
"""

from __future__ import annotations

import heapq
import numpy as np
from numpy.typing import ArrayLike

from tracefl_jax.data.federated import client_slots, ladder, ladder_ceil  # noqa: F401

# Packed lanes may compute at most this many times the needed steps (auto_lanes).
LANE_EFFICIENCY = 1.1


def _lane_candidates(limit: int, per_device: int) -> list[int]:
  """The ladder up to `limit`, and `per_device` itself when it is within `limit`; largest
  first."""
  out = set(ladder(limit))
  if per_device <= limit:
    out.add(per_device)
  return sorted(out, reverse=True)


def auto_lanes(steps: ArrayLike, devices: int = 1, efficiency: float = LANE_EFFICIENCY) -> int:
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


PACKED = ("vmap", "chunked", "sharded")


def round_lanes(strategy: str, steps: ArrayLike, clients_per_chunk: int = 0,
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


def packed_steps(steps: ArrayLike, lanes: int, devices: int = 1) -> int:
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


def executed_steps(strategy: str, steps: ArrayLike, lanes: int | None = None,
                   devices: int = 1) -> int:
  """Steps a round computes under `strategy` (resolved) with `lanes` (`round_lanes`)."""
  steps = np.asarray(steps, np.int64).reshape(-1)
  if strategy not in PACKED:
    return int(steps.sum())
  return packed_steps(steps, lanes or 1, devices if strategy == "sharded" else 1)


def program_bound(sizes: ArrayLike, clients_per_round: int, batch_size: int, strategy: str,
                  devices: int = 1) -> int:
  """At most this many round programs for a run drawing `clients_per_round` of the clients
  with `sizes [C]` (examples each): the ladder's slot lengths T between the round of the K
  smallest and the round of the K largest clients, times the lane counts `auto_lanes` can
  pick (1 for "scan" and "loop"; "chunked" with a fixed `clients_per_chunk` has 1 too but is
  counted like "vmap" here)."""
  slots = np.sort(client_slots(sizes, batch_size))
  k = int(clients_per_round)
  low, high = ladder_ceil(slots[:k].sum()), ladder_ceil(slots[-k:].sum())
  lengths = sum(1 for v in ladder(high) if v >= low)
  if strategy not in PACKED:
    return lengths
  per = -(-k // devices)
  return lengths * len(_lane_candidates(per, per))
