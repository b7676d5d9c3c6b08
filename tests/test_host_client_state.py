"""A per-client state table on the host (`client_state.HostTable`, issue 34 item 1): SCAFFOLD,
FedDyn and Ditto give the device table's results (bit for bit where the arithmetic is the same,
SCAFFOLD's shared c within float32 rounding: the host keeps c as a running mean), unsampled
clients keep their rows, the program never takes the `[C, ...]` table, and the table saves,
restores and resumes exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tracefl_jax as tfl
from tests.linear_federation import linear_federation
from tracefl_jax.experiment.checkpoints import Checkpointer
from tracefl_jax.fl import algorithm as algorithm_module
from tracefl_jax.fl import client_state as cstate
from tracefl_jax.fl.ditto import ditto, personal_variables
from tracefl_jax.fl.feddyn import feddyn
from tracefl_jax.fl.scaffold import scaffold_state

LR, EPOCHS = 0.3, 2
SIZES = [6, 8, 10, 12, 5, 7]
SCHEDULE = [[0, 1, 2], [1, 3, 5], [0, 2, 3], [4, 5, 1]]


@pytest.fixture(scope="module")
def setup():
  return linear_federation(SIZES, seed=1)


def _algorithms(model):
  kw = dict(batch_size=4, local_epochs=EPOCHS, strategy="vmap")
  return {"scaffold": tfl.scaffold(model, LR, **kw),
          "feddyn": feddyn(model, LR, 0.1, **kw),
          "ditto": ditto(model, optax.sgd(LR), 0.5, **kw)}


def _run(alg, state, data, schedule, first=1):
  outs = []
  for r, clients in enumerate(schedule, first):
    before = jax.tree.map(np.array, cstate.table_rows(state.client_state))
    state, out = alg.round(state, clients, data, jax.random.key(r))
    absent = np.array(sorted(set(range(len(SIZES))) - set(clients)))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a)[absent], b[absent]),
                 cstate.table_rows(state.client_state), before)  # unsampled rows kept
    outs.append(out)
  return state, outs


@pytest.mark.parametrize("name", ["scaffold", "feddyn", "ditto"])
def test_host_table_gives_the_device_tables_results(setup, name):
  model, data, variables, _ = setup
  alg = _algorithms(model)[name]
  dev, dev_outs = _run(alg, alg.init(variables, num_clients=6, placement="device"), data,
                       SCHEDULE)
  host0 = alg.init(variables, num_clients=6, placement="host")
  assert isinstance(host0.client_state, cstate.HostTable)
  assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(host0.client_state.rows))
  host, host_outs = _run(alg, host0, data, SCHEDULE)
  assert isinstance(host.client_state, cstate.HostTable)
  if name == "scaffold":  # c: the mean each round vs a running mean; float32 rounding
    check = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    mean = jax.tree.map(lambda t: np.mean(np.asarray(t, np.float64), 0), host.client_state.rows)
    jax.tree.map(check, host.client_state.shared, mean)
  else:
    check = np.testing.assert_array_equal
    assert host.client_state.shared is None
  jax.tree.map(check, host.variables, dev.variables)
  jax.tree.map(check, host.client_state.rows, dev.client_state)
  for a, b in zip(host_outs, dev_outs):
    jax.tree.map(check, a.clients.variables, b.clients.variables)
    # Leave-one-out of a stateful round still re-runs its server side.
    w = jnp.asarray(a.weights).at[0].set(0.0)
    jax.tree.map(check, a.reaggregate(w), b.reaggregate(w))
  if name == "ditto":
    jax.tree.map(check, personal_variables(host, 3), personal_variables(dev, 3))


def test_the_program_never_takes_the_whole_table(setup, monkeypatch):
  """The host round hands the program the round's `[K, ...]` rows, never the `[C, ...]` table,
  and gets `[K, ...]` rows back."""
  model, data, variables, _ = setup
  real, seen = algorithm_module.make_round_program, []

  def spying(*args, **kwargs):
    program = real(*args, **kwargs)

    def spy(*a, **k):
      result = program(*a, **k)
      seen.append(([np.shape(v) for v in jax.tree.leaves((a, k))],
                   [np.shape(v) for v in jax.tree.leaves(result[6])]))
      return result
    return spy
  monkeypatch.setattr(algorithm_module, "make_round_program", spying)
  alg = tfl.scaffold(model, LR, batch_size=4, local_epochs=EPOCHS, strategy="vmap")
  state = alg.init(variables, num_clients=6, placement="host")
  alg.round(state, [0, 2, 4], data, jax.random.key(0))
  (args, results), = seen
  assert (6, 4, 3) not in args and (6, 3) not in args   # no [C, ...] leaf goes in
  assert (3, 4, 3) in args and (3, 3) in args            # the round's rows do
  assert sorted(results) == [(3,), (3, 3), (3, 4, 3), (4, 3)]  # [K] rows and c come back


def test_host_table_saves_restores_and_resumes_exactly(setup, tmp_path):
  model, data, variables, _ = setup
  alg = _algorithms(model)["scaffold"]
  template = lambda: alg.init(variables, num_clients=6, placement="host")
  whole, _ = _run(alg, template(), data, SCHEDULE)
  half, _ = _run(alg, template(), data, SCHEDULE[:2])
  # The library's save/load.
  tfl.save_server_state(tmp_path / "s.msgpack", half)
  back = tfl.load_server_state(tmp_path / "s.msgpack", template())
  # The experiment layer's orbax checkpoint.
  ckpt = Checkpointer(tmp_path / "work", "{}", every=1)
  ckpt.maybe_save(half, [], 0.0)
  restored, _, _ = ckpt.restore(template())
  ckpt.close()
  for got in (back, restored):
    assert isinstance(got.client_state, cstate.HostTable)
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(got.client_state.rows))
    jax.tree.map(np.testing.assert_array_equal, got, half)
  resumed, _ = _run(alg, restored, data, SCHEDULE[2:], first=3)
  jax.tree.map(np.testing.assert_array_equal, resumed, whole)


def test_placement_choices_and_errors(setup):
  model, _, variables, _ = setup
  alg = _algorithms(model)["scaffold"]
  # On the CPU backend "auto" keeps the table on the device (device memory is host memory).
  if jax.default_backend() == "cpu":
    assert not isinstance(alg.init(variables, num_clients=6).client_state, cstate.HostTable)
  with pytest.raises(ValueError, match="placement='disk'; valid: 'auto', 'device', 'host'"):
    alg.init(variables, num_clients=6, placement="disk")
  no_update = scaffold_state(LR)._replace(shared_update=None)
  with pytest.raises(ValueError, match="shared value reads the whole table"):
    cstate.init_table(no_update, variables["params"], 6, "host")
  # "auto" keeps such a piece's table on the device.
  assert not isinstance(cstate.init_table(no_update, variables["params"], 6, "auto"),
                        cstate.HostTable)
