"""Config -> the library's algorithm pieces: client objective, aggregation rule, server
optimizer (`fl.losses`, `fl.robust`, `fl.server`).

    federated_averaging(model, optimizer, ..., **algorithm_pieces(config))

The defaults (`client.loss="cross_entropy"`, `aggregation.rule="mean"`,
`server.optimizer="none"`) give None for every piece, i.e. plain FedAvg bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

from tracefl_jax.fl import losses, robust, server

LOSSES = ("cross_entropy", "fedprox")


def client_loss(c: Any) -> losses.LossFn | None:
  """`client.loss`: None (cross-entropy) or FedProx with `client.prox_mu`."""
  if c.client.loss == "fedprox":
    return losses.fedprox(c.client.prox_mu)
  return None


def aggregation_rule(c: Any) -> robust.AggregationRule | None:
  """`aggregation.rule`: None for the mean (FedAvg), else the robust rule."""
  a = c.aggregation
  if a.rule == "mean":
    return None
  return robust.make_rule(a.rule, trim_beta=a.trim_beta, num_byzantine=a.num_byzantine,
                          num_selected=a.num_selected)


def server_optimizer(c: Any) -> Any:
  """`server.*`: None (G_t = aggregate) or the optax transformation of the pseudo-gradient."""
  s = c.server
  return server.server_optimizer(s.optimizer, s.learning_rate, momentum=s.momentum, b1=s.b1,
                                 b2=s.b2, eps=s.eps)


def algorithm_pieces(c: Any) -> dict[str, Any]:
  """Keyword arguments of `federated_averaging` for the config's algorithm."""
  return {"loss_fn": client_loss(c), "aggregator": aggregation_rule(c),
          "server_optimizer": server_optimizer(c)}


def algorithm_errors(c: Any) -> list[str]:
  """The algorithm fields' checks that involve other fields, one line each (each field's own
  range or choices are in `config_checks`)."""
  errors: list[str] = []
  a, n = c.aggregation, c.clients_per_round
  if a.rule == "krum" and a.num_selected > n:
    errors.append(f"aggregation.num_selected={a.num_selected} exceeds clients_per_round={n}")
  # Krum scores each client by its n - f - 2 nearest neighbours, at least 1: every f above
  # n - 3 scores by one neighbour, i.e. runs exactly as f = n - 3 would, silently.
  most = max(n - 3, 0)
  if a.rule == "krum" and a.num_byzantine > most:
    errors.append(f"aggregation.num_byzantine={a.num_byzantine} must be at most "
                  f"clients_per_round - 3 = {most} for krum (each client is scored by its "
                  f"n - f - 2 >= 1 nearest neighbours; a larger f runs as f={most}): lower it "
                  f"or raise clients_per_round")
  for field, value, default in (("num_byzantine", a.num_byzantine, 0),
                                ("num_selected", a.num_selected, 1)):
    if a.rule != "krum" and value != default:
      errors.append(f"aggregation.{field}={value} is used by aggregation.rule='krum' only "
                    f"(rule is {a.rule!r}): leave it at {default} or set rule='krum'")
  # The trimmed mean cuts floor(beta * n) values from each end: below one it is the mean.
  if a.rule == "trimmed_mean" and a.trim_beta > 0 and math.floor(a.trim_beta * n) < 1:
    errors.append(f"aggregation.trim_beta={a.trim_beta:g} cuts floor({a.trim_beta:g} x "
                  f"clients_per_round={n}) = 0 clients from each end, so the trimmed mean is "
                  f"the plain mean: set trim_beta >= {1 / n:.3g} or use more clients per round")
  if c.dp.enabled and a.rule != "mean":
    errors.append(f"dp.enabled averages clipped updates: aggregation.rule must be 'mean', "
                  f"got {a.rule!r}")
  return errors
