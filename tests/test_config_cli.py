"""Configs fail loudly on bad input; the CLI runs end to end in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tracefl_jax.experiment.config import base_config, validate
from tracefl_jax.models import get_model
from tests.xla_env import xla_flags

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("field,value,message", [
    ("clients_per_round", 200, "clients_per_round=200 must be in"),
    ("rounds", 0, "rounds=0 must be >= 1"),
    ("partition.alpha", 0.0, "partition.alpha=0.0 must be > 0"),
    ("partition.method", "zipf", "partition.method='zipf' is not one of iid, dirichlet"),
    ("simulation.strategy", "pmap", "simulation.strategy='pmap' is not one of auto, vmap"),
    ("client.optimizer", "lion", "client.optimizer='lion' is not one of adam"),
    ("provenance.rounds", "3,99", "provenance.rounds [99] outside 1..10"),
])
def test_bad_config_values_are_named(field, value, message):
  c = base_config()
  *parents, leaf = field.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    validate(c)


def test_config_is_locked_against_typos():
  c = base_config()
  with pytest.raises(AttributeError):
    c.clinets_per_round = 5  # pylint: disable=attribute-defined-outside-init


def test_faulty_mode_needs_clients_and_flip():
  c = base_config()
  c.provenance.mode = "faulty"
  with pytest.raises(ValueError, match="needs faulty.clients and faulty.flip"):
    validate(c)


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match="unknown model .resnet99.; valid models: bert_base, bert_tiny, cnn, cnn_patches, cnn_xla, densenet121"):
    get_model("resnet99", (8, 8, 1), 10)


def _cli(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
  return subprocess.run(
      [sys.executable, "-m", "tracefl_jax", "--config=configs/demo.py:quick",
       f"--workdir={workdir}", "--quiet", *overrides],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_cli_smoke_run(tmp_path):
  cache = tmp_path.parent / f"{tmp_path.name}-xla"
  proc = _cli(tmp_path, "--config.rounds=2", "--config.num_clients=20",
              "--config.clients_per_round=5", "--config.client.local_epochs=1",
              f"--compilation_cache={cache}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert any(cache.iterdir())  # the round (compiled for over a second) was kept
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [1, 2]
  assert all(0.0 <= r["accuracy"] <= 1.0 and len(r["clients"]) == 5 for r in rows)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["num_clients"] == 20
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["rounds"] == 2
  assert "global accuracy" in proc.stdout


def test_cli_rejects_bad_input_clearly(tmp_path):
  proc = _cli(tmp_path, "--config.clients_per_round=500")
  assert proc.returncode == 2
  assert "clients_per_round=500 must be in [1, num_clients=20]" in proc.stderr
  proc = _cli(tmp_path, "--config.model.name=vgg")
  assert proc.returncode == 2 and "model.name='vgg' is not one of bert_base" in proc.stderr
  proc = _cli(tmp_path, "--config.clinets_per_round=5")  # a typo is an error, not a new field
  assert proc.returncode == 2 and "did you mean --config.clients_per_round?" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = _cli(tmp_path, "--config.dataset.name=imagenet")
  assert proc.returncode == 2 and "imagenet" in proc.stderr and "digits" in proc.stderr
  # Issue 23: these passed validation (ZeroDivisionError after a round; numpy's "expected
  # non-negative integer" without the field); now named before anything is written.
  proc = _cli(tmp_path / "new", "--config.seed=-5", "--config.eval.batch_size=0")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "seed=-5 must be in [0, 4294967295]" in proc.stderr
  assert "eval.batch_size=0 must be >= 1" in proc.stderr
  assert not any((tmp_path / "new").glob("*"))  # nothing written
  # A truncated archive (zipfile.BadZipFile's traceback before): one line naming the file.
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "mnist.npz").write_bytes(b"PK\x03\x04 cut short")
  proc = _cli(tmp_path / "npz", "--config.dataset.name=mnist",
              f"--config.dataset.data_dir={tmp_path / 'data'}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert f"{tmp_path / 'data' / 'mnist.npz'}: cannot be read as Keras' mnist.npz" in proc.stderr


def test_overrides_parse_as_the_field_types_in_both_flag_forms():
  from tracefl_jax.experiment import cli  # pylint: disable=g-import-not-at-top
  args = cli.parse_args([
      f"--config={ROOT / 'configs' / 'demo.py'}:quick", "--workdir", "runs/x",
      "--config.rounds", "7", "--config.partition.alpha=0.1", "--config.provenance.use_decay",
      "--config.dataset.data_dir", "/data", "--config.checkpoint.resume=false", "--noquiet",
      "--overwrite"])
  c = args.config
  assert (c.rounds, c.partition.alpha, c.provenance.use_decay) == (7, 0.1, True)
  assert (c.dataset.data_dir, c.checkpoint.resume, c.checkpoint.overwrite) == ("/data", False,
                                                                              True)
  assert args.flags["workdir"] == "runs/x" and args.flags["quiet"] is False
  with pytest.raises(AttributeError):  # still locked
    c.clinets_per_round = 5  # pylint: disable=attribute-defined-outside-init
  for bad, message in [(["--config.partition.alpha=x"], "partition.alpha takes a number"),
                       (["--config.client"], "--config.client is a section"),
                       (["--overwrit"], "unknown flag --overwrit; did you mean --overwrite?"),
                       (["stray"], "unexpected argument 'stray'")]:
    with pytest.raises(ValueError, match=message):
      cli.parse_args([f"--config={ROOT / 'configs' / 'demo.py'}", "--workdir=w", *bad])
