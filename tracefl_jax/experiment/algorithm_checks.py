"""The algorithm fields' checks that involve other fields (`algorithm_errors`, which
`config.validate` runs after each field's own rule): aggregation.rule's counts, `algorithm`
against the pieces SCAFFOLD, FedDyn, FedNova, q-FFL and Ditto fix themselves, and
adaptive-clipping DP
(`dp.adaptive`). One problem is one line naming the fields, the values and the fix.
"""

from __future__ import annotations

import math

import ml_collections

# `algorithm` (`stages.build_algorithm`): FedAvg's family is composed of client.loss,
# aggregation.rule, server.optimizer and dp.*; the others are algorithms of their own.
ALGORITHMS = ("fedavg", "scaffold", "feddyn", "fednova", "qffl", "ditto")
STATEFUL = ("scaffold", "feddyn", "ditto")  # a per-client state table (`fl.client_state`)


def algorithm_errors(c: ml_collections.ConfigDict) -> list[str]:
  """The algorithm fields' checks that involve other fields (client.loss, aggregation.rule,
  server.*, algorithm, dp.*), one line each; each field's own range or choices are its rule's."""
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
  return errors + _memory_errors(c) + _adaptive_dp_errors(c)


_WHAT = {"scaffold": "option II's control variates assume", "feddyn": "gradient memory assumes",
         "fednova": "step-count normalisation assumes",
         "qffl": "Lipschitz estimate L = 1 / client.learning_rate assumes"}
# Fields of one algorithm: (its algorithm, default).
_OWN = {"feddyn.alpha": ("feddyn", 0.1), "ditto.lam": ("ditto", 0.1),
        "qffl.q": ("qffl", 1.0), "qffl.lipschitz": ("qffl", 0.0)}


def _memory_errors(c: ml_collections.ConfigDict) -> list[str]:
  """`algorithm` against the pieces it fixes itself (client optimizer and objective, rule,
  server step, DP, the client-axis strategy) and the fields of one algorithm (`_OWN`)."""
  alg, cl, s = c.algorithm, c.client, c.server
  errors: list[str] = []
  for name, (owner, default) in _OWN.items():
    section, field = name.split(".")
    if alg != owner and c[section][field] != default:
      errors.append(f"{name}={c[section][field]:g} is used by algorithm={owner!r} only "
                    f"(algorithm is {alg!r}): leave it at {default:g} or set "
                    f"algorithm={owner!r}")
  if alg == "ditto":
    return errors + _stateful_errors(c)
  if alg not in _WHAT:  # fedavg, or a name its rule has refused
    return errors
  head = f"algorithm={alg!r}"
  sgd = f"{head} trains clients with plain SGD at client.learning_rate (its {_WHAT[alg]} it)"
  if cl.optimizer != "sgd":
    errors.append(f"{sgd}: set client.optimizer='sgd' (got {cl.optimizer!r})")
  if cl.momentum != 0:
    errors.append(f"{sgd}: set client.momentum=0 (got {cl.momentum:g})")
  if alg in STATEFUL and cl.weight_decay != 0:
    errors.append(f"{sgd}: set client.weight_decay=0 (got {cl.weight_decay:g})")
  if c.aggregation.rule != "mean":
    own = "rule (q-FedAvg's step)" if alg == "qffl" else "mean"
    errors.append(f"{head} aggregates by its own {own}: aggregation.rule must be 'mean', got "
                  f"{c.aggregation.rule!r} (robust rules: algorithm='fedavg')")
  if c.dp.enabled:
    errors.append(f"{head} cannot run with dp.enabled (DP-FedAvg clips and noises FedAvg's "
                  f"mean): set dp.enabled=False, or algorithm='fedavg' for DP")
  if alg not in STATEFUL:
    return errors
  if cl.loss != "cross_entropy":
    errors.append(f"{head} has its own client objective (cross-entropy plus its correction): "
                  f"client.loss must be 'cross_entropy', got {cl.loss!r}")
  if alg == "scaffold" and (s.optimizer not in ("none", "sgd") or s.momentum != 0):
    errors.append(f"{head} takes a global step size only: server.optimizer 'none' (G = the "
                  f"mean) or 'sgd' with server.momentum=0 (step server.learning_rate), got "
                  f"server.optimizer={s.optimizer!r}, server.momentum={s.momentum:g}")
  if alg == "feddyn" and s.optimizer != "none":
    errors.append(f"{head} has its own server step (h, the mean of the gradient memories): "
                  f"server.optimizer must be 'none', got {s.optimizer!r}")
  return errors + _stateful_errors(c)


def _stateful_errors(c: ml_collections.ConfigDict) -> list[str]:
  """A per-client state table (SCAFFOLD, FedDyn, Ditto): DP, the strategy, the compare."""
  head, errors = f"algorithm={c.algorithm!r}", []
  if c.algorithm == "ditto" and c.dp.enabled:
    errors.append(f"{head} cannot run with dp.enabled (DP-FedAvg has no per-client state): "
                  f"set dp.enabled=False")
  if c.simulation.strategy in ("loop", "sharded"):
    errors.append(f"{head} keeps a per-client state table, which runs under "
                  f"simulation.strategy auto, vmap, chunked or scan, not "
                  f"{c.simulation.strategy!r}")
  if c.attribution.enabled:
    errors.append(f"{head}: the compare command retrains federations without per-client "
                  f"state, so its truths cannot run; use algorithm='fedavg' for the comparison")
  return errors


_ADAPTIVE_DEFAULTS = {"target_quantile": 0.5, "clip_learning_rate": 0.2, "count_stddev": 0.0}


def _adaptive_dp_errors(c: ml_collections.ConfigDict) -> list[str]:
  """dp.adaptive (adaptive clipping, `fl.adaptive_clipping`) and its fields."""
  d = c.dp
  errors: list[str] = []
  if not d.adaptive:
    for name, default in _ADAPTIVE_DEFAULTS.items():
      if d[name] != default:
        errors.append(f"dp.{name}={d[name]:g} is used by dp.adaptive=True only: leave it at "
                      f"{default:g} or set dp.adaptive=True")
    return errors
  if not d.enabled:
    errors.append("dp.adaptive=True adapts DP-FedAvg's clip norm: set dp.enabled=True too")
  if d.parity:
    errors.append("dp.adaptive=True has no parity mode (it traces the noisy model and keeps "
                  "BatchNorm statistics out of the noise): set dp.parity=False")
  if c.server.optimizer != "none":
    errors.append(f"dp.adaptive=True sets G to the noisy clipped mean: server.optimizer must "
                  f"be 'none', got {c.server.optimizer!r}")
  if c.attribution.enabled:
    errors.append("dp.adaptive=True cannot be retrained (its clip norm is read from the server "
                  "state), so the compare command's retraining truths cannot run: set "
                  "dp.adaptive=False (fixed clipping) for the comparison")
  sigma_b = d.count_stddev or c.clients_per_round / 20
  value = (f"{d.count_stddev:g}" if d.count_stddev else
           f"0 (clients_per_round / 20 = {sigma_b:g})")
  if d.noise_multiplier > 0 and not 2 * sigma_b > d.noise_multiplier:
    errors.append(f"dp.count_stddev={value} leaves no noise for the update: it must exceed "
                  f"dp.noise_multiplier / 2 = {d.noise_multiplier / 2:g} (Andrew et al. 2021, "
                  f"Theorem 1)")
  return errors
