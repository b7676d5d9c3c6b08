"""A finished run is traceable afterwards (issue 20): its last round is stored by default, the
`trace` path imports the run's own modules (a model the user registered), and takes inputs in
the dataset's own form. A FedAdam run interrupted after round 2 and resumed by the runner
ends equal to an uninterrupted one (server optimizer state checkpointed and restored).

One tiny federation (digits, the user's 2-layer MLP, 10 clients, 3 per round, 3 rounds)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from tracefl_jax import models
from tracefl_jax.data import Normalization, load_dataset
from tracefl_jax.experiment import cli, runner, stages
from tracefl_jax.experiment.checkpoints import CheckpointError
from tracefl_jax.experiment.stored import load_round, model_inputs, trace_stored_round
import tracefl_jax as tfl

ROOT = Path(__file__).resolve().parents[1]
MODULE = "tfl_issue20_own_models"  # written to tmp_path, imported through --config.imports
SOURCE = '''
import flax.linen as nn
from tracefl_jax.models import register_model


class OwnMLP(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes)(nn.relu(nn.Dense(16)(x)))


register_model("own_mlp_issue20", OwnMLP)
'''
ARGS = [f"--config={ROOT / 'configs' / 'demo.py'}:quick", "--config.rounds=3",
        "--config.num_clients=10", "--config.clients_per_round=3",
        "--config.client.local_epochs=1", "--config.checkpoint.every=1",
        "--config.provenance.counterfactual=False", "--config.server.optimizer=adam",
        "--config.server.learning_rate=0.01", f"--config.imports={MODULE}",
        "--config.model.name=own_mlp_issue20", "--config.provenance.rounds=3",
        "--config.simulation.strategy=loop"]  # loop: compiled once for the three runs


class Interrupted(Exception):
  pass


def _untimed(row):
  if isinstance(row, dict):
    return {k: _untimed(v) for k, v in row.items() if "seconds" not in k and k != "memory"}
  return row


def _rows(workdir: Path, name: str) -> list[dict]:
  return [_untimed(json.loads(l)) for l in (workdir / name).read_text().splitlines() if l]


def _checkpoint_meta(workdir: Path, step: int) -> dict:
  """The JSON metadata of a checkpoint (its leaves and their checksums)."""
  for f in (workdir / "checkpoints" / str(step) / "meta").rglob("*"):
    if f.is_file():
      try:
        meta = json.loads(f.read_text())
      except (UnicodeDecodeError, ValueError):
        continue
      if isinstance(meta, dict) and "checksums" in meta:
        return meta
  raise AssertionError(f"no checkpoint metadata in {workdir}")


def _forget_module(monkeypatch) -> None:
  """As a fresh process: the user's module not imported, its model not registered."""
  registry = models._REGISTRY  # pylint: disable=protected-access
  monkeypatch.delitem(registry, "own_mlp_issue20", raising=False)
  monkeypatch.delitem(sys.modules, MODULE, raising=False)


def test_resumed_fedadam_run_ends_equal_and_its_last_round_traces(tmp_path, monkeypatch):
  (tmp_path / "mods").mkdir()
  (tmp_path / "mods" / f"{MODULE}.py").write_text(SOURCE)
  monkeypatch.syspath_prepend(str(tmp_path / "mods"))
  _forget_module(monkeypatch)
  config = cli.parse_args(ARGS, need_workdir=False).config
  assert config.provenance.store_rounds == "last"  # the default, not set above
  full, cut = tmp_path / "full", tmp_path / "cut"
  runner.run(config, full, progress=False)

  real = stages.federated_averaging

  def stopped_in_round_3(*args, **kwargs):
    algorithm = real(*args, **kwargs)

    def round_(state, *rest, **kw):
      if int(state.round) == 2:
        raise Interrupted
      return algorithm.round(state, *rest, **kw)
    return algorithm._replace(round=round_)

  with monkeypatch.context() as m:
    m.setattr(stages, "federated_averaging", stopped_in_round_3)
    with pytest.raises(Interrupted):
      runner.run(config, cut, progress=False)
  assert [r["round"] for r in _rows(cut, "metrics.jsonl")] == [1, 2]
  assert not (cut / "rounds").exists()  # only the last round is stored
  runner.run(config, cut, progress=False)  # resumes from round 2's checkpoint

  assert _rows(cut, "metrics.jsonl") == _rows(full, "metrics.jsonl")
  assert _rows(cut, "provenance.jsonl") == _rows(full, "provenance.jsonl")
  meta_full, meta_cut = _checkpoint_meta(full, 3), _checkpoint_meta(cut, 3)
  assert any("opt_state" in leaf for leaf in meta_full["leaves"])  # Adam's moments are kept
  assert meta_cut["checksums"] == meta_full["checksums"]
  # Only the last round is stored, by default; both runs stored the same arrays.
  assert sorted(p.name for p in (full / "rounds").iterdir()) == ["3"]
  a, b = load_round(full), load_round(cut)
  assert a.round == b.round == 3
  jax.tree.map(np.testing.assert_array_equal, (a.global_vars, a.client_vars),
               (b.global_vars, b.client_vars))

  # Traced afterwards as a fresh process would: the run's imports rebuild the user's model,
  # and the numbers equal the online trace of round 3.
  _forget_module(monkeypatch)
  rows = [r for r in _rows(full, "provenance.jsonl") if r["round"] == 3]
  assert rows
  x = load_dataset("digits").x_test[[r["input"] for r in rows]]
  result, stored = trace_stored_round(full, x)
  assert "own_mlp_issue20" in models.available_models()
  assert stored.round == 3 and stored.model.name == "own_mlp_issue20"
  np.testing.assert_array_equal(result.traced_client, [r["traced_client"] for r in rows])
  np.testing.assert_allclose(result.probs, [r["probs"] for r in rows], rtol=1e-5, atol=1e-7)
  # FedAdam's round keeps its server side: the run's algorithm, rebuilt from config.json,
  # re-runs it without each client (its G_t checked on load).
  assert stored.aggregation == "mean + server optimizer" and stored.removal()[1] == "rule"
  x_model = model_inputs(x, stored.model, None)
  drops = np.asarray(stored.leave_one_out(x_model).drops)
  assert drops.shape == (len(rows), 3) and np.all(np.isfinite(drops))

  # The module gone: one error naming it and where it must be.
  _forget_module(monkeypatch)
  (tmp_path / "mods" / f"{MODULE}.py").unlink()
  importlib.invalidate_caches()
  with pytest.raises(ValueError, match=f"imports: cannot import module '{MODULE}'.*PYTHONPATH"):
    trace_stored_round(full, x)
  with pytest.raises(CheckpointError, match="not a run's workdir .* tracefl_jax.load_round"):
    trace_stored_round(full / "rounds" / "3", x)


