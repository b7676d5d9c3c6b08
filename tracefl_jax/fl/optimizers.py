"""The local (client) optimizer by name, as the config and the comparison build it; any optax
transformation works as a client optimizer from Python."""

from __future__ import annotations

import optax

OPTIMIZERS = ("adam", "adamw", "sgd")


# Adam's `sqrt(v + eps_root)`: float32's smallest normal. At v = 0 (a parameter whose
# gradient has been exactly 0, e.g. behind a dead ReLU) `sqrt` has an infinite derivative and
# reverse mode through the optimizer gives NaN; with it the derivative is finite. Forward it
# changes nothing: v + eps_root == v in float32 wherever v > ~2e-31, and below that
# sqrt(v + eps_root) <= 5e-16 is under half a unit in the last place of eps (1e-8), so the
# denominator sqrt(v + eps_root) + eps rounds to the same float (tests/test_adam_eps_root.py).
EPS_ROOT = 1.1754943508222875e-38


def make_optimizer(name: str, learning_rate: float, weight_decay: float = 0.0,
                   momentum: float = 0.0) -> optax.GradientTransformation:
  """The local optimizer by name: "sgd", "adam" (CNN clients in the paper) or "adamw" (text).
  Adam and AdamW get `eps_root=EPS_ROOT`, so reverse mode through local training (a
  hypergradient, `provenance.across_rounds`) is finite where a gradient is exactly 0; the
  float32 forward updates are optax's own, bit for bit."""
  if name == "sgd":
    return optax.sgd(learning_rate, momentum=momentum or None)
  if name == "adam":
    return optax.adam(learning_rate, eps_root=EPS_ROOT)
  if name == "adamw":
    return optax.adamw(learning_rate, weight_decay=weight_decay, eps_root=EPS_ROOT)
  raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
