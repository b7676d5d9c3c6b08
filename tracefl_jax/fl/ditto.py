"""Ditto (Li et al., ICML 2021, Algorithm 1): a personal model per client beside the global one.

Round t from w = G_{t-1}: every sampled client k trains the global model as in FedAvg (its
client optimizer, `local_epochs`), and G_t is FedAvg's aggregate of those models (or any rule
and server optimizer given). Then, on the same batches, it trains its personal model v_k (a
row of the per-client state table; v_k = G_0 at first) on

    F_k(v) + (lam / 2) ||v - w||^2                                   (`fedprox(lam)`'s objective)

anchored at the round's start model w (the paper's w^t), with its own optimizer (the client
optimizer by default) for the same number of steps (`ClientStatePiece.local`). lam = 0 gives
local training alone, a large lam pulls v_k to w. Clients not sampled keep their v_k. Only
params are personal: a model's other collections (BatchNorm statistics) are the global model's.

Per-client evaluation: `personal_variables(state, k)` is client k's model as variables;
`personal_accuracy(model, state, x, y, parts)` each client's accuracy on its own examples.
Provenance of a personal model: `trace_clients(model, personal_variables(state, k),
out.clients.variables, x)` traces v_k's prediction to the round's client models with TraceFL
(tests/test_ditto.py); the global model is traced as for FedAvg.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tracefl_jax.fl.client import make_client_update
from tracefl_jax.fl.client_state import ClientContext, ClientStatePiece, table_rows
from tracefl_jax.fl.losses import LossFn, cross_entropy, fedprox
from tracefl_jax.fl.server import ServerState


def ditto_state(personal_update: Any) -> ClientStatePiece:
  """The personal models as a per-client state: rows v_k (float32 params, G_0 at first),
  trained after local training by `personal_update` (a `ClientUpdate` on Ditto's objective)
  from v_k, anchored at G_{t-1}."""

  def local(client: ClientContext, variables, train):
    start = {**variables, "params": client.state}
    return train(personal_update, start).variables["params"]

  def finish(client: ClientContext, global_params, params, num_steps):
    del global_params, params, num_steps
    return client.state  # `local` wrote the new v_k

  def init(params):
    return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
  return ClientStatePiece(init, finish, local=local)


def ditto(model: Any, optimizer: optax.GradientTransformation, lam: float, *, batch_size: int,
          local_epochs: int, personal_optimizer: optax.GradientTransformation | None = None,
          base_loss: LossFn = cross_entropy, **kwargs: Any):
  """Ditto as a `FederatedAlgorithm` (module docstring): clients train G with `optimizer`
  (objective `kwargs["loss_fn"]`, default `base_loss`) and their personal models with
  `personal_optimizer` (default `optimizer`) on `base_loss + lam / 2 ||v - G||^2`. `kwargs`
  go to `federated_averaging` (weighting, aggregator, server_optimizer, strategy vmap,
  chunked or scan, ...). Initialise with `algorithm.init(variables, num_clients=C)`."""
  from tracefl_jax.fl.algorithm import federated_averaging  # pylint: disable=g-import-not-at-top
  if not float(lam) >= 0:
    raise ValueError(f"ditto: lam={lam} must be >= 0 (the personal models' pull to G)")
  personal = make_client_update(model, personal_optimizer or optimizer, batch_size,
                                local_epochs, loss_fn=fedprox(float(lam), base_loss))
  kwargs.setdefault("loss_fn", base_loss)
  return federated_averaging(model, optimizer, batch_size=batch_size,
                             local_epochs=local_epochs, client_state=ditto_state(personal),
                             **kwargs)


def personal_variables(state: ServerState, client: int) -> Any:
  """Client `client`'s personal model as variables: its params from the table, the global
  model's other collections."""
  params = jax.tree.map(lambda t: t[client], table_rows(state.client_state))
  return {**state.variables, "params": params}


def personal_accuracy(model: Any, state: ServerState, x: Any, y: Any,
                      parts: Sequence[Any]) -> np.ndarray:
  """`[C]` each client's personal-model accuracy on its own examples `x[parts[c]]` (NaN for
  a client without any): one jitted program, clients one at a time (`lax.map`)."""
  counts = np.array([len(p) for p in parts], np.int32)
  table = table_rows(state.client_state)  # a host table goes to the device for this
  if len(parts) != jax.tree.leaves(table)[0].shape[0]:
    raise ValueError(f"personal_accuracy: {len(parts)} clients' examples for a table of "
                     f"{jax.tree.leaves(table)[0].shape[0]} personal models")
  rows = np.zeros((len(parts), max(int(counts.max(initial=0)), 1)), np.int32)
  for c, p in enumerate(parts):
    rows[c, :len(p)] = np.asarray(p)
  correct = _personal_correct(model, state.variables, table, jnp.asarray(x),
                              jnp.asarray(y), jnp.asarray(rows), jnp.asarray(counts))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.asarray(correct, np.float64) / counts


@functools.partial(jax.jit, static_argnames="model")
def _personal_correct(model, variables, table, x, y, rows, counts):
  def one(args):
    params, row, count = args
    logits, _ = model.apply({**variables, "params": params}, x[row])
    hit = (jnp.argmax(logits, -1) == y[row]) & (jnp.arange(row.shape[0]) < count)
    return jnp.sum(hit)
  return jax.lax.map(one, (table, rows, counts))
