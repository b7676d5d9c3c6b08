"""The command line's entrances: the installed `tracefl-jax` command, one command per
experiment (`run | compare | trace | config`, `run` by default) and the string fields parsed
once (`config.typed`). Nothing here trains: each check stops at a refusal or a printout."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tracefl_jax.experiment import cli
from tracefl_jax.experiment.config import Typed, base_config, typed

ROOT = Path(__file__).resolve().parents[1]
DEMO = f"--config={ROOT / 'configs' / 'demo.py'}:quick"
ATTRIBUTION = f"--config={ROOT / 'configs' / 'attribution.py'}:smoke"


def _script_target() -> str:
  with open(ROOT / "pyproject.toml", "rb") as f:
    return tomllib.load(f)["project"]["scripts"]["tracefl-jax"]


def test_the_declared_entry_point_resolves_and_runs(capsys):
  """pyproject.toml's `tracefl-jax` names a function that exists and answers --help (it
  named the removed `tracefl_jax.cli`: ModuleNotFoundError on a fresh install)."""
  point = importlib.metadata.EntryPoint("tracefl-jax", _script_target(), "console_scripts")
  point.load()(["--help"])
  out = capsys.readouterr().out
  assert out.startswith("usage: ") and "compare" in out and "  rounds=10 " in out


def test_the_installed_command_answers_help():
  """The installed distribution's console script (`pip install -e .` or `pip install .`):
  its metadata names pyproject's target, and the script on PATH beside this Python runs."""
  # The environment's own metadata (site-packages): a stale tracefl_jax.egg-info left in the
  # checkout by an old build is on sys.path too when Python starts here.
  installed = [d for d in importlib.metadata.distributions()
               if (d.metadata["Name"] or "").lower().replace("-", "_") == "tracefl_jax"
               and str(d.locate_file("")).startswith(sys.prefix)]
  points = [p for d in installed for p in d.entry_points if p.name == "tracefl-jax"]
  if not points:
    pytest.skip("tracefl_jax is not installed in this environment (pip install -e .)")
  (point,) = points
  assert point.value == _script_target(), "reinstall: pip install -e ."
  script = Path(sys.executable).parent / "tracefl-jax"
  if not script.is_file():
    pytest.skip(f"no console script beside {sys.executable}")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "compare" in proc.stdout and "--workdir=DIR" in proc.stdout


def _error(capsys, argv: list[str]) -> str:
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  err = capsys.readouterr().err
  assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
  return err.strip()


def test_run_is_the_default_command_and_a_misspelt_command_is_named(capsys, tmp_path):
  bad = [DEMO, f"--workdir={tmp_path / 'w'}", "--config.rounds=abc"]
  message = "error: --config.rounds=abc: rounds takes an integer, got 'abc'"
  assert _error(capsys, bad) == _error(capsys, ["run", *bad]) == message
  assert _error(capsys, ["runn", *bad]) == (
      "error: unknown command 'runn'; did you mean run? (commands: run, compare, trace, "
      "config; python -m tracefl_jax --help)")
  assert not (tmp_path / "w").exists()


def test_the_comparison_is_its_own_command(capsys, tmp_path):
  """`run` refuses a comparison cell (it ran the comparison without saying so); `compare`
  takes it, with the same flags as `run`'s."""
  err = _error(capsys, [ATTRIBUTION, f"--workdir={tmp_path / 'run'}"])
  assert "attribution.enabled=True" in err and "python -m tracefl_jax compare" in err
  assert not (tmp_path / "run").exists()
  a_file = tmp_path / "file"
  a_file.write_text("x")
  assert "is a file" in _error(capsys, ["compare", ATTRIBUTION, f"--workdir={a_file}"])
  assert "--sweep is a flag of python -m tracefl_jax" in _error(
      capsys, ["compare", ATTRIBUTION, f"--workdir={tmp_path}", "--sweep"])
  cli.main(["compare", "--help"])
  assert capsys.readouterr().out.startswith("usage: python -m tracefl_jax compare")


def test_config_prints_the_resolved_fields_with_their_choices(capsys):
  cli.main(["config", "--config.provenance.rounds=2,4"])
  out = capsys.readouterr().out
  assert '  provenance.rounds="2,4" ' in out
  line = next(l for l in out.splitlines() if l.startswith("  client.optimizer="))
  assert line.rstrip().endswith("local optimizer: " + ", ".join(
      __import__("tracefl_jax.fl.client", fromlist=["OPTIMIZERS"]).OPTIMIZERS))


def test_string_fields_are_parsed_once_into_typed_values():
  c = base_config()
  assert typed(c) == Typed((), frozenset({10}), (), {})
  c.provenance.rounds, c.provenance.store_rounds = " 2, 5", "all"
  c.faulty.clients, c.faulty.flip = "largest", "1:0, 2:0"
  assert typed(c) == Typed((2, 5), frozenset(range(1, 11)), None, {1: 0, 2: 0})
  c.provenance.store_rounds, c.faulty.clients = "none", "0,3"
  assert typed(c)[1:3] == (frozenset(), (0, 3))
  c.faulty.flip = "1-0"
  with pytest.raises(ValueError, match=r"^invalid config: faulty.flip='1-0' is not 'src:dst"):
    typed(c)
