"""The library without a config: a user's own Flax module (standard BatchNorm) and arrays run
the paper's protocol and give the numbers of the config-driven run; stored rounds trace like
the online trace; the layering and dependency rules hold."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import tracefl_jax as tfl
from tracefl_jax.data import Dataset, available_datasets, load_dataset, register_dataset
from tracefl_jax.experiment import runner
from tracefl_jax.experiment.config import base_config
from tracefl_jax.experiment.stored import trace_stored_round
from tracefl_jax.models import available_models, register_model

ROOT = Path(__file__).resolve().parents[1]
SEED = 7


class BNNet(nn.Module):
  """A user's module: nothing project-specific (standard BatchNorm, no mask argument)."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes)(x)


def _arrays():
  rng = np.random.default_rng(SEED)
  protos = rng.normal(size=(4, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 4, 750).astype(np.int32)
  x = protos[y] + rng.normal(size=(750, 8, 8, 1)).astype(np.float32)
  return x[:600], y[:600], x[600:], y[600:]


def _library_run():
  x, y, x_test, y_test = _arrays()
  model = tfl.make_model("bn_net", BNNet(num_classes=4), (8, 8, 1), 4)
  data = tfl.federate(x, y, tfl.make_partition(y, "dirichlet", 20, seed=SEED, alpha=0.3))
  algorithm = tfl.federated_averaging(model, optax.adam(1e-3), batch_size=32, local_epochs=2)
  state = algorithm.init(model.init(jax.random.fold_in(jax.random.key(SEED), 0)))
  evaluator = tfl.GlobalEvaluator(model, x_test, y_test)
  traces = []
  provenance = tfl.provenance_callback(model, evaluator, tfl.ProtocolSettings(size_unit=32),
                                       on_trace=lambda r, t: traces.append(t))
  state, history = tfl.run_rounds(algorithm, state, data, rounds=3, clients_per_round=5,
                                  seed=SEED, callbacks=[evaluator, provenance])
  return state, history, traces


def _register_once():
  if "lib_test_arrays" not in available_datasets():
    register_dataset("lib_test_arrays",
                     lambda data_dir, **_: Dataset("lib_test_arrays", *_arrays()[:2],
                                                   *_arrays()[2:], 4))
  if "lib_test_bn_net" not in available_models():
    register_model("lib_test_bn_net", lambda k: BNNet(num_classes=k))


def test_library_run_equals_config_driven_run(tmp_path):
  state, history, traces = _library_run()
  assert "batch_stats" in state.variables and state.round == 3
  assert len(history) == 3 and all(np.isfinite(h["client_loss"]) for h in history)
  assert sum(t.summary["inputs"] for t in traces) > 0

  _register_once()
  c = base_config()
  c.seed, c.rounds, c.num_clients, c.clients_per_round = SEED, 3, 20, 5
  c.dataset.name, c.model.name = "lib_test_arrays", "lib_test_bn_net"
  c.checkpoint.every = 0
  c.partition.fixup, c.aggregation.weighting = False, "examples"  # as the library run above
  runner.run(c, tmp_path, progress=False)
  metrics = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  rows = [json.loads(l) for l in (tmp_path / "provenance.jsonl").read_text().splitlines()]
  assert len(metrics) == 3
  for lib, cfg in zip(history, metrics, strict=True):
    assert lib["clients"] == cfg["clients"]
    assert lib["accuracy"] == cfg["accuracy"]
    np.testing.assert_allclose(lib["client_loss"], cfg["client_loss"], rtol=1e-6)
    timing = ("tracefl_seconds_per_input",)
    assert ({k: v for k, v in lib["provenance"].items() if k not in timing}
            == {k: v for k, v in cfg["provenance"].items() if k not in timing})
  traced = np.concatenate([t.traced_client for t in traces])
  np.testing.assert_array_equal(traced, [r["traced_client"] for r in rows])
  np.testing.assert_allclose(np.concatenate([t.probs for t in traces]),
                             [r["probs"] for r in rows], rtol=1e-6, atol=1e-8)


def test_own_dataset_and_model_from_the_command_line(tmp_path):
  (tmp_path / "my_registry.py").write_text(textwrap.dedent("""
      import flax.linen as nn
      import numpy as np
      from tracefl_jax.data import Dataset, register_dataset
      from tracefl_jax.models import register_model

      class Net(nn.Module):
        num_classes: int

        @nn.compact
        def __call__(self, x):  # no train argument: fine too
          return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))

      rng = np.random.default_rng(0)
      y = rng.integers(0, 3, 400)
      x = y[:, None] + rng.normal(size=(400, 6))
      register_dataset("cli_arrays", lambda data_dir, **_: Dataset.from_arrays(
          "cli_arrays", x[:300], y[:300], x[300:], y[300:]))
      register_model("cli_net", lambda k: Net(num_classes=k))
      """))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
  cmd = [sys.executable, "-m", "tracefl_jax", f"--config={ROOT / 'configs' / 'demo.py'}:quick",
         "--quiet", "--config.dataset.name=cli_arrays", "--config.model.name=cli_net",
         "--config.num_clients=10", "--config.clients_per_round=3", "--config.rounds=2"]
  done = subprocess.run([*cmd, f"--workdir={tmp_path / 'run'}", "--config.imports=my_registry"],
                        capture_output=True, text=True, env=env, check=False)
  assert done.returncode == 0, done.stderr
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["rounds"] == 2 and summary["provenance"]["rounds_traced"] >= 1
  done = subprocess.run([*cmd, f"--workdir={tmp_path / 'bad'}", "--config.imports=no_such_mod"],
                        capture_output=True, text=True, env=env, check=False)
  assert done.returncode == 2 and "cannot import module 'no_such_mod'" in done.stderr


def test_stored_round_trace_equals_online_trace(tmp_path):
  c = base_config()
  c.rounds, c.checkpoint.every = 3, 0
  c.provenance.store_rounds = "2,3"
  runner.run(c, tmp_path, progress=False)
  rows = [json.loads(l) for l in (tmp_path / "provenance.jsonl").read_text().splitlines()]
  rows = [r for r in rows if r["round"] == 3]
  assert rows
  x = load_dataset("digits").x_test[[r["input"] for r in rows]]
  result, stored = trace_stored_round(tmp_path, x, 3)
  assert stored.round == 3 and stored.client_ids.tolist() == rows[0]["participants"]
  np.testing.assert_array_equal(result.traced_client, [r["traced_client"] for r in rows])
  np.testing.assert_allclose(result.probs, [r["probs"] for r in rows], rtol=1e-5, atol=1e-7)

  # The CLI verb gives the same answer; a round that was not stored is a clear error.
  np.save(tmp_path / "x.npy", x)
  cmd = [sys.executable, "-m", "tracefl_jax", "trace", f"--workdir={tmp_path}",
         f"--inputs={tmp_path / 'x.npy'}"]
  done = subprocess.run([*cmd, "--round=3", f"--out={tmp_path / 'a.jsonl'}"],
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  cli = [json.loads(l) for l in (tmp_path / "a.jsonl").read_text().splitlines()]
  assert [r["traced_client"] for r in cli] == [r["traced_client"] for r in rows]
  done = subprocess.run([*cmd, "--round=1"], capture_output=True, text=True, check=False)
  assert done.returncode == 2
  assert "round 1 is not stored" in done.stderr and "stored rounds: 2, 3" in done.stderr
  with pytest.raises(ValueError, match="inputs have shape"):
    trace_stored_round(tmp_path, np.zeros((2, 9, 9, 1), np.float32), 3)


def test_only_the_experiment_layer_reads_a_config():
  package = ROOT / "tracefl_jax"
  offenders = [str(p.relative_to(package)) for p in package.rglob("*.py")
               if p.relative_to(package).parts[0] != "experiment"
               and re.search(r"ml_collections|ConfigDict", p.read_text(encoding="utf-8"))]
  assert not offenders


def test_library_import_needs_only_jax_flax_optax_numpy():
  code = ("import sys; import jax, flax.linen, optax, numpy; before = set(sys.modules); "
          "import tracefl_jax; "
          "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout.split()
  allowed = {"tracefl_jax", "jax", "jaxlib", "flax", "optax", "numpy"}
  third_party = [m for m in out if m not in allowed and m not in sys.stdlib_module_names
                 and not m.startswith("_")]
  assert "tracefl_jax" in out and not third_party, third_party


def test_example_runs_as_written():
  spec = importlib.util.spec_from_file_location("own_model", ROOT / "examples" / "own_model.py")
  example = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = example  # dataclasses (Flax modules) look their module up there
  try:
    spec.loader.exec_module(example)
  finally:
    del sys.modules[spec.name]
  out = example.main(rounds=2, clients=10, per_round=3)
  assert [h["round"] for h in out["history"]] == [1, 2]
  result = out["result"]
  assert result.probs.shape == (5, 3)
  assert set(np.asarray(result.traced_client).tolist()) <= set(out["last"].client_ids.tolist())
