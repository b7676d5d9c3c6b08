"""`make_model`: a Flax module (linen or NNX) and the shape of one example -> a `ModelDef`.

Every check runs here, once, on ONE abstract eval-mode forward pass (`units._inspect`): the
input shape and class count match the module, every traced unit runs once, at least one unit
is traced, and parameterised submodules outside every traced unit are listed on the
`ModelDef` (`untraced`) and, unless they are layers TraceFL leaves out by design (BatchNorm,
GroupNorm, RMSNorm, Embed), warned about: their weights train but never enter a client score.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tracefl_jax.models.base import ModelDef
from tracefl_jax.models.units import (TRACED_UNIT_TYPES, UNTRACED_BY_DESIGN, LayerPath,
                                      MissingTracedLayers, _inspect, _ModuleKey, _reject_shared)

_UNSET: Any = object()
_TRACED_NAMES = "/".join(t.__name__ for t in TRACED_UNIT_TYPES)


def check_shape_and_classes(input_shape: Any, num_classes: Any) -> tuple[int, ...]:
  """One-line errors instead of Flax/XLA tracebacks from inside the first forward pass."""
  if (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
      or num_classes < 1):
    raise ValueError(f"num_classes={num_classes!r} must be a positive int (the number of "
                     f"logits)")
  shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
  if not shape or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1
                          for d in shape):
    raise ValueError(f"input_shape={input_shape!r} must be a non-empty tuple of positive ints, "
                     f"the shape of ONE example, e.g. (28, 28, 1) or (seq_len,)")
  return tuple(int(d) for d in shape)


def _label(path: LayerPath) -> str:
  return "/".join(path) or "<the module's own self.param>"


def make_model(
    module_or_name: Any,
    module: Any = _UNSET,
    input_shape: Any = _UNSET,
    num_classes: Any = _UNSET,
    input_dtype: Any = jnp.float32,
    traced_layers: tuple[LayerPath, ...] | None = None,
    *,
    name: str | None = None,
) -> ModelDef:
  """Builds a `ModelDef`, discovering the traced layers unless they are given.

      make_model(module, input_shape=(28, 28, 1), num_classes=10)
      make_model("my_cnn", module, (28, 28, 1), 10)   # the older form; the name is a label

  Args:
    module: a linen `nn.Module`, or a Flax NNX `nnx.Module` instance (adapted by
      `models.nnx.from_nnx`; its current weights are the model's initial weights).
    input_shape: the shape of ONE example (no batch axis).
    num_classes: the number of logits.
    input_dtype: the dtype of an example (int32 for token ids).
    traced_layers: module paths to trace, in forward order (whole blocks allowed); default
      every `TRACED_UNIT_TYPES` unit that runs in eval mode, in execution order.
    name: a label (default the module's class name).

  Raises:
    TypeError: `module` is not a Flax module.
    ValueError: a bad `input_shape` or `num_classes` (including a forward pass that fails on
      one example of `input_shape`, or logits that are not `[B, num_classes]`), a traced unit
      called more than once per forward pass, a given traced layer that never runs, or no
      traced unit at all.
  """
  if isinstance(module_or_name, str):
    name = module_or_name if name is None else name
  else:
    if module is not _UNSET:  # make_model(module, input_shape, num_classes[, dtype])
      if input_shape is not _UNSET and num_classes is not _UNSET:
        input_dtype = num_classes
      input_shape, num_classes = module, (input_shape if input_shape is not _UNSET
                                          else num_classes)
    module = module_or_name
  for arg, value in (("module", module), ("input_shape", input_shape),
                     ("num_classes", num_classes)):
    if value is _UNSET:
      raise TypeError(f"make_model needs {arg}")
  if not isinstance(module, nn.Module):
    from tracefl_jax.models import nnx as nnx_adapter  # pylint: disable=g-import-not-at-top
    if not nnx_adapter.is_nnx(module):
      raise TypeError(f"module must be a Flax linen nn.Module or an NNX nnx.Module instance, "
                      f"got {type(module).__name__}")
    module = nnx_adapter.from_nnx(module)
  name = name or getattr(module, "nnx_kind", None) or type(module).__name__
  shape = check_shape_and_classes(input_shape, num_classes)
  explicit = traced_layers is not None
  traced = tuple(tuple(p) for p in traced_layers) if explicit else None
  kind = getattr(module, "nnx_kind", None) or type(module).__name__
  try:
    survey = _inspect(_ModuleKey(module), (1, *shape), jnp.dtype(input_dtype), traced)
  except MissingTracedLayers:
    raise
  except Exception as err:  # pylint: disable=broad-except
    raise ValueError(
        f"input_shape={shape}: an eval-mode forward pass of {kind} on one example of this "
        f"shape ({jnp.dtype(input_dtype).name}) failed with {type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}. input_shape is the shape of ONE "
        f"example, without the batch axis.") from err
  if tuple(survey.logits.shape) != (1, num_classes):
    raise ValueError(f"num_classes={num_classes}: {kind} returns logits of shape "
                     f"{tuple(survey.logits.shape)} for one example, not (1, {num_classes})")
  _reject_shared(survey.units)
  owners = survey.untraced
  if not survey.units:
    listed = ", ".join(f"{_label(p)} ({k})" for p, k in owners) or "none"
    raise ValueError(
        f"{kind} has no traced unit: no {_TRACED_NAMES} layer (NNX: Linear, LinearGeneral, "
        f"Einsum, Conv, LayerNorm) runs in its eval-mode forward pass. Its parameterised "
        f"submodules: {listed}. Pass traced_layers=(path, ...) naming the layers or blocks "
        f"to trace (a non-affine block is scored by the reference kernel).")
  unexpected = [p for p, k in owners if k not in UNTRACED_BY_DESIGN]
  if unexpected and not explicit:
    warnings.warn(
        f"{kind}: the parameterised submodule(s) {', '.join(map(_label, unexpected))} are not "
        f"traced (not a {_TRACED_NAMES} layer): their weights train but enter no client "
        f"score. Pass traced_layers to trace them (see ModelDef.untraced).", UserWarning,
        stacklevel=2)
  return ModelDef(name=name, module=module, input_shape=shape, num_classes=int(num_classes),
                  input_dtype=input_dtype,
                  traced_layers=traced if explicit else tuple(u.path for u in survey.units),
                  untraced=tuple(p for p, _ in owners))
