"""The numbers a `FederatedAlgorithm` was built with, as data on it (`algorithm.hyperparameters`).

A pytree whose leaves are the learning rates, everything else static metadata, so a sweep can
stack algorithms' hyperparameters and `jax.tree` reads them. A learning rate is known when its
optimizer exposes it the optax way, built with `optax.inject_hyperparams`
(`optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)`); an optimizer that hides it in a
closure (`optax.adam(1e-3)`) records None.
"""

from __future__ import annotations

import flax.struct
import jax
import optax

from tracefl_jax.fl.privacy import DPSettings


@flax.struct.dataclass
class Hyperparameters:
  """What `federated_averaging` was given, beside its pieces (model, optimizers, rule)."""
  client_learning_rate: jax.Array | None   # leaf; None when the optimizer hides it
  server_learning_rate: jax.Array | None   # leaf; None without a server optimizer or hidden
  batch_size: int = flax.struct.field(pytree_node=False)
  local_epochs: int = flax.struct.field(pytree_node=False)
  weighting: str = flax.struct.field(pytree_node=False)
  clients_per_chunk: int = flax.struct.field(pytree_node=False)
  dp: DPSettings | None = flax.struct.field(pytree_node=False)


def learning_rate(optimizer: optax.GradientTransformation | None) -> jax.Array | None:
  """The learning rate an optimizer exposes in its state (`optax.inject_hyperparams`), read
  from its state over no parameters; None for a plain transformation, no optimizer, or one
  exposing several (a chain of two injected optimizers)."""
  if optimizer is None:
    return None
  try:
    return optax.tree_utils.tree_get(optimizer.init({}), "learning_rate")
  except KeyError:
    return None
