"""Fault injection (issue 13): the workdir, the checkpoints, the JSONL files and the command
line under faults and bad input. Nothing is lost, nothing is mixed, nothing is silent, and
every mistake is one `error: ...` line naming the bad input and the way out.

One tiny finished run (digits, 10 clients, 3 per round, 2 rounds, a checkpoint per round,
round 2 stored) is made once; each test works on its own copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from tracefl_jax.experiment import cli, runner, stages
from tracefl_jax.experiment.checkpoints import CheckpointError
from tracefl_jax.experiment.io import WorkdirError, read_jsonl
from tracefl_jax.experiment.stored import load_round
from tracefl_jax.experiment.config import FIELD_HELP, base_config, config_fields
from tracefl_jax.fl.rounds import (FederatedAlgorithm, RoundOutput, ServerState,
                                   TrainingDivergedError, run_rounds)
from tests.xla_env import xla_flags

ROOT = Path(__file__).resolve().parents[1]
DEMO = f"--config={ROOT / 'configs' / 'demo.py'}:quick"
TINY = [DEMO, "--config.rounds=2", "--config.num_clients=10", "--config.clients_per_round=3",
        "--config.client.local_epochs=1", "--config.checkpoint.every=1",
        "--config.provenance.counterfactual=False", "--config.provenance.store_rounds=last"]


def _config(*overrides: str):
  """The config the CLI builds from TINY + overrides (so CLI reruns see the same config)."""
  return cli.parse_args([*TINY, *overrides], need_workdir=False).config


def _no_training(monkeypatch):
  """Fails the test if the run gets as far as loading data (checks must come first)."""
  def refuse(*_, **__):
    raise AssertionError("the dataset was loaded: the check did not come first")
  monkeypatch.setattr(stages, "load_dataset", refuse)


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


def _snapshot(workdir: Path) -> dict[str, bytes]:
  return {str(p.relative_to(workdir)): p.read_bytes()
          for p in sorted(workdir.rglob("*")) if p.is_file()}


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
  return subprocess.run([sys.executable, "-m", "tracefl_jax", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def _one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr == f"error: {message}\n", proc.stderr[-3000:]


# --- Data mixed or lost ------------------------------------------------------------------


def test_fresh_run_in_a_used_workdir_refuses_and_changes_nothing(run_copy, monkeypatch):
  before = _snapshot(run_copy)
  _no_training(monkeypatch)
  holds = (f"workdir {run_copy} holds a run (metrics.jsonl, provenance.jsonl, summary.json, "
           f"checkpoints/, rounds/)")
  ways_out = (f"use another --workdir, or pass --overwrite (--config.checkpoint.overwrite="
              f"True) to move the old run to {run_copy / 'previous'}/<time>/")
  with pytest.raises(WorkdirError) as info:  # the case: resume=False, another seed
    runner.run(_config("--config.checkpoint.resume=False", "--config.seed=7"), run_copy,
               progress=False)
  assert str(info.value) == (
      f"{holds}; a fresh run (checkpoint.resume=False) would mix with its results. Resume it "
      f"(the same config, checkpoint.resume=True), {ways_out}")
  with pytest.raises(WorkdirError) as info:  # resume=True, another seed
    runner.run(_config("--config.seed=7"), run_copy, progress=False)
  assert str(info.value) == (f"{holds} of a different experiment (config differs in: seed "
                             f"(42 -> 7)); resume it with its own config, {ways_out}")
  assert _snapshot(run_copy) == before


def test_overwrite_moves_the_old_run_aside_and_starts_afresh(run_copy, finished):
  before = _snapshot(run_copy)
  summary = runner.run(_config("--config.seed=7", "--config.rounds=1", "--overwrite"),
                       run_copy, progress=False)
  moved = list((run_copy / "previous").iterdir())
  assert len(moved) == 1
  assert _snapshot(moved[0]) == before  # all of the old run, byte for byte
  assert json.loads((run_copy / "config.json").read_text())["seed"] == 7
  rows, _ = read_jsonl(run_copy / "metrics.jsonl")
  assert [r["round"] for r in rows] == [1] and summary["rounds"] == 1
  assert json.loads((run_copy / "summary.json").read_text())["rounds"] == 1
  assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["1"]


def test_workdir_must_be_given_and_not_the_current_directory(tmp_path):
  (tmp_path / "keep.txt").write_text("mine")
  proc = _cli(*TINY, "--workdir=", cwd=tmp_path)
  _one_line_error(proc, "no workdir given (--workdir is empty): name the directory for the "
                        "run's results, e.g. --workdir=runs/demo")
  proc = _cli(*TINY, "--workdir=.", cwd=tmp_path)
  _one_line_error(proc, f"workdir '.' is the current directory ({tmp_path}): the run's files "
                        f"(config.json, metrics.jsonl, checkpoints/, ...) would mix with what "
                        f"is there; name a sub-directory such as --workdir=runs/demo, or pass "
                        f"--allow_cwd to use it on purpose")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
  with pytest.raises(WorkdirError, match="no workdir given"):
    runner.run(_config(), "", progress=False)


def test_finished_run_rerun_changes_nothing(run_copy, capsys):
  before = _snapshot(run_copy)
  mtimes = {p: p.stat().st_mtime_ns for p in run_copy.rglob("*")}
  summary = runner.run(_config(), run_copy, progress=False)
  assert summary == json.loads(before["summary.json"])
  message = (f"nothing to do: {run_copy} holds this config's finished run (2 rounds); its "
             f"files are unchanged (a larger --config.rounds continues it, --overwrite starts "
             f"afresh)\n")
  assert capsys.readouterr().err == message
  proc = _cli(*TINY, f"--workdir={run_copy}", "--quiet")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr == message
  assert _snapshot(run_copy) == before
  assert {p: p.stat().st_mtime_ns for p in run_copy.rglob("*")} == mtimes


def test_fewer_rounds_than_done_is_an_error(run_copy, monkeypatch):
  before = _snapshot(run_copy)
  _no_training(monkeypatch)
  with pytest.raises(WorkdirError) as info:
    runner.run(_config("--config.rounds=1"), run_copy, progress=False)
  assert str(info.value) == (
      f"workdir {run_copy} holds a run (metrics.jsonl, provenance.jsonl, summary.json, "
      f"checkpoints/, rounds/) with 2 rounds done, more than rounds=1: a shorter run would "
      f"leave results that disagree. Pass --config.rounds=2 (or more) to keep or continue it, "
      f"use another --workdir, or pass --overwrite (--config.checkpoint.overwrite=True) to "
      f"move the old run to {run_copy / 'previous'}/<time>/")
  assert _snapshot(run_copy) == before


def _weight_file(step_dir: Path) -> Path:
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def test_corrupt_checkpoint_data_is_named_and_kept(run_copy):
  # 4 KB of 0xFF inside the weight data of the checkpoint a longer run resumes from.
  data = _weight_file(run_copy / "checkpoints" / "2")
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2:len(raw) // 2 + 4096] = b"\xff" * 4096
  data.write_bytes(bytes(raw))
  before = _snapshot(run_copy)
  with pytest.raises(CheckpointError) as info:
    runner.run(_config("--config.rounds=3"), run_copy, progress=False)
  message = str(info.value)
  assert message.startswith(f"checkpoint {run_copy.resolve() / 'checkpoints' / '2'} is "
                            f"corrupt: array variables/params/"), message
  assert message.endswith("does not match the SHA-256 checksum written with it. It was left "
                          "as it is: --overwrite moves the run to WORKDIR/previous/<time>/ to "
                          "start afresh, or use another --workdir.")
  assert _snapshot(run_copy) == before


def test_corrupt_stored_round_is_named(run_copy):
  assert load_round(run_copy).round == 2
  data = max((p for p in (run_copy / "rounds" / "2" / "arrays").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2:len(raw) // 2 + 64] = b"\xff" * 64
  data.write_bytes(bytes(raw))
  with pytest.raises(CheckpointError, match=r"^stored round .*rounds/2 is corrupt: array "
                     r"\S+ does not match the SHA-256 checksum written with it\. It was left "
                     r"as it is: rerun"):
    load_round(run_copy)


def test_torn_last_jsonl_line_is_dropped_on_resume(run_copy, finished, capsys):
  # A crash during round 2, after checkpoint 1: round 2's rows were half written.
  shutil.rmtree(run_copy / "checkpoints" / "2")
  shutil.rmtree(run_copy / "rounds")
  (run_copy / "summary.json").unlink()
  for name in ("metrics.jsonl", "provenance.jsonl"):
    text = (run_copy / name).read_text()
    (run_copy / name).write_text(text[:-40])  # the last line loses its end and newline
  assert runner.run(_config(), run_copy, progress=False)["rounds"] == 2
  assert capsys.readouterr().err == "".join(
      f"note: dropped the torn last line of {run_copy / name} (a crash mid-write; round 2, "
      f"after checkpoint 1: that round runs again)\n"
      for name in ("metrics.jsonl", "provenance.jsonl"))
  for name in ("metrics.jsonl", "provenance.jsonl"):
    again, torn = read_jsonl(run_copy / name)
    first, _ = read_jsonl(finished / name)
    assert not torn and _untimed(again) == _untimed(first)


def test_malformed_jsonl_line_is_an_error_naming_file_and_line(run_copy, monkeypatch):
  (run_copy / "summary.json").unlink()  # an unfinished run, so it resumes
  lines = (run_copy / "metrics.jsonl").read_text().splitlines(keepends=True)
  (run_copy / "metrics.jsonl").write_text(lines[0][:20] + "\n" + "".join(lines[1:]))
  _no_training(monkeypatch)
  with pytest.raises(WorkdirError) as info:
    runner.run(_config(), run_copy, progress=False)
  assert str(info.value) == (
      f"{run_copy / 'metrics.jsonl'} line 1 is not valid JSON (Unterminated string starting "
      f"at: line 1 column 14 (char 13)); only a torn last line (a crash mid-write) is dropped "
      f"on resume: repair or delete that line, or start afresh with --overwrite")


def _untimed(rows):
  if isinstance(rows, dict):
    return {k: _untimed(v) for k, v in rows.items() if "seconds" not in k}
  if isinstance(rows, list):
    return [_untimed(v) for v in rows]
  return rows


# --- Silent wrong answers: divergence ------------------------------------------------------


def test_adam_at_lr_1e6_stops_with_a_clear_error(tmp_path):
  proc = _cli(*TINY, f"--workdir={tmp_path / 'run'}", "--quiet",
              "--config.client.learning_rate=1e6")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.count("\n") == 1
  assert proc.stderr.startswith("error: round 1: training diverged, mean client loss ")
  assert "exceeds 1000 x ln(classes) = 2303 (client losses " in proc.stderr
  assert proc.stderr.endswith(
      "). The fields that set its steps: client.learning_rate=1e+06 (client.optimizer=adam); "
      "client.learning_rate is unusually large: lower it. No round finished, so the workdir "
      "holds no results to keep.\n")
  assert not (tmp_path / "run" / "summary.json").exists()


def _fake_algorithm(losses: dict[int, float], nan_round: int = 0) -> FederatedAlgorithm:
  """A stand-in round: given mean losses per round, NaN parameters in `nan_round`."""
  class Clients(tuple):
    loss = property(lambda self: self[0])
    num_examples = property(lambda self: self[1])

  def round_(state, clients, data, key):
    del data, key
    w = jnp.full(3, jnp.nan if state.round + 1 == nan_round else 1.0)
    variables = {"params": {"w": w}}
    out = RoundOutput(variables, Clients((np.full(len(clients), losses[state.round + 1]),
                                          np.ones(len(clients)))),
                      np.asarray(clients), np.ones(len(clients)), variables, None)
    return ServerState(variables, state.round + 1), out

  return FederatedAlgorithm(lambda v: ServerState(v, 0), round_, "fake", None)


class _Data:
  num_clients, num_classes = 4, 10


def test_run_rounds_reports_explosion_and_nonfinite_parameters_after_keeping_rows():
  seen = []
  algorithm = _fake_algorithm({1: 2.0, 2: 2.1, 3: 5e3})
  with pytest.raises(TrainingDivergedError, match=r"^round 3: training diverged, mean client "
                     r"loss 5000 exceeds 1000 x ln\(classes\) = 2303 \(client losses 5e\+03, "
                     r"5e\+03\)\. Lower the learning rate\.$"):
    run_rounds(algorithm, algorithm.init({}), _Data(), rounds=4, clients_per_round=2,
               callbacks=[lambda info: seen.append(info.round)])
  assert seen == [1, 2]  # earlier rounds reached their callbacks (rows, checkpoints)
  _, history = run_rounds(algorithm, algorithm.init({}), _Data(), rounds=3,
                          clients_per_round=2, divergence_factor=0)  # 0: off
  assert len(history) == 3
  algorithm = _fake_algorithm({1: 2.0, 2: 2.0}, nan_round=2)
  with pytest.raises(TrainingDivergedError, match=r"^round 2: the global model has non-finite "
                     r"parameters in params/w \(mean client loss 2\)"):
    run_rounds(algorithm, algorithm.init({}), _Data(), rounds=2, clients_per_round=2,
               divergence_factor=0)


def test_divergence_keeps_earlier_rows_and_checkpoints(tmp_path, monkeypatch):
  real = stages.federated_averaging

  def exploding_in_round_2(*args, **kwargs):
    algorithm = real(*args, **kwargs)

    def round_(state, clients, data, key):
      state, out = algorithm.round(state, clients, data, key)
      if state.round == 2:
        out = out._replace(clients=out.clients._replace(loss=out.clients.loss * 1e6))
      return state, out
    return algorithm._replace(round=round_)

  monkeypatch.setattr(stages, "federated_averaging", exploding_in_round_2)
  with pytest.raises(TrainingDivergedError, match=r"^round 2: training diverged.*\. The "
                     r"fields that set its steps: client\.learning_rate=0\.001 "
                     r"\(client\.optimizer=adam\); lower one of them\. The "
                     r"rows of rounds 1-1 are in .*metrics\.jsonl, checkpoints in "
                     r".*checkpoints; a run with other values needs another "
                     r"--workdir or --overwrite\.$"):
    runner.run(_config("--config.provenance.store_rounds="), tmp_path, progress=False)
  rows, _ = read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["round"] for r in rows] == [1]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


# --- Errors that were tracebacks -----------------------------------------------------------


def test_help_lists_every_config_field_with_default_and_meaning():
  fields = config_fields(base_config())
  assert set(FIELD_HELP) == set(fields)
  assert all(text and "\n" not in text for text in FIELD_HELP.values())
  proc = _cli("--help")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  for field, value in fields.items():
    default = json.dumps(value) if isinstance(value, str) else repr(value)
    line = next((l for l in lines if l.startswith(f"  {field}=")), None)
    assert line is not None, field
    assert line.split()[0] == f"{field}={default}" and FIELD_HELP[field] in line, line
  assert "--overwrite" in proc.stdout and "--workdir=DIR" in proc.stdout
  config = _cli("config", DEMO, "--config.rounds=7")
  assert config.returncode == 0 and "  rounds=7 " in config.stdout


@pytest.mark.parametrize("args,message", [
    (["--config.clinets_per_round=5"],
     "unknown config field 'clinets_per_round' (--config.clinets_per_round); did you mean "
     "--config.clients_per_round? (python -m tracefl_jax --help lists every field)"),
    (["--config.rounds=abc"], "--config.rounds=abc: rounds takes an integer, got 'abc'"),
    (["--config=configs/demo.py:quik"],
     "--config=configs/demo.py:quik: unknown preset 'quik'; valid: quick, faulty"),
    (["--config=configs/nope.py"],
     "config file 'configs/nope.py' does not exist; --config takes PATH.py[:PRESET], e.g. "
     "--config=configs/demo.py:quick"),
])
def test_bad_command_lines_are_one_line_errors(tmp_path, args, message):
  proc = _cli(*TINY, f"--workdir={tmp_path / 'run'}", *args)
  _one_line_error(proc, message)
  assert not (tmp_path / "run").exists()


def test_image_model_on_text_data_is_a_one_line_error(tmp_path):
  proc = _cli(*TINY, f"--workdir={tmp_path / 'run'}", "--config.dataset.name=synthetic_text",
              "--config.dataset.synthetic_shape=12")
  _one_line_error(proc, "model 'cnn' takes images: input_shape must be (height, width, "
                        "channels), got (12,)")


def _readonly_dir(tmp_path: Path) -> Path:
  path = tmp_path / "readonly"
  path.mkdir()
  path.chmod(0o555)
  if os.access(path, os.W_OK):  # root ignores permissions; sysfs refuses even root
    if not Path("/sys/kernel").is_dir():
      pytest.skip("no directory here is read-only for this user")
    return Path("/sys/kernel")
  return path


def test_bad_workdir_layouts_are_named_before_anything_is_loaded(tmp_path, monkeypatch):
  _no_training(monkeypatch)
  readonly = _readonly_dir(tmp_path)
  cases = {readonly: f"workdir {readonly} is not writable (Permission denied); give a "
                     f"writable --workdir"}
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  cases[a_file] = f"workdir {a_file} is a file, not a directory; give a directory with --workdir"
  metrics_dir = tmp_path / "metrics_dir"
  (metrics_dir / "metrics.jsonl").mkdir(parents=True)
  cases[metrics_dir] = (f"{metrics_dir / 'metrics.jsonl'} is a directory, but the run writes "
                        f"its metrics.jsonl file there; move it away or use another --workdir")
  checkpoints_file = tmp_path / "checkpoints_file"
  checkpoints_file.mkdir()
  (checkpoints_file / "checkpoints").write_text("")
  cases[checkpoints_file] = (f"{checkpoints_file / 'checkpoints'} is a file, but the run keeps "
                             f"its checkpoints/ directory there; move it away or use another "
                             f"--workdir")
  for workdir, message in cases.items():
    with pytest.raises(WorkdirError) as info:
      runner.run(_config(), workdir, progress=False)
    assert str(info.value) == message
  _one_line_error(_cli(*TINY, f"--workdir={a_file}"), cases[a_file])
