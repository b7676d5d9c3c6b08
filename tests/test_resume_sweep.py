"""Checkpoint/resume after a real SIGKILL, clear checkpoint errors, and sweeps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tracefl_jax.experiment import runner as experiment, sweep
from tracefl_jax.experiment.checkpoints import CheckpointError
from tracefl_jax.experiment.io import WorkdirError
from tracefl_jax.experiment.config import base_config
from tests.xla_env import xla_flags

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--config.num_clients=20", "--config.clients_per_round=5",
         "--config.client.local_epochs=1", "--config.checkpoint.every=1"]
# Timings differ between runs; everything else must be identical.


def _cli(workdir: Path, *extra: str) -> subprocess.Popen:
  # The runs compile the same programs: the later ones load them from the session's
  # compilation cache (tests/conftest.py; the environment carries it).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir.parent / f"{workdir.name}.stderr", "a", encoding="utf-8") as log:
    return subprocess.Popen(
        [sys.executable, "-m", "tracefl_jax", "--config=configs/demo.py",
         f"--workdir={workdir}", "--quiet", "--config.rounds=5", *SMALL, *extra],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)


def _stderr(workdir: Path) -> str:
  return (workdir.parent / f"{workdir.name}.stderr").read_text()[-3000:]


def _rows(workdir: Path, name: str) -> list[dict]:
  path = workdir / name
  if not path.exists():
    return []
  rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  return [_untimed(r) for r in rows]


def _untimed(row):
  """A row without wall-clock fields or memory readings (at any depth), which differ between
  runs."""
  if isinstance(row, dict):
    return {k: _untimed(v) for k, v in row.items() if "seconds" not in k and k != "memory"}
  return row


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
  full, killed = tmp_path / "full", tmp_path / "killed"
  proc = _cli(full)
  assert proc.wait(timeout=300) == 0, _stderr(full)

  proc = _cli(killed)
  deadline = time.time() + 240
  while len(_rows(killed, "metrics.jsonl")) < 2 and proc.poll() is None:
    assert time.time() < deadline, "the run never reached round 2"
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  assert proc.wait(timeout=30) == -signal.SIGKILL
  done_at_kill = len(_rows(killed, "metrics.jsonl"))
  assert 2 <= done_at_kill < 5, "the run must be killed mid-way"

  proc = _cli(killed)
  assert proc.wait(timeout=300) == 0, _stderr(killed)
  assert _rows(killed, "metrics.jsonl") == _rows(full, "metrics.jsonl")
  assert _rows(killed, "provenance.jsonl") == _rows(full, "provenance.jsonl")
  s_full = json.loads((full / "summary.json").read_text())
  s_killed = json.loads((killed / "summary.json").read_text())
  assert _untimed(s_killed) == _untimed(s_full)


def _small_config(rounds=2):
  c = base_config()
  c.rounds = rounds
  c.num_clients = 20
  c.clients_per_round = 5
  c.client.local_epochs = 1
  c.checkpoint.every = 1
  return c


def test_corrupt_or_foreign_checkpoint_is_a_clear_error_and_kept(tmp_path):
  experiment.run(_small_config(), tmp_path, progress=False)
  step_dir = tmp_path / "checkpoints" / "2"
  other = _small_config()
  other.partition.alpha = 0.9
  with pytest.raises(WorkdirError, match=r"different experiment .*partition.alpha"):
    experiment.run(other, tmp_path, progress=False)
  # Corrupt the array data: the error names the checkpoint, and nothing is overwritten. (A
  # longer run resumes from it; the same 2 rounds would be the finished run, left alone.)
  for f in (step_dir / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "METADATA" not in f.name:
      f.write_bytes(b"\0garbage")
  shutil.rmtree(step_dir / "meta")
  before = sorted(p.name for p in step_dir.rglob("*"))
  with pytest.raises(CheckpointError, match="corrupt"):
    experiment.run(_small_config(rounds=3), tmp_path, progress=False)
  assert sorted(p.name for p in step_dir.rglob("*")) == before


def test_longer_run_resumes_from_a_finished_one(tmp_path):
  first = experiment.run(_small_config(rounds=2), tmp_path, progress=False)
  assert first["rounds"] == 2
  longer = experiment.run(_small_config(rounds=3), tmp_path, progress=False)
  assert longer["rounds"] == 3
  rows = _rows(tmp_path, "metrics.jsonl")
  assert [r["round"] for r in rows] == [1, 2, 3]


def test_sweep_runs_grid_skips_finished_and_writes_results(tmp_path):
  grid = {"partition.alpha": [0.3, 1.0], "seed": [1, 2]}
  config = _small_config()
  rows = sweep.run_sweep(config, grid, tmp_path, progress=False)
  assert [r["run"] for r in rows] == ["partition.alpha=0.3,seed=1", "partition.alpha=0.3,seed=2",
                                      "partition.alpha=1.0,seed=1", "partition.alpha=1.0,seed=2"]
  assert not any(r["skipped_existing"] for r in rows)
  table = (tmp_path / "results.md").read_text()
  assert "localization_acc" in table and table.count("\n") == 6
  assert (tmp_path / "results.csv").read_text().count("\n") == 5
  for png in (tmp_path / "accuracy_vs_partition.alpha.png",
              tmp_path / rows[0]["run"] / "client_probs.png",
              tmp_path / rows[0]["run"] / "label_distribution.png"):
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
  again = sweep.run_sweep(config, grid, tmp_path, progress=False)
  assert all(r["skipped_existing"] for r in again)
  assert [r["best_accuracy"] for r in again] == [r["best_accuracy"] for r in rows]
  with pytest.raises(ValueError, match=r"unknown config field 'partition.alfa' \(sweep field "
                     r"partition.alfa\); did you mean --config.partition.alpha\?"):
    sweep.run_sweep(config, {"partition.alfa": [0.1]}, tmp_path)
  # A job array: two shards into another directory, then collect: the same tables.
  shards = tmp_path / "shards"
  first = sweep.run_sweep(config, grid, shards, progress=False, shard=(0, 2))
  assert [r["run"] for r in first] == [rows[0]["run"], rows[2]["run"]]
  assert not (shards / "results.csv").exists()  # a shard writes no table
  _, missing = sweep.collect(config, grid, shards)
  assert missing == [rows[1]["run"], rows[3]["run"]]
  sweep.run_sweep(config, grid, shards, progress=False, shard=(1, 2))
  collected, missing = sweep.collect(config, grid, shards)
  assert not missing and [r["run"] for r in collected] == [r["run"] for r in rows]
  assert _table(shards / "results.csv") == _table(tmp_path / "results.csv")
  assert (shards / "accuracy_vs_partition.alpha.png").read_bytes()[:4] == b"\x89PNG"
  assert sweep.shard_from_environment({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "3",
                                       "SLURM_ARRAY_TASK_COUNT": "2"}) == (1, 2)
  with pytest.raises(ValueError, match=r"--sweep_shard=2/2: takes I/N with 0 <= I < N"):
    sweep.parse_shard("2/2")
  other = _small_config()  # the same run directories, another experiment: refused, not mixed
  other.client.batch_size = 16
  with pytest.raises(WorkdirError, match=r"partition.alpha=0.3,seed=1 holds a run .* of a "
                     r"different experiment \(config differs in: client.batch_size \(32 -> 16\)\)"):
    sweep.run_sweep(other, grid, tmp_path, progress=False)


def _table(path: Path) -> list[dict]:
  """results.csv without the columns that differ between runs (times, memory)."""
  import csv  # pylint: disable=g-import-not-at-top
  with open(path, encoding="utf-8") as f:
    return [{k: v for k, v in row.items() if k not in _TIMED} for row in csv.DictReader(f)]


_TIMED = ("seconds", "s_per_round", "first_round_s", "prov_s_per_round", "first_prov_s",
          "tracefl_s_per_input", "feddebug_s_per_input", "peak_rss_mb", "device_peak_mb")


def test_divergence_stops_with_a_clear_error(tmp_path):
  c = _small_config(rounds=3)
  c.client.optimizer = "sgd"
  c.client.learning_rate = 1e30
  with pytest.raises(experiment.TrainingDivergedError,
                     match=r"round 1: non-finite training loss on clients \[.*learning_rate"):
    experiment.run(c, tmp_path, progress=False)
  assert (tmp_path / "config.json").exists() and (tmp_path / "partition.json").exists()
  assert _rows(tmp_path, "metrics.jsonl") == []  # no row for the diverged round
