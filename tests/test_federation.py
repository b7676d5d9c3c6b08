"""A federation as one program (issue 35, item 2): R rounds equal `run_rounds`, a sweep over
seeds and learning rates is one vmapped call equal to sequential runs, and `jax.grad` of a
validation loss w.r.t. the client and server learning rates through 10 rounds of FedAvg and
FedAdam equals finite differences."""

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
from tracefl_jax.fl.server import server_optimizer
from tracefl_jax.models import get_model

SIZES = [9, 4, 13, 0, 6, 11, 7, 5]  # ragged, one empty
K, BATCH = 3, 4


def _data(dtype=np.float32, n=64, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 6)).astype(dtype)
  y = rng.integers(0, 3, n).astype(np.int32)
  clients = np.split(rng.permutation(n)[:sum(SIZES)], np.cumsum(SIZES)[:-1])
  return federate(x, y, clients, num_classes=3), jnp.asarray(x[-8:]), jnp.asarray(y[-8:])


def _fedadam(model, **kwargs):
  def build(hp):
    return federated_averaging(
        model, optax.sgd(hp["client_lr"]), batch_size=BATCH, local_epochs=2, strategy="scan",
        server_optimizer=optax.adam(hp["server_lr"], b1=0.9, b2=0.99, eps=1e-3,
                                    eps_root=1e-12), **kwargs)
  return build


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(u - v))) for u, v in
             zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_federation_equals_run_rounds_and_sweeps_in_one_call():
  data, _, _ = _data()
  model = get_model("mlp", (6,), 3)
  variables = model.init(jax.random.key(1))
  build = _fedadam(model)
  fed = federation(build, data, rounds=3, clients_per_round=K, batch_size=BATCH)
  hp = {"client_lr": 0.1, "server_lr": 0.01}
  runs = {}
  for lr in (0.05, 0.1):
    for seed in (0, 1):
      alg = build({**hp, "client_lr": lr})
      runs[lr, seed] = run_rounds(alg, alg.init(variables), data, rounds=3,
                                  clients_per_round=K, seed=seed)[0]
  # One federation: the same programs as run_rounds, bit for bit.
  state, trace = fed(variables, hp, fed.plan(0), jax.random.key(0))
  assert state.round == 3 and trace.client_loss.shape == (3, K)
  assert _max_diff(state.variables, runs[0.1, 0].variables) == 0.0
  # 2 learning rates x 2 seeds as one call (nested vmap over hparams, then plans and keys).
  seeds = [0, 1]
  sweep = jax.jit(jax.vmap(jax.vmap(fed.run, in_axes=(None, None, 0, 0, None, None)),
                           in_axes=(None, {"client_lr": 0, "server_lr": None}) + (None,) * 4))
  out = sweep(variables, {"client_lr": jnp.asarray([0.05, 0.1]), "server_lr": 0.01},
              fed.plans(seeds), jax.vmap(jax.random.key)(jnp.asarray(seeds)), data.x,
              data.y)[0]
  for i, lr in enumerate((0.05, 0.1)):
    for j, seed in enumerate(seeds):
      got = jax.tree.map(lambda a, i=i, j=j: a[i, j], out.variables)
      assert _max_diff(got, runs[lr, seed].variables) < 1e-5
      assert _max_diff(jax.tree.map(lambda a, i=i, j=j: a[i, j], out.opt_state),
                       runs[lr, seed].opt_state) < 1e-5


@pytest.mark.parametrize("server", ["fedavg", "fedadam"])
def test_hypergradient_through_10_rounds_equals_finite_differences(server):
  """d(validation loss of G_10) / d(client lr, server lr), float64, against central
  differences along each learning rate."""
  with jax.enable_x64(True):
    data, xv, yv = _data(np.float64)
    model = get_model("mlp", (6,), 3)
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                             model.init(jax.random.key(2)))
    if server == "fedadam":
      build = _fedadam(model, loss_fn=_objective, aggregator=_mean_rule)
      hp = {"client_lr": jnp.float64(0.1), "server_lr": jnp.float64(0.01)}
    else:  # FedAvg with a server learning rate (1.0: plain FedAvg), by name, traced
      def build(hp):
        return federated_averaging(
            model, optax.sgd(hp["client_lr"]), batch_size=BATCH, local_epochs=2,
            strategy="scan", loss_fn=_objective, aggregator=_mean_rule,
            server_optimizer=server_optimizer("sgd", hp["server_lr"]))
      hp = {"client_lr": jnp.float64(0.1), "server_lr": jnp.float64(0.8)}
    fed = federation(build, data, rounds=10, clients_per_round=K, batch_size=BATCH)
    plan, key = fed.plan(3), jax.random.key(3)

    @jax.jit
    def val_loss(hp):
      v = fed.run(variables, hp, plan, key, data.x, data.y)[0].variables
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(v, xv)[0],
                                                             yv).mean()

    g = jax.grad(val_loss)(hp)
    for name in hp:
      eps = 1e-6 * float(hp[name])
      up, down = ({**hp, name: hp[name] + s * eps} for s in (1, -1))
      fd = (val_loss(up) - val_loss(down)) / (2 * eps)
      np.testing.assert_allclose(float(g[name]), float(fd), rtol=1e-5)
      assert abs(float(g[name])) > 1e-6


def test_federation_errors():
  data, _, _ = _data()
  model = get_model("mlp", (6,), 3)
  with pytest.raises(ValueError, match="needs batch_size"):
    federation(_fedadam(model), data, rounds=2, clients_per_round=K)
  loop = federated_averaging(model, optax.sgd(0.1), batch_size=BATCH, local_epochs=1,
                             strategy="loop")
  fed = federation(loop, data, rounds=2, clients_per_round=K)
  with pytest.raises(ValueError, match="one device program"):
    fed(model.init(jax.random.key(0)), None, fed.plan(0), jax.random.key(0))
  fed = federation(_fedadam(model), data, rounds=2, clients_per_round=K, batch_size=8)
  with pytest.raises(ValueError, match="batch_size=4"):
    fed(model.init(jax.random.key(0)), {"client_lr": 0.1, "server_lr": 0.1}, fed.plan(0),
        jax.random.key(0))


def test_hypergradient_example_lowers_the_validation_loss():
  from tests.test_examples import _run  # pylint: disable=g-import-not-at-top
  out = _run("hypergradient", rounds=3, steps=2, clients=6, per_round=3)
  assert out["server_lrs"][1] > out["server_lrs"][0]  # the gradient raised a too-small rate
  assert out["val_losses"][1] < out["val_losses"][0]
  assert out["sweep"].shape == (3, 4) and np.all(np.isfinite(out["sweep"]))
