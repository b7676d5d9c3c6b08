"""The library's Python boundary (issue 13): bad arguments are one-line ValueErrors naming the
bad value and the valid choices, raised before anything is traced; non-finite scores are never
an attribution."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from tracefl_jax.fl import aggregation, privacy
from tracefl_jax.models import get_model, make_model
from tracefl_jax.provenance import attribution, trace_clients

K, N = 3, 4


@pytest.fixture(scope="module")
def case():
  model = get_model("mlp", (4, 4, 1), 3)
  g = model.init(jax.random.key(0))
  keys = iter(jax.random.split(jax.random.key(1), 16))
  clients = jax.tree.map(lambda a: a[None] + 0.1 * jax.random.normal(next(keys), (K, *a.shape)),
                         g)
  x = jax.random.normal(jax.random.key(2), (N, 4, 4, 1))
  return model, g, clients, x


def _raises(fragment: str):
  """The error is a ValueError on one line containing `fragment` verbatim."""
  return pytest.raises(ValueError, match=re.escape(fragment))


def _one_line(excinfo) -> None:
  assert "\n" not in str(excinfo.value)


# --- Non-finite values are never an attribution ------------------------------------------


def test_finite_inputs_are_all_attributable(case):
  model, g, clients, x = case
  res = trace_clients(model, g, clients, x)
  assert res.attributable.dtype == jnp.bool_ and res.attributable.shape == (N,)
  assert bool(np.all(res.attributable))
  # New fields come last: positional users keep working.
  assert res[7] is res.attributable and res[-1] is res.first_order_scores is None
  np.testing.assert_array_equal(res[2], res.traced_client)


def test_nan_in_one_client_makes_every_input_unattributable(case):
  model, g, clients, x = case
  poisoned = jax.tree.map(lambda a: a.at[1].set(jnp.nan), clients)
  res = trace_clients(model, g, poisoned, x)
  assert not np.any(res.attributable)
  np.testing.assert_array_equal(res.traced_client, -1)   # not client 0
  np.testing.assert_array_equal(res.traced_position, -1)
  assert np.all(np.isnan(res.probs))
  assert np.all(np.isnan(res.scores[:, 1]))  # raw scores stay inspectable
  assert np.all(np.isfinite(res.scores[:, [0, 2]]))


def test_nan_input_row_is_the_only_unattributable_input(case):
  model, g, clients, x = case
  res = trace_clients(model, g, clients, x.at[2].set(jnp.nan), client_ids=jnp.array([7, 8, 9]))
  np.testing.assert_array_equal(res.attributable, [True, True, False, True])
  assert int(res.traced_client[2]) == -1 and int(res.traced_position[2]) == -1
  assert np.all(np.isnan(res.probs[2]))
  ok = np.array([0, 1, 3])
  clean = trace_clients(model, g, clients, x[ok], client_ids=jnp.array([7, 8, 9]))
  np.testing.assert_array_equal(res.traced_client[ok], clean.traced_client)
  np.testing.assert_allclose(res.probs[ok], clean.probs, rtol=1e-6)


def test_inf_in_global_model_is_unattributable(case):
  model, g, clients, x = case
  g_inf = jax.tree.map(lambda a: a, g)
  g_inf["params"]["Dense_0"]["bias"] = jnp.full_like(g["params"]["Dense_0"]["bias"], jnp.inf)
  res = trace_clients(model, g_inf, clients, x)
  assert not np.any(res.attributable)
  np.testing.assert_array_equal(res.traced_client, -1)
  assert np.all(np.isnan(res.probs))
  # One inf weight only reaches the inputs whose activations carry it (ReLU may zero it):
  # attributability is decided per input, by that input's scores.
  g_one = jax.tree.map(lambda a: a, g)
  g_one["params"]["Dense_0"]["kernel"] = g["params"]["Dense_0"]["kernel"].at[0, 0].set(jnp.inf)
  res = trace_clients(model, g_one, clients, x)
  np.testing.assert_array_equal(res.attributable,
                                np.all(np.isfinite(np.asarray(res.scores)), axis=1))
  np.testing.assert_array_equal(np.asarray(res.traced_client) == -1, ~np.asarray(res.attributable))


# --- trace_clients: checks at the Python boundary ----------------------------------------


@pytest.mark.parametrize("bad", [99, -1, 3])
def test_target_out_of_range(case, bad):
  model, g, clients, x = case
  target = jnp.array([0, bad, 1, 2])
  with _raises(f"target={bad} (input 1) is out of range; model 'mlp' has classes [0, 3)") as e:
    trace_clients(model, g, clients, x, target=target)
  _one_line(e)


def test_target_shape_and_dtype(case):
  model, g, clients, x = case
  with _raises("target has shape (2,) and dtype int32; it must be [N] = (4,) integer class "
               "ids in [0, 3)"):
    trace_clients(model, g, clients, x, target=jnp.array([0, 1]))
  with _raises("target has shape (4,) and dtype float32; it must be [N] = (4,)"):
    trace_clients(model, g, clients, x, target=jnp.zeros(4))


def test_client_sizes_shape_negative_and_all_zero(case):
  model, g, clients, x = case
  with _raises("client_sizes has shape (2,); it must be [K] = (3,)"):
    trace_clients(model, g, clients, x, client_sizes=jnp.array([1, 2]), use_size_factor=True)
  with _raises("client_sizes must be finite and >= 0, got [4, -2, 3] (bad at positions [1])"):
    trace_clients(model, g, clients, x, client_sizes=jnp.array([4, -2, 3]))
  with _raises("client_sizes are all 0 ([0, 0, 0]); use_size_factor=True needs a positive "
               "total for p_k = n_k / sum n") as e:
    trace_clients(model, g, clients, x, client_sizes=np.zeros(3, np.int64),
                  use_size_factor=True)
  _one_line(e)
  # Zero sizes are harmless while the size factor is off.
  trace_clients(model, g, clients, x, client_sizes=np.zeros(3, np.int64))


def test_mismatched_leaf_shape_is_named(case):
  model, g, clients, x = case
  bad = jax.tree.map(lambda a: a, clients)
  bad["params"]["Dense_1"]["kernel"] = bad["params"]["Dense_1"]["kernel"][:, :5]
  with _raises("client_vars leaf params/Dense_1/kernel has shape (3, 5, 64); global_vars has "
               "shape (128, 64) there, so it must be [K, 128, 64]"):
    trace_clients(model, g, bad, x)


def test_mismatched_structure_is_named(case):
  model, g, clients, x = case
  missing = {"params": {k: v for k, v in clients["params"].items() if k != "Dense_2"}}
  with _raises("client_vars lacks leaf params/Dense_2/bias of global_vars"):
    trace_clients(model, g, missing, x)
  extra = {"params": {**clients["params"], "Extra": {"w": jnp.ones((K, 2))}}}
  with _raises("client_vars has leaf params/Extra/w that global_vars lacks"):
    trace_clients(model, g, extra, x)
  unstacked = jax.tree.map(lambda a: a[0], clients)  # one client, not stacked [K, ...]
  with _raises("client_vars leaf params/Dense_0/bias has shape (128,); global_vars has shape "
               "(128,) there, so it must be [K, 128] (stacked over the round's clients)"):
    trace_clients(model, g, unstacked, x)
  with _raises("client_vars must be Flax variables, a dict of collections with 'params', "
               "got dict with keys ['Dense_0', 'Dense_1', 'Dense_2']"):
    trace_clients(model, g, clients["params"], x)


def test_inconsistent_client_axis_is_named(case):
  model, g, clients, x = case
  bad = jax.tree.map(lambda a: a, clients)
  bad["params"]["Dense_2"]["bias"] = bad["params"]["Dense_2"]["bias"][:2]
  with _raises("client_vars leaf params/Dense_2/bias stacks 2 clients but params/Dense_0/bias "
               "stacks 3; every leaf's leading axis is the round's K clients"):
    trace_clients(model, g, bad, x)


def test_wrong_input_shape(case):
  model, g, clients, x = case
  with _raises("x has shape (4, 3, 4, 1); model 'mlp' takes inputs of shape [N, 4, 4, 1]"):
    trace_clients(model, g, clients, x[:, :3])
  with _raises("x has shape (4, 4, 1); model 'mlp' takes inputs of shape [N, 4, 4, 1]"):
    trace_clients(model, g, clients, x[0])  # one example without the batch axis


def test_integer_inputs_for_a_float_model(case):
  model, g, clients, x = case
  with _raises("x has dtype int32; model 'mlp' takes floating-point inputs (float32)"):
    trace_clients(model, g, clients, x.astype(jnp.int32))


class _Tokens(nn.Module):
  @nn.compact
  def __call__(self, ids, train=False):
    return nn.Dense(3)(nn.Embed(20, 4)(ids).mean(axis=1))


def test_float_inputs_for_a_token_model():
  model = make_model("tok", _Tokens(), (6,), 3, input_dtype=jnp.int32)
  g = model.init(jax.random.key(0))
  clients = jax.tree.map(lambda a: jnp.stack([a, a]), g)
  with _raises("x has dtype float32; model 'tok' takes integer token ids (int32)"):
    trace_clients(model, g, clients, jnp.zeros((2, 6), jnp.float32))


def test_no_inputs_and_no_clients(case):
  model, g, clients, x = case
  with _raises("x holds N = 0 inputs (shape (0, 4, 4, 1)); trace at least one"):
    trace_clients(model, g, clients, x[:0])
  with _raises("client_vars holds K = 0 clients (leading axis of params/Dense_0/bias); trace "
               "at least one client"):
    trace_clients(model, g, jax.tree.map(lambda a: a[:0], clients), x)


@pytest.mark.parametrize("bad", [-1, 2.5])
def test_clients_per_chunk(case, bad):
  model, g, clients, x = case
  with _raises(f"clients_per_chunk={bad!r} must be None or 0 (off) or a positive int"):
    trace_clients(model, g, clients, x, clients_per_chunk=bad)


@pytest.mark.parametrize("bad", [0, 1.5, float("nan")])
def test_decay_outside_unit_interval(case, bad):
  model, g, clients, x = case
  with _raises(f"decay={bad} must be in (0, 1]"):
    trace_clients(model, g, clients, x, decay=bad)


def test_errors_come_before_any_compilation(case):
  model, g, clients, x = case
  before = attribution._trace._cache_size()  # pylint: disable=protected-access
  with pytest.raises(ValueError):
    trace_clients(model, g, clients, x[:, :2, :2])
  with pytest.raises(ValueError):
    trace_clients(model, g, clients, x, target=jnp.array([0, 0, 0, 5]))
  assert attribution._trace._cache_size() == before  # pylint: disable=protected-access


# --- get_model ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -2])
def test_get_model_num_classes(bad):
  with _raises(f"num_classes={bad} must be a positive int (the number of logits)"):
    get_model("mlp", (4, 4, 1), bad)


@pytest.mark.parametrize("bad", [(), (4, 0, 1), (4, -4, 1)])
def test_get_model_input_shape(bad):
  with _raises(f"input_shape={bad!r} must be a non-empty tuple of positive ints, the shape of "
               f"ONE example"):
    get_model("mlp", bad, 3)


def test_get_model_input_rank_for_images_and_tokens():
  with _raises("model 'cnn' takes images: input_shape must be (height, width, channels), "
               "got (16,)"):
    get_model("cnn", (16,), 3)
  with _raises("text model 'bert_tiny' takes token ids: input_shape must be (seq_len,), got "
               "(4, 4)"):
    get_model("bert_tiny", (4, 4), 3, vocab_size=50)
  with _raises("unknown model 'cnnn'; valid models: bert_base"):
    get_model("cnnn", (), 0)  # the name is checked first


# --- fedavg, client_weights, DP -----------------------------------------------------------


@pytest.fixture(scope="module")
def stacked():
  return {"params": {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones((3, 2))}}


def test_fedavg_weights_of_the_wrong_length(stacked):
  msg = ("aggregation weights have length 2 but leaf params/b has shape (3, 2); every leaf "
         "must be stacked [C, ...] with C = 2, the number of weights")
  with _raises(msg):
    aggregation.fedavg(stacked, jnp.ones(2))
  with _raises(msg):  # shapes are static: the check holds under jit too
    jax.jit(aggregation.fedavg)(stacked, jnp.ones(2))
  with _raises("aggregation weights must be a vector [C], got shape (3, 1)"):
    aggregation.fedavg(stacked, jnp.ones((3, 1)))


def test_fedavg_negative_and_zero_weights(stacked):
  with _raises("aggregation weights must be finite and >= 0, got [1.0, -1.0, 1.0] (bad at "
               "positions [1])"):
    aggregation.fedavg(stacked, jnp.array([1.0, -1.0, 1.0]))
  with _raises("every client of this round has aggregation weight 0 ([0.0, 0.0, 0.0]); "
               "nothing to average"):
    aggregation.fedavg(stacked, np.zeros(3, np.float32))
  with _raises("aggregation weights must be finite and >= 0, got [1.0, nan, 1.0]"):
    aggregation.fedavg(stacked, np.array([1.0, np.nan, 1.0]))


@pytest.mark.parametrize("w", [[1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, np.nan, 0.0]])
def test_fedavg_under_jit_gives_nan_never_a_plausible_model(stacked, w):
  out = jax.jit(aggregation.fedavg)(stacked, jnp.asarray(w, jnp.float32))
  assert all(np.all(np.isnan(leaf)) for leaf in jax.tree.leaves(out))


def test_fedavg_under_jit_keeps_valid_weights_and_padding(stacked):
  w = jnp.array([1.0, 0.0, 3.0])  # a zero weight is a padded client, not an error
  got = jax.jit(aggregation.fedavg)(stacked, w)
  np.testing.assert_allclose(got["params"]["w"], (stacked["params"]["w"][0]
                                                  + 3 * stacked["params"]["w"][2]) / 4)


def test_checked_fedavg_reports_the_cause_under_jit(stacked):
  run = jax.jit(aggregation.checked_fedavg)
  err, _ = run(stacked, jnp.array([1.0, -1.0, 1.0]))
  with pytest.raises(checkify.JaxRuntimeError,
                     match=re.escape("aggregation weights must be finite and >= 0, got")):
    err.throw()
  err, _ = run(stacked, jnp.zeros(3))
  with pytest.raises(ValueError, match=re.escape("aggregation weights are all 0")):
    err.throw()
  err, out = run(stacked, jnp.array([1.0, 0.0, 1.0]))
  err.throw()  # valid: no error
  np.testing.assert_allclose(out["params"]["w"], aggregation.fedavg(stacked,
                                                                    jnp.array([1.0, 0.0, 1.0]))
                             ["params"]["w"])


def test_client_weights_negative_counts_and_batch_size():
  with _raises("example counts must be >= 0, got [3, -1, 2] (negative at positions [1])"):
    aggregation.client_weights(np.array([3, -1, 2]))
  with _raises('weighting="batches" needs a batch_size >= 1, got -4'):
    aggregation.client_weights(np.array([3, 1, 2]), "batches", -4)


@pytest.mark.parametrize("kwargs,msg", [
    ({"clip_norm": -1.0}, "clip_norm=-1.0 must be > 0 (the L2 bound C on each client's update)"),
    ({"clip_norm": 0.0}, "clip_norm=0.0 must be > 0"),
    ({"noise_multiplier": -0.5}, "noise_multiplier=-0.5 must be >= 0 (0 = no noise)"),
    ({"clients_per_round": 0}, "clients_per_round=0 must be an integer >= 1"),
])
def test_dp_fedavg_settings(stacked, kwargs, msg):
  prev = jax.tree.map(lambda a: a[0], stacked)
  settings = {"clip_norm": 1.0, "noise_multiplier": 0.0, "clients_per_round": 3, **kwargs}
  with _raises(msg):
    privacy.dp_fedavg(stacked, jnp.ones(3), prev, jax.random.key(0), **settings)


def test_clip_update_needs_positive_clip_norm():
  with _raises("clip_norm=-1 must be > 0"):
    privacy.clip_update({"a": jnp.ones(3)}, -1)
