"""Library save_round / load_round: a round comes back as saved, with the user's ModelDef,
and traces as the arrays it holds; missing, altered or foreign rounds are clear errors."""

from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import tracefl_jax as tfl
from tracefl_jax.provenance.storage import StoredRoundError
from tracefl_jax.provenance import trace_clients
from tracefl_jax.provenance.counterfactual import leave_one_out
from tracefl_jax.provenance.removal import round_removal


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


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.tanh(nn.Dense(8)(x)))


ALGORITHMS = {
    "fedavg": {},
    "fedadam": {"server_optimizer": tfl.server_optimizer("adam", 0.05)},
    "krum": {"aggregator": tfl.krum(1)},
}


@pytest.fixture(scope="module")
def federation():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 140).astype(np.int32)
  x = (rng.normal(size=(140, 4)) + y[:, None]).astype(np.float32)
  data = tfl.federate(x[:120], y[:120], [np.arange(i, 120, 6)[: 8 + 2 * i] for i in range(6)])
  model = tfl.make_model(MLP(), input_shape=(4,), num_classes=3)
  return model, data, model.init(jax.random.key(0)), x[120:]


def _algorithm(model, name):
  return tfl.federated_averaging(model, optax.sgd(0.2), batch_size=4, local_epochs=1,
                                 strategy="vmap", **ALGORITHMS[name])


def _last_round(federation, name):
  model, data, variables, _ = federation
  alg = _algorithm(model, name)
  outs = []
  tfl.run_rounds(alg, alg.init(variables), data, rounds=2, clients_per_round=5, seed=3,
                 divergence_factor=0, callbacks=[lambda info: outs.append(info.output)])
  return alg, outs[-1]


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_a_stored_round_traces_as_the_online_one_under_its_algorithm(federation, tmp_path,
                                                                      name):
  model, _, _, x = federation
  alg, out = _last_round(federation, name)
  path = tfl.save_round(tmp_path / "r", out, round_idx=2, model=model)
  stored = tfl.load_round(path, model, None if name == "fedavg" else alg)
  assert stored.aggregation == out.aggregation
  np.testing.assert_array_equal(stored.weights, out.weights)
  reaggregate, kind = round_removal(out)
  assert stored.removal()[1] == kind
  online = trace_clients(model, out.traced, out.clients.variables, x, client_ids=out.client_ids,
                         weights=out.weights, reaggregate=reaggregate)
  got = stored.trace(x, weights=stored.weights)
  np.testing.assert_array_equal(got.scores, online.scores)
  np.testing.assert_allclose(got.first_order_scores, online.first_order_scores, atol=1e-6)
  fo_online = trace_clients(model, out.traced, out.clients.variables, x, score="first_order",
                            client_ids=out.client_ids, weights=out.weights,
                            reaggregate=reaggregate)
  fo = stored.trace(x, score="first_order")
  np.testing.assert_allclose(fo.scores, fo_online.scores, atol=1e-6)
  np.testing.assert_array_equal(fo.traced_client, fo_online.traced_client)
  truth = leave_one_out(model, out.clients.variables, out.weights, x,
                        global_vars=out.traced if reaggregate is None else None,
                        reaggregate=reaggregate)
  np.testing.assert_allclose(stored.leave_one_out(x).drops, truth.drops, atol=1e-6)
  if name != "fedavg":
    # Without its algorithm the rule cannot be re-run: one line saying what to pass.
    bare = tfl.load_round(path, model)
    with pytest.raises(ValueError, match=rf"server side is '{re.escape(out.aggregation)}'.*"
                       r"load_round\(path, model, algorithm\)"):
      bare.trace(x, score="first_order")
    with pytest.raises(StoredRoundError, match=r"aggregated by .*, the algorithm given "
                       r"aggregates by 'mean': pass the algorithm the round was made with"):
      tfl.load_round(path, model, _algorithm(model, "fedavg"))
  if name == "fedadam":  # the same words, another learning rate: G_t does not come back
    other = tfl.federated_averaging(model, optax.sgd(0.2), batch_size=4, local_epochs=1,
                                    server_optimizer=tfl.server_optimizer("adam", 0.5))
    with pytest.raises(StoredRoundError, match="does not give its global model back"):
      tfl.load_round(path, model, other)
