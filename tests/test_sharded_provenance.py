"""Provenance sharded over a device mesh (4 fake CPU devices) against the unsharded call."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tracefl_jax.fl.strategies import client_mesh
from tracefl_jax.models import make_model
from tracefl_jax.provenance import protocol as evaluation
from tracefl_jax.provenance import trace_clients
from tests.test_provenance import ConvNormDense


@pytest.fixture(scope="module")
def case():
  model = make_model("cnd", ConvNormDense(), (8, 8, 3), 5)
  g = model.init(jax.random.key(0))
  rng = np.random.default_rng(1)  # host-side: eager jax.random compiles a program per shape
  clients = jax.tree.map(lambda a: (np.asarray(a)[None] * (
      1 + 0.3 * rng.normal(size=(8, *a.shape)))).astype(np.float32), g)
  x = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
  return model, g, clients, x


def _assert_same(got, want):
  np.testing.assert_allclose(np.asarray(got.scores), np.asarray(want.scores), rtol=1e-6,
                             atol=1e-6 * float(np.abs(np.asarray(want.scores)).max()))
  np.testing.assert_allclose(np.asarray(got.probs), np.asarray(want.probs), rtol=1e-5,
                             atol=1e-7)
  for field in ("traced_client", "traced_position", "client_ids", "predicted", "attributable"):
    np.testing.assert_array_equal(np.asarray(getattr(got, field)),
                                  np.asarray(getattr(want, field)), err_msg=field)
  if want.layer_scores is not None:
    np.testing.assert_allclose(np.asarray(got.layer_scores), np.asarray(want.layer_scores),
                               rtol=1e-6, atol=1e-6 * float(np.abs(np.asarray(
                                   want.layer_scores)).max()))


# K = 8 divides the 4 devices; K = 7 and 5 do not (padded with zero clients, dropped).
@pytest.mark.parametrize("kernel,k,chunk,extras", [
    ("grad", 8, None, False),
    ("grad", 7, 2, True),
    ("reference", 5, None, True),
    ("jvp", 7, 2, True),
])
def test_sharded_equals_unsharded(case, kernel, k, chunk, extras):
  assert jax.device_count() == 4, "conftest sets 4 fake CPU devices"
  model, g, clients, x = case
  clients = jax.tree.map(lambda a: a[:k], clients)
  kw = dict(kernel=kernel, clients_per_chunk=chunk, return_layers=kernel != "jvp")
  if extras:  # global ids and the data-size factor (p_k scales scores or, for "reference",
    # the client parameters before the kernel)
    kw.update(client_ids=np.arange(100, 100 + k) * 3, client_sizes=np.arange(1, k + 1) ** 2,
              use_size_factor=True)
  want = trace_clients(model, g, clients, x, **kw)
  got = trace_clients(model, g, clients, x, mesh=client_mesh(), **kw)
  assert got.scores.shape == (x.shape[0], k)
  assert got.scores.sharding.is_fully_replicated
  # A padded column inside the softmax would take probability mass from the K real ones.
  np.testing.assert_allclose(np.asarray(got.probs).sum(-1), 1.0, rtol=1e-6)
  _assert_same(got, want)


def test_mesh_must_be_one_dimensional(case):
  model, g, clients, x = case
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2), ("a", "b"))
  with pytest.raises(ValueError, match="1-D"):
    trace_clients(model, g, clients, x, mesh=mesh)


def test_protocol_shard_clients_traces_the_same(case):
  model, g, clients, x = case
  k = 6
  clients = jax.tree.map(lambda a: a[:k], clients)
  predictions = np.asarray(jax.numpy.argmax(model.logits(g, x), -1))
  label_counts = np.random.default_rng(3).integers(0, 3, size=(9, 5))
  common = dict(client_ids=np.array([0, 2, 3, 5, 7, 8]), client_sizes=np.arange(10, 16),
                label_counts=label_counts, x_test=x, y_test=predictions,
                predictions=predictions)
  rounds = {shard: evaluation.trace_round(
      model, g, clients, settings=evaluation.ProtocolSettings(
          kernel="grad", per_label=1, shard_clients=shard, counterfactual=False,
          feddebug=False), **common) for shard in (False, True)}
  assert rounds[True].summary["inputs"] > 0
  np.testing.assert_array_equal(rounds[True].traced_client, rounds[False].traced_client)
  np.testing.assert_allclose(rounds[True].probs, rounds[False].probs, rtol=1e-5, atol=1e-7)
