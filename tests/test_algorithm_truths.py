"""Provenance that knows the algorithm: under every rule and server optimizer, the
leave-one-client-out truth, the first-order score and multi-round provenance remove a client
by the round's own server side (`provenance/removal.py`), checked against the round re-run
without each client (`leave_one_out_variables`) and a plain gradient recomputation."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tracefl_jax as tfl
from tracefl_jax.fl import robust
from tracefl_jax.fl.algorithm import leave_one_out_variables
from tracefl_jax.fl.server import server_optimizer
from tracefl_jax.fl.strategies import client_mesh
from tracefl_jax.provenance import protocol, trace_clients
from tracefl_jax.provenance.counterfactual import leave_one_out
from tracefl_jax.provenance.multiround import MultiRoundAccumulator
from tracefl_jax.provenance.removal import round_removal
from tracefl_jax.provenance.round_callback import provenance_callback


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.tanh(nn.Dense(8)(x)))


ALGORITHMS = {
    "fedavg": {},
    "fedadam": {"server_optimizer": server_optimizer("adam", 0.05)},
    "trimmed_mean": {"aggregator": robust.trimmed_mean(0.2)},
    "median": {"aggregator": robust.median()},
    "krum": {"aggregator": robust.krum(1)},
}


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 160).astype(np.int32)
  x = (rng.normal(size=(160, 4)) + y[:, None]).astype(np.float32)
  data = tfl.federate(x[:120], y[:120], [np.arange(i, 120, 8)[: 6 + 2 * i] for i in range(8)])
  model = tfl.make_model(MLP(), input_shape=(4,), num_classes=3)
  return model, data, model.init(jax.random.key(0)), x[120:], y[120:]


def _run(setup, name, rounds=2, callbacks=()):
  model, data, variables, _, _ = setup
  pieces = ALGORITHMS[name] if isinstance(name, str) else name
  alg = tfl.federated_averaging(model, optax.sgd(0.2), batch_size=4, local_epochs=1,
                                strategy="vmap", **pieces)
  outs = []
  state, rows = tfl.run_rounds(alg, alg.init(variables), data, rounds=rounds,
                               clients_per_round=6, seed=3, divergence_factor=0,
                               callbacks=[*callbacks, lambda info: outs.append(info.output)])
  return state, outs, rows


def _explained(model, variables, x, target):
  return np.take_along_axis(np.asarray(model.logits(variables, x), np.float64),
                            target[:, None], axis=1)[:, 0]


def _flat(tree):
  return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_truth_and_first_order_score_remove_clients_by_the_rounds_own_rule(setup, name):
  model, _, _, x, _ = setup
  _, outs, _ = _run(setup, name)
  out = outs[-1]
  reaggregate, kind = round_removal(out)
  assert kind == ("closed_form" if name == "fedavg" else "rule")
  assert out.aggregation == {"fedavg": "mean", "fedadam": "mean + server optimizer",
                             "trimmed_mean": "trimmed_mean(0.2)", "median": "median",
                             "krum": "krum(1,1)"}[name]
  w = np.asarray(out.weights)
  clients = out.clients.variables
  # The reference: the round re-run without each client, evaluated plainly.
  loo_vars = leave_one_out_variables(out)
  target = np.asarray(model.logits(out.variables, x)).argmax(1)
  s_g = _explained(model, out.variables, x, target)
  want = np.stack([s_g - _explained(model, jax.tree.map(lambda a: a[k], loo_vars), x, target)
                   for k in range(len(w))], axis=1)                                # [N, K]
  rule = leave_one_out(model, clients, w, x, reaggregate=out.reaggregate)
  np.testing.assert_allclose(rule.drops, want, atol=2e-5)
  np.testing.assert_array_equal(rule.predicted, target)
  if name == "fedavg":  # the closed form is the round's own removal: the fast path agrees
    closed = leave_one_out(model, clients, w, x, global_vars=out.variables)
    np.testing.assert_allclose(closed.drops, rule.drops, atol=2e-5)
  else:  # ... and is not, here: the closed form would report another truth
    closed = leave_one_out(model, clients, w, x, global_vars=out.variables)
    assert np.abs(np.asarray(closed.drops) - want).max() > 1e-3
  if name == "krum":  # removing a client Krum did not choose changes nothing: exactly 0
    assert np.sum(np.all(np.asarray(rule.drops) == 0, axis=0)) >= 3
  # First order: < grad s(G), G - G_{-k} > over every parameter (all units are traced).
  g_re = out.reaggregate(jnp.asarray(w))
  grads = np.stack([_flat(jax.grad(lambda p, n=n: model.logits(
      {"params": p}, x[n:n + 1])[0, target[n]])(out.variables["params"]))
                    for n in range(len(x))])
  diffs = np.stack([_flat(g_re["params"]) - _flat(jax.tree.map(lambda a: a[k],
                                                               loo_vars["params"]))
                    for k in range(len(w))])
  expected = grads @ diffs.T
  scale = max(np.abs(expected).max(), 1e-6)
  res = trace_clients(model, out.variables, clients, x, score="first_order", weights=w,
                      reaggregate=out.reaggregate)
  np.testing.assert_allclose(res.scores, expected, atol=1e-4 * scale)
  for kw in ({"kernel": "jvp", "clients_per_chunk": 4}, {"kernel": "reference"},
             {"mesh": client_mesh()}):
    other = trace_clients(model, out.variables, clients, x, score="first_order", weights=w,
                          reaggregate=out.reaggregate, **kw)
    np.testing.assert_allclose(other.scores, res.scores, atol=1e-4 * scale)
  beside = trace_clients(model, out.variables, clients, x, weights=w,
                         reaggregate=out.reaggregate)
  np.testing.assert_allclose(beside.first_order_scores, res.scores, atol=1e-4 * scale)
  if name == "fedavg":  # equal to the weight-aware score of FedAvg's closed form
    fast = trace_clients(model, out.variables, clients, x, score="first_order", weights=w)
    np.testing.assert_allclose(fast.scores, res.scores, atol=1e-4 * scale)


@pytest.mark.parametrize("name", ["krum", "fedadam"])
def test_the_protocol_reports_agreement_with_the_rounds_own_truth(setup, name):
  model, data, _, x, y = setup
  evaluator = tfl.GlobalEvaluator(model, x, y)
  traced = {}
  cb = provenance_callback(model, evaluator, protocol.ProtocolSettings(per_label=8),
                           on_trace=lambda r, t: traced.__setitem__(r, t))
  _, outs, rows = _run(setup, name, callbacks=[evaluator, cb])
  out, summary, t = outs[-1], rows[-1]["provenance"], traced[2]
  assert summary["counterfactual_removal"] == "rule"
  assert summary["aggregation"] == out.aggregation
  run = protocol.summarize_rounds([r["provenance"] for r in rows])
  assert run["counterfactual_removal"] == "rule" and run["aggregation"] == out.aggregation
  from tracefl_jax.experiment.report import removal_words  # what the run command prints
  assert removal_words(run["counterfactual_removal"], run["aggregation"]) == (
      f"re-running the round's {out.aggregation} without it (exact)")
  xs = x[t.inputs]
  loo_vars = leave_one_out_variables(out)
  s_g = _explained(model, out.reaggregate(jnp.asarray(out.weights)), xs, t.predicted)
  drops = np.stack([s_g - _explained(model, jax.tree.map(lambda a, k=k: a[k], loo_vars), xs,
                                     t.predicted) for k in range(len(out.weights))], axis=1)
  # The truth the summary reports is the round's own (top-1 agreement 1.00) ...
  np.testing.assert_array_equal(t.counterfactual_client, out.client_ids[drops.argmax(1)])
  # ... and each score's reported agreement is its agreement with that truth.
  paper = np.asarray(trace_clients(model, out.variables, out.clients.variables, xs).scores)
  assert summary["counterfactual_top1"] == pytest.approx(
      np.mean(paper.argmax(1) == drops.argmax(1)))
  fo = np.asarray(trace_clients(model, out.variables, out.clients.variables, xs,
                                score="first_order", weights=out.weights,
                                reaggregate=out.reaggregate).scores)
  assert summary["first_order_counterfactual_top1"] == pytest.approx(
      np.mean(fo.argmax(1) == drops.argmax(1)))


def test_closed_form_is_refused_for_another_rule(setup):
  model, data, _, x, y = setup
  _, outs, _ = _run(setup, "median", rounds=1)
  out = outs[-1]
  predictions = np.asarray(model.logits(out.variables, x)).argmax(1)
  kw = dict(client_ids=out.client_ids, client_sizes=np.asarray(out.clients.num_examples),
            label_counts=data.label_counts, x_test=x, y_test=y, predictions=predictions,
            weights=out.weights)
  with pytest.raises(ValueError, match="'median'.*reaggregate=output.reaggregate"):
    protocol.trace_round(model, out.variables, out.clients.variables, aggregation="median",
                         **kw)
  dp = protocol.trace_round(model, out.variables, out.clients.variables,
                            aggregation="dp_fedavg", **kw)
  assert dp.summary["counterfactual_removal"] == "dp_closed_form"
  with pytest.raises(ValueError, match="needs the round's aggregation weights"):
    trace_clients(model, out.variables, out.clients.variables, x,
                  reaggregate=out.reaggregate)


def test_multi_round_sums_each_rounds_own_removal(setup):
  model, data, variables, x, _ = setup
  state, outs, _ = _run(setup, {"aggregator": robust.trimmed_mean(0.2),
                                 "server_optimizer": server_optimizer("adam", 0.05)}, rounds=3)
  acc = MultiRoundAccumulator(variables["params"], data.num_clients, round_decay=0.5)
  chunked = MultiRoundAccumulator(variables["params"], data.num_clients, round_decay=0.5)
  want = np.zeros((data.num_clients, _flat(variables["params"]).size))
  for out in outs:
    acc.update(out.clients.variables, out.traced, out.weights, out.client_ids,
               reaggregate=out.reaggregate)
    chunked.update(out.clients.variables, out.traced, out.weights, out.client_ids,
                   reaggregate=out.reaggregate, clients_per_chunk=4)
    loo = leave_one_out_variables(out)["params"]
    g = _flat(out.reaggregate(jnp.asarray(out.weights))["params"])
    want *= 0.5
    for k, c in enumerate(out.client_ids):
      want[c] += g - _flat(jax.tree.map(lambda a, k=k: a[k], loo))
  got = np.stack([_flat(jax.tree.map(lambda a, c=c: a[c], acc.directions))
                  for c in range(data.num_clients)])
  np.testing.assert_allclose(got, want, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), chunked.directions,
               acc.directions)
  # The closed form would have accumulated something else under this algorithm.
  closed = MultiRoundAccumulator(variables["params"], data.num_clients, round_decay=0.5)
  for out in outs:
    closed.update(out.clients.variables, out.traced, out.weights, out.client_ids)
  assert np.abs(_flat(closed.directions) - _flat(acc.directions)).max() > 1e-3
  mr = acc.scores(model, state.variables, x)
  assert np.asarray(mr.scores).shape == (len(x), data.num_clients)


@pytest.mark.parametrize("output", ["margin", "log_prob"])
def test_explained_outputs_against_a_plain_recomputation(setup, output):
  """The margin (logit minus the log-sum-exp of the other classes) and the log-probability:
  the truth's drops and the first-order score against NumPy and plain jax.grad, and every
  kernel's TraceFL scores against the reference kernel."""
  model, _, _, x, _ = setup
  _, outs, _ = _run(setup, "trimmed_mean", rounds=1)
  out = outs[-1]
  w, clients = np.asarray(out.weights), out.clients.variables

  def plain(variables, target):
    z = np.asarray(model.logits(variables, x), np.float64)
    mine = z[np.arange(len(z)), target]
    if output == "log_prob":
      return mine - np.log(np.exp(z).sum(1))
    rivals = np.where(np.eye(z.shape[1], dtype=bool)[target], -np.inf, z)
    return mine - np.log(np.exp(rivals).sum(1))

  target = np.asarray(model.logits(out.variables, x)).argmax(1)
  loo_vars = leave_one_out_variables(out)
  g_re = out.reaggregate(jnp.asarray(w))
  want = np.stack([plain(g_re, target) - plain(jax.tree.map(lambda a, k=k: a[k], loo_vars),
                                                target) for k in range(len(w))], axis=1)
  res = leave_one_out(model, clients, w, x, reaggregate=out.reaggregate, output=output)
  np.testing.assert_allclose(res.drops, want, atol=2e-5)
  np.testing.assert_allclose(res.target_logit, plain(out.variables, target), atol=2e-5)
  logit = leave_one_out(model, clients, w, x, reaggregate=out.reaggregate)
  assert np.abs(np.asarray(logit.drops) - want).max() > 1e-3  # another output indeed

  def s(params, n):
    z = model.logits({"params": params}, x[n:n + 1])[0]
    if output == "log_prob":
      return z[target[n]] - jax.nn.logsumexp(z)
    return z[target[n]] - jax.nn.logsumexp(jnp.where(jnp.arange(3) == target[n], -jnp.inf, z))

  grads = np.stack([_flat(jax.grad(s)(out.variables["params"], n)) for n in range(len(x))])
  diffs = np.stack([_flat(g_re["params"]) - _flat(jax.tree.map(lambda a, k=k: a[k],
                                                               loo_vars["params"]))
                    for k in range(len(w))])
  expected = grads @ diffs.T
  scale = np.abs(expected).max()
  fo = trace_clients(model, out.variables, clients, x, score="first_order", weights=w,
                     reaggregate=out.reaggregate, output=output)
  np.testing.assert_allclose(fo.scores, expected, atol=1e-4 * scale)
  ref = trace_clients(model, out.variables, clients, x, kernel="reference", output=output)
  for kernel in ("grad", "jvp"):
    other = trace_clients(model, out.variables, clients, x, kernel=kernel, output=output)
    np.testing.assert_allclose(other.scores, ref.scores, rtol=1e-4, atol=1e-5)
  from tracefl_jax.provenance.retrained import explained_logits
  feds = jax.tree.map(lambda a, b: jnp.stack([a, b]), out.variables, g_re)
  np.testing.assert_allclose(explained_logits(model, feds, x, jnp.asarray(target), output),
                             np.stack([plain(out.variables, target), plain(g_re, target)]),
                             atol=2e-5)
  with pytest.raises(ValueError, match="output='prob'; valid: logit, margin, log_prob"):
    trace_clients(model, out.variables, clients, x, output="prob")
