"""Algorithms with memory from the config (issue 34): `algorithm` (scaffold, feddyn, fednova)
and `dp.adaptive` build the library's pieces, bad combinations are one line each naming the
fix, each runs end to end from a tiny config, and a SCAFFOLD, FedDyn or adaptive-DP run
killed after round 2 resumes to the uninterrupted run's final state bit for bit (client-state
table and server state included), and a stored FedDyn round (a client-state table and a
server optimizer) re-aggregates and traces as the online one."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracefl_jax.experiment import runner, stages
from tracefl_jax.experiment.checkpoints import Checkpointer
from tracefl_jax.experiment.config import base_config, validate
from tracefl_jax.fl.adaptive_clipping import ClipState
from tracefl_jax.fl.algorithm import leave_one_out_variables
from tracefl_jax.fl.feddyn import FedDynState
from tracefl_jax.provenance import storage
from tracefl_jax.provenance.counterfactual import leave_one_out


def _config(algorithm="fedavg", rounds=2, **fields):
  """digits, mlp, 6 clients with 3 per round, 1 local epoch, SGD clients."""
  c = base_config()
  c.rounds, c.num_clients, c.clients_per_round = rounds, 6, 3
  c.model.name, c.algorithm = "mlp", algorithm
  c.client.optimizer, c.client.learning_rate, c.client.local_epochs = "sgd", 0.05, 1
  c.checkpoint.every, c.provenance.per_label = 1, 1
  for name, value in fields.items():
    *parents, leaf = name.split("__")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _errors(c) -> list[str]:
  with pytest.raises(ValueError) as e:
    validate(c)
  text = str(e.value).removeprefix("invalid config:").strip()
  return [l.removeprefix("- ").strip() for l in text.splitlines()]


# --- bad combinations -----------------------------------------------------------------------

BAD = [
    (dict(algorithm="scaffold", client__optimizer="adam"),
     "algorithm='scaffold' trains clients with plain SGD at client.learning_rate (its option "
     "II's control variates assume it): set client.optimizer='sgd' (got 'adam')"),
    (dict(algorithm="fednova", client__momentum=0.9),
     "algorithm='fednova' trains clients with plain SGD at client.learning_rate (its "
     "step-count normalisation assumes it): set client.momentum=0 (got 0.9)"),
    (dict(algorithm="feddyn", client__weight_decay=1e-4), "set client.weight_decay=0"),
    (dict(algorithm="scaffold", aggregation__rule="median"),
     "algorithm='scaffold' aggregates by its own mean: aggregation.rule must be 'mean', got "
     "'median' (robust rules: algorithm='fedavg')"),
    (dict(algorithm="scaffold", server__optimizer="adam"),
     "algorithm='scaffold' takes a global step size only: server.optimizer 'none' (G = the "
     "mean) or 'sgd' with server.momentum=0 (step server.learning_rate), got "
     "server.optimizer='adam', server.momentum=0"),
    (dict(algorithm="feddyn", server__optimizer="sgd"),
     "algorithm='feddyn' has its own server step (h, the mean of the gradient memories): "
     "server.optimizer must be 'none', got 'sgd'"),
    (dict(algorithm="feddyn", client__loss="fedprox"), "client.loss must be 'cross_entropy'"),
    (dict(algorithm="fednova", dp__enabled=True),
     "algorithm='fednova' cannot run with dp.enabled"),
    (dict(algorithm="scaffold", simulation__strategy="loop"),
     "algorithm='scaffold' keeps a per-client state table, which runs under "
     "simulation.strategy auto, vmap, chunked or scan, not 'loop'"),
    (dict(algorithm="feddyn", attribution__enabled=True),
     "the compare command retrains federations without per-client state"),
    (dict(feddyn__alpha=0.5), "feddyn.alpha=0.5 is used by algorithm='feddyn' only "
                              "(algorithm is 'fedavg'): leave it at 0.1 or set "
                              "algorithm='feddyn'"),
    (dict(dp__adaptive=True), "dp.adaptive=True adapts DP-FedAvg's clip norm: set "
                              "dp.enabled=True too"),
    (dict(dp__target_quantile=0.3), "dp.target_quantile=0.3 is used by dp.adaptive=True only"),
    (dict(dp__enabled=True, dp__adaptive=True, dp__parity=True), "set dp.parity=False"),
    (dict(dp__enabled=True, dp__adaptive=True, server__optimizer="adam"),
     "dp.adaptive=True sets G to the noisy clipped mean: server.optimizer must be 'none'"),
    (dict(dp__enabled=True, dp__adaptive=True, attribution__enabled=True),
     "the compare command's retraining truths cannot run: set dp.adaptive=False"),
    (dict(dp__enabled=True, dp__adaptive=True, dp__noise_multiplier=1.0),
     "dp.count_stddev=0 (clients_per_round / 20 = 0.15) leaves no noise for the update: it "
     "must exceed dp.noise_multiplier / 2 = 0.5 (Andrew et al. 2021, Theorem 1)"),
]


@pytest.mark.parametrize("fields,message", BAD)
def test_a_bad_combination_is_one_line_naming_the_fix(fields, message):
  c = _config(**{"algorithm": "fedavg", **fields})
  lines = _errors(c)
  assert any(message in l for l in lines), lines
  assert sum(message in l for l in lines) == 1


def test_good_combinations_validate():
  validate(_config("scaffold", server__optimizer="sgd", server__learning_rate=0.5))
  validate(_config("feddyn", feddyn__alpha=0.01, aggregation__weighting="uniform"))
  validate(_config("fednova", client__loss="fedprox", server__optimizer="adam"))
  validate(_config(dp__enabled=True, dp__adaptive=True, dp__noise_multiplier=1.0,
                   dp__count_stddev=0.6, dp__target_quantile=0.7))


def test_the_config_builds_the_library_pieces():
  c = _config("fednova")
  data = stages.load_data(c)
  model = stages.build_model(c, data)
  assert stages.build_algorithm(c, model, data).aggregator.__name__ == "fednova_rule"
  scaffold = stages.build_algorithm(_config("scaffold", server__optimizer="sgd",
                                            server__learning_rate=0.5), model, data)
  state = scaffold.init(model.variables, num_clients=data.data.num_clients)
  tree = {"w": jnp.ones(2)}
  step, _ = scaffold.server_optimizer.update(tree, scaffold.server_optimizer.init(tree))
  np.testing.assert_allclose(step["w"], -0.5)  # the global step size server.learning_rate
  assert stages.build_algorithm(_config("scaffold"), model, data).server_optimizer is None
  assert jax.tree.leaves(state.client_state)[0].shape[0] == data.data.num_clients
  feddyn = stages.build_algorithm(_config("feddyn", feddyn__alpha=0.01), model, data)
  assert isinstance(feddyn.init(model.variables, num_clients=6).opt_state, FedDynState)
  adaptive = stages.build_algorithm(_config(dp__enabled=True, dp__adaptive=True,
                                            dp__clip_norm=0.3), model, data)
  clip = adaptive.init(model.variables).opt_state
  assert isinstance(clip, ClipState) and float(clip.clip_norm) == pytest.approx(0.3)


# --- end to end from the config -------------------------------------------------------------


@pytest.mark.parametrize("algorithm,fields,server_side", [
    ("scaffold", {}, "mean"),
    ("feddyn", {}, "mean + server optimizer"),
    ("fednova", {}, "custom rule fednova_rule"),
    ("fedavg", dict(dp__enabled=True, dp__adaptive=True, dp__noise_multiplier=0.1),
     "dp_fedavg"),
])
def test_each_algorithm_runs_from_the_config(tmp_path, algorithm, fields, server_side):
  c = _config(algorithm, **fields)
  summary = runner.run(c, tmp_path, progress=False)
  assert summary["rounds"] == 2
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["provenance"]["aggregation"] for r in rows] == [server_side] * 2
  assert all(np.isfinite(r["client_loss"]) for r in rows)
  if fields:  # adaptive clipping: the clip norm moves from dp.clip_norm
    assert rows[0]["dp_clip_norm"] == 1.0 and rows[1]["dp_clip_norm"] != 1.0


# --- resume exactly after a kill --------------------------------------------------------------


class _Killed(Exception):
  pass


def _final_state(c, workdir):
  data = stages.load_data(c)
  model = stages.build_model(c, data)
  algorithm = stages.build_algorithm(c, model, data)
  example = algorithm.init(model.variables, num_clients=data.data.num_clients)
  ck = Checkpointer(workdir, (workdir / "config.json").read_text().strip(), 1)
  try:
    state, history, _ = ck.restore(example)
  finally:
    ck.close()
  return state, history


def _uninterrupted_and_resumed(c, tmp_path, monkeypatch):
  """`c` run to the end, and run again killed after round 2 (its row and checkpoint 2
  written) then resumed: both final `ServerState`s, after checking that the resumed run
  ends at the same round with the same state, bit for bit, and the same rows (but times)."""
  full, killed = tmp_path / "full", tmp_path / "killed"
  runner.run(c, full, progress=False)
  record = runner.Recorder.__call__

  def dies_after_round_2(self, info):
    record(self, info)  # the row and checkpoint 2 are written, then the process dies
    if info.round == 2:
      raise _Killed
  monkeypatch.setattr(runner.Recorder, "__call__", dies_after_round_2)
  with pytest.raises(_Killed):
    runner.run(c, killed, progress=False)
  monkeypatch.setattr(runner.Recorder, "__call__", record)
  checkpoints = Checkpointer(killed, "{}", 1)
  assert checkpoints.latest_round() == 2
  checkpoints.close()
  runner.run(c, killed, progress=False)
  (want, want_rows), (got, got_rows) = _final_state(c, full), _final_state(c, killed)
  assert got.round == want.round == c.rounds
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  untimed = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
  assert untimed(got_rows) == untimed(want_rows)
  return want, got


@pytest.mark.parametrize("algorithm,fields", [
    ("scaffold", {}), ("feddyn", {}),
    ("fedavg", dict(dp__enabled=True, dp__adaptive=True, dp__noise_multiplier=0.1))])
def test_killed_after_round_2_resumes_bit_for_bit(tmp_path, monkeypatch, algorithm, fields):
  """SCAFFOLD's control variates and FedDyn's memories (the client-state table), FedDyn's h
  and adaptive clipping's clip norm (the server state) are in the checkpoint."""
  c = _config(algorithm, rounds=4, provenance__enabled=False, **fields)
  want, got = _uninterrupted_and_resumed(c, tmp_path, monkeypatch)
  if algorithm != "fedavg":
    table = jax.tree.leaves(got.client_state)
    assert table and table[0].shape[0] == 6 and float(jnp.abs(table[0]).max()) > 0
  assert jax.tree.leaves(got.opt_state) or algorithm == "scaffold"


