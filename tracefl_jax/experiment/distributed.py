"""Several processes (JAX's multi-controller runtime): joining them, and what they share.

Every process runs the same program on the same inputs: host-side decisions (partition,
sampling, input selection) are functions of (seed, round), so they agree without
communication. What depends on the workdir (the plan, the checks of its files) is decided by
process 0 alone and shared (`on_primary`), so every process takes the same path or stops with
the same error. Exactly one process (index 0) writes files; checkpoints and stored rounds
go through orbax, which every process calls.

A process whose peers never join stops after `initialization_timeout` seconds, in one line;
processes started with different configs are refused at the start (`check_same_run`). A
process that dies is named (its last heartbeat) in one line by the others instead of their
waiting forever in a collective: JAX's coordination service notices a dead process only after
`--heartbeat_timeout` seconds and then ends every survivor natively (a C++ check failure and
its stack); the collective that meets the dead process first fails at once with a transport
error ("Gloo AllGather failed: ... Connection reset by peer") that names no process, and
reached the terminal as a disk problem when it came through a checkpoint. So every process
writes its own heartbeat (the time, each second) into the service's key-value store, and a
survivor whose collective failed reads them: a process whose heartbeat no longer advances is
the one lost; and each process's heartbeat thread watches the others' too, so a process
blocked where no error comes (a barrier) still names the lost one before JAX's check fires.
The survivor then prints one line and ends at once (`exit_now`): a normal exit would wait on
the lost process in JAX's shutdown and end natively all the same.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from tracefl_jax.experiment.config import config_fields
from tracefl_jax.experiment.io import WorkdirError

BEAT_KEY = "tracefl/heartbeat/"
BEAT_SECONDS = 1.0
DONE = "done"  # a process that ended normally: not lost when its beat stops


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
    exit_now(f"{who}: not all {num_processes or 'the'} processes joined{where} within "
                   f"{initialization_timeout} s (--join_timeout); start every process with the "
                   f"same command (and each its own --process_id), or raise --join_timeout", 3)

  threading.Thread(target=watchdog, name="join-watchdog", daemon=True).start()
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id,
                             initialization_timeout=initialization_timeout + 30,
                             heartbeat_timeout_seconds=heartbeat_timeout)
  joined.set()
  start_heartbeat(heartbeat_timeout)


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


# --- a lost process, named ---------------------------------------------------------------


def exit_now(message: str, code: int) -> None:
  """Prints `error: message` and ends the process at once (no atexit, no JAX shutdown)."""
  try:
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
  finally:
    os._exit(code)  # pylint: disable=protected-access


def _client() -> Any:
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


def start_heartbeat(heartbeat_timeout: int) -> None:
  """Writes this process's heartbeat every `BEAT_SECONDS`, and watches the others': one
  silent for half of `heartbeat_timeout` (at least 3 s) is named and this process ends
  (`exit_now`), before JAX's own check ends it natively at `heartbeat_timeout`. A process
  that exits normally marks itself done first (atexit runs before JAX's shutdown)."""
  client, index, n = _client(), jax.process_index(), jax.process_count()
  if client is None or n == 1:
    return
  stop = threading.Event()
  silent = max(3.0, heartbeat_timeout / 2)

  def beat() -> None:
    failures = 0
    while not stop.is_set():
      try:
        client.key_value_set(f"{BEAT_KEY}{index}", repr(time.time()), allow_overwrite=True)
        failures = 0
      except Exception:  # pylint: disable=broad-except  # the service is gone (or shut down)
        failures += 1
        if failures >= 3 and not stop.is_set() and index != 0:
          exit_now(lost_message([0], {}), 3)
        stop.wait(BEAT_SECONDS)
        continue
      beats = _heartbeats(client)
      now = time.time()
      lost = [k for k, t in (beats or {}).items() if t is not None and now - t > silent]
      if lost and not stop.is_set():
        exit_now(lost_message(lost, beats), 3)
      stop.wait(BEAT_SECONDS)

  def done() -> None:
    stop.set()
    try:
      client.key_value_set(f"{BEAT_KEY}{index}", DONE, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass

  atexit.register(done)
  threading.Thread(target=beat, name="tracefl-heartbeat", daemon=True).start()


def _heartbeats(client: Any, wait: float = 2.0) -> dict[int, float | None] | None:
  """`{process: last heartbeat, None when done}`; None when the service (process 0) does not
  answer within `wait` seconds."""
  answer: dict[str, Any] = {}

  def ask() -> None:
    try:
      answer["beats"] = {int(k.rsplit("/", 1)[-1]): None if v == DONE else float(v)
                         for k, v in client.key_value_dir_get(BEAT_KEY)}
    except Exception:  # pylint: disable=broad-except
      answer["beats"] = None

  thread = threading.Thread(target=ask, name="tracefl-heartbeats", daemon=True)
  thread.start()
  thread.join(wait)
  return answer.get("beats")


def lost_processes(wait: float = 3 * BEAT_SECONDS
                   ) -> tuple[list[int], dict[int, float | None]]:
  """The other processes whose heartbeat does not advance within `wait` seconds, with every
  process's last heartbeat; ([0], {}) when process 0, which holds the service, is gone;
  ([], beats) when every other process still beats (or ended normally)."""
  client, n, me = _client(), jax.process_count(), jax.process_index()
  if client is None or n == 1:
    return [], {}
  first = _heartbeats(client)
  if first is None:
    return ([0] if me != 0 else []), {}
  waiting = {k for k in range(n) if k != me and first.get(k, 0.0) is not None}
  deadline, beats = time.time() + wait, first
  while waiting and time.time() < deadline:
    time.sleep(BEAT_SECONDS / 2)
    beats = _heartbeats(client) or beats
    waiting = {k for k in waiting if beats.get(k, 0.0) is not None
               and beats.get(k, 0.0) == first.get(k, 0.0)}
  return sorted(waiting), beats


def lost_message(lost: list[int], beats: dict[int, float | None]) -> str:
  """One line naming the lost processes, their last heartbeats, and the way out."""
  n, me = jax.process_count(), jax.process_index()
  if not beats:
    what = f"process 0 (the coordinator) of the run's {n} is gone: process {me} cannot reach it"
  else:
    last = "; ".join(
        f"process {k}'s last heartbeat at "
        f"{time.strftime('%H:%M:%S', time.localtime(beats[k]))} "
        f"({time.time() - beats[k]:.0f} s ago)" if beats.get(k) else
        f"process {k} never sent a heartbeat" for k in lost)
    what = (f"process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))} of the "
            f"run's {n} died or {'were' if len(lost) > 1 else 'was'} stopped ({last})")
  return (f"{what}; the rows and checkpoints so far are kept: run the same command again "
          f"on every process to resume from the last checkpoint")


def exit_if_lost() -> None:
  """With several processes: when another process is gone, prints the one line naming it
  and ends this process now (code 3); returns when every other process still beats."""
  if jax.process_count() == 1:
    return
  lost, beats = lost_processes()
  if lost:
    exit_now(lost_message(lost, beats), 3)
