"""Algorithms on the per-client state and round hooks: SCAFFOLD and FedNova.

SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1 with option II): client i keeps a control
variate c_i (a row of the `[C, ...]` table), the server c = mean_i c_i (exactly: c starts at 0
and moves by (1/N) sum of the sampled clients' changes, so it is the table's mean). Client i
runs K_i SGD steps y <- y - lr (g_i(y) - c_i + c) from x = G, then

    c_i+ = c_i - c + (x - y_i) / (K_i lr)                        (option II)

and the server takes x <- x + lr_g mean_i (y_i - x) over the sampled clients (uniform weights;
lr_g through `server_optimizer=optax.sgd(lr_g)`, FedAvg's mean at lr_g = 1).

The correction enters as the objective `loss + <theta - G, c - c_i>` (stop-gradient on c and
c_i), whose gradient is g - c_i + c; the client's reported loss includes that term.

FedNova (Wang et al., NeurIPS 2020, plain local SGD): the rule normalises each update by its
step count, G <- G + tau_eff sum_i p_i (theta_i - G) / tau_i with tau_eff = sum_i p_i tau_i.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from tracefl_jax.fl.client_state import ClientContext, ClientStatePiece
from tracefl_jax.fl.losses import LossFn, cross_entropy


def scaffold_state(learning_rate: float) -> ClientStatePiece:
  """SCAFFOLD's control variates as a per-client state: rows c_i (float32, shaped like the
  params, 0 at first), shared c = their mean, option II's update after local training at the
  client learning rate `learning_rate` (plain SGD)."""
  lr = float(learning_rate)
  if not lr > 0:
    raise ValueError(f"scaffold: learning_rate={learning_rate} must be > 0")

  def init(params):
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)

  def shared(table, variables):
    del variables
    return jax.tree.map(lambda t: jnp.mean(t, axis=0), table)

  def finish(client: ClientContext, global_params, params, num_steps):
    scale = 1.0 / (jnp.maximum(num_steps, 1).astype(jnp.float32) * lr)
    new = jax.tree.map(
        lambda ci, c, x, y: ci - c + (x.astype(jnp.float32) - y.astype(jnp.float32)) * scale,
        client.state, client.shared, global_params, params)
    # A client that took no step has no estimate: it keeps its variate.
    return jax.tree.map(lambda n, o: jnp.where(num_steps > 0, n, o), new, client.state)

  def shared_update(c, old, new, num_clients):
    # c stays the mean of all C rows: only the round's rows changed (a host table's c).
    n = jnp.asarray(num_clients, jnp.float32)
    return jax.tree.map(lambda c, o, r: c + (jnp.sum(r, 0) - jnp.sum(o, 0)) / n, c, old, new)

  return ClientStatePiece(init, finish, shared, shared_update=shared_update)


def scaffold_loss(base: LossFn = cross_entropy) -> LossFn:
  """`base + <theta - G, c - c_i>`: SCAFFOLD's corrected gradient g - c_i + c."""

  def loss(model, variables, x, y, mask, rng, global_params=None, client=None):
    if client is None or global_params is None:
      raise ValueError("scaffold_loss needs the client's control variates and G's params; "
                       "use it with client_state=scaffold_state(lr)")
    value, state = base(model, variables, x, y, mask, rng, global_params)
    terms = jax.tree.map(
        lambda p, g, ci, c: jnp.sum((p.astype(jnp.float32) - g) * jax.lax.stop_gradient(c - ci)),
        variables["params"], global_params, client.state, client.shared)
    return value + sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32)), state
  return loss


def scaffold(model: Any, learning_rate: float, *, batch_size: int, local_epochs: int,
             server_learning_rate: float = 1.0, base_loss: LossFn = cross_entropy,
             **kwargs: Any):
  """SCAFFOLD as a `FederatedAlgorithm`: plain SGD clients at `learning_rate` with control
  variates (`scaffold_state`, `scaffold_loss`), uniform mean of the client models, server
  step `server_learning_rate` (1: G = the mean). `kwargs` go to `federated_averaging`
  (strategy, compute_dtype, aggregator, ...). Initialise with
  `algorithm.init(variables, num_clients=C)`."""
  from tracefl_jax.fl.algorithm import federated_averaging  # pylint: disable=g-import-not-at-top
  server = None if float(server_learning_rate) == 1.0 else optax.sgd(server_learning_rate)
  kwargs.setdefault("weighting", "uniform")
  return federated_averaging(model, optax.sgd(learning_rate), batch_size=batch_size,
                             local_epochs=local_epochs, loss_fn=scaffold_loss(base_loss),
                             client_state=scaffold_state(learning_rate),
                             server_optimizer=server, **kwargs)


def fednova():
  """FedNova's rule over updates `[K, ...]` (a plain function: `federated_averaging` hands it
  theta_k - G): sum_i p_i tau_eff / tau_i (theta_i - G), p the normalised weights, tau the
  clients' step counts (`num_steps`, which the round passes to rules that declare it)."""

  def fednova_rule(updates, weights, *, num_steps):
    w = jnp.asarray(weights, jnp.float32)
    p = w / jnp.sum(w)
    tau = num_steps.astype(jnp.float32)
    tau_eff = jnp.sum(p * tau)
    coef = jnp.where(tau > 0, p * tau_eff / jnp.maximum(tau, 1.0), 0.0)
    return jax.tree.map(lambda u: jnp.tensordot(coef, u.astype(jnp.float32), axes=1,
                                                precision=jax.lax.Precision.HIGHEST
                                                ).astype(u.dtype), updates)
  return fednova_rule
