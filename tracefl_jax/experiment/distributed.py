"""Several processes (JAX's multi-controller runtime): joining them, and what they share.

Every process runs the same program on the same inputs: host-side decisions (partition,
sampling, input selection) are functions of (seed, round), so they agree without
communication. What depends on the workdir (the plan, the checks of its files) is decided by
process 0 alone and shared (`on_primary`), so every process takes the same path or stops with
the same error. Exactly one process (index 0) writes files; checkpoints and stored rounds
go through orbax, which every process calls.

A process that dies is noticed by the others instead of their waiting forever in a
collective: peers.py names it (its last heartbeat) in one line, before JAX's coordination
service ends them natively after `heartbeat_timeout` seconds. A process whose peers never
join stops after `initialization_timeout` seconds, in one line too; processes started with
different configs are refused at the start (`check_same_run`).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable

import jax
import numpy as np

from tracefl_jax.experiment import peers
from tracefl_jax.experiment.io import WorkdirError


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout: int = 60,
               initialization_timeout: int = 300) -> None:
  """Joins the job (`jax.distributed.initialize`) before anything else touches JAX. Without
  arguments JAX detects the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU) from its
  environment variables.

  A process still waiting for the others after `initialization_timeout` seconds prints one
  line and exits with code 3: JAX's own deadline, set a little later, would end the process
  natively (a C++ check failure and its stack).
  """
  joined = threading.Event()

  def watchdog() -> None:
    if joined.wait(initialization_timeout):
      return
    who = "this process" if process_id is None else f"process {process_id}"
    where = f" at {coordinator}" if coordinator else ""
    peers.exit_now(f"{who}: not all {num_processes or 'the'} processes joined{where} within "
                   f"{initialization_timeout} s (--join_timeout); start every process with the "
                   f"same command (and each its own --process_id), or raise --join_timeout", 3)

  threading.Thread(target=watchdog, name="join-watchdog", daemon=True).start()
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id,
                             initialization_timeout=initialization_timeout + 30,
                             heartbeat_timeout_seconds=heartbeat_timeout)
  joined.set()
  peers.start_heartbeat(heartbeat_timeout)


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


class StoppedByPrimary(RuntimeError):
  """Raised on every process but 0 when process 0's step failed: process 0 prints the one
  line, the others end with the same exit code and print nothing (the CLI)."""


class WorkdirStoppedByPrimary(StoppedByPrimary, WorkdirError):
  """Process 0 refused the workdir (in use, another run's results, ...)."""


def on_primary(fn: Callable[[], Any]) -> Any:
  """Runs `fn` on process 0 and returns its (JSON-able) result on every process; an error it
  raises (a `ValueError`, `OSError` or any other) is raised on process 0, and on the others a
  `StoppedByPrimary` (a `WorkdirError` too for a refused workdir) naming process 0, so no
  process waits forever. One process: just `fn()`."""
  if jax.process_count() == 1:
    return fn()
  result, error = None, None
  if is_primary():
    try:
      result = {"ok": fn()}
    except Exception as e:  # shared before it is re-raised, so no process waits forever
      error = e
      result = {"error": str(e), "workdir": isinstance(e, WorkdirError)}
  shared = json.loads(_broadcast_text(json.dumps(result, default=str)))
  if error is not None:
    raise error
  if "error" in shared:
    raise (WorkdirStoppedByPrimary if shared["workdir"] else StoppedByPrimary)(
        f"process 0 stopped the run: {shared['error']}")
  return shared["ok"]


def check_same_run(text: str) -> None:
  """Refuses, on every process at once, a run whose processes were started with different
  configs or flags (`text`: each process's as JSON `{"config": {...}, "flags": {...}}`): they
  would train different experiments into one workdir, or wait on each other forever.

  Raises:
    ValueError on process 0, naming the processes and the fields that differ;
    StoppedByPrimary on the others (process 0 prints the line).
  """
  if jax.process_count() == 1:
    return
  from tracefl_jax.experiment.config import config_fields  # pylint: disable=g-import-not-at-top
  mine = config_fields(json.loads(text))
  theirs = config_fields(json.loads(_broadcast_text(text)))
  fields = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
  gathered = [json.loads(t) for t in _gather_text(json.dumps(fields))]
  bad = [k for k, differing in enumerate(gathered) if differing]
  if not bad:
    return
  if not is_primary():
    raise StoppedByPrimary("processes started with different configs")
  seen = sorted({f for k in bad for f in gathered[k]})
  raise ValueError(
      f"process{'es' if len(bad) > 1 else ''} {', '.join(map(str, bad))} "
      f"{'were' if len(bad) > 1 else 'was'} started with another config or flags than process "
      f"0 (differing in: {', '.join(f.replace('config.', '', 1) for f in seen[:8])}"
      f"{' ...' if len(seen) > 8 else ''}); start every process with the same command but "
      f"its --process_id")


def _gather_text(text: str) -> list[str]:
  """Every process's `text`, in process order (a collective)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(text.encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
  buffer = np.zeros(int(sizes.max()), np.uint8)
  buffer[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(buffer)).reshape(len(sizes), -1)
  return [bytes(row[:size]).decode("utf-8") for row, size in zip(rows, sizes)]


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
