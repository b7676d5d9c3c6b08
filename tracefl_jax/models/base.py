"""The model interface: a Flax module as pure (init, apply) plus traced-layer metadata.

Every model in tracefl_jax is a `ModelDef`. Its variables are a plain dict of collections,
`{"params": ..., "batch_stats": ...}` (the second only for models with BatchNorm), so that
stacked client models `[C, ...]`, FedAvg and provenance all work on ordinary pytrees.

Traced layers (tracefl-spec.md section 2) are the module paths of the Dense, Conv and LayerNorm
units in forward order. They are discovered by running the module once under
`nn.intercept_methods`, so the order is the order of execution, not of declaration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Variables = dict[str, Any]
LayerPath = tuple[str, ...]

# Units that are affine in their own parameters once their input is fixed (spec section 2).
TRACED_UNIT_TYPES: tuple[type[nn.Module], ...] = (nn.Dense, nn.Conv, nn.LayerNorm)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
  """A classifier as pure functions over variable pytrees.

  Attributes:
    name: registry name.
    module: the Flax linen module; `module(x, train=...)` returns logits `[B, num_classes]`.
    input_shape: shape of ONE example, e.g. `(8, 8, 1)` or `(128,)` for token ids.
    input_dtype: dtype of an example (float32 images, int32 tokens).
    num_classes: number of logits.
    traced_layers: module paths of the traced units in forward order (filled by `make_model`).
  """

  name: str
  module: nn.Module
  input_shape: tuple[int, ...]
  num_classes: int
  input_dtype: Any = jnp.float32
  traced_layers: tuple[LayerPath, ...] = ()

  def init(self, key: jax.Array) -> Variables:
    """Initial variables, `{"params": ..., [other collections]}`."""
    x = jnp.zeros((1, *self.input_shape), self.input_dtype)
    variables = self.module.init({"params": key, "dropout": key}, x, train=False)
    return dict(variables)

  def apply(
      self,
      variables: Mapping[str, Any],
      x: jax.Array,
      *,
      train: bool = False,
      rng: jax.Array | None = None,
      mask: jax.Array | None = None,
  ) -> tuple[jax.Array, Variables]:
    """Logits `[B, num_classes]` and the updated non-parameter state.

    In train mode mutable collections (BatchNorm statistics) are updated and returned; in
    eval mode the state comes back unchanged. `rng` feeds dropout in train mode. `mask` `[B]`
    marks the real examples of a padded batch for models with batch statistics (their modules
    take a `mask` argument); padded examples then stay out of the statistics.
    """
    state = {k: v for k, v in variables.items() if k != "params"}
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    if train and state:
      extra = {} if mask is None else {"mask": mask}
      logits, new_state = self.module.apply(
          variables, x, train=True, rngs=rngs, mutable=list(state), **extra)
      return logits, dict(new_state)
    logits = self.module.apply(variables, x, train=train, rngs=rngs)
    return logits, state

  def logits(self, variables: Mapping[str, Any], x: jax.Array) -> jax.Array:
    """Eval-mode logits `[B, num_classes]` (BatchNorm running stats, no dropout)."""
    return self.apply(variables, x, train=False)[0]


def discover_traced_layers(
    module: nn.Module,
    input_shape: tuple[int, ...],
    input_dtype: Any = jnp.float32,
    unit_types: tuple[type[nn.Module], ...] = TRACED_UNIT_TYPES,
) -> tuple[LayerPath, ...]:
  """Module paths of the traced units, in the order they run in an eval forward pass."""
  x = jnp.zeros((1, *input_shape), input_dtype)
  found: list[LayerPath] = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, unit_types):
      path = tuple(context.module.path)
      if path not in found:
        found.append(path)
    return next_fun(*args, **kwargs)

  def forward():
    variables = module.init({"params": jax.random.key(0), "dropout": jax.random.key(0)}, x,
                            train=False)
    with nn.intercept_methods(record):
      module.apply(variables, x, train=False)

  jax.eval_shape(forward)
  return tuple(found)


def make_model(
    name: str,
    module: nn.Module,
    input_shape: tuple[int, ...],
    num_classes: int,
    input_dtype: Any = jnp.float32,
    traced_layers: tuple[LayerPath, ...] | None = None,
) -> ModelDef:
  """Builds a `ModelDef`, discovering the traced layers unless they are given."""
  if traced_layers is None:
    traced_layers = discover_traced_layers(module, input_shape, input_dtype)
  return ModelDef(name=name, module=module, input_shape=tuple(input_shape),
                  num_classes=num_classes, input_dtype=input_dtype,
                  traced_layers=tuple(traced_layers))


def get_layer(tree: Mapping[str, Any], path: LayerPath) -> Any:
  """The subtree of `tree` (a params dict) at module path `path`."""
  for key in path:
    tree = tree[key]
  return tree
