"""Data off the device (issue 36 item 2): a training set kept on the host (or memory-mapped
from disk), each round gathering its clients' examples, computes exactly what the on-device
set computes, through a round, run_rounds with prefetch and retraining, with as many compiled
round programs; "auto" follows its stated rule; whole-federation programs refuse host data."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from tracefl_jax.data import make_partition, placement
from tracefl_jax.data.base import Normalization
from tracefl_jax.data.federated import ClientSlots, federate
from tracefl_jax.fl.federation import federation
from tracefl_jax.fl.lanes import program_bound, round_lanes
from tracefl_jax.fl.rounds import federated_averaging, round_key, run_rounds, sample_clients
from tracefl_jax.models import get_model
from tracefl_jax.provenance import retraining

SIZES = (1, 37, 0, 5, 9, 4, 64, 3, 12, 20)  # one large client, one empty, ragged tails
BATCH = 4


def _arrays(kind, tmp_path):
  """(x, y, parts, normalization): float32 features, uint8 pixels, or float32 in a memmap
  file."""
  rng = np.random.default_rng(0)
  n = sum(SIZES)
  y = rng.integers(0, 3, n)
  parts = np.split(rng.permutation(n), np.cumsum(SIZES)[:-1])
  if kind == "uint8":
    return rng.integers(0, 256, (n, 6), dtype=np.uint8), y, parts, Normalization(100.0, 60.0)
  x = rng.normal(size=(n, 6)).astype(np.float32)
  if kind == "memmap":
    mm = np.memmap(tmp_path / "x.f32", np.float32, "w+", shape=x.shape)
    mm[:] = x
    mm.flush()
    x = np.memmap(tmp_path / "x.f32", np.float32, "r", shape=x.shape)
  return x, y, parts, None


def _equal(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("strategy,kinds", [("scan", ("float32", "uint8", "memmap")),
                                            ("vmap", ("uint8",)), ("loop", ("memmap",))])
def test_host_round_equals_device_round_bit_for_bit(strategy, kinds, tmp_path):
  model = get_model("mlp", (6,), 3)
  variables = model.init(jax.random.key(1))
  algorithm = federated_averaging(model, optax.sgd(0.1, momentum=0.9), batch_size=BATCH,
                                  local_epochs=2, strategy=strategy)
  clients = [0, 1, 2, 6, 8]
  for kind in kinds:
    x, y, parts, norm = _arrays(kind, tmp_path)
    on_device = federate(x, y, parts, normalization=norm, placement="device")
    on_host = federate(x, y, parts, normalization=norm, placement="host")
    assert (on_device.placement, on_host.placement) == ("device", "host")
    assert on_host.x is x and on_host.y.dtype == np.int32  # the memmap itself, not a copy
    outs = [algorithm.round(algorithm.init(variables), clients=clients, data=d,
                            key=jax.random.key(3))[1] for d in (on_device, on_host)]
    _equal(outs[0].variables, outs[1].variables)
    _equal(outs[0].clients, outs[1].clients)


def test_round_inputs_gather_the_round_only(tmp_path):
  x, y, parts, _ = _arrays("memmap", tmp_path)
  data = federate(x, y, parts, placement="host")
  slots, _ = data.round_slots([1, 3, 6], BATCH)
  xr, yr, ir = data.round_inputs(slots)
  flat = np.asarray(slots.flat)
  assert isinstance(ir, ClientSlots) and xr.shape == (len(flat), 6) < x.shape
  np.testing.assert_array_equal(np.asarray(ir.flat), np.arange(len(flat)))
  np.testing.assert_array_equal(ir.offsets, slots.offsets)
  np.testing.assert_array_equal(np.asarray(xr), x[flat])
  np.testing.assert_array_equal(np.asarray(yr), y[flat])
  rows = data.round_data([1, 3, 6], BATCH).indices  # the [K, M] layout
  xr, yr, ir = data.round_inputs(rows)
  np.testing.assert_array_equal(np.asarray(xr)[ir], x[rows])
  device = federate(x, y, parts, placement="device")
  assert device.round_inputs(slots) == (device.x, device.y, slots)


def test_run_rounds_with_prefetch_equals_device_placement():
  x, y, parts, _ = _arrays("float32", None)
  model = get_model("mlp", (6,), 3)
  variables = model.init(jax.random.key(1))
  algorithm = federated_averaging(model, optax.sgd(0.1), batch_size=BATCH, local_epochs=1,
                                  strategy="vmap")
  runs = {}
  for where in ("device", "host"):
    data = federate(x, y, parts, placement=where)
    runs[where] = run_rounds(algorithm, algorithm.init(variables), data, rounds=4,
                             clients_per_round=4, seed=2)
  host_feed = data._feed  # pylint: disable=protected-access
  assert host_feed.gathers == 4 and host_feed.prefetch_hits == 3  # rounds 2..4 prefetched
  _equal(runs["device"][0].variables, runs["host"][0].variables)
  for a, b in zip(runs["device"][1], runs["host"][1], strict=True):
    assert (a["clients"], a["client_loss"]) == (b["clients"], b["client_loss"])


def test_retraining_host_equals_device():
  x, y, parts, _ = _arrays("float32", None)
  model = get_model("mlp", (6,), 3)
  variables = model.init(jax.random.key(1))
  algorithm = federated_averaging(model, optax.sgd(0.1), batch_size=BATCH, local_epochs=1,
                                  strategy="scan")
  masks = np.ones((3, len(SIZES)), np.float32)
  masks[1, 1] = masks[2, 6] = 0
  kw = dict(rounds=2, clients_per_round=4, seed=0, batch_size=BATCH, local_epochs=1)
  got = {}
  for where in ("device", "host"):
    data = federate(x, y, parts, placement=where)
    got[where] = (retraining.retrain(algorithm, variables, data, masks, **kw),
                  retraining.retrain_sequential(algorithm, variables, data, masks[1], **kw))
  _equal(got["device"], got["host"])


def test_host_placement_compiles_no_more_round_programs():
  part = make_partition(np.arange(600) % 3, "heavy_tailed", 30, 0, num_classes=3,
                        exponent=1.2, min_size=2)
  x = np.random.default_rng(0).normal(size=(600, 6)).astype(np.float32)
  model = get_model("mlp", (6,), 3)
  compiled, shapes = {}, set()
  for where in ("device", "host"):
    data = federate(x, np.arange(600) % 3, part, placement=where)
    algorithm = federated_averaging(model, optax.sgd(0.1), batch_size=8, local_epochs=1,
                                    strategy="vmap")
    state = algorithm.init(model.init(jax.random.key(0)))
    for r in range(1, 5):
      clients = sample_clients(0, r, data.num_clients, 6)
      slots, counts = data.round_slots(clients, 8)
      shapes.add((len(slots.flat), round_lanes("vmap", -(-counts // 8))))
      state, _ = algorithm.round(state, clients=clients, data=data,
                                 key=round_key(jax.random.key(0), r))
    compiled[where] = algorithm.program._cache_size()  # pylint: disable=protected-access
  assert compiled["host"] == compiled["device"] == len(shapes)
  assert compiled["host"] <= program_bound(part.client_sizes, 6, 8, "vmap")


def test_auto_placement_rule_and_errors(tmp_path, monkeypatch):
  x, y, parts, _ = _arrays("memmap", tmp_path)
  assert federate(x, y, parts).placement == "host"  # a memmap stays on the host
  dense = np.asarray(x).copy()
  assert federate(dense, y, parts).placement == "device"  # CPU: device unless memmap
  with pytest.raises(ValueError, match="placement='disk'; valid: 'auto', 'device', 'host'"):
    federate(dense, y, parts, placement="disk")

  class Accelerator:  # bytes_limit - bytes_in_use = 2 * dense.nbytes of free memory
    def memory_stats(self):
      return {"bytes_limit": 3 * dense.nbytes, "bytes_in_use": dense.nbytes}

  on_device = jax.numpy.zeros(1)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *a: [Accelerator()])
  assert placement.resolve_placement(dense, "auto") == "device"  # half of free, not over
  assert placement.resolve_placement(np.concatenate([dense, dense[:1]]), "auto") == "host"
  assert placement.resolve_placement(on_device, "auto") == "device"  # already there
  monkeypatch.undo()

  data = federate(dense, y, parts, placement="host")
  algorithm = federated_averaging(get_model("mlp", (6,), 3), optax.sgd(0.1), batch_size=4,
                                  local_epochs=1, strategy="scan")
  with pytest.raises(ValueError, match='placement="device"'):
    federation(algorithm, data, rounds=2, clients_per_round=3)
