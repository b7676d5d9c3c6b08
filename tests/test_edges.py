"""Issue 38's edges, each bad input one line naming what is wrong and the way out, tested at
the function that decides it (no run starts; the suite stays fast):

  config relations   krum's num_byzantine against clients per round, fields the rule does not
                     use, a trimmed mean that cuts nothing, --sweep_shard without --sweep;
  several processes  flags checked before JAX starts, a refusal printed by process 0 only,
                     the dead peer named, a peer that never joins refused after the stated
                     wait (one short real process);
  a full disk        run.log that cannot grow keeps the terminal to the error line;
  causes named       the divergence guard's fields, a dangling-symlink lock file.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tracefl_jax.experiment import checkpoints, cli, cli_args, distributed, io, runner
from tracefl_jax.experiment.config import base_config, validate
from tracefl_jax.experiment.io import WorkdirError
from tracefl_jax.experiment.workdir import LOCK_FILE, WorkdirLock
from tracefl_jax.fl.rounds import TrainingDivergedError
from tests.xla_env import xla_flags

ROOT = Path(__file__).resolve().parents[1]
DEMO = f"--config={ROOT / 'configs' / 'demo.py'}:quick"


def _invalid(c) -> str:
  with pytest.raises(ValueError) as e:
    validate(c)
  return str(e.value)


# --- Config relations -----------------------------------------------------------------------


def test_krum_counts_are_checked_against_clients_per_round():
  c = base_config()  # 5 clients per round
  c.aggregation.rule, c.aggregation.num_byzantine = "krum", 10
  assert _invalid(c) == (
      "invalid config: aggregation.num_byzantine=10 must be at most clients_per_round - 3 = 2 "
      "for krum (each client is scored by its n - f - 2 >= 1 nearest neighbours; a larger f "
      "runs as f=2): lower it or raise clients_per_round")
  c.aggregation.num_byzantine = 2  # n - f - 2 = 1: the largest f that changes the result
  validate(c)
  c.aggregation.num_selected = 6
  assert "aggregation.num_selected=6 exceeds clients_per_round=5" in _invalid(c)


def test_counts_the_rule_ignores_and_a_trim_that_cuts_nothing_are_refused():
  c = base_config()
  c.aggregation.num_byzantine, c.aggregation.num_selected = 2, 3  # rule "mean"
  lines = _invalid(c).splitlines()[1:]
  assert lines == [
      "  - aggregation.num_byzantine=2 is used by aggregation.rule='krum' only (rule is "
      "'mean'): leave it at 0 or set rule='krum'",
      "  - aggregation.num_selected=3 is used by aggregation.rule='krum' only (rule is "
      "'mean'): leave it at 1 or set rule='krum'"]
  c = base_config()
  c.aggregation.rule, c.aggregation.trim_beta = "trimmed_mean", 0.1  # floor(0.1 x 5) = 0
  assert _invalid(c) == (
      "invalid config: aggregation.trim_beta=0.1 cuts floor(0.1 x clients_per_round=5) = 0 "
      "clients from each end, so the trimmed mean is the plain mean: set trim_beta >= 0.2 or "
      "use more clients per round")
  c.aggregation.trim_beta = 0.2
  validate(c)
  c.aggregation.trim_beta = 0.0  # explicitly the mean: allowed
  validate(c)


def test_sweep_shard_needs_sweep_and_not_collect():
  with pytest.raises(ValueError) as e:
    cli_args.parse_args([DEMO, "--workdir=w", "--sweep_shard=0/2"])
  assert str(e.value) == (
      "--sweep_shard=0/2 runs one share of a sweep's grid: it needs --sweep (without it the "
      "config's own run would go into the sweep's --workdir): add --sweep, or drop "
      "--sweep_shard")
  with pytest.raises(ValueError, match="needs --sweep and not --collect"):
    cli_args.parse_args([DEMO, "--workdir=w", "--sweep", "--collect", "--sweep_shard=0/2"])
  assert cli_args.parse_args([DEMO, "--workdir=w", "--sweep", "--sweep_shard=0/2"])


# --- Several processes ----------------------------------------------------------------------


def _join(*argv: str):
  return cli_args.join_flags(cli_args.parse_args([DEMO, "--workdir=w", *argv]).flags)


@pytest.mark.parametrize("argv,message", [
    (["--coordinator=localhost:abc", "--num_processes=2", "--process_id=0"],
     "--coordinator=localhost:abc must be HOST:PORT, process 0's address with a port number "
     "in 1..65535, e.g. --coordinator=localhost:12345"),
    (["--coordinator=localhost", "--num_processes=2", "--process_id=0"],
     "--coordinator=localhost must be HOST:PORT"),
    (["--coordinator=:123", "--num_processes=2", "--process_id=0"],
     "--coordinator=:123 must be HOST:PORT"),
    (["--coordinator=localhost:70000", "--num_processes=2", "--process_id=0"],
     "--coordinator=localhost:70000 must be HOST:PORT"),
    (["--num_processes=2", "--process_id=0"],
     "--num_processes=2 --process_id=0 joins a multi-process run, which also needs "
     "--coordinator: every process gets --coordinator=HOST:PORT (process 0's address, the "
     "same for all), --num_processes=N and its own --process_id=I; on a cluster whose "
     "scheduler JAX reads (SLURM, Open MPI, ...) use --distributed instead"),
    (["--coordinator=localhost:1234"], "also needs --num_processes and --process_id"),
    (["--coordinator=localhost:1234", "--num_processes=2", "--process_id=2"],
     "--process_id=2 must be in 0..1 (--num_processes=2)"),
    (["--num_processes=two", "--distributed"], "--num_processes=two must be an integer >= 1"),
    (["--distributed", "--heartbeat_timeout=0"], "--heartbeat_timeout=0 must be an integer >= 1"),
    (["--distributed", "--join_timeout=soon"], "--join_timeout=soon must be an integer >= 1"),
])
def test_multi_process_flags_are_checked_before_jax_starts(argv, message):
  with pytest.raises(ValueError) as e:
    _join(*argv)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_valid_multi_process_flags():
  assert _join() is None  # one process: nothing to join
  assert _join("--coordinator=[::1]:1234", "--num_processes=2", "--process_id=1",
               "--join_timeout=20") == cli_args.Join("[::1]:1234", 2, 1, 60, 20)
  assert _join("--distributed") == cli_args.Join(None, None, None, 60, 300)  # the cluster's


def test_process_0s_refusal_reaches_the_others_silently(monkeypatch):
  """Process 1 printed a raw traceback when process 0 refused a busy workdir: the refusal's
  type did not reach it ('WorkdirBusyError' does not end with 'WorkdirError')."""
  monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
  monkeypatch.setattr(distributed.jax, "process_index", lambda: 1)
  for error, kind in ((WorkdirError("workdir w is in use"), WorkdirError),
                      (OSError("disk"), RuntimeError)):
    monkeypatch.setattr(distributed, "_broadcast_text", lambda text, e=error: (
        '{"error": "%s", "workdir": %s}' % (e, "true" if isinstance(e, WorkdirError)
                                              else "false")))
    with pytest.raises(distributed.StoppedByPrimary) as info:
      distributed.on_primary(lambda: None)
    assert isinstance(info.value, kind)


def test_a_lost_process_is_named_with_its_last_heartbeat(monkeypatch):
  """A dead peer was reported as a disk problem ('make room ...') when the collective that
  met it was a checkpoint's, then JAX's shutdown aborted natively."""
  monkeypatch.setattr(distributed.jax, "process_count", lambda: 3)
  monkeypatch.setattr(distributed.jax, "process_index", lambda: 0)
  monkeypatch.setattr(distributed, "_client", lambda: object())
  now = time.time()
  stamp = time.strftime("%H:%M:%S", time.localtime(now - 4))
  reads = iter([{0: now, 1: now - 4, 2: now}, {0: now, 1: now - 4, 2: now + 1}])
  monkeypatch.setattr(distributed, "_heartbeats", lambda client: next(reads, {0: now, 1: now - 4,
                                                                       2: now + 1}))
  monkeypatch.setattr(distributed, "BEAT_SECONDS", 0.01)
  lost, beats = distributed.lost_processes(wait=0.1)  # process 2's beat advanced, 1's did not
  assert lost == [1]
  assert distributed.lost_message(lost, beats) == (
      f"process 1 of the run's 3 died or was stopped (process 1's last heartbeat at {stamp} "
      f"(4 s ago)); the rows and checkpoints so far are kept: run the same command again on "
      f"every process to resume from the last checkpoint")
  monkeypatch.setattr(distributed, "_heartbeats", lambda client: {0: now, 1: None, 2: None})
  assert distributed.lost_processes(wait=0.1)[0] == []  # ended normally ('done'): not lost
  monkeypatch.setattr(distributed.jax, "process_index", lambda: 1)
  monkeypatch.setattr(distributed, "_heartbeats", lambda client: None)  # the service is gone
  assert distributed.lost_processes(wait=0.1) == ([0], {})
  assert distributed.lost_message([0], {}).startswith(
      "process 0 (the coordinator) of the run's 3 is gone: process 1 cannot reach it; ")


def test_a_process_whose_peer_never_joins_stops_after_the_stated_wait():
  """JAX's own deadline ends the process with a C++ check failure and its stack, after 300 s
  by default; --join_timeout bounds the wait and ends it in one line."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
  code = ("from tracefl_jax.experiment import distributed; "
          "distributed.initialize('localhost:1', 2, 1, initialization_timeout=2)")
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=60, check=False)
  assert proc.returncode == 3 and time.perf_counter() - t0 < 30, proc.stderr[-2000:]
  assert proc.stderr == (
      "error: process 1: not all 2 processes joined at localhost:1 within 2 s "
      "(--join_timeout); start every process with the same command (and each its own "
      "--process_id), or raise --join_timeout\n")


