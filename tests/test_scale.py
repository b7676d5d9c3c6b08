"""The scale study (configs/scale.py, issue 14): its smoke preset end to end, and the pieces
it added: tuple sweep axes and grid unions, memory-planned chunking, clients forced into
every round, exactly `max_clients` clients after the fix-up, the structured image set."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_gpu_script import _gpu_script
from tracefl_jax.data.structured import make_structured_images
from tracefl_jax.experiment import summary as outputs, sweep
from tracefl_jax.fl.rounds import sample_clients

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "scale.py"


def _scale():
  spec = importlib.util.spec_from_file_location("scale_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tuple_axes_and_grid_unions_expand_in_order():
  grid = [{("a", "b"): [(1, 2), (3, 4)], "k": [5, 6]}, {"k": [7], ("m", "f"): [("x", True)]}]
  assert sweep.expand_grid(grid) == [
      {"a": 1, "b": 2, "k": 5}, {"a": 1, "b": 2, "k": 6}, {"a": 3, "b": 4, "k": 5},
      {"a": 3, "b": 4, "k": 6}, {"k": 7, "m": "x", "f": True}]
  assert sweep.grid_fields(grid) == ["a", "b", "k", "m", "f"]
  with pytest.raises(ValueError, match="one value per field"):
    sweep.expand_grid({("a", "b"): [(1, 2, 3)]})


def test_the_study_grid_is_the_issues():
  scale = _scale()
  points = sweep.expand_grid(scale.get_sweep("cpu"))
  main = [(p["partition.max_clients"], p["clients_per_round"]) for p in points
          if "provenance.mode" not in p]
  assert main == [(t, k) for t in (1000, 10000) for k in (10, 100, 1000)]
  faulty = [p for p in points if p.get("provenance.mode") == "faulty"]
  assert [p["clients_per_round"] for p in faulty] == [100, 1000]
  assert all(p["faulty.every_round"] and p["faulty.clients"] == "largest" for p in faulty)
  assert all(p["num_clients"] > p["partition.max_clients"] for p in points)


def test_memory_plan_chunks_only_when_the_measured_rate_predicts_too_much():
  measured = [{"clients_per_round": 10, "memory": {"rounds_peak_rss_bytes": 3_000,
                                                   "start_rss_bytes": 1_000}},
              {"clients_per_round": 100, "memory": {"rounds_peak_rss_bytes": 6_000,
                                                    "start_rss_bytes": 1_000}}]
  assert outputs.bytes_per_participant(measured) == 50.0  # the run with the most clients
  assert outputs.plan_chunks(1000, 50.0, budget=100_000) == 0
  assert outputs.plan_chunks(1000, 50.0, budget=10_000) == 200
  assert outputs.plan_chunks(1000, None, budget=10) == 0  # nothing measured yet
  config = _scale().get_config("smoke")
  config.clients_per_round = 20  # predicted 20 x 50 bytes > 500: 10 clients at a time
  planned, plan = sweep.plan_memory(config, measured, budget=500)
  assert plan["clients_per_chunk"] == 10
  assert (planned.simulation.strategy, planned.simulation.clients_per_chunk,
          planned.provenance.clients_per_chunk) == ("chunked", 10, 10)
  kept, plan = sweep.plan_memory(config, measured, budget=10**9)
  assert plan["clients_per_chunk"] == 0 and kept is config


def test_always_sampled_clients_join_every_round():
  for r in range(1, 6):
    ids = sample_clients(42, r, 50, 10, always=[3])
    assert 3 in ids and len(set(ids.tolist())) == 10 and np.all(np.diff(ids) > 0)
  np.testing.assert_array_equal(sample_clients(42, 2, 50, 10), sample_clients(42, 2, 50, 10, ()))
  with pytest.raises(ValueError, match="at most"):
    sample_clients(0, 1, 10, 2, always=[1, 2, 3])


def test_structured_images_are_deterministic_and_class_structured():
  a = make_structured_images(400, 100, (8, 8, 1), 10, seed=3, noise=0.0)
  b = make_structured_images(400, 100, (8, 8, 1), 10, seed=3, noise=0.0)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  assert a.x_train.shape == (400, 8, 8, 1) and a.x_train.dtype == np.float32
  # Without noise, an example is its class pattern shifted and rescaled: its correlation with
  # its own class's mean image beats the other classes' on most examples.
  means = np.stack([a.x_train[a.y_train == k].mean(0).ravel() for k in range(10)])
  x = a.x_test.reshape(len(a.x_test), -1)
  corr = (x - x.mean(1, keepdims=True)) @ (means - means.mean(1, keepdims=True)).T
  assert np.mean(np.argmax(corr, 1) == a.y_test) > 0.6


def test_smoke_study_runs_end_to_end(tmp_path):
  """The study's code paths at toy size: every cell, the faulty cells, the tables and plots."""
  scale = _scale()
  rows = sweep.run_sweep(scale.get_config("smoke"), scale.get_sweep("smoke"), tmp_path,
                         progress=False)
  assert len(rows) == 5
  with open(tmp_path / "results.csv", encoding="utf-8") as f:
    table = list(csv.DictReader(f))
  main = [t for t in table if t["mode"] == "correct"]
  assert sorted((int(t["clients_after_fixup"]), int(t["participants"])) for t in main) == [
      (20, 5), (20, 20), (40, 5), (40, 20)]  # exactly max_clients after the fix-up
  for t in main:
    for column in ("localization_acc", "random_baseline", "largest_client_baseline",
                   "oracle_acc", "cf_top1", "cf_weight_aware_top1", "cf_spearman",
                   "s_per_round", "prov_s_per_round", "peak_rss_mb", "final_global_acc"):
      assert t[column] not in ("", None), (column, t)
  faulty = [t for t in table if t["mode"] == "faulty"]
  assert len(faulty) == 1 and faulty[0]["feddebug_acc"] not in ("", None)
  assert float(faulty[0]["random_baseline"]) == pytest.approx(1 / 20)
  faulty_dir = tmp_path / faulty[0]["run"]
  part = json.loads((faulty_dir / "partition.json").read_text())
  (bad,) = part["faulty_clients"]  # "largest": the most examples of labels 1..9 before the flip
  before = json.loads((tmp_path / main[-1]["run"] / "partition.json").read_text())
  flippable = np.asarray(before["label_counts"])[:, 1:].sum(axis=1)
  assert flippable[bad] == flippable.max()
  for line in (faulty_dir / "metrics.jsonl").read_text().splitlines():
    assert bad in json.loads(line)["clients"]  # the faulty client took part in every round
  scale_md = (tmp_path / "scale.md").read_text()
  assert "| 40 | 20 |" in scale_md and "weight-aware LOO top-1 %" in scale_md
  assert "localization_acc" in (tmp_path / "results.md").read_text()
  for png in ("scale_vs_clients_per_round.png", "time_vs_clients_per_round.png"):
    assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  again = sweep.run_sweep(scale.get_config("smoke"), scale.get_sweep("smoke"), tmp_path,
                          progress=False)
  assert all(r["skipped_existing"] for r in again)
  # The GPU benchmark's scale section runs this study's first cell in smoke mode (here, in
  # this process, its programs are compiled already; tests/test_gpu_script.py runs the rest).
  gpu = _gpu_script()
  report = gpu.Report(tmp_path / "gpu", "smoke")
  gpu.scale_section(report, gpu.SIZES["smoke"], gpu.Budget(600))
  (row,) = [r for r in report.rows if r["section"] == "scale"]
  assert row["status"] == "ok" and row["final_accuracy"] == rows[0]["final_accuracy"]
