"""Flax NNX models through the same `make_model`: an `nnx.Module` as a linen module.

`from_nnx(module)` (which `make_model` calls for an NNX module) returns `NNXModel`, a linen
module that rebuilds the NNX module from plain variable dicts on every call (`nnx.merge`), so
the NNX model meets the linen contract (`ModelDef`): variables `{"params", "batch_stats"}`,
`__call__(x, train)`, train mode updating BatchNorm statistics, dropout keys from the
"dropout" stream.

Every NNX layer that owns variables directly (`nnx.Linear`, `nnx.Conv`, `nnx.LayerNorm`,
`nnx.BatchNorm`, `nnx.Embed`, ...) runs as a linen child of `NNXModel`, named by its NNX path
joined with "_" (`layers[0]` -> "layers_0"), holding its own variables: the traced layers
(Linear, LinearGeneral, Einsum, Conv, LayerNorm: affine in their parameters) as `NNXUnit`s,
which provenance discovers in execution order like linen's `nn.Dense`; the others as
`NNXLayer`s, listed on `ModelDef.untraced`. Variables an NNX module owns beside submodules
(a raw `nnx.Param`) live in `NNXModel`'s own scope under their joined path.

The NNX module's current weights are the model's initial weights: `ModelDef.init(key)`
returns them whatever the key (an NNX module is built already initialised, from its own
`nnx.Rngs`). Dropout keys come from linen's "dropout" stream: each `nnx.Dropout`'s stream is
re-seeded per call from `rng` (its own `nnx.Rngs` state is not carried between steps).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax import traverse_util

from tracefl_jax.models.base import AffineUnit

TRACED_NNX = ("Linear", "LinearGeneral", "Einsum", "Conv", "LayerNorm")


def is_nnx(module: Any) -> bool:
  """Whether `module` is a Flax NNX module instance."""
  return isinstance(module, nnx.Module)


class Frozen:
  """A value held by a linen module field: equal only to itself, hashed by identity (linen
  compares fields by value; arrays cannot be)."""
  __slots__ = ("value",)

  def __init__(self, value: Any):
    self.value = value

  def __eq__(self, other: object) -> bool:
    return self is other

  def __hash__(self) -> int:
    return id(self)


def _collection(variable: Any) -> str | None:
  """The linen collection of an NNX variable; None for RNG state (re-seeded per call)."""
  if isinstance(variable, nnx.RngState):
    return None
  if isinstance(variable, nnx.Param):
    return "params"
  if isinstance(variable, nnx.BatchStat):
    return "batch_stats"
  raise ValueError(f"NNX variable type {type(variable).__name__} is not supported (Param, "
                   f"BatchStat and RNG state are)")


def _declare(module: nn.Module, name: str, collection: str, value: Any) -> Any:
  """A linen variable initialised to `value`; returns (its value, its handle or None)."""
  if collection == "params":
    return module.param(name, lambda _: value), None
  var = module.variable(collection, name, lambda: value)
  return var.value, var


class NNXLayer(nn.Module):
  """One NNX layer that owns variables, as a linen module holding them (`layout`: (name,
  collection) pairs; `holder`: (graphdef, state) of the layer with its initial values)."""
  holder: Frozen
  layout: tuple[tuple[str, str], ...]
  nnx_kind: str

  @nn.compact
  def __call__(self, *args, train: bool | None = None, **kwargs):
    graphdef, template = self.holder.value
    values, handles = {}, {}
    for name, collection in self.layout:
      values[name], handles[name] = _declare(self, name, collection,
                                             nnx.to_pure_dict(template)[name])
    state = jax.tree.map(lambda a: a, template)
    nnx.replace_by_pure_dict(state, values)
    layer = nnx.merge(graphdef, state)
    if train is not None:
      layer.train() if train else layer.eval()  # pylint: disable=expression-not-assigned
    out = layer(*args, **kwargs)
    new = nnx.to_pure_dict(nnx.state(layer))
    for name, var in handles.items():
      if var is not None and self.is_mutable_collection(var.collection):
        var.value = new[name]
    return out


class NNXUnit(NNXLayer, AffineUnit):
  """A traced NNX layer (Linear, LinearGeneral, Einsum, Conv, LayerNorm): affine in its
  parameters, so the exact kernels score it."""


class NNXModel(nn.Module):
  """An NNX module as a linen module (see the module docstring). `holder` keeps the NNX
  graph and state; build it with `from_nnx`."""
  holder: Frozen
  nnx_kind: str

  @nn.compact
  def __call__(self, x, train: bool = False):
    graphdef, template, leaves, direct = self.holder.value
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(template))
    values: dict[tuple[Any, ...], Any] = {}
    for path, value in flat.items():  # a layer's own variables live in its linen child
      inside = any(path[:len(leaf)] == leaf for leaf in leaves)
      values[path] = jnp.zeros(value.shape, value.dtype) if inside else value
    handles = {}
    for path, (name, collection) in direct.items():
      values[path], handles[path] = _declare(self, name, collection, flat[path])
    rng = self.make_rng("dropout") if train and self.has_rng("dropout") else None
    for i, path in enumerate(p for p in flat if p[-1] == "key" and len(p) > 1
                             and p[-2] == "rngs"):
      values[path] = jax.random.fold_in(rng if rng is not None else jax.random.key(0), i)
    state = jax.tree.map(lambda a: a, template)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    module = nnx.merge(graphdef, state)
    module.train() if train else module.eval()  # pylint: disable=expression-not-assigned
    for path, (name, traced, layout, holder, kind) in leaves.items():
      cls = NNXUnit if traced else NNXLayer
      child = cls(holder, layout, kind, name=name)
      proxy = child if traced else (lambda c: lambda *a, **k: c(*a, train=train, **k))(child)
      parent = module
      for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
      if isinstance(path[-1], int):
        parent[path[-1]] = proxy
      else:
        setattr(parent, path[-1], proxy)
    out = module(x)
    if handles:
      new = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(module)))
      for path, var in handles.items():
        if var is not None and self.is_mutable_collection(var.collection):
          var.value = new[path]
    return out


def _join(path: tuple[Any, ...]) -> str:
  return "_".join(str(p) for p in path)


def from_nnx(module: Any) -> NNXModel:
  """The linen adapter of an NNX module instance (its current weights are the initial ones).

  Raises ValueError for variable types other than Param, BatchStat and RNG state, and for
  two layer paths that join to the same name.
  """
  graphdef, template = nnx.split(module)
  modules = {tuple(path): node for path, node in nnx.iter_graph(module)
             if isinstance(node, nnx.Module)}
  leaves: dict[tuple[Any, ...], Any] = {}
  direct: dict[tuple[Any, ...], tuple[str, str]] = {}
  names: dict[str, tuple[Any, ...]] = {}
  owned: dict[tuple[Any, ...], list[tuple[str, str]]] = {}
  for path, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Variable):
      collection = _collection(node)
      if collection is not None:
        owned.setdefault(tuple(path[:-1]), []).append((path[-1], collection))
  for owner, layout in owned.items():
    has_children = any(p[:len(owner)] == owner and len(p) > len(owner) for p in modules)
    if owner and owner in modules and not has_children:
      layer = modules[owner]
      kind = type(layer).__name__
      g, st = nnx.split(layer)
      name = _join(owner)
      if name in names:
        raise ValueError(f"NNX paths {names[name]} and {owner} both map to the name {name!r}")
      names[name] = owner
      leaves[owner] = (name, kind in TRACED_NNX, tuple((str(a), c) for a, c in layout),
                       Frozen((g, st)), kind)
    else:
      for attr, collection in layout:
        direct[(*owner, attr)] = (_join((*owner, attr)), collection)
  return NNXModel(Frozen((graphdef, template, leaves, direct)), type(module).__name__)
