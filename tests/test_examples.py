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


def test_readme_algorithm_and_saved_round_blocks_run(tmp_path, monkeypatch):
  """The README's Python blocks after the first (which test_readme runs), in order, on a tiny
  model and federation of the first block's names: the algorithm pieces, provenance under
  the round's own rule, algorithms with memory, a saved round."""
  import re  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import tracefl_jax as tfl  # pylint: disable=g-import-not-at-top

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(x)

  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"),
                      re.S)
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 200).astype(np.int32)
  x = (rng.normal(size=(200, 4)) + y[:, None]).astype(np.float32)
  scope = {"tfl": tfl, "jax": jax, "optax": optax, "np": np, "x_test": x[:8],
           "model": tfl.make_model(Tiny(), input_shape=(4,), num_classes=3),
           "data": tfl.federate(x, y, [np.arange(i, 200, 10) for i in range(10)])}
  exec(compile(blocks[1], "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["state"].opt_state is not None
  assert jax.tree.leaves(scope["without_each"])[0].shape[0] == 3
  monkeypatch.chdir(tmp_path)
  assert len(blocks) == 5, "a README Python block was added or removed: run it here too"
  exec(compile(blocks[2], "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["drops"].shape == scope["fo"].scores.shape == (8, 3)
  exec(compile(blocks[3], "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["state"].round == 3 and scope["state"].client_state is not None
  exec(compile(blocks[4], "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["stored"].round == 4 and (tmp_path / "runs/mine/round_4/round.json").exists()
