"""The model interface: a Flax module as pure (init, apply) plus traced-unit metadata.

Every model in tracefl_jax is a `ModelDef`. Its variables are a plain dict of collections,
`{"params": ..., "batch_stats": ...}` (the second only for models with BatchNorm), so that
stacked client models `[C, ...]`, FedAvg and provenance all work on ordinary pytrees.

Traced units (tracefl-spec.md section 2) are found by ONE abstract eval-mode forward pass under
`nn.intercept_methods` (`inspect_units`), so their order is the order of execution, not of
declaration. The same pass gives each unit's unbound module, output shape and call count; model
construction, provenance capture and the kernel choice all read it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tracefl_jax.models.layers import plain_convs_canonical

Variables = dict[str, Any]
LayerPath = tuple[str, ...]

# The unit types traced by default. Each is affine in its own parameters once its input is
# fixed (spec section 2), which is what makes the "grad" and "jvp" kernels exact; subclasses
# (e.g. `layers.PatchConv`) must keep that property.
class AffineUnit(nn.Module):
  """Marker base class of a module affine in its own parameters once its input is fixed (no
  parameter-free term): traced by default, scored exactly by every kernel. The adapters of
  NNX's Linear, Conv and LayerNorm (`models.nnx`) are such units."""


TRACED_UNIT_TYPES: tuple[type[nn.Module], ...] = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv,
                                                   nn.LayerNorm, AffineUnit)

# Parameterised layers TraceFL deliberately leaves untraced (as the original does): they are
# listed on `ModelDef.untraced` but not warned about. Matched by class name, so the Flax NNX
# layers of the same names count too.
UNTRACED_BY_DESIGN = ("BatchNorm", "GroupNorm", "RMSNorm", "Embed")


class TracedUnit(NamedTuple):
  """One traced unit as seen by an abstract eval-mode forward pass of a batch."""
  path: LayerPath                  # module path, e.g. ("layer1_0", "conv1")
  module: nn.Module                # an unbound clone: `module.apply({"params": theta}, *args)`
  output: jax.ShapeDtypeStruct     # its output for the inspected batch, leading axis B
  calls: int                       # how often its `__call__` ran (1 in a valid model)
  lifted: str = ""                 # the Flax transform it runs inside ("nn.remat", "nn.scan")


@functools.lru_cache(maxsize=None)
def _call_args(cls: type[nn.Module]) -> tuple[bool, bool]:
  """(takes `train`, takes `mask`) from `cls.__call__`'s signature.

  `**kwargs` counts as taking `train` (a wrapper forwarding it); `mask` must be named, since
  masked batch statistics are an opt-in.
  """
  params = inspect.signature(cls.__call__).parameters
  var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
  return "train" in params or var_kw, "mask" in params


def _module_hash(module: nn.Module) -> int:
  """Flax modules hash by field values; one with a list or dict field hashes by its repr."""
  try:
    return hash(module)
  except TypeError:
    return hash((type(module), repr(module)))


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


class _ModuleKey:
  """A module as an lru_cache key: equal by value, hashable even with list fields."""
  __slots__ = ("module",)

  def __init__(self, module: nn.Module):
    self.module = module

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _ModuleKey) and self.module == other.module

  def __hash__(self) -> int:
    return _module_hash(self.module)


def inspect_units(
    module: nn.Module,
    batch_shape: tuple[int, ...],
    dtype: Any = jnp.float32,
    traced_layers: tuple[LayerPath, ...] | None = None,
) -> tuple[TracedUnit, ...]:
  """The traced units of one abstract eval-mode forward of a `batch_shape` batch, in order.

  The one discovery pass of the library (cached; nothing is computed, `jax.eval_shape`).
  Without `traced_layers` the units are the `TRACED_UNIT_TYPES` submodules; with it, exactly
  those module paths (whole blocks allowed; their inner units are then not traced). A unit's
  own re-entrant calls (a subclass calling `super().__call__`) count once; `calls > 1` means
  the same weights ran twice (rejected by `ModelDef.units` and `make_model`).

  Raises:
    ValueError: a path in `traced_layers` never ran.
  """
  traced = None if traced_layers is None else tuple(tuple(p) for p in traced_layers)
  return _inspect(_ModuleKey(module), tuple(batch_shape), jnp.dtype(dtype), traced).units


class MissingTracedLayers(ValueError):
  """A path of `traced_layers` never ran in the eval-mode forward pass."""


class _Survey(NamedTuple):
  """What one abstract eval-mode forward pass tells about a module."""
  units: tuple[TracedUnit, ...]
  untraced: tuple[tuple[LayerPath, str], ...]  # (owner path, owner kind) of untraced params
  logits: jax.ShapeDtypeStruct


def _kind(module: nn.Module) -> str:
  """A module's class name; an NNX layer's own class name for its linen adapter."""
  return getattr(module, "nnx_kind", None) or type(module).__name__


