"""A round as `storage.load_round` gives it back, and the round's server side rebuilt from
the `FederatedAlgorithm` it was made with, so that a stored round traces as the online one:
TraceFL's scores from G_t and the client models, the first-order score and the exact
leave-one-client-out truth from the round's own removal of each client (`removal.py`).

What removing a client needs beyond the client models (`RoundOutput.reaggregate`'s
arguments): G_{t-1} where the rule reads it (a rule over updates, a server optimizer;
otherwise it is G_t's object and is not stored twice), the server optimizer's state before
the round (its leaves; the algorithm gives their structure back), the round's key, and the
clients' `[K]` values a rule may read (`client_info`: losses, example and step counts, q-FFL's
start losses).
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.provenance.storage_files import StoredRoundError
from tracefl_jax.models.base import ModelDef


class StoredRound(NamedTuple):
  """A round's models as stored by `save_round`."""
  round: int
  global_vars: Any          # the model provenance explains (G_t)
  client_vars: Any          # the round's client models, every leaf stacked [K, ...]
  client_ids: np.ndarray    # [K] global ids, in the round's order
  client_sizes: np.ndarray  # [K] example counts
  meta: dict[str, Any]      # the caller's metadata and the model's description
  model: ModelDef | None = None  # the ModelDef given to `load_round`
  weights: np.ndarray | None = None  # [K] aggregation weights (None: an older store)
  aggregation: str | None = None  # the round's server side (`RoundOutput.aggregation`)
  reaggregate: Any = None   # weights [K] -> G_t re-run with them (`RoundOutput.reaggregate`),
                            # rebuilt by load_round(path, model, algorithm); None for the mean
  input_range: list[float] | None = None  # [lo, hi] of the data's own float inputs

  def removal(self) -> tuple[Any, str]:
    """`(reaggregate, kind)` as `removal.round_removal` gives it for the online round.

    Raises:
      ValueError: the round was stored without its weights (an older store), or its server
        side is not the mean and it was loaded without its algorithm.
    """
    if self.weights is None or self.aggregation is None:
      raise ValueError(f"round {self.round} was stored without its aggregation weights and "
                       f"server side (an older save_round), so no client can be removed from "
                       f"it; store it again with save_round(path, round_output)")
    if self.aggregation == "dp_fedavg":
      return None, "dp_closed_form"
    if self.aggregation == "mean":
      return None, "closed_form"
    if self.reaggregate is None:
      raise ValueError(f"round {self.round}'s server side is {self.aggregation!r}: removing a "
                       f"client re-runs it, so load the round with the algorithm it was made "
                       f"with, load_round(path, model, algorithm)")
    return self.reaggregate, "rule"

  def _check_range(self, x: Any) -> None:
    """Float inputs far outside the round's own (`input_range`) are refused: raw values."""
    from tracefl_jax.provenance.checks import check_input_range  # pylint: disable=g-import-not-at-top
    if self.input_range is not None and hasattr(x, "dtype"):
      check_input_range(x, self.input_range)

  def _model(self) -> ModelDef:
    if self.model is None:
      raise ValueError("this StoredRound has no model: load it with load_round(path, model)")
    return self.model

  def trace(self, x: Any, **kwargs: Any) -> Any:
    """`trace_clients(self.model, G_t, clients, x, client_ids=..., **kwargs)` for inputs
    `[N, *input_shape]` as the model takes them (the same inputs `trace_clients` accepts;
    no conversion; float inputs far outside `input_range` are refused). With `score="first_order"` (or `weights=`) the round's weights and its
    own removal of each client (`removal`) are used unless given."""
    from tracefl_jax.provenance import trace_clients  # pylint: disable=g-import-not-at-top
    model = self._model()
    self._check_range(x)
    kwargs.setdefault("client_ids", self.client_ids)
    if kwargs.get("score") == "first_order" or kwargs.get("weights") is not None:
      if "reaggregate" not in kwargs:
        kwargs["reaggregate"] = self.removal()[0]
      if kwargs.get("weights") is None:
        kwargs["weights"] = self.weights
    return trace_clients(model, self.global_vars, self.client_vars, x, **kwargs)

  def leave_one_out(self, x: Any, *, target: Any = None,
                    clients_per_chunk: int | None = None) -> Any:
    """`counterfactual.leave_one_out` of the round: drops `[N, K]` of G's logit when each
    client is removed by the round's own server side (`removal`)."""
    from tracefl_jax.provenance.checks import check_inputs  # pylint: disable=g-import-not-at-top
    from tracefl_jax.provenance.counterfactual import leave_one_out  # pylint: disable=g-import-not-at-top
    model = self._model()
    reaggregate, _ = self.removal()
    if not hasattr(x, "shape"):
      x = np.asarray(x)
    check_inputs(model, x)  # the contract trace_clients keeps
    self._check_range(x)
    return leave_one_out(model, self.client_vars, self.weights, x, target=target,
                         global_vars=self.global_vars if reaggregate is None else None,
                         clients_per_chunk=clients_per_chunk, reaggregate=reaggregate)


