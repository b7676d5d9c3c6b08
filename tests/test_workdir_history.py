"""Issue 23's workdir cases: one run per workdir (an OS lock), histories without gaps on resume,
derived outputs rebuilt, orbax's failures kept to one line, and the CLI checks that come
before any work (`trace --out`, .npz inputs, a negative seed).

One tiny finished run (tests/test_faults.py's TINY: digits, 10 clients, 3 per round, 2 rounds,
a checkpoint per round) is made once; each test works on its own copy.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_faults import TINY, _cli, _config, _snapshot, _untimed
from tracefl_jax.experiment import cli, runner, stored, summary as outputs
from tracefl_jax.experiment.io import WorkdirError, read_jsonl
from tracefl_jax.experiment.workdir import LOCK_FILE, WorkdirBusyError
from tests.xla_env import xla_flags

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
  workdir = tmp_path_factory.mktemp("finished") / "run"
  runner.run(_config(), workdir, progress=False, figures=True)
  return workdir


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  return workdir


def _rows(path: Path) -> list[dict]:
  return _untimed(read_jsonl(path)[0])


# --- One run per workdir --------------------------------------------------------------------


def test_a_second_run_is_refused_at_once_and_a_dead_holders_lock_never_blocks(run_copy):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys; from tracefl_jax.experiment.workdir import WorkdirLock;"
       f"WorkdirLock({str(run_copy)!r}).acquire(); print('held', flush=True); sys.stdin.read()"],
      cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    before = _snapshot(run_copy)
    t0 = time.perf_counter()
    with pytest.raises(WorkdirBusyError) as info:
      runner.run(_config(), run_copy, progress=False)
    assert time.perf_counter() - t0 < 5  # refused at once, not after loading or training
    message = str(info.value)
    assert message.startswith(f"workdir {run_copy} is in use by another run (pid {holder.pid} "
                              f"on host {socket.gethostname()}, since "), message
    assert message.endswith("); wait for it to end, or use another --workdir")
    assert _snapshot(run_copy) == before
    proc = _cli(*TINY, f"--workdir={run_copy}", "--quiet")  # the command line: one line
    assert proc.returncode == 2 and proc.stderr == f"error: {message}\n", proc.stderr[-2000:]
  finally:
    holder.kill()  # SIGKILL: the kernel releases the lock; the lock file stays behind
    holder.wait()
    holder.stdin.close()
    holder.stdout.close()
  assert (run_copy / LOCK_FILE).exists()
  assert runner.run(_config(), run_copy, progress=False)["rounds"] == 2  # not blocked
  assert not (run_copy / LOCK_FILE).exists()


# --- Histories without gaps -----------------------------------------------------------------


def test_metrics_rows_the_checkpoint_holds_are_rebuilt_on_resume(run_copy, finished, capsys):
  (run_copy / "summary.json").unlink()  # unfinished: it resumes from checkpoint 2
  lines = (run_copy / "metrics.jsonl").read_text().splitlines(keepends=True)
  (run_copy / "metrics.jsonl").write_text(lines[1])  # round 1's row lost
  assert runner.run(_config(), run_copy, progress=False)["rounds"] == 2
  assert capsys.readouterr().err == (f"note: {run_copy / 'metrics.jsonl'} lacked the rows of "
                                     f"rounds 1; rebuilt them from checkpoint 2\n")
  assert _rows(run_copy / "metrics.jsonl") == _rows(finished / "metrics.jsonl")
  (run_copy / "summary.json").unlink()
  (run_copy / "metrics.jsonl").unlink()  # the whole file lost
  assert runner.run(_config(), run_copy, progress=False)["rounds"] == 2
  assert "lacked the rows of rounds 1, 2; rebuilt" in capsys.readouterr().err
  assert _rows(run_copy / "metrics.jsonl") == _rows(finished / "metrics.jsonl")
  assert _rows(run_copy / "provenance.jsonl") == _rows(finished / "provenance.jsonl")


def test_a_torn_row_is_judged_by_its_round(run_copy, finished, capsys):
  (run_copy / "summary.json").unlink()
  for name in ("metrics.jsonl", "provenance.jsonl"):
    text = (run_copy / name).read_text()
    (run_copy / name).write_text(text[:-40])  # round 2's last row torn; checkpoint 2 holds it
  before = _snapshot(run_copy)
  with pytest.raises(WorkdirError) as info:  # round 2's traced input is lost: refused
    runner.run(_config(), run_copy, progress=False)
  assert str(info.value) == (
      f"{run_copy / 'provenance.jsonl'} lacks rows of rounds 2, which checkpoint 2 holds (their "
      f"traced inputs cannot be rebuilt from a checkpoint); restore the file, or start afresh "
      f"with --overwrite (the run moves to {run_copy / 'previous'}/<time>/)")
  assert _snapshot(run_copy) == before  # checked before anything is written
  shutil.copy(finished / "provenance.jsonl", run_copy / "provenance.jsonl")
  capsys.readouterr()
  assert runner.run(_config(), run_copy, progress=False)["rounds"] == 2
  assert capsys.readouterr().err == (
      f"note: dropped the torn last line of {run_copy / 'metrics.jsonl'} (a crash mid-write; "
      f"round 2, which checkpoint 2 holds)\nnote: {run_copy / 'metrics.jsonl'} lacked the rows "
      f"of rounds 2; rebuilt them from checkpoint 2\n")
  assert _rows(run_copy / "metrics.jsonl") == _rows(finished / "metrics.jsonl")


def test_missing_summary_and_figures_are_rebuilt(run_copy, finished, capsys):
  old = json.loads((finished / "summary.json").read_text())
  (run_copy / "summary.json").unlink()
  (run_copy / "client_probs.png").unlink()
  new = runner.run(_config(), run_copy, progress=False, figures=True)
  assert _untimed({k: v for k, v in new.items() if k != "memory"}) == _untimed(
      {k: v for k, v in old.items() if k != "memory"})
  assert new["seconds"] >= json.loads((finished / "checkpoints" / "2" / "meta" /
                                       "metadata").read_text())["seconds"]
  assert json.loads((run_copy / "summary.json").read_text()) == new
  assert (run_copy / "client_probs.png").read_bytes()[:4] == b"\x89PNG"
  (run_copy / "label_distribution.png").unlink()  # a finished run: only the figure is made
  capsys.readouterr()
  runner.run(_config(), run_copy, progress=False, figures=True)
  assert "its files are unchanged; made its missing figures (label_distribution.png)" in (
      capsys.readouterr().err)
  assert (run_copy / "label_distribution.png").exists()


def test_summary_times_are_steady_state_and_seconds_count_every_invocation():
  history = [{"round": r, "accuracy": 0.5, "train_seconds": t,
              "provenance": {"inputs": 2, "accuracy": 1.0, "tracefl_seconds_per_input": p}}
             for r, t, p in ((1, 9.0, 5.0), (2, 1.0, 0.1), (3, 2.0, 0.3), (4, 3.0, 0.2))]
  summary = outputs.summarize(history, 42.0, "vmap")
  assert summary["round_seconds"] == 2.0 and summary["first_round_seconds"] == 9.0
  assert summary["provenance"]["tracefl_seconds_per_input"] == pytest.approx(0.2)  # not 1.4
  assert summary["seconds"] == 42.0


# --- Quiet failures -------------------------------------------------------------------------


def test_a_full_disk_is_one_line_logged_in_the_workdir_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
  # Every file the run writes may hold at most 200 KB: the checkpoint does not fit.
  cmd = ["bash", "-c", 'ulimit -f 200 && exec "$0" "$@"', sys.executable, "-m", "tracefl_jax",
         *TINY, f"--workdir={workdir}", "--quiet"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
  assert proc.stderr.startswith(f"error: cannot write checkpoint 1 in "
                                f"{workdir.resolve() / 'checkpoints'} (")
  assert "File too large" in proc.stderr and "Traceback" not in proc.stderr
  assert "Traceback" in (workdir / "run.log").read_text()
  proc = _cli(*TINY, f"--workdir={workdir}", "--quiet")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [r["round"] for r in read_jsonl(workdir / "metrics.jsonl")[0]] == [1, 2]


def test_an_unreadable_checkpoint_is_one_line(run_copy):
  data = max((p for p in (run_copy / "checkpoints" / "2" / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[:100])  # truncated: TensorStore cannot decode it
  proc = _cli(*TINY, "--config.rounds=3", f"--workdir={run_copy}", "--quiet")
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
  assert proc.stderr.startswith(f"error: checkpoint {run_copy.resolve() / 'checkpoints' / '2'} ")
  assert len(proc.stderr) < 800, proc.stderr


# --- Checked before any work ----------------------------------------------------------------


def _trace(argv, monkeypatch, capsys) -> str:
  def refuse(*_, **__):
    raise AssertionError("traced before the check")
  monkeypatch.setattr(stored, "trace_stored_round", refuse)
  with pytest.raises(SystemExit) as info:
    cli.trace(argv)
  assert info.value.code == 2
  return capsys.readouterr().err


def test_trace_checks_out_and_inputs_before_tracing(tmp_path, monkeypatch, capsys):
  x = tmp_path / "x.npy"
  np.save(x, np.zeros((2, 8, 8, 1), np.float32))
  common = ["--workdir", str(tmp_path), "--inputs", str(x)]
  out = tmp_path / "missing" / "rows.jsonl"
  err = _trace([*common, "--out", str(out)], monkeypatch, capsys)
  assert err.startswith(f"error: --out='{out}'") and "does not exist" in err
  assert err.count("\n") == 1
  err = _trace([*common, "--out", str(tmp_path)], monkeypatch, capsys)
  assert err.startswith(f"error: --out='{tmp_path}' is a directory") and err.count("\n") == 1
  npz = tmp_path / "x.npz"
  np.savez(npz, images=np.zeros(3), labels=np.zeros(3))
  err = _trace(["--workdir", str(tmp_path), "--inputs", str(npz)], monkeypatch, capsys)
  assert err.startswith(f"error: --inputs {str(npz)!r} is an .npz archive (keys images, labels)")
  assert err.count("\n") == 1


def test_a_negative_seed_names_the_field(tmp_path):
  with pytest.raises(ValueError, match=r"seed=-5 must be in \[0, 4294967295\]"):
    runner.run(_config("--config.seed=-5"), tmp_path / "run", progress=False)
  assert not (tmp_path / "run").exists()



def test_a_run_from_before_a_field_existed_resumes_at_its_default():
  # A config.json written before `algorithm` and `feddyn.alpha` were fields: those fields at
  # their defaults are the same experiment; a non-default value, or any other field, is not.
  from tracefl_jax.experiment.config import base_config
  from tracefl_jax.experiment.workdir import config_diff
  current = base_config()
  old = json.loads(current.to_json())
  del old["algorithm"], old["feddyn"]
  assert config_diff(json.dumps(old), current.to_json()) == []
  changed = base_config()
  changed.unlock()
  changed.algorithm = "scaffold"
  assert config_diff(json.dumps(old), changed.to_json()) == ["algorithm ('fedavg' -> 'scaffold')"]
  old["seed"] = 7
  assert config_diff(json.dumps(old), current.to_json()) == [f"seed (7 -> {current.seed!r})"]