@functools.lru_cache(maxsize=256)
def _inspect(key: _ModuleKey, batch_shape: tuple[int, ...], dtype: Any,
             traced: tuple[LayerPath, ...] | None) -> _Survey:
  module = key.module
  wanted = set(traced or ())
  clones: dict[LayerPath, nn.Module] = {}  # insertion order = first-call order
  outputs: dict[LayerPath, jax.ShapeDtypeStruct] = {}
  calls: collections.Counter[LayerPath] = collections.Counter()
  kinds: dict[LayerPath, str] = {}
  active: list[LayerPath] = []

  lifted: dict[LayerPath, str] = {}

  def record(next_fun, args, kwargs, context):
    path = tuple(context.module.path)
    kinds.setdefault(path, _kind(context.module))
    is_unit = (path in wanted if traced is not None
               else isinstance(context.module, TRACED_UNIT_TYPES))
    if context.method_name != "__call__" or not is_unit or path in active:
      return next_fun(*args, **kwargs)
    calls[path] += 1
    lifted.setdefault(path, _lifted_transform(context.module))
    clones.setdefault(path, context.module.clone(parent=None))
    active.append(path)
    try:
      out = next_fun(*args, **kwargs)
    finally:
      active.pop()
    # A block returning a tuple (an nn.scan's (carry, ys)) is refused later, by name.
    outputs[path] = (jax.ShapeDtypeStruct(out.shape, out.dtype) if hasattr(out, "shape")
                     else type(out).__name__)
    return out

  def forward():
    x = jnp.zeros(batch_shape, dtype)
    mode = {"train": False} if _call_args(type(module))[0] else {}
    variables = module.init({"params": jax.random.key(0), "dropout": jax.random.key(0)}, x,
                            **mode)
    with nn.intercept_methods(record):
      logits = module.apply(variables, x, **mode)
    return variables.get("params", {}), logits

  params, logits = jax.eval_shape(forward)
  missing = wanted - set(clones)
  if missing:
    raise MissingTracedLayers(f"traced layers {sorted(missing)} never ran in an eval-mode "
                              f"forward pass of {type(module).__name__}")
  owners: dict[LayerPath, str] = {}
  for leaf_path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in leaf_path)
    if any(path[:len(u)] == u for u in clones):
      continue
    owner = path[:-1]
    known = max((p for p in kinds if owner[:len(p)] == p), key=len, default=())
    owners.setdefault(owner, kinds.get(owner, kinds.get(known, type(module).__name__)))
  units = tuple(TracedUnit(p, m, outputs[p], calls[p], lifted[p]) for p, m in clones.items())
  logits = jax.ShapeDtypeStruct(getattr(logits, "shape", ()),
                                getattr(logits, "dtype", jnp.float32))
  return _Survey(units, tuple(owners.items()), logits)


# Flax's lifted module classes are named transform + module ("CheckpointDense", "ScanBody").
_LIFTED = {"Checkpoint": "nn.remat", "Scan": "nn.scan", "Vmap": "nn.vmap", "Jit": "nn.jit",
           "While_loop": "nn.while_loop", "Cond": "nn.cond", "Map_variables": "nn.map_variables"}


def _lifted_transform(module: nn.Module | None) -> str:
  """The lifted Flax transform ("nn.remat", ...) `module` runs inside, or "".

  Inside a lifted transform a module's parent chain stops short of the root (its scope is the
  transform's own): the top of the chain still has a path. Flax names the lifted module
  transform + class ("ScanBody_0", "CheckpointDense_0"), which names the transform.
  """
  while isinstance(getattr(module, "parent", None), nn.Module):
    module = module.parent
  path = tuple(getattr(module, "path", ()) or ())
  if not path:
    return ""
  return next((t for prefix, t in _LIFTED.items() if str(path[-1]).startswith(prefix)),
              f"a lifted Flax transform (at {'/'.join(map(str, path))})")


def _reject_lifted(units: tuple[TracedUnit, ...]) -> None:
  """Units under nn.remat / nn.scan run inside the transform's own trace: the captured input
  cannot leave it (remat: an UnexpectedTracerError at trace time), and a scan stacks L
  layers' weights `[L, ...]` and runs them L times. Refused when the model is built."""
  bad = [u for u in units if u.lifted or not hasattr(u.output, "shape")]
  if not bad:
    return
  others = [u.path for u in units if u not in bad]
  u = bad[0]
  name = "/".join(u.path)
  where = (f"runs inside {u.lifted}" if u.lifted
           else f"returns a {u.output}, not one array")
  fix = ("build the module without nn.remat (it changes memory, not values: the same "
         "variables fit the plain module), or" if u.lifted == "nn.remat" else
         "unroll the stack (a Python loop of separate modules, one per layer), or")
  raise ValueError(
      f"traced unit {name!r} ({_kind(u.module)}) {where}: TraceFL captures each traced "
      f"unit's input and output as one array in the forward pass, which a lifted Flax "
      f"transform (nn.remat, nn.scan) keeps inside its own trace ({len(bad)} unit(s): "
      f"{', '.join('/'.join(b.path) for b in bad[:4])}). To trace this model, {fix} pass "
      f"traced_layers naming only layers outside it (here: {others or 'none'}).")


def _reject_shared(units: tuple[TracedUnit, ...]) -> None:
  _reject_lifted(units)
  for u in units:
    if u.calls > 1:
      name = "/".join(u.path)
      raise ValueError(
          f"traced unit {name!r} ({type(u.module).__name__}) is called {u.calls} times in one "
          f"forward pass (shared weights). TraceFL captures ONE input per traced unit: a "
          f"second call would overwrite the captured input while the unit's parameter "
          f"gradients sum over all calls, so its client scores would be wrong. Use a separate "
          f"module per call, or pass explicit traced_layers naming a block that contains "
          f"{name!r} (a whole-block unit, scored by the reference kernel).")


def discover_traced_layers(
    module: nn.Module,
    input_shape: tuple[int, ...],
    input_dtype: Any = jnp.float32,
) -> tuple[LayerPath, ...]:
  """Module paths of the `TRACED_UNIT_TYPES` units, in the order they run in eval mode.

  Raises ValueError if one of them is called more than once per forward pass.
  """
  units = inspect_units(module, (1, *input_shape), input_dtype)
  _reject_shared(units)
  return tuple(u.path for u in units)


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
