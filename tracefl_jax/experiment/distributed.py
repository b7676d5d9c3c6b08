"""Several processes (JAX's multi-controller runtime): joining them, and what they share.

Every process runs the same program on the same inputs: host-side decisions (partition,
sampling, input selection) are functions of (seed, round), so they agree without
communication. What depends on the workdir (the plan, the checks of its files) is decided by
process 0 alone and shared (`on_primary`), so every process takes the same path or stops with
the same error. Exactly one process (index 0) writes files; checkpoints and stored rounds
go through orbax, which every process calls.

A process that dies is noticed by the others through JAX's coordination service: after
`heartbeat_timeout` seconds without its heartbeat they stop with an error naming the dead
task, instead of waiting forever in a collective.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import jax
import numpy as np

from tracefl_jax.experiment.io import WorkdirError


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout: int = 60,
               initialization_timeout: int = 300) -> None:
  """Joins the job (`jax.distributed.initialize`) before anything else touches JAX. Without
  arguments JAX detects the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU) from its
  environment variables."""
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id,
                             initialization_timeout=initialization_timeout,
                             heartbeat_timeout_seconds=heartbeat_timeout)


def use_compilation_cache(directory: str | None) -> None:
  """Keeps compiled programs in `directory` (JAX's persistent compilation cache; None: the
  `JAX_COMPILATION_CACHE_DIR` JAX read, if any). A resumed or rerun experiment then loads its
  round, evaluation and provenance programs instead of compiling them again. The cache is
  keyed by the program, the compile options and the devices; point hosts of different CPU
  kinds at different directories. (JAX's `jax_share_binary_between_hosts`, one process
  compiling for all, deadlocked the runner's 4-process test on CPU: not used.)"""
  if directory:
    jax.config.update("jax_compilation_cache_dir", directory)


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def _broadcast_text(text: str | None) -> str:
  """Process 0's `text` on every process (a collective: all processes call it)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer((text or "").encode("utf-8"), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
  buffer = np.zeros(size, np.uint8)
  buffer[:data.size] = data[:size] if jax.process_index() == 0 else 0
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode("utf-8")


def on_primary(fn: Callable[[], Any]) -> Any:
  """Runs `fn` on process 0 and returns its (JSON-able) result on every process; an error it
  raises (a `ValueError`, `OSError` or any other) is raised on every process, the others
  naming process 0. One process: just `fn()`."""
  if jax.process_count() == 1:
    return fn()
  result, error = None, None
  if is_primary():
    try:
      result = {"ok": fn()}
    except Exception as e:  # shared before it is re-raised, so no process waits forever
      error = e
      result = {"error": str(e), "type": type(e).__name__}
  shared = json.loads(_broadcast_text(json.dumps(result, default=str)))
  if error is not None:
    raise error
  if "error" in shared:
    raise (WorkdirError if shared["type"].endswith("WorkdirError") else RuntimeError)(
        f"process 0 stopped the run: {shared['error']}")
  return shared["ok"]


def _to_host(leaf: Any) -> Any:
  """A leaf every process can read: arrays spread over processes are gathered."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(leaf, tiled=True)
  return leaf


def host_round(algorithm):
  """The algorithm with a round whose outputs every process holds whole (the `sharded`
  strategy spreads the client axis over every process's devices; the callbacks, the
  checkpoints and the next round read host values, the same in every process). One process:
  the algorithm itself."""
  if jax.process_count() == 1:
    return algorithm
  round_ = algorithm.round

  def gathered(state, clients, data, key):
    state, out = round_(state, clients=clients, data=data, key=key)
    same = out.traced is out.variables is state.variables
    state, out = jax.tree.map(_to_host, state), jax.tree.map(_to_host, out)
    if same:  # one object, so the evaluator's per-model cache sees one model
      out = out._replace(variables=state.variables, traced=state.variables)
    return state, out

  return algorithm._replace(round=gathered)
