"""A lost process of a multi-process run, named: which one, and when it was last heard from.

JAX's coordination service notices a dead process only after `--heartbeat_timeout` seconds
and then ends every survivor natively (a C++ check failure and its stack); the collective
that meets the dead process first fails at once with a transport error ("Gloo AllGather
failed: ... Connection reset by peer") that names no process, and reached the terminal as a
disk problem when it came through a checkpoint. So every process writes its own heartbeat
(the time, each second) into the service's key-value store, and a survivor whose collective
failed reads them: a process whose heartbeat no longer advances is the one lost; and each
process's heartbeat thread watches the others' too, so a process blocked where no error
comes (a barrier) still names the lost one before JAX's check fires. The survivor then
prints one line and ends at once (`exit_now`): a normal exit would wait on the lost process
in JAX's shutdown and end natively all the same.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import Any

import jax

BEAT_KEY = "tracefl/heartbeat/"
BEAT_SECONDS = 1.0
DONE = "done"  # a process that ended normally: not lost when its beat stops


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