class _Pixels(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class _Tokens(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.Embed(11, 4)(x).mean(axis=1))


def test_inputs_in_the_datasets_own_form_or_one_error_saying_it():
  image = tfl.make_model(_Pixels(), input_shape=(4, 4, 1), num_classes=3)
  norm = Normalization((0.5,), (0.25,))
  pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 4), dtype=np.uint8)
  want = ((pixels[..., None] / 255.0 - 0.5) / 0.25).astype(np.float32)
  # Raw pixels with or without the channel axis of 1, one example or a batch.
  for given in (pixels, pixels[..., None]):
    np.testing.assert_allclose(model_inputs(given, image, norm), want, atol=1e-6)
  np.testing.assert_allclose(model_inputs(pixels[0], image, norm), want[:1], atol=1e-6)
  np.testing.assert_array_equal(model_inputs(want, image, norm), want)  # already normalised
  expected = (r"traces \[N, 4, 4, 1\] \(or one example \[4, 4, 1\]\) or \[N, 4, 4\] without "
              r"the channel axis: integer pixels in \[0, 255\] .* mean \(0.5,\), std \(0.25,\)"
              r"\), or float inputs already normalised so, in \[-2, 2\]")
  with pytest.raises(ValueError, match=r"^inputs have shape \[2, 4, 4\] and dtype float64 "
                     r"with values in \[\d+, 2\d\d\] \(raw pixels as floats\? .*\); round 7 .*"
                     + expected):
    model_inputs(pixels.astype(np.float64), image, norm, where="round 7 of runs/x")
  with pytest.raises(ValueError, match=r"^inputs have shape \[2, 5, 5, 1\] and dtype float32; "
                     + r"this round " + expected):
    model_inputs(np.zeros((2, 5, 5, 1), np.float32), image, norm)
  with pytest.raises(ValueError, match=r"dtype int16 with values in \[-1, -1\]"):
    model_inputs(np.full((1, 4, 4, 1), -1, np.int16), image, norm)
  with pytest.raises(ValueError, match="dtype bool"):
    model_inputs(np.zeros((1, 4, 4, 1), bool), image, norm)
  # No normalisation recorded (e.g. digits): floats as the dataset holds them.
  with pytest.raises(ValueError, match="float inputs preprocessed as the run's dataset is"):
    model_inputs(pixels[..., None], image, None)

  text = tfl.make_model(_Tokens(), input_shape=(5,), num_classes=3, input_dtype=np.int32)
  ids = np.arange(10).reshape(2, 5)
  np.testing.assert_array_equal(model_inputs(ids, text, None, 11), ids)
  with pytest.raises(ValueError, match=r"values in \[1, 11\]; this round traces \[N, 5\] .*"
                     r"integer token ids in \[0, 11\)"):
    model_inputs(ids + 1 + (ids == 9), text, None, 11)
  with pytest.raises(ValueError, match="dtype float32"):
    model_inputs(ids.astype(np.float32), text, None, 11)
