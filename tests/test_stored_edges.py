"""Stored rounds at their edges (issue 38 items 1-2): a failed save leaves the old round, bad
arguments write nothing, a damaged round is one line naming its file, a round of another model
is refused, and the trace verb, `StoredRound.trace` and `trace_clients` keep one input
contract, case by case."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

import tracefl_jax as tfl
from tracefl_jax.data import load_dataset
from tracefl_jax.experiment import stored as exp_stored
from tracefl_jax.experiment.checkpoints import CheckpointError
from tracefl_jax.experiment.config import base_config
from tracefl_jax.experiment.stages import model_from_spec
from tracefl_jax.fl import robust
from tracefl_jax.provenance import storage_files
from tracefl_jax.provenance.storage import StoredRoundError
from tracefl_jax.provenance import trace_clients


class Tiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(5)(x)))


@pytest.fixture(scope="module")
def tiny():
  model = tfl.make_model(Tiny(), input_shape=(4,), num_classes=3)
  g = model.init(jax.random.key(0))
  clients = jax.tree.map(lambda a: np.stack([a * (1 + 0.1 * k) for k in range(3)]), g)
  return model, g, clients


def _save(path, tiny, round_idx=3, **kw):
  model, g, clients = tiny
  kw.setdefault("client_ids", np.array([7, 2, 5]))
  return tfl.save_round(path, round_idx=round_idx, global_vars=g, client_vars=clients,
                        client_sizes=np.array([30, 10, 20]), weights=np.array([3., 1., 2.]),
                        aggregation="mean", model=model, **kw)


def test_bad_saves_write_nothing_and_a_failed_save_keeps_the_old_round(tmp_path, tiny,
                                                                       monkeypatch):
  model = tiny[0]
  path = _save(tmp_path / "r", tiny)
  refused = [
      ({"meta": {"acc": np.float32(0.9)}}, r"meta\['acc'\] is a numpy.float32 .* JSON cannot "
       r"hold .*float\(\.\.\.\).*nothing was written"),
      ({"round_idx": 4, "meta": {"round": 9}}, r"round_idx=4 but meta\['round'\]=9"),
      ({"meta": {"checksums": 1}}, "meta key.* checksums are written by save_round"),
      ({"client_ids": np.array([7, 2, 5, 9])}, r"client_ids has shape \[4\], but client_vars "
       r"stacks K = 3 clients"),
      ({"client_ids": np.array([7, 2, 7])}, r"client_ids \[7, 2, 7\] repeat an id"),
  ]
  for kw, message in refused:
    with pytest.raises(ValueError, match=message):
      _save(path, tiny, **{"round_idx": None, **kw})
    assert tfl.load_round(path, model).round == 3
  assert _save(path, tiny, round_idx=None, meta={"round": 6}) and (
      tfl.load_round(path, model).round == 6)

  def full_disk(directory):
    raise OSError(28, "No space left on device")
  with monkeypatch.context() as m:  # the arrays are written, then the disk is full
    m.setattr(storage_files, "file_sizes", full_disk)
    with pytest.raises(OSError, match="No space left"):
      _save(path, tiny, round_idx=8)
  assert tfl.load_round(path, model).round == 6
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # nothing half-written left
  _save(path, tiny, round_idx=9)
  assert tfl.load_round(path, model).round == 9
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
  # A crash between the swap's two renames leaves the old round complete beside: found.
  path.rename(tmp_path / ".r.old")
  assert tfl.load_round(path, model).round == 9
  _save(path, tiny, round_idx=10)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_a_damaged_round_or_another_models_is_one_line_naming_it(tmp_path, tiny):
  model = tiny[0]
  path = _save(tmp_path / "r", tiny)
  other = tfl.make_model(Tiny(), input_shape=(6,), num_classes=3)
  with pytest.raises(StoredRoundError) as info:
    tfl.load_round(path, other)
  assert "does not hold the variables of model 'Tiny'" in str(info.value)
  record = (path / "round.json").read_text()
  assert json.loads(record)["storage"]["shapes"]["global/params/Dense_1/kernel"] == [
      [4, 5], "float32"]
  biggest = max((p for p in (path / "arrays").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  data = biggest.read_bytes()
  biggest.write_bytes(data[:len(data) // 2])
  with pytest.raises(StoredRoundError) as info:
    tfl.load_round(path, model)
  message = str(info.value)
  assert "\n" not in message and message.startswith(f"stored round {path} is damaged: file "
                                                    f"{biggest} has {len(data) // 2} bytes, "
                                                    f"{len(data)} were written")
  biggest.write_bytes(data)
  (path / "round.json").write_text(record[:len(record) // 2])
  with pytest.raises(StoredRoundError, match=r"^stored round \S+ is damaged: \S+round.json is "
                     r"not valid JSON \(a torn write\?"):
    tfl.load_round(path, model)


def test_duplicate_ids_and_fractional_krum_counts_are_refused(tiny):
  model, g, clients = tiny
  with pytest.raises(ValueError, match=r"client_ids \[0, 1, 1\] repeat id\(s\) \[1\]"):
    trace_clients(model, g, clients, np.zeros((2, 4), np.float32), client_ids=[0, 1, 1])
  for bad in ({"num_byzantine": 1.5}, {"num_selected": 2.0}, {"num_byzantine": True}):
    with pytest.raises(ValueError, match="must be a whole number of clients"):
      robust.krum(**{"num_byzantine": 1, "num_selected": 1, **bad})


# --- one input contract: trace_clients, StoredRound.trace and the trace verb --------------

SPEC = {"name": "mlp", "hf_path": None, "input_shape": [8, 8, 1], "num_classes": 10,
        "vocab_size": None, "pad_token_id": None}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run's workdir as the runner leaves it, with one stored round of an MLP on digits
  (written directly: config.json and the round)."""
  workdir = tmp_path_factory.mktemp("run")
  c = base_config()
  c.model.name, c.client.batch_size = "mlp", 8
  (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
  model, g = model_from_spec(SPEC, jax.random.key(0))
  clients = jax.tree.map(lambda a: np.stack([a * (1 + 0.2 * k) for k in range(3)]), g)
  x_test = load_dataset("digits").x_test
  exp_stored.save_round(workdir, 2, meta={"model": SPEC, "normalization": None}, model=model,
                        global_vars=g, client_vars=clients, client_ids=[4, 1, 7],
                        client_sizes=[64, 32, 96], weights=[2., 1., 3.], aggregation="mean",
                        input_range=[float(x_test.min()), float(x_test.max())])
  return workdir, model, g, clients, x_test


def _outcome(fn):
  try:
    return ("traced", np.asarray(fn().traced_client).tolist())
  except ValueError as e:
    return ("refused", str(e).split(";")[0])


def test_one_input_contract_case_by_case(run_dir):
  workdir, model, g, clients, x_test = run_dir
  stored = exp_stored.load_round(workdir, 2, model)
  x = x_test[:4]
  raw = np.round((x * 0.37605 + 0.30526) * 16)  # the digits' raw pixels, 0..16
  nan_row = x.copy()
  nan_row[1] = np.nan
  cases = {  # what the model takes: all three agree
      "float32": (x, "traced"), "float64": (x.astype(np.float64), "traced"),
      "a NaN row (unattributable)": (nan_row, "traced"),
      "int32": (raw.astype(np.int32), "refused"), "bool": (x > 0, "refused"),
      "wrong shape": (x[:, :4], "refused"), "no inputs": (x[:0], "refused"),
      # the range of the round's own inputs, which trace_clients cannot know
      "raw pixels as floats": (raw.astype(np.float32), "refused"),
  }
  for name, (given, expected) in cases.items():
    library = _outcome(lambda: trace_clients(model, g, clients, given,  # noqa: B023
                                             client_ids=stored.client_ids))
    round_ = _outcome(lambda: stored.trace(given))  # noqa: B023
    verb = _outcome(lambda: exp_stored.trace_stored_round(workdir, given, 2)[0])  # noqa: B023
    assert round_[0] == verb[0] == expected, (name, round_, verb)
    if name != "raw pixels as floats":
      assert library == round_, (name, library, round_)
      if expected == "traced":
        assert verb == round_, name
    else:
      assert library[0] == "traced"  # no range without the round
  # The verb adds the dataset's own form's conveniences: one example without its batch axis.
  assert _outcome(lambda: exp_stored.trace_stored_round(workdir, x[0], 2)[0])[0] == "traced"
  assert _outcome(lambda: stored.trace(x[0]))[0] == "refused"


def test_a_round_of_another_model_or_a_damaged_one_is_one_line(run_dir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "cnn_run"
  shutil.copytree(run_dir[0], workdir)
  config = json.loads((workdir / "config.json").read_text())
  config["model"]["name"] = "cnn"
  (workdir / "config.json").write_text(json.dumps(config))
  x = run_dir[4][:2]
  with pytest.raises(CheckpointError, match=r"is a round of model 'mlp', but the run in \S+ "
                     r"trains model 'cnn' \(its config.json\)"):
    exp_stored.trace_stored_round(workdir, x)
  # A damaged round through the verb: exit code 2 and one line naming the file.
  shutil.rmtree(workdir)
  shutil.copytree(run_dir[0], workdir)
  np.save(tmp_path / "x.npy", x)
  biggest = max((p for p in (workdir / "rounds" / "2" / "arrays").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:100])
  cmd = [sys.executable, "-m", "tracefl_jax", "trace", f"--workdir={workdir}",
         f"--inputs={tmp_path / 'x.npy'}"]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                        cwd=Path(__file__).resolve().parents[1])
  assert done.returncode == 2 and done.stdout == ""
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and f"is damaged: file {biggest} has 100 bytes" in lines[0], lines
  (workdir / "rounds" / "2" / "round.json").write_text('{"round": 2, "mod')
  done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                        cwd=Path(__file__).resolve().parents[1])
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2 and len(lines) == 1 and "round.json is not valid JSON" in lines[0]
