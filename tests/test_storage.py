"""Library save_round / load_round: a round comes back as saved, with the user's ModelDef,
and traces as the arrays it holds; missing, altered or foreign rounds are clear errors."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

import tracefl_jax as tfl
from tracefl_jax.fl.storage import StoredRoundError


class Tiny(nn.Module):
  width: int = 4

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(5)(x)))


def test_saved_round_loads_and_traces_as_saved(tmp_path):
  model = tfl.make_model(Tiny(), input_shape=(4,), num_classes=3)
  g = model.init(jax.random.key(0))
  clients = jax.tree.map(lambda a: np.stack([a * (1 + 0.1 * k) for k in range(3)]), g)
  ids, sizes = np.array([7, 2, 5]), np.array([30, 10, 20])
  path = tfl.save_round(tmp_path / "r", round_idx=3, global_vars=g, client_vars=clients,
                        client_ids=ids, client_sizes=sizes, model=model, meta={"run": "a"})
  stored = tfl.load_round(path, model)
  assert stored.round == 3 and stored.meta["run"] == "a" and stored.model is model
  np.testing.assert_array_equal(stored.client_ids, ids)
  np.testing.assert_array_equal(stored.client_sizes, sizes)
  jax.tree.map(np.testing.assert_array_equal, stored.client_vars, clients)
  x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  want = tfl.trace_clients(model, g, clients, x, client_ids=ids)
  got = stored.trace(x)
  np.testing.assert_array_equal(got.scores, want.scores)
  np.testing.assert_array_equal(got.traced_client, want.traced_client)
  bare = tfl.load_round(path)  # no model: arrays only, no trace
  with pytest.raises(ValueError, match="load it with load_round"):
    bare.trace(x)

  with pytest.raises(StoredRoundError, match="does not hold the variables of model 'Tiny'"):
    tfl.load_round(path, tfl.make_model(Tiny(), input_shape=(6,), num_classes=3))
  with pytest.raises(StoredRoundError, match="no stored round"):
    tfl.load_round(tmp_path / "nothing", model)
  record = json.loads((path / "round.json").read_text())
  first = sorted(record["checksums"])[0]
  record["checksums"][first] = "0" * 64
  (path / "round.json").write_text(json.dumps(record))
  with pytest.raises(StoredRoundError, match=r"is corrupt: array \S+ does not match the SHA-256"):
    tfl.load_round(path, model)
  with pytest.raises(ValueError, match="needs a RoundOutput or client_vars"):
    tfl.save_round(tmp_path / "s", global_vars=g, client_ids=ids, client_sizes=sizes)