# --- A full disk ----------------------------------------------------------------------------


def test_a_run_log_that_cannot_grow_keeps_the_terminal_to_one_line(tmp_path, monkeypatch,
                                                                   capfd):
  """On a full disk logging printed each record it could not write with two tracebacks
  (94-139 lines); the error line no longer points at the log either."""
  class Full:
    def write(self, text):
      raise OSError(errno.ENOSPC, "No space left on device")
    flush = close = lambda self: None

  def cannot_create(self):
    raise OSError(errno.ENOSPC, "No space left on device")

  for opened in (lambda self: Full(), cannot_create):  # run.log cannot grow, or be made
    monkeypatch.setattr(checkpoints._LogFile, "_open", opened)
    with checkpoints.quiet_orbax(tmp_path):
      try:
        raise ValueError("RESOURCE_EXHAUSTED: writing leaf00001")
      except ValueError:
        logging.getLogger("orbax").exception("saving checkpoint %d", 1)
    assert capfd.readouterr().err == ""
  assert checkpoints.details(tmp_path) == f"{tmp_path / 'run.log'} could not be written either"
  line = cli._os_error_line(OSError(errno.ENOSPC, "No space left on device"), str(tmp_path))
  assert line == (f"cannot write in {tmp_path}: No space left on device (the disk or quota is "
                  f"full); the rows and checkpoints written so far are kept: make room and run "
                  f"the same command again to resume from the last checkpoint")


