"""The library's Adam (`fl.optimizers.make_optimizer`) takes `eps_root` = float32's smallest
normal (issue 35): reverse mode through a FedAvg round of Adam clients is finite where a
gradient is exactly 0 (dead ReLUs, NaN without it) and equals finite differences, and the
float32 forward updates are optax's plain Adam, bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.test_reverse_mode import (BATCH, _check_fd, _equal, _mean_rule, _objective,
                                     _setup64, _unit)
from tracefl_jax.fl.optimizers import EPS_ROOT, make_optimizer
from tracefl_jax.fl.rounds import federated_averaging
from tracefl_jax.models import get_model


def _dead(variables, units=8):
  """The first `units` hidden units of the MLP's first layer dead for every input (bias
  -100): their weights' gradients are exactly 0, so Adam's v stays 0 there."""
  params = dict(variables["params"])
  layer = dict(params["Dense_0"])
  layer["bias"] = layer["bias"].at[:units].set(-100.0)
  params["Dense_0"] = layer
  return {**variables, "params": params}


def test_eps_root_is_float32_tiny():
  assert EPS_ROOT == float(np.finfo(np.float32).tiny)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_forward_updates_equal_plain_adam_bit_for_bit(name):
  """30 float32 steps with dead units (v = 0 there) and gradients scaled down to 0 (they
  underflow; m and v decay): the same parameters as optax without eps_root."""
  model = get_model("mlp", (6,), 3)
  params = _dead(model.init(jax.random.key(0)))["params"]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 16))
  plain = (optax.adam(0.01) if name == "adam" else optax.adamw(0.01, weight_decay=0.0))
  ours = make_optimizer(name, 0.01)

  def loss(p, scale):
    logits = model.apply({"params": p}, x)[0]
    return scale * optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grad = jax.jit(jax.grad(loss))

  def run(opt):
    p, state = params, opt.init(params)
    update = jax.jit(opt.update)
    for t in range(30):
      g = grad(p, jnp.float32(10.0 ** (-2 * t)))  # gradients to ~1e-58: v ~ 0
      u, state = update(g, state, p)
      p = optax.apply_updates(p, u)
    return p
  _equal(run(ours), run(plain))


def test_grad_through_adam_clients_is_finite_and_equals_finite_differences():
  """d(validation loss of G_2) / d(G_0, client lr) through 2 FedAvg rounds of Adam clients
  (`make_optimizer("adam", lr)`, 8 dead hidden units), float64, under "vmap": finite and
  equal to central differences; optax's Adam without eps_root gives NaN there."""
  with jax.enable_x64(True):
    model, variables, data, _, val_loss = _setup64()
    variables = _dead(variables)
    ids = np.array([0, 1, 2, 4])
    slots = data.round_slots(ids, BATCH)
    counts = jnp.asarray(slots.counts)

    def loss(theta, optimizer):
      v, lr = theta
      algorithm = federated_averaging(model, optimizer(lr), batch_size=BATCH, local_epochs=2,
                                      strategy="vmap", loss_fn=_objective,
                                      aggregator=_mean_rule)
      for r in range(2):
        v = algorithm.program(v, data.x, data.y, slots.indices, counts,
                              jnp.asarray(ids, jnp.int32), jax.random.key(r),
                              counts.astype(jnp.float64))[0]
      return val_loss(v)

    theta = (variables, jnp.float64(0.01))
    f = jax.jit(lambda theta: loss(theta, lambda lr: make_optimizer("adam", lr)))
    g = jax.grad(f)(theta)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))
    _check_fd(f, theta, g, _unit(theta, jax.random.key(1)), 1e-6, 1e-5)
    _check_fd(f, theta, g, (jax.tree.map(jnp.zeros_like, variables), jnp.float64(1.0)),
              1e-7, 1e-5)
    plain = jax.jit(jax.grad(lambda theta: loss(theta, optax.adam)))(theta)
    assert not all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(plain))