def server_arrays(output: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(arrays, info)`: what re-running `output`'s server side needs beyond the client
  models (nothing for FedAvg's mean and for DP, whose removal is the closed form)."""
  if output.reaggregate is None or output.closed_form_exact:
    return {}, {}
  previous, _, key, opt_state, *rest = output.reaggregate.args
  arrays: dict[str, Any] = {}
  # The clients' [K] values a rule may read (FedNova's steps, q-FFL's start losses).
  info_arrays = dict(zip(CLIENT_INFO, rest[0])) if rest and rest[0] is not None else {}
  info_arrays = {k: v for k, v in info_arrays.items() if v is not None}
  if info_arrays:
    arrays["client_info"] = info_arrays
  info: dict[str, Any] = {"previous": previous is not output.variables}
  if info["previous"]:
    arrays["previous"] = previous
  leaves = jax.tree.leaves(opt_state)
  info["opt_state_leaves"] = len(leaves)
  if leaves:
    arrays["opt_state"] = {str(i): leaf for i, leaf in enumerate(leaves)}
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  info["key"] = str(jax.random.key_impl(key)) if typed else "raw"
  arrays["key"] = jax.random.key_data(key) if typed else key
  return arrays, info


# `RoundOutput.reaggregate`'s client_info, in its order (`host_round`).
CLIENT_INFO = ("losses", "num_examples", "num_steps", "start_loss")


class _ServerSide(NamedTuple):
  """`reaggregate`'s function: hashable and equal for one `server_update`, so a jitted
  consumer given rounds of one algorithm compiles once."""
  server_update: Any

  def __call__(self, previous, client_vars, key, opt_state, client_info, weights):
    return self.server_update(previous, client_vars, weights, key, opt_state, client_info)[0]


def _server_state_shape(algorithm: Any, previous: Any, stored: StoredRound) -> Any:
  """`algorithm.init(previous)`'s shapes (nothing is computed). An algorithm with a per-client
  state table needs its C to build one: any C gives the same server optimizer state, so the
  round's largest client id + 1 is passed to an `init` that takes `num_clients`."""
  try:
    takes = "num_clients" in inspect.signature(algorithm.init).parameters
  except (TypeError, ValueError):  # a callable without a signature
    takes = False
  num_clients = int(np.max(stored.client_ids, initial=0)) + 1
  init = (functools.partial(algorithm.init, num_clients=num_clients) if takes
          else algorithm.init)
  return jax.eval_shape(init, previous)


def rebuild_reaggregate(path: Path, stored: StoredRound, arrays: dict[str, Any],
                        info: dict[str, Any], algorithm: Any) -> Any:
  """The round's `reaggregate` from `algorithm.server_update` and the stored server state;
  None for the mean and DP (closed form). Checked: the algorithm's server side in words is
  the round's, and it gives the stored G_t back from the round's own weights."""
  from tracefl_jax.fl.algorithm import describe_server  # pylint: disable=g-import-not-at-top
  if stored.aggregation in (None, "dp_fedavg"):
    return None  # FederatedAlgorithm does not say whether it is DP: nothing to compare
  now = describe_server(algorithm.aggregator, algorithm.server_optimizer, None)
  if now != stored.aggregation:
    raise StoredRoundError(f"stored round {path} was aggregated by {stored.aggregation!r}, the "
                           f"algorithm given aggregates by {now!r}: pass the algorithm the "
                           f"round was made with")
  if stored.aggregation == "mean":
    return None
  if "key" not in info or stored.weights is None:
    raise StoredRoundError(f"stored round {path} ({stored.aggregation!r}) was saved without "
                           f"the server state re-running it needs; save_round(path, "
                           f"round_output) keeps it")
  previous = arrays.get("previous", stored.global_vars)
  opt_state = None
  if algorithm.server_optimizer is not None:
    wanted = _server_state_shape(algorithm, previous, stored).opt_state
    leaves = [arrays["opt_state"][str(i)] for i in range(info["opt_state_leaves"])]
    want = jax.tree.leaves(wanted)
    if [(tuple(np.shape(a)), np.dtype(a.dtype)) for a in leaves] != [
        (tuple(a.shape), np.dtype(a.dtype)) for a in want]:
      raise StoredRoundError(f"stored round {path}: its server optimizer state is not the "
                             f"given algorithm's ({len(leaves)} arrays stored, "
                             f"{len(want)} expected): pass the algorithm the round was made "
                             f"with")
    opt_state = jax.tree.unflatten(jax.tree.structure(wanted), leaves)
  key = arrays["key"]
  if info["key"] != "raw":
    key = jax.random.wrap_key_data(key, impl=info["key"])
  stored_info = arrays.get("client_info") or {}
  client_info = (tuple(None if stored_info.get(n) is None else jnp.asarray(stored_info[n])
                       for n in CLIENT_INFO) if stored_info else None)
  reaggregate = jax.tree_util.Partial(_ServerSide(algorithm.server_update), previous,
                                      stored.client_vars, key, opt_state, client_info)
  again = reaggregate(jnp.asarray(stored.weights))
  for (name, a), b in zip(jax.tree_util.tree_flatten_with_path(again)[0],
                          jax.tree.leaves(stored.global_vars)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = float(np.max(np.abs(a - b), initial=0.0))
    if not err <= 1e-4 * max(float(np.max(np.abs(b), initial=0.0)), 1e-3):
      raise StoredRoundError(
          f"stored round {path}: the algorithm given does not give its global model back "
          f"(leaf {jax.tree_util.keystr(name, simple=True, separator='/')} differs by "
          f"{err:.3g}): pass the algorithm the round was made with (same rule, server "
          f"optimizer and settings)")
  return reaggregate