def test_a_write_on_a_full_disk_names_its_file_and_leaves_no_temporary(tmp_path, monkeypatch):
  def full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(Path, "write_text", full)
  with pytest.raises(OSError) as e:
    io.write_atomic(tmp_path / "partition.json", "{}")
  assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "partition.json")
  assert list(tmp_path.iterdir()) == []
  assert cli._os_error_line(e.value, str(tmp_path)).startswith(
      f"cannot write {tmp_path / 'partition.json'}: No space left on device (the disk or quota "
      f"is full); ")


# --- Messages that name the cause -----------------------------------------------------------


def test_divergence_names_the_fields_that_could_have_caused_it():
  e = TrainingDivergedError("round 1: training diverged, mean client loss 1e+09 exceeds 1000 "
                            "x ln(classes) = 2303 (client losses 1e+09). Lower the learning "
                            "rate.")
  c = base_config()
  c.server.optimizer, c.server.learning_rate = "sgd", 1e6
  c.client.loss, c.client.prox_mu = "fedprox", 1e12
  assert runner.diverged_message(e, c) == (
      "round 1: training diverged, mean client loss 1e+09 exceeds 1000 x ln(classes) = 2303 "
      "(client losses 1e+09). The fields that set its steps: client.learning_rate=0.001 "
      "(client.optimizer=adam), server.learning_rate=1e+06 (server.optimizer=sgd), "
      "client.prox_mu=1e+12 (client.loss=fedprox); server.learning_rate and client.prox_mu "
      "are unusually large: lower them.")
  c = base_config()  # plain FedAvg: only the client's learning rate sets the steps
  nan = TrainingDivergedError("round 2: non-finite training loss on clients [3]. Lower the "
                              "learning rate or check the data for NaN/inf values.")
  assert runner.diverged_message(nan, c) == (
      "round 2: non-finite training loss on clients [3]. The fields that set its steps: "
      "client.learning_rate=0.001 (client.optimizer=adam); lower one of them, or check the "
      "data for NaN/inf values.")


def test_a_dangling_symlink_lock_file_is_named(tmp_path):
  (tmp_path / LOCK_FILE).symlink_to(tmp_path / "gone" / "lock")
  with pytest.raises(WorkdirError) as e:
    WorkdirLock(tmp_path).acquire()
  assert str(e.value) == (
      f"{tmp_path / LOCK_FILE} is a symbolic link (to {tmp_path / 'gone' / 'lock'}), not the "
      f"lock file a run leaves: remove it (rm {tmp_path / LOCK_FILE}) and run again")
  (tmp_path / LOCK_FILE).unlink()
  (tmp_path / LOCK_FILE).mkdir()
  with pytest.raises(WorkdirError, match="cannot open the workdir's lock file .* must be a "
                     "regular file"):
    WorkdirLock(tmp_path).acquire()
