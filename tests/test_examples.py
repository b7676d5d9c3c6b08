"""Each script under examples/ runs as written, at a tiny size, and shows what it claims."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _run(name: str, **kwargs):
  spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
  example = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = example  # dataclasses (Flax modules) look their module up there
  try:
    spec.loader.exec_module(example)
    return example.main(**kwargs)
  finally:
    del sys.modules[spec.name]


def test_fedadam_example_resumes_exactly():
  out = _run("fedadam", rounds=2, clients=6, per_round=3)
  assert [len(h) for h in out["histories"].values()] == [2, 2]
  assert out["resumed_equal"]
  assert out["histories"]["FedAdam"] != out["histories"]["FedAvg"]


def test_robust_aggregation_example():
  out = _run("robust_aggregation", rounds=2, clients=5, per_round=3, rules=("mean", "krum"))
  assert set(out) == {"mean", "krum"}
  assert all(0 <= r["accuracy"] <= 1 for r in out.values())


def test_fedprox_example_reduces_client_drift():
  out = _run("fedprox", rounds=2, mu=1.0, clients=6, per_round=3)
  plain, prox = out["FedAvg"], out["FedProx(mu=1)"]
  assert prox < plain


def test_nnx_example_traces_the_saved_round_as_online(tmp_path):
  out = _run("nnx_traced", rounds=2, workdir=str(tmp_path))
  stored, online, result = out["stored"], out["online"], out["result"]
  assert stored.round == 2 and stored.model is not None
  np.testing.assert_array_equal(result.traced_client, online.traced_client)
  np.testing.assert_allclose(result.scores, online.scores, rtol=1e-6, atol=1e-6)
