"""Config -> the library's algorithm pieces: client objective, aggregation rule, server
optimizer (`fl.losses`, `fl.robust`, `fl.server`).

    federated_averaging(model, optimizer, ..., **algorithm_pieces(config))

The defaults (`client.loss="cross_entropy"`, `aggregation.rule="mean"`,
`server.optimizer="none"`) give None for every piece, i.e. plain FedAvg bit for bit.
"""

from __future__ import annotations

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
  a = c.aggregation
  if a.rule == "krum" and a.num_selected > c.clients_per_round:
    errors.append(f"aggregation.num_selected={a.num_selected} exceeds clients_per_round="
                  f"{c.clients_per_round}")
  if c.dp.enabled and a.rule != "mean":
    errors.append(f"dp.enabled averages clipped updates: aggregation.rule must be 'mean', "
                  f"got {a.rule!r}")
  return errors
