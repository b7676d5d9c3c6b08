"""Ditto and q-FFL from the config (issue 34): `algorithm=ditto|qffl` with `ditto.lam`,
`qffl.q` and `qffl.lipschitz` build the library's pieces, bad combinations are one line each
naming the fix, each runs end to end from a tiny config, and a run killed after round 2
resumes to the uninterrupted run's final state bit for bit (Ditto's personal models
included)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from tests.test_algorithm_config import _config, _errors, _uninterrupted_and_resumed
from tracefl_jax.experiment import runner, stages
from tracefl_jax.experiment.config import validate
from tracefl_jax.fl.robust import AggregationRule

BAD = [
    (dict(algorithm="qffl", client__optimizer="adam"),
     "algorithm='qffl' trains clients with plain SGD at client.learning_rate (its Lipschitz "
     "estimate L = 1 / client.learning_rate assumes it): set client.optimizer='sgd' (got "
     "'adam')"),
    (dict(algorithm="qffl", aggregation__rule="median"),
     "algorithm='qffl' aggregates by its own rule (q-FedAvg's step): aggregation.rule must be "
     "'mean', got 'median'"),
    (dict(algorithm="qffl", dp__enabled=True), "algorithm='qffl' cannot run with dp.enabled"),
    (dict(algorithm="ditto", dp__enabled=True),
     "algorithm='ditto' cannot run with dp.enabled (DP-FedAvg has no per-client state): set "
     "dp.enabled=False"),
    (dict(algorithm="ditto", simulation__strategy="sharded"),
     "algorithm='ditto' keeps a per-client state table, which runs under simulation.strategy "
     "auto, vmap, chunked or scan, not 'sharded'"),
    (dict(algorithm="ditto", attribution__enabled=True),
     "the compare command retrains federations without per-client state"),
    (dict(ditto__lam=1.0), "ditto.lam=1 is used by algorithm='ditto' only (algorithm is "
                           "'fedavg'): leave it at 0.1 or set algorithm='ditto'"),
    (dict(algorithm="ditto", qffl__q=2.0), "qffl.q=2 is used by algorithm='qffl' only "
                                           "(algorithm is 'ditto')"),
    (dict(qffl__lipschitz=5.0), "qffl.lipschitz=5 is used by algorithm='qffl' only"),
]


@pytest.mark.parametrize("fields,message", BAD)
def test_a_bad_combination_is_one_line_naming_the_fix(fields, message):
  lines = _errors(_config(**{"algorithm": "fedavg", **fields}))
  assert sum(message in l for l in lines) == 1, lines


def test_good_combinations_validate_and_build_the_pieces():
  # Ditto keeps FedAvg's family for G: another optimizer, a robust rule, a server optimizer.
  validate(_config("ditto", ditto__lam=1.0, client__optimizer="adam",
                   aggregation__rule="median", server__optimizer="adam"))
  validate(_config("qffl", qffl__q=5.0, qffl__lipschitz=10.0, server__optimizer="sgd"))
  c = _config("qffl", qffl__q=0.0)
  data = stages.load_data(c)
  model = stages.build_model(c, data)
  rule = stages.build_algorithm(c, model, data).aggregator
  assert isinstance(rule, AggregationRule) and rule.name == "qffl"
  ditto = stages.build_algorithm(_config("ditto"), model, data)
  state = ditto.init(model.variables, num_clients=data.data.num_clients)
  jax.tree.map(lambda t, p: np.testing.assert_array_equal(t, np.broadcast_to(p, t.shape)),
               state.client_state, model.variables["params"])  # v_k = G_0


@pytest.mark.parametrize("algorithm,server_side", [("ditto", "mean"), ("qffl", "qffl")])
def test_each_runs_from_the_config(tmp_path, algorithm, server_side):
  summary = runner.run(_config(algorithm), tmp_path, progress=False)
  assert summary["rounds"] == 2
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["provenance"]["aggregation"] for r in rows] == [server_side] * 2
  assert all(np.isfinite(r["client_loss"]) for r in rows)


@pytest.mark.parametrize("algorithm", ["ditto", "qffl"])
def test_killed_after_round_2_resumes_bit_for_bit(tmp_path, monkeypatch, algorithm):
  c = _config(algorithm, rounds=4, provenance__enabled=False)
  _, got = _uninterrupted_and_resumed(c, tmp_path, monkeypatch)
  if algorithm == "ditto":  # the personal models moved from G_0 and were restored
    table = np.asarray(jax.tree.leaves(got.client_state)[0])
    assert table.shape[0] == 6 and np.ptp(table, axis=0).max() > 0
