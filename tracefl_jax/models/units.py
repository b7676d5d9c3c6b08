"""Traced units: which modules of a model TraceFL traces, found by ONE abstract eval-mode
forward pass under `nn.intercept_methods` (`inspect_units`), so their order is the order of
execution, not of declaration. The same pass gives each unit's unbound module, output shape and
call count; model construction (`build.py`), `ModelDef.units`, provenance capture and the
kernel choice all read it.
"""

from __future__ import annotations

import collections
import functools
import inspect
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

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
