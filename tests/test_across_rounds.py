"""Influence across rounds (issue 35, item 3): the score is the derivative of the federation's
explained output along the removal path (finite differences, float64); for one round it is
the last-round first-order score up to FedAvg's factor (W - w_k) / W, and with form="loo"
equal to it; over several rounds it tracks exact retraining without the client. Forward mode
(one JVP per sampled client) equals reverse mode (one cotangent per input)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.test_reverse_mode import _mean_rule, _objective
from tracefl_jax.data.federated import federate
from tracefl_jax.fl.federation import federation
from tracefl_jax.fl.rounds import federated_averaging, run_rounds
from tracefl_jax.models import get_model
from tracefl_jax.provenance import trace_clients
from tracefl_jax.provenance.across_rounds import across_rounds, choose_mode
from tracefl_jax.provenance.capture import explained

SIZES = [9, 4, 13, 6, 11, 7]
K, BATCH = 3, 4


def _setup(dtype, lr=0.1, rounds=3, f64=False):
  rng = np.random.default_rng(0)
  n = 64
  x = rng.normal(size=(n, 6)).astype(dtype)
  y = rng.integers(0, 3, n).astype(np.int32)
  clients = np.split(rng.permutation(n)[:sum(SIZES)], np.cumsum(SIZES)[:-1])
  data = federate(x, y, clients, num_classes=3)
  model = get_model("mlp", (6,), 3)
  variables = model.init(jax.random.key(1))
  kw = dict(loss_fn=_objective, aggregator=_mean_rule) if f64 else {}
  if f64:
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
  alg = federated_averaging(model, optax.sgd(lr), batch_size=BATCH, local_epochs=1,
                            strategy="scan", **kw)
  fed = federation(alg, data, rounds=rounds, clients_per_round=K)
  plan = fed.plan(0)
  if f64:
    plan = plan._replace(weights=jnp.asarray(plan.weights, jnp.float64))
  xt = jnp.asarray(x[-6:])
  target = jnp.asarray(rng.integers(0, 3, 6), jnp.int32)
  return model, variables, alg, fed, plan, xt, target


def _outputs_fn(fed, model, variables, plan, key, x, target, output):
  @jax.jit
  def f(w):
    state, _ = fed.run(variables, None, plan._replace(weights=w), key, fed.data.x, fed.data.y)
    return explained(model.logits(state.variables, x), target, output)
  return f


@pytest.mark.parametrize("output", ["logit", "margin"])
def test_score_equals_finite_difference_of_the_removal_path(output):
  with jax.enable_x64(True):
    model, variables, _, fed, plan, x, target = _setup(np.float64, f64=True)
    key = jax.random.key(0)
    res = across_rounds(fed, model, variables, None, plan, key, x, target, output=output,
                        inputs_per_chunk=4)  # 6 inputs: two chunks, the last padded
    f = _outputs_fn(fed, model, variables, plan, key, x, target, output)
    np.testing.assert_allclose(res.outputs, f(plan.weights), rtol=1e-12)
    ids = np.asarray(plan.client_ids)
    eps = 1e-6
    for c in np.unique(ids):
      scale = lambda e, c=c: plan.weights * (1 - e * (ids == c))  # noqa: E731
      fd = -(f(scale(eps)) - f(scale(-eps))) / (2 * eps)
      np.testing.assert_allclose(res.scores[:, c], fd, rtol=1e-6, atol=1e-9)
    assert np.abs(res.scores).max() > 1e-3
    never = np.setdiff1d(np.arange(len(SIZES)), ids)
    assert np.all(res.scores[:, never] == 0)


@pytest.mark.parametrize("form", ["tangent", "loo"])
def test_forward_mode_equals_reverse_mode_float64(form):
  """Several client chunks (the last padded with zero tangents) and input chunks with a
  remainder; float64: equal to 1e-10 of the largest score."""
  with jax.enable_x64(True):
    model, variables, _, fed, plan, x, target = _setup(np.float64, f64=True)
    key = jax.random.key(0)
    run = lambda mode: across_rounds(  # noqa: E731
        fed, model, variables, None, plan, key, x, target, output="margin", form=form,
        mode=mode, inputs_per_chunk=4, clients_per_chunk=2)
    fwd, rev = run("forward"), run("reverse")
    assert (fwd.mode, rev.mode) == ("forward", "reverse")
    assert fwd.per_round is None and rev.per_round.shape == (6, 3, K)
    scale = np.abs(rev.scores).max()
    assert scale > 1e-3
    np.testing.assert_allclose(fwd.scores, rev.scores, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(fwd.outputs, rev.outputs, rtol=1e-12)


def test_forward_mode_equals_reverse_mode_float32():
  """float32 FedAvg: the two modes sum the same terms in another order (1e-4 of the
  largest score)."""
  model, variables, _, fed, plan, x, target = _setup(np.float32)
  key = jax.random.key(0)
  fwd = across_rounds(fed, model, variables, None, plan, key, x, target, form="loo",
                      mode="forward")
  rev = across_rounds(fed, model, variables, None, plan, key, x, target, form="loo",
                      mode="reverse")
  np.testing.assert_allclose(fwd.scores, rev.scores, atol=1e-4 * np.abs(rev.scores).max())


def test_auto_mode_picks_the_fewer_lanes():
  assert choose_mode("auto", 20, 100) == "forward"
  assert choose_mode("auto", 100, 100) == "forward"
  assert choose_mode("auto", 101, 100) == "reverse"
  assert choose_mode("reverse", 2, 100) == "reverse"
  with pytest.raises(ValueError, match="mode="):
    choose_mode("backward", 2, 100)


def test_one_round_equals_last_round_first_order():
  """R = 1, float32 FedAvg: tangent = first_order * (W - w_k) / W; loo = first_order."""
  model, variables, alg, fed, plan, x, target = _setup(np.float32, rounds=1)
  kept = {}

  def keep(info):
    kept["out"] = info.output
  run_rounds(alg, alg.init(variables), fed.data, rounds=1, clients_per_round=K, seed=0,
             callbacks=[keep])
  out = kept["out"]
  fo = trace_clients(model, out.traced, out.clients.variables, x, target=target,
                     score="first_order", weights=out.weights, client_ids=out.client_ids)
  key = jax.random.key(0)
  tangent = across_rounds(fed, model, variables, None, plan, key, x, target)
  loo = across_rounds(fed, model, variables, None, plan, key, x, target, form="loo")
  ids = np.asarray(out.client_ids)
  w = np.asarray(out.weights, np.float64)
  fo_scores = np.asarray(fo.scores, np.float64)
  scale = np.max(np.abs(fo_scores))
  np.testing.assert_allclose(loo.scores[:, ids], fo_scores, atol=1e-4 * scale)
  np.testing.assert_allclose(tangent.scores[:, ids], fo_scores * (w.sum() - w) / w.sum(),
                             atol=1e-4 * scale)


def test_tracks_exact_retraining_without_the_client():
  """Near-linear (client lr 0.005, 4 rounds of 3 clients, float64): the first-order score
  against retraining without client c in every round (its weight 0, as
  `retraining.retrain`). First order is not exact: removing 1 of 3 clients is a large step
  and the MLP's output is not linear in its parameters (one round alone, lr 0.02: loo 0.10
  off), but "loo" tracks the truth closely and "tangent" keeps its ranking."""
  with jax.enable_x64(True):
    model, variables, _, fed, plan, x, target = _setup(np.float64, lr=0.005, rounds=4,
                                                          f64=True)
    key = jax.random.key(0)
    f = _outputs_fn(fed, model, variables, plan, key, x, target, "logit")
    ids = np.asarray(plan.client_ids)
    sampled = np.unique(ids)
    base = f(plan.weights)
    exact = np.stack([np.asarray(base - f(plan.weights * (ids != c))) for c in sampled], 1)
    errs, corr = {}, {}
    for form in ("tangent", "loo"):
      got = across_rounds(fed, model, variables, None, plan, key, x, target,
                          form=form).scores[:, sampled]
      errs[form] = np.abs(got - exact).max() / np.abs(exact).max()
      corr[form] = np.corrcoef(got.ravel(), exact.ravel())[0, 1]
    # Measured: max error / max |truth|: loo 0.051, tangent 0.45 (it linearises each round's
    # 1 / (W - w_k) at w_k); Pearson over inputs x clients: 0.9992 and 0.995.
    assert errs["loo"] < 0.08 and corr["loo"] > 0.998, (errs, corr)
    assert errs["loo"] < errs["tangent"] and corr["tangent"] > 0.99, (errs, corr)


def test_comparison_skips_algorithms_where_weight_zero_is_not_removal():
  from tracefl_jax.experiment import comparison_methods
  from tracefl_jax.experiment.config import base_config
  c = base_config()
  c.algorithm = "scaffold"
  scores, info = comparison_methods.across_rounds(c, None, None, None, None, None, None, ())
  assert scores is None and "scaffold" in info["skipped"]


def test_comparison_switch_leaves_the_method_out():
  from tracefl_jax.experiment import comparison_methods
  from tracefl_jax.experiment.config import base_config
  c = base_config()
  c.attribution.across_rounds = False
  scores, info = comparison_methods.across_rounds(c, None, None, None, None, None, None, ())
  assert scores is None and info["skipped"] == "attribution.across_rounds=False"
  import importlib.util
  from pathlib import Path
  spec = importlib.util.spec_from_file_location(
      "attribution_presets", Path(__file__).resolve().parents[1] / "configs" / "attribution.py")
  presets = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(presets)
  assert presets.get_config("smoke").attribution.across_rounds
  assert not any(presets.get_config(p).attribution.across_rounds
                 for p in ("quick", "cpu", "mnist"))
