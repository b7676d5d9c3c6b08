"""The model interface: a Flax module as pure (init, apply) plus traced-unit metadata.

Every model in tracefl_jax is a `ModelDef`. Its variables are a plain dict of collections,
`{"params": ..., "batch_stats": ...}` (the second only for models with BatchNorm), so that
stacked client models `[C, ...]`, FedAvg and provenance all work on ordinary pytrees. Its
traced units come from the discovery pass in `units.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tracefl_jax.models.layers import plain_convs_canonical
from tracefl_jax.models.units import (_call_args, _module_hash, _reject_shared, LayerPath,
                                      TracedUnit, inspect_units)
# The discovery pass's public names, importable with the model interface that reads them.
from tracefl_jax.models.units import (TRACED_UNIT_TYPES, UNTRACED_BY_DESIGN,  # noqa: F401
                                      AffineUnit, MissingTracedLayers, discover_traced_layers)

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
  """A classifier as pure functions over variable pytrees, and the contract its module meets.

  The module contract (any standard linen module meets it):
  - `__call__(x)` or `__call__(x, train)` maps a batch `[B, *input_shape]` to logits
    `[B, num_classes]`. `train=` is passed only when `__call__` takes it.
  - Variables are `{"params": ..., [other collections]}`. Standard
    `nn.BatchNorm(use_running_average=not train)` works: training updates and returns the
    non-"params" collections (`mutable`), eval mode reads them (running statistics).
  - Dropout draws from the "dropout" rng stream, fed in train mode only.
  - Optional: a `mask` parameter of `__call__` receives the `[B]` real-example mask of a padded
    training batch, to keep padding out of batch statistics (the project's ResNet/DenseNet).
  - Traced units are the `TRACED_UNIT_TYPES` submodules (`nn.Dense`, `nn.DenseGeneral`,
    `nn.Einsum`, `nn.Conv`, `nn.LayerNorm`; NNX layers through `models.nnx`) that run in eval
    mode, in execution order, each called ONCE per forward pass (shared weights are rejected);
    or explicit `traced_layers` module paths, e.g. whole blocks (non-affine: reference kernel).
  Provenance always runs the global model in eval mode: `train=False`, dropout off, BatchNorm
  on running statistics, no mask, so every input is scored independently of its batch.

  Equality and hash are by value on (module, input_shape, num_classes, input_dtype,
  traced_layers), not `name`: a `ModelDef` built twice is the same static jit argument, and
  provenance does not recompile. (traced_layers is compared because explicit paths are not a
  function of the module, and equal models share jit and discovery caches.)

  Attributes:
    name: registry name.
    module: the Flax linen module.
    input_shape: shape of ONE example, e.g. `(8, 8, 1)` or `(128,)` for token ids.
    input_dtype: dtype of an example (float32 images, int32 tokens).
    num_classes: number of logits.
    traced_layers: module paths of the traced units in forward order (filled by `make_model`).
    untraced: paths of the modules that own parameters outside every traced unit (BatchNorm,
      embeddings, a raw `self.param`), filled by `make_model`; their weights take part in
      training but not in the client scores.
  """

  name: str
  module: nn.Module
  input_shape: tuple[int, ...]
  num_classes: int
  input_dtype: Any = jnp.float32
  traced_layers: tuple[LayerPath, ...] = ()
  untraced: tuple[LayerPath, ...] = ()

  def __post_init__(self):
    # Lists would make the model unhashable, i.e. unusable as a static jit argument.
    object.__setattr__(self, "input_shape", tuple(self.input_shape))
    object.__setattr__(self, "traced_layers", tuple(tuple(p) for p in self.traced_layers))
    object.__setattr__(self, "untraced", tuple(tuple(p) for p in self.untraced))

  def _key(self) -> tuple[Any, ...]:
    return (self.module, self.input_shape, self.num_classes, jnp.dtype(self.input_dtype),
            self.traced_layers)

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, ModelDef):
      return NotImplemented
    return self is other or self._key() == other._key()

  def __hash__(self) -> int:
    return hash((_module_hash(self.module), *self._key()[1:]))

  @property
  def accepts_train(self) -> bool:
    """Whether the module's `__call__` takes `train` (else it is called without it)."""
    return _call_args(type(self.module))[0]

  @property
  def accepts_mask(self) -> bool:
    """Whether the module's `__call__` takes a `mask` for masked batch statistics."""
    return _call_args(type(self.module))[1]

  def init(self, key: jax.Array) -> Variables:
    """Initial variables, `{"params": ..., [other collections]}`."""
    x = jnp.zeros((1, *self.input_shape), self.input_dtype)
    # One compiled program (cached per ModelDef): run eagerly, every initializer of every
    # parameter is an op of its own (seconds for a ResNet).
    # Compiler options apply only to a top-level jit: inside a user's jit or vmap (a traced
    # key or input) the init is traced into their program.
    top_level = not isinstance(key, jax.core.Tracer) and not isinstance(x, jax.core.Tracer)
    return _jitted_init(self, top_level and jax.default_backend() == "cpu")(key, x)

  def apply(
      self,
      variables: Mapping[str, Any],
      x: jax.Array,
      *,
      train: bool = False,
      rng: jax.Array | None = None,
      mask: jax.Array | None = None,
  ) -> tuple[jax.Array, Variables]:
    """`(logits [B, num_classes], state)`: logits AND the non-parameter state, always a pair.

    Unlike linen's `Module.apply` (logits alone, or `(logits, mutated)` only when given
    `mutable=`), this returns the pair in both modes, so a training step reads the BatchNorm
    statistics the same way for every model: `logits, _ = model.apply(variables, x)`.

    In train mode mutable collections (BatchNorm statistics) are updated and returned; in
    eval mode the state comes back unchanged. `rng` feeds the "dropout" stream in train mode.
    `mask` `[B]` marks the real examples of a padded batch; it reaches the module only in
    train mode and only if its `__call__` takes `mask` (else it is dropped).
    """
    state = {k: v for k, v in variables.items() if k != "params"}
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    kwargs: dict[str, Any] = {"train": train} if self.accepts_train else {}
    if train and mask is not None and self.accepts_mask:
      kwargs["mask"] = mask
    # Plain nn.Conv layers get canonical_conv's derivatives on CPU (same numbers; fast in
    # the clients' step loops): `layers.plain_convs_canonical`.
    with (nn.intercept_methods(plain_convs_canonical) if jax.default_backend() == "cpu"
          else contextlib.nullcontext()):
      if train and state:
        logits, new_state = self.module.apply(variables, x, rngs=rngs, mutable=list(state),
                                              **kwargs)
        return logits, dict(new_state)
      logits = self.module.apply(variables, x, rngs=rngs, **kwargs)
    return logits, state

  def logits(self, variables: Mapping[str, Any], x: jax.Array) -> jax.Array:
    """Eval-mode logits `[B, num_classes]` (BatchNorm running stats, no dropout)."""
    return self.apply(variables, x, train=False)[0]

  def units(self, batch_shape: tuple[int, ...] | None = None,
            dtype: Any = None) -> tuple[TracedUnit, ...]:
    """The traced units for a batch of `batch_shape` (default one example), forward order.

    Raises ValueError if a traced layer never runs or runs more than once.
    """
    shape = (1, *self.input_shape) if batch_shape is None else tuple(batch_shape)
    units = inspect_units(self.module, shape, self.input_dtype if dtype is None else dtype,
                          self.traced_layers)
    _reject_shared(units)
    return units


def get_layer(tree: Mapping[str, Any], path: LayerPath) -> Any:
  """The subtree of `tree` (a params dict) at module path `path`."""
  for key in path:
    tree = tree[key]
  return tree


# XLA:CPU's default backend optimisation (level 2) spends several times longer compiling the
# initialisers (mostly the unrolled threefry rounds of every parameter's random bits) than
# level 1 (benchmarks/README.md, "Measurements behind the library's choices"). The
# program runs once, and level 1 gives bit-identical variables for every registered model
# (checked by tests/test_model_contract.py), so the init program is compiled at level 1.
_CPU_INIT_OPTIONS = {"xla_backend_optimization_level": 1}


@functools.lru_cache(maxsize=64)
def _jitted_init(model: ModelDef, cpu: bool) -> Callable[[jax.Array, jax.Array], Variables]:
  mode = {"train": False} if model.accepts_train else {}
  return jax.jit(lambda key, x: dict(model.module.init({"params": key, "dropout": key}, x,
                                                       **mode)),
                 compiler_options=_CPU_INIT_OPTIONS if cpu else None)
