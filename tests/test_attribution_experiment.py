"""configs/attribution.py: the comparison of attribution methods against retrained federations,
its smoke preset end to end (the compare command) and every cpu cell validated."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_gpu_script import _gpu_script
from tracefl_jax.experiment import cli, comparison, comparison_methods
from tracefl_jax.experiment.config import validate
from tracefl_jax.experiment.sweep import apply_overrides, expand_grid

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "attribution.py"


def _module():
  spec = importlib.util.spec_from_file_location("attribution_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_cpu_cells_validate_and_unknown_preset_is_named():
  module = _module()
  base = module.get_config("cpu")
  cells = expand_grid(module.get_sweep("cpu"))
  assert len(cells) == 4
  for overrides in cells:
    validate(apply_overrides(base, overrides))
  quick = expand_grid(module.get_sweep("quick"))
  assert [q["attribution.setting"] for q in quick] == [cells[0]["attribution.setting"],
                                                       cells[-1]["attribution.setting"]]
  assert quick == [cells[0], cells[-1]]
  for overrides in quick:
    validate(apply_overrides(module.get_config("quick"), overrides))
  (mnist,) = expand_grid(module.get_sweep("mnist"))
  validate(apply_overrides(module.get_config("mnist"), mnist))
  algorithms = expand_grid(module.get_sweep("algorithms"))
  assert len(algorithms) == 4
  for overrides in algorithms:
    validate(apply_overrides(module.get_config("algorithms"), overrides))
  with pytest.raises(ValueError, match="unknown preset 'tpu'"):
    module.get_config("tpu")


@pytest.mark.parametrize("argv,message", [
    (["--sweep"], "--sweep is a flag of python -m tracefl_jax, not of the comparison"),
    (["--config.dataset.data_dri=x"], "did you mean --config.dataset.data_dir"),
    ([], "--workdir is required"),
])
def test_comparison_command_names_a_bad_argument(argv, message, capsys):
  workdir = [] if not argv else ["--workdir=unused"]
  with pytest.raises(SystemExit) as e:
    cli.compare([f"--config={CONFIG}:smoke", *workdir, *argv])
  assert e.value.code == 2 and message in capsys.readouterr().err


def test_smoke_preset_end_to_end(tmp_path, capsys):
  # An override reaches every cell (the preset explains 10 inputs).
  cli.compare([f"--config={CONFIG}:smoke", f"--workdir={tmp_path}",
               "--config.attribution.explain_inputs=8"])
  table = capsys.readouterr().out
  (cell,) = [p for p in tmp_path.iterdir() if p.is_dir()]
  s = json.loads((cell / "summary.json").read_text())
  assert s["aggregation"] == "mean" and s["counterfactual_removal"] == "closed_form"
  assert [r["method"] for r in s["rows"]] == [*comparison.METHODS]
  # per truth seed the base and one per client sampled in some round, then 3 subsets
  assert s["federations"] == 3 * (1 + 6 - s["clients_never_sampled"]) + 3 and s["inputs"] == 8
  assert s["output"] == "margin" and s["truth_seeds"] == 3
  assert 0 <= s["ceiling_top1"] <= 1 and -1 <= s["ceiling_spearman"] <= 1
  assert len(s["curve"]) == 2 and "prov_first_order_accuracy" in s["curve"][-1]
  rows = {r["method"]: r for r in s["rows"]}
  assert rows["loo_last"]["loo_last_top1"] == 1.0  # the truth itself
  for r in s["rows"]:
    for key in ("paper_rule", "loo_last_top1", "retrain_top1"):
      assert 0.0 <= r[key] <= 1.0
    fitted = r["method"] in ("banzhaf", "datamodel")  # to the subsets: no LDS on them
    if r["method"] != "random":  # intervals around every top-1 and LDS
      assert r["retrain_top1_low"] <= r["retrain_top1"] <= r["retrain_top1_high"]
      assert r["lds"] is None if fitted else r["lds_low"] <= r["lds_high"]
    if r["method"] not in ("random", "tracefl"):  # paired with TraceFL
      assert 0 <= r["retrain_top1_diff_p"] <= 1
      assert r["lds_diff_p"] is None if fitted else 0 <= r["lds_diff_p"] <= 1
  assert rows["first_order"]["lds"] is not None and -1 <= rows["first_order"]["lds"] <= 1
  # Top-k removal of the first 3 inputs: every method (and k random participants), k = 1, 3.
  assert {(r["method"], r["k"]) for r in s["topk"]} == {
      (m, k) for m in (*comparison.METHODS, "random") for k in (1, 3)}
  assert all(0 <= r["flip_rate"] <= 1 and r["drop_low"] <= r["drop_high"] for r in s["topk"])
  assert "Top-k removal" in table
  # The base federation retrained side by side is the trained run, up to float rounding.
  assert s["base_reproduced_max_abs"] < 1e-2
  assert table.count("| smoke | mean |") == len(comparison.METHODS)
  assert (tmp_path / "attribution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # A finished cell of the same config is read back, not rerun; of another, refused at once
  # (one line, exit 2) and left as it was.
  before = (cell / "summary.json").stat().st_mtime_ns
  cli.compare([f"--config={CONFIG}:smoke", f"--workdir={tmp_path}",
               "--config.attribution.explain_inputs=8"])
  assert (cell / "summary.json").stat().st_mtime_ns == before
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    cli.compare([f"--config={CONFIG}:smoke", f"--workdir={tmp_path}",
                 "--config.rounds=3", "--config.aggregation.rule=median"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and len(err.strip().splitlines()) == 1
  assert "config differs in: aggregation.rule ('mean' -> 'median')" in err
  assert (cell / "summary.json").stat().st_mtime_ns == before
  assert np.isfinite(s["base_reproduced_max_abs"])
  # The GPU benchmark's attribution section runs this very preset in smoke mode (here, in
  # this process, its programs are compiled already; tests/test_gpu_script.py runs the rest).
  gpu = _gpu_script()
  report = gpu.Report(tmp_path / "gpu", "smoke")
  gpu.attribution_section(report, gpu.SIZES["smoke"], gpu.Budget(600))
  rows = [r for r in report.rows if r["section"] == "attribution"]
  assert [r["method"] for r in rows] == [*comparison.METHODS]
  assert all(r["status"] == "ok" and r["global_accuracy"] == s["global_accuracy"]
             for r in rows)
  assert (tmp_path / "gpu" / "attribution" / "table.md").read_text().count("| smoke | mean |") == len(
      comparison.METHODS)



@pytest.mark.parametrize("field,value,message", [
    ("provenance.score", "loo", "provenance.score='loo' is not one of tracefl, first_order"),
    ("attribution.subsets", 2, r"attribution.subsets=2 must be 0 \(no LDS\) or >= 3"),
    ("attribution.round_decay", 1.5, r"attribution.round_decay=1.5 must be in \[0, 1\]"),
    ("attribution.explain_inputs", 0, "attribution.explain_inputs=0 must be >= 1"),
])
def test_bad_attribution_fields_are_named(field, value, message):
  config = apply_overrides(_module().get_config("smoke"), {field: value})
  with pytest.raises(ValueError, match=message):
    validate(config)
  if field == "provenance.score":  # and the weight-aware score takes no size factor
    config = apply_overrides(_module().get_config("smoke"),
                             {"provenance.score": "first_order",
                              "provenance.use_size_factor": True})
    with pytest.raises(ValueError, match="use_size_factor=True applies to score='tracefl'"):
      validate(config)


def test_comparison_runs_the_configured_algorithm(tmp_path):
  config = apply_overrides(_module().get_config("smoke"), {
      "aggregation.rule": "trimmed_mean", "aggregation.trim_beta": 0.25,
      "server.optimizer": "adam", "server.learning_rate": 0.01, "client.loss": "fedprox",
      "attribution.subsets": 0, "attribution.per_round": False, "attribution.truth_seeds": 1,
      "attribution.topk_inputs": 0})
  s = comparison.run_comparison(config, tmp_path / "cell")
  # The trained federation ran the configured rule and server optimizer, its truths removed
  # clients by them, and the retrained base federation (the same algorithm) reproduces it.
  assert s["aggregation"] == "trimmed_mean(0.25) + server optimizer"
  assert s["counterfactual_removal"] == "rule"
  assert s["base_reproduced_max_abs"] < 1e-2
  assert {r["method"]: r for r in s["rows"]}["loo_last"]["loo_last_top1"] == 1.0
  saved = json.loads((tmp_path / "cell" / "config.json").read_text())
  assert saved["aggregation"]["rule"] == "trimmed_mean" and saved["client"]["loss"] == "fedprox"
  # The compare command's table names the algorithm each cell ran.
  assert "| cell | trimmed_mean(0.25) + server optimizer |" in comparison_methods.table([("cell", s)])


def test_comparison_refusals_are_one_line(tmp_path, capsys):
  from tracefl_jax.experiment.workdir import WorkdirBusyError, WorkdirLock, plan_run

  def refused(*argv):
    with pytest.raises(SystemExit) as e:
      cli.compare([*argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err

  a_file = tmp_path / "file"
  a_file.write_text("x")
  assert "is a file" in refused(f"--config={CONFIG}:smoke", f"--workdir={a_file}")
  assert "simulation.strategy='loop' cannot run the comparison" in refused(
      f"--config={CONFIG}:smoke", f"--workdir={tmp_path / 'w'}",
      "--config.simulation.strategy=loop")
  assert "aggregation.trim_beta" in refused(
      f"--config={CONFIG}:smoke", f"--workdir={tmp_path / 'w'}",
      "--config.aggregation.rule=trimmed_mean", "--config.aggregation.trim_beta=0.1")
  demo = Path(__file__).resolve().parents[1] / "configs" / "demo.py"
  assert "get_sweep" in refused(f"--config={demo}", f"--workdir={tmp_path / 'w'}")
  # A second comparison (or a run) in a workdir in use is refused at once.
  (tmp_path / "busy").mkdir()
  with WorkdirLock(tmp_path / "busy"):
    assert "in use by another run" in refused(f"--config={CONFIG}:smoke",
                                              f"--workdir={tmp_path / 'busy'}")
    (tmp_path / "busy" / "smoke").mkdir()
  with WorkdirLock(tmp_path / "busy" / "smoke"), pytest.raises(WorkdirBusyError):
    comparison.run_comparison(_module().get_config("smoke"), tmp_path / "busy" / "smoke")
  # A summary torn by a full disk is no finished cell: the plan computes it again.
  config = _module().get_config("smoke")
  cell = tmp_path / "torn"
  cell.mkdir()
  (cell / "config.json").write_text(config.to_json_best_effort(indent=2))
  (cell / "summary.json").write_text('{"rows": [')
  assert plan_run(config, cell).action == "resume"
  assert comparison.comparison_errors(config) == []
