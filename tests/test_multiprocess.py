"""Real multi-process runs: processes on localhost joined by jax.distributed (CPU devices, gloo).

The library: each process calls `jax.distributed.initialize` (CPU collectives: gloo, jax's default) and runs
tests/distributed_worker.py's `round_and_trace`: a `sharded` FedAvg round and a sharded
`trace_clients` over all 4 global devices. The test process runs the same function on its own
4 fake devices; both must agree.

The runner: `python -m tracefl_jax` as two processes of 2 devices each (the demo's quick preset,
`sharded` strategy, sharded provenance), one of them killed (SIGKILL) after round 1: the other
stops with an error instead of hanging, and the same command run again resumes; the rows
written before the kill and after, and summary.json, equal one process's over 4 devices.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import distributed_worker
from tests.xla_env import xla_flags

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_equal_one(tmp_path):
  env = {**os.environ, "XLA_FLAGS": xla_flags(2),
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  port, out = _free_port(), tmp_path / "result.npz"
  procs = [subprocess.Popen(
      [sys.executable, str(ROOT / "tests" / "distributed_worker.py"), str(i), "2", str(port),
       str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  try:
    want = distributed_worker.round_and_trace()  # meanwhile: one process, 4 devices
    logs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{log[-3000:]}"
  got = dict(np.load(out))
  assert int(got["devices"]) == int(want["devices"]) == 4
  assert set(got) == set(want)
  for name in sorted(want):
    if name.startswith("param_") or name == "losses":
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
  scale = float(np.abs(want["scores"]).max())
  np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_array_equal(got["traced_client"], want["traced_client"])
  np.testing.assert_array_equal(got["predicted"], want["predicted"])
  assert got["scores"].shape == (10, distributed_worker.NUM_CLIENTS)


# --- The experiment runner under several processes -----------------------------------------

# The leave-one-client-out truth (and the weight-aware score beside it) is off: neither is
# sharded (every process would compute the same replicated programs, tested in one process by
# test_counterfactual and test_weight_aware), so here it would only add compilation to every
# process of every run.
SHARDED = ["--config=configs/demo.py:quick", "--quiet", "--config.rounds=3",
           "--config.checkpoint.every=1", "--config.simulation.strategy=sharded",
           "--config.provenance.shard_clients=True", "--config.provenance.counterfactual=False"]


def _runner(workdir: Path, devices: int, *extra: str,
            process: tuple[int, int, int] | None = None) -> subprocess.Popen:
  """`python -m tracefl_jax` on `devices` fake CPU devices; `process`: (id, count, port).

  The processes compile the same programs: later runs load them from the session's
  compilation cache (tests/conftest.py; the environment carries it)."""
  env = {**os.environ, "XLA_FLAGS": xla_flags(devices),
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  joined = [] if process is None else [
      f"--process_id={process[0]}", f"--num_processes={process[1]}",
      f"--coordinator=localhost:{process[2]}", "--heartbeat_timeout=10"]
  log = open(workdir.parent / f"{workdir.name}.{process[0] if process else 'single'}.log", "a",
             encoding="utf-8")
  with log:
    return subprocess.Popen([sys.executable, "-m", "tracefl_jax", *SHARDED,
                             f"--workdir={workdir}", *joined, *extra], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _processes(workdir: Path, n: int) -> list[subprocess.Popen]:
  port = _free_port()
  return [_runner(workdir, 4 // n, process=(i, n, port)) for i in range(n)]


def _logs(workdir: Path) -> str:
  return "\n".join(p.read_text()[-2000:] for p in sorted(workdir.parent.glob(f"{workdir.name}.*.log")))


def _wait(procs: list[subprocess.Popen], workdir: Path, timeout: float = 240) -> list[int]:
  try:
    return [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def _same(got, want, where="") -> None:
  """Rows equal, floats to 1e-5 (cross-process sums may round differently), timings aside."""
  if isinstance(want, dict):
    keys = {k for k in want if "seconds" not in k}
    assert keys == {k for k in got if "seconds" not in k}, where
    for k in keys:
      _same(got[k], want[k], f"{where}.{k}")
  elif isinstance(want, list):
    assert len(got) == len(want), where
    for i, (g, w) in enumerate(zip(got, want)):
      _same(g, w, f"{where}[{i}]")
  elif isinstance(want, float):
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6), where
  else:
    assert got == want, where


def _jsonl(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
  """The reference: one process over 4 devices."""
  workdir = tmp_path_factory.mktemp("single") / "run"
  proc = _runner(workdir, 4)
  assert _wait([proc], workdir) == [0], _logs(workdir)
  return workdir


def _assert_equal_runs(workdir: Path, single: Path) -> None:
  for name in ("metrics.jsonl", "provenance.jsonl"):
    _same(_jsonl(workdir / name), _jsonl(single / name), name)
  _same({k: v for k, v in json.loads((workdir / "summary.json").read_text()).items()
         if k != "memory"},
        {k: v for k, v in json.loads((single / "summary.json").read_text()).items()
         if k != "memory"}, "summary")


@pytest.mark.distributed
def test_runner_kill_9_one_process_then_rerun_equals_uninterrupted(tmp_path, single):
  workdir = tmp_path / "run"
  procs = _processes(workdir, 2)
  deadline = time.time() + 240
  try:
    while not (workdir / "metrics.jsonl").exists() or not _jsonl(workdir / "metrics.jsonl"):
      assert all(p.poll() is None for p in procs), _logs(workdir)
      assert time.time() < deadline, "the run never finished round 1"
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    codes = _wait(procs, workdir, timeout=90)  # the survivor stops; it does not hang
    assert codes[1] == -signal.SIGKILL and codes[0] != 0, _logs(workdir)
    assert time.time() - t0 < 60
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  done = len(_jsonl(workdir / "metrics.jsonl"))
  assert 1 <= done < 3, "the run must be killed mid-way"
  procs = _processes(workdir, 2)  # the same command again: resumes
  assert _wait(procs, workdir) == [0, 0], _logs(workdir)
  _assert_equal_runs(workdir, single)  # every row, those before the kill and after
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "3"]


@pytest.mark.distributed
def test_runner_four_processes_equal_one(tmp_path, single):
  # One device per process: every collective of the sharded round and trace crosses processes.
  workdir = tmp_path / "run"
  assert _wait(_processes(workdir, 4), workdir, timeout=400) == [0, 0, 0, 0], _logs(workdir)
  _assert_equal_runs(workdir, single)
  written = sorted(p.name for p in workdir.iterdir() if p.is_file())
  assert {"metrics.jsonl", "provenance.jsonl", "summary.json"} <= set(written)


@pytest.mark.distributed
def test_processes_started_with_different_configs_are_refused_at_start(tmp_path):
  """Issue 38: a pair whose --config.rounds differ ran into one workdir; now process 0 names
  the process and the field in one line before any data is loaded, process 1 prints nothing
  (process 0's line is the run's), and both exit 2."""
  workdir, port = tmp_path / "run", _free_port()
  procs = [_runner(workdir, 2, f"--config.rounds={3 + i}", process=(i, 2, port))
           for i in range(2)]
  assert _wait(procs, workdir, timeout=120) == [2, 2], _logs(workdir)
  logs = [(tmp_path / f"run.{i}.log").read_text() for i in range(2)]
  errors = [[l for l in log.splitlines() if not l.startswith("[Gloo]")] for log in logs]
  assert errors == [["error: process 1 was started with another config or flags than process "
                     "0 (differing in: rounds); start every process with the same command but "
                     "its --process_id"], []], logs
  assert not workdir.exists() or not any(workdir.iterdir())