# --- a stored FedDyn round ------------------------------------------------------------------


def test_a_stored_feddyn_round_reaggregates_and_traces_as_the_online_one(tmp_path):
  c = _config("feddyn")
  data = stages.load_data(c)
  model = stages.build_model(c, data)
  algorithm = stages.build_algorithm(c, model, data, donate=False)
  state = algorithm.init(model.variables, num_clients=data.data.num_clients)
  for r in (1, 2):  # round 2: h and the memories are no longer zero
    state, out = algorithm.round(state, clients=[r, 3, 5], data=data.data,
                                 key=jax.random.key(r))
  path = storage.save_round(tmp_path / "round", out, round_idx=2, model=model.model)
  stored = storage.load_round(path, model.model, algorithm)
  reaggregate, kind = stored.removal()
  assert kind == "rule" and reaggregate is not None
  online = leave_one_out_variables(out)
  again = jax.vmap(reaggregate)(jnp.asarray(out.weights)[None] * (1 - jnp.eye(3)))
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(online), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  x = jnp.asarray(data.x_test[:4])
  want = leave_one_out(model.model, out.clients.variables, out.weights, x,
                       reaggregate=out.reaggregate)
  np.testing.assert_allclose(stored.leave_one_out(x).drops, want.drops, rtol=1e-5, atol=1e-6)
  traced = stored.trace(x, score="first_order")
  assert list(np.asarray(traced.client_ids)) == [2, 3, 5]
