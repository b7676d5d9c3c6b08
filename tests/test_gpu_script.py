"""The GPU benchmark's CPU smoke mode: the same script, tiny sizes, so it cannot rot before a
GPU comes (issue 12 item 7). Runs benchmarks/gpu.py in a subprocess as gpu.sh would."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.xla_env import xla_flags

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_smoke(tmp_path):
  out = tmp_path / "gpu"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(),
         "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  # Every section but attribution and scale, which tests/test_attribution_experiment.py and
  # tests/test_scale.py run in the process that has just compiled the same smoke preset (here
  # it would compile them again).
  sections = "correctness,round,provenance,reference"
  assert ",".join(_gpu_script().SECTIONS) == sections + ",attribution,scale"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke",
                         f"--out={out}", f"--sections={sections}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = [json.loads(line) for line in (out / "gpu.jsonl").read_text().splitlines()]
  assert all(r["mode"] == "smoke" and "versions" in r and "peak_bytes" in r for r in rows)
  checks = [r for r in rows if r["section"] == "correctness" and "max_rel_err" in r]
  names = {r["name"] for r in checks}
  assert {"strategy vmap == loop", "strategy chunked == loop", "strategy scan == loop",
          "cnn_patches == cnn_xla (logits)", "provenance jvp == grad",
          "provenance reference == grad"} <= names
  assert all(r["status"] == "pass" for r in checks), [r for r in checks if r["status"] != "pass"]
  assert not [r for r in rows if r["status"] in ("fail", "error", "skipped")], rows
  # Every section measured something: the round against its limit, provenance at each size.
  assert any(r["section"] == "round" and r.get("limit_fraction") for r in rows)
  assert any(r["section"] == "provenance" and r.get("pairs_per_s") for r in rows)
  table = (out / "gpu.md").read_text()
  assert "| correctness | strategy vmap == loop | pass |" in table
  assert "trace_clients" in table


def _gpu_script():
  """benchmarks/gpu.py as a module (its sections and sizes), without running it."""
  spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
