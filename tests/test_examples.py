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


def test_docs_python_blocks_run(tmp_path, monkeypatch):
  """The docs pages' Python blocks (README's one runs in test_readme), page by page in
  test_docs.EXECUTED's order, in one scope, on a tiny model and federation of the README
  example's names: the algorithm pieces, provenance under the round's own rule, algorithms
  with memory (docs/algorithms.md), a saved round (docs/guide.md)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import tracefl_jax as tfl  # pylint: disable=g-import-not-at-top
  from tests.test_docs import EXECUTED, python_blocks  # pylint: disable=g-import-not-at-top

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(x)

  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 200).astype(np.int32)
  x = (rng.normal(size=(200, 4)) + y[:, None]).astype(np.float32)
  scope = {"tfl": tfl, "jax": jax, "optax": optax, "np": np, "x_test": x[:8],
           "model": tfl.make_model(Tiny(), input_shape=(4,), num_classes=3),
           "data": tfl.federate(x, y, [np.arange(i, 200, 10) for i in range(10)])}
  checks = {  # what each block must leave in the scope
      ("docs/algorithms.md", 0): lambda s: (
          s["state"].opt_state is not None
          and jax.tree.leaves(s["without_each"])[0].shape[0] == 3),
      ("docs/algorithms.md", 1): lambda s: s["drops"].shape == s["fo"].scores.shape == (8, 3),
      ("docs/algorithms.md", 2): lambda s: (
          s["state"].round == 3 and s["state"].client_state is not None),
      ("docs/guide.md", 0): lambda s: (
          s["stored"].round == 4 and (tmp_path / "runs/mine/round_4/round.json").exists()),
  }
  monkeypatch.chdir(tmp_path)  # the blocks write server.msgpack and runs/mine/
  ran = []
  for page in (p for p in EXECUTED if p != "README.md"):
    for i, block in enumerate(python_blocks(ROOT / page)):
      assert (page, i) in checks, f"{page}'s Python block {i} is new: check it here"
      exec(compile(block, page, "exec"), scope)  # pylint: disable=exec-used
      assert checks[(page, i)](scope), f"{page}'s Python block {i}"
      ran.append((page, i))
  assert ran == list(checks)


def test_scaffold_example_traces_its_last_round():
  out = _run("scaffold_traced", rounds=2, clients=6, per_round=3, inputs=10)
  assert out["FedAvg"] != out["SCAFFOLD"]  # the control variates change the training
  # The first-order score against SCAFFOLD's own leave-one-out (the round re-run without k):
  # after two small-step rounds the expansion is close to exact.
  assert out["first-order = leave-one-out"] >= 0.8
  assert 0 <= out["TraceFL = leave-one-out"] <= 1
