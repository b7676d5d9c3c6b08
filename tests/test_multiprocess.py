"""A real multi-process run: two processes on localhost, 2 fake CPU devices each, one mesh.

Each process calls `jax.distributed.initialize` (CPU collectives: gloo, jax's default) and runs
tests/distributed_worker.py's `round_and_trace`: a `sharded` FedAvg round and a sharded
`trace_clients` over all 4 global devices. The test process runs the same function on its own
4 fake devices; both must agree.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import distributed_worker

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_equal_one(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
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
