"""The local (client) optimizer by name, as the config and the comparison build it; any optax
transformation works as a client optimizer from Python."""

from __future__ import annotations

import optax

OPTIMIZERS = ("adam", "adamw", "sgd")


def make_optimizer(name: str, learning_rate: float, weight_decay: float = 0.0,
                   momentum: float = 0.0) -> optax.GradientTransformation:
  """The local optimizer by name: "sgd", "adam" (CNN clients in the paper) or "adamw" (text)."""
  if name == "sgd":
    return optax.sgd(learning_rate, momentum=momentum or None)
  if name == "adam":
    return optax.adam(learning_rate)
  if name == "adamw":
    return optax.adamw(learning_rate, weight_decay=weight_decay)
  raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
