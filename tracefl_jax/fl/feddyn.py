"""FedDyn (Acar et al., ICLR 2021, Algorithm 1) on the per-client state and the server optimizer.

Client i keeps its gradient memory g_i (a row of the `[C, ...]` table, 0 at first). From
G = G_{t-1} it minimises

    L_i(theta) - <g_i, theta> + (alpha / 2) ||theta - G||^2            (`feddyn_loss`)

and then g_i <- g_i - alpha (theta_i - G) (`feddyn_state`). With P the round's clients and m
the federation's C, the server keeps

    h <- h - alpha (1 / m) sum_{i in P} (theta_i - G),     G_t = mean_{i in P} theta_i - h / alpha

as a server optimizer (`feddyn_server`): it receives the pseudo-gradient d = G - mean theta_i,
so h <- h + alpha (|P| / m) d and the update is -d - h / alpha. |P| / m lives in its state
(`FedDynState.participation`): `round` sets it from the round's clients and the data's C;
`server_update` (leave-one-out, stored rounds) scales it by the share of clients whose weight
is > 0, so removing a client removes it from h's sum too. h stays the table's mean (both start
at 0 and move by the same sums), as the paper notes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tracefl_jax.fl.client_state import ClientContext, ClientStatePiece
from tracefl_jax.fl.losses import LossFn, cross_entropy, proximal_term


class FedDynState(NamedTuple):
  h: Any                    # the server's h, float32, shaped like the params
  participation: jax.Array  # float32 |P| / m of the round being aggregated


def _f32(tree: Any) -> Any:
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def feddyn_server(alpha: float) -> optax.GradientTransformation:
  """FedDyn's server side over the pseudo-gradient d = G - mean_i theta_i (module docstring)."""

  def init(params):
    return FedDynState(jax.tree.map(jnp.zeros_like, _f32(params)), jnp.ones((), jnp.float32))

  def update(d, state, params=None):
    del params
    h = jax.tree.map(lambda h, d: h + alpha * state.participation * d, state.h, _f32(d))
    return (jax.tree.map(lambda d, h: (-d - h / alpha).astype(d.dtype), d, h),
            state._replace(h=h))
  return optax.GradientTransformation(init, update)


def feddyn_state(alpha: float) -> ClientStatePiece:
  """The gradient memories g_i: 0 at first, g_i - alpha (theta_i - G) after each round."""

  def finish(client: ClientContext, global_params, params, num_steps):
    del num_steps
    return jax.tree.map(lambda g, x, y: g - alpha * (y - x), client.state, _f32(global_params),
                        _f32(params))
  return ClientStatePiece(lambda params: jax.tree.map(jnp.zeros_like, _f32(params)), finish)


def feddyn_loss(alpha: float, base: LossFn = cross_entropy) -> LossFn:
  """`base - <g_i, theta> + alpha / 2 ||theta - G||^2`, FedDyn's client objective."""

  def loss(model, variables, x, y, mask, rng, global_params=None, client=None):
    if client is None or global_params is None:
      raise ValueError("feddyn_loss needs the client's gradient memory and G's params; use "
                       "it with client_state=feddyn_state(alpha)")
    value, state = base(model, variables, x, y, mask, rng, global_params)
    linear = jax.tree.map(lambda p, g: jnp.sum(p.astype(jnp.float32) * jax.lax.stop_gradient(g)),
                          variables["params"], client.state)
    return (value - sum(jax.tree.leaves(linear), jnp.zeros((), jnp.float32))
            + 0.5 * alpha * proximal_term(variables["params"], global_params)), state
  return loss


def feddyn(model: Any, learning_rate: float, alpha: float, *, batch_size: int,
           local_epochs: int, base_loss: LossFn = cross_entropy, **kwargs: Any):
  """FedDyn as a `FederatedAlgorithm`: plain SGD clients at `learning_rate` on FedDyn's
  objective, the uniform mean of the client models, the server's h (`feddyn_server`).
  `kwargs` go to `federated_averaging` (strategy vmap/chunked/scan, compute_dtype, ...).
  Initialise with `algorithm.init(variables, num_clients=C)`."""
  from tracefl_jax.fl.algorithm import federated_averaging  # pylint: disable=g-import-not-at-top
  if not float(alpha) > 0:
    raise ValueError(f"feddyn: alpha={alpha} must be > 0 (the dynamic regulariser)")
  alpha = float(alpha)
  kwargs.setdefault("weighting", "uniform")
  inner = federated_averaging(model, optax.sgd(learning_rate), batch_size=batch_size,
                              local_epochs=local_epochs, loss_fn=feddyn_loss(alpha, base_loss),
                              client_state=feddyn_state(alpha),
                              server_optimizer=feddyn_server(alpha), **kwargs)

  def server_update(variables, client_variables, weights, key, opt_state=None,
                    client_info=None):
    w = jnp.asarray(weights, jnp.float32)
    share = jnp.sum(w > 0) / w.shape[0]
    opt_state = opt_state._replace(participation=opt_state.participation * share)
    return inner.server_update(variables, client_variables, w, key, opt_state, client_info)

  def reaggregate(previous, client_variables, key, opt_state, client_info, weights):
    return server_update(previous, client_variables, weights, key, opt_state, client_info)[0]

  def round_(state, clients, data, key):
    if not isinstance(state.opt_state, FedDynState):
      raise ValueError("feddyn's state keeps h in opt_state: build it with "
                       "algorithm.init(variables, num_clients=C)")
    part = jnp.float32(np.size(clients) / data.num_clients)
    state = state._replace(opt_state=state.opt_state._replace(participation=part))
    state, out = inner.round(state, clients, data, key)
    clients_out = out.clients
    again = jax.tree_util.Partial(reaggregate, out.previous.variables, clients_out.variables, key,
                                  out.previous.opt_state,
                                  (clients_out.loss, clients_out.num_examples,
                                   clients_out.num_steps))
    return state, out._replace(reaggregate=again)

  return inner._replace(round=round_, server_update=jax.jit(server_update))
