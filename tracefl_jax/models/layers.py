"""Layers shared by the models and by provenance: convolution geometry, image patches,
`PatchConv`, an `nn.Conv` (same parameters, same numbers) computed as image patches times a
matrix, and `canonical_conv`, XLA's convolution with derivatives written in the layout that
XLA:CPU's fast convolution takes (`nn.Conv(..., conv_general_dilated=canonical_conv)`).
`provenance/` imports these from here, not from a model module.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


class ConvGeometry(NamedTuple):
  """A 2-D convolution's geometry as hashable tuples (usable as static arguments)."""
  window: tuple[int, int]
  strides: tuple[int, int]
  padding: str | tuple[tuple[int, int], ...]
  lhs_dilation: tuple[int, int]
  rhs_dilation: tuple[int, int]


def _pair(value: Any) -> tuple[int, int]:
  if value is None:
    return (1, 1)
  return (value, value) if isinstance(value, int) else tuple(value)


def conv_geometry(conv: nn.Conv) -> ConvGeometry:
  """The geometry of a 2-D `nn.Conv` (or `PatchConv`) without feature groups or a mask;
  a clear error for anything the patch formulation does not cover."""
  padding = conv.padding
  if (len(conv.kernel_size) != 2 or conv.feature_group_count != 1 or conv.mask is not None
      or (isinstance(padding, str) and padding not in ("SAME", "VALID"))):
    raise ValueError("the patch formulation covers 2-D convolutions without feature groups "
                     "or masks, with SAME, VALID or explicit padding; got kernel_size="
                     f"{conv.kernel_size}, feature_group_count={conv.feature_group_count}, "
                     f"padding={padding!r}")
  if isinstance(padding, int):
    padding = ((padding, padding),) * 2
  elif not isinstance(padding, str):
    padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  return ConvGeometry(tuple(conv.kernel_size), _pair(conv.strides), padding,
                      _pair(conv.input_dilation), _pair(conv.kernel_dilation))


def image_patches(x: jax.Array, geo: ConvGeometry) -> jax.Array:
  """[B, H', W', C_in * kh * kw]: each output position's input patch, features channel-major
  (C_in, kh, kw)."""
  return jax.lax.conv_general_dilated_patches(
      x, geo.window, geo.strides, geo.padding, lhs_dilation=geo.lhs_dilation,
      rhs_dilation=geo.rhs_dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)


class PatchConv(nn.Conv):
  """`nn.Conv` (same parameters, same numbers) computed as image patches times a matrix.

  Under `vmap` over clients, XLA lowers an `nn.Conv` with per-client kernels to a grouped
  convolution (slow on CPU, reported slow in the backward pass on GPU: jax issue 13800);
  this formulation becomes a batched matrix multiply over the client axis instead. Which one
  wins is a per-backend measurement (benchmarks/bench_round.py, `lenet_xla` vs
  `lenet_patches`). Supports 2-D kernels without feature groups or masks (`conv_geometry`).
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:  # pylint: disable=arguments-differ
    geo = conv_geometry(self)
    kernel = self.param("kernel", self.kernel_init,
                        (*geo.window, inputs.shape[-1], self.features), self.param_dtype)
    y = _patch_conv(inputs, kernel.astype(inputs.dtype), geo)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
    return y


CONV_IMPLS = ("auto", "xla", "patches")


def _matmul_conv(x: jax.Array, kernel: jax.Array, geo: ConvGeometry) -> jax.Array:
  matrix = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(-1, kernel.shape[-1])
  return jnp.einsum("...p,pf->...f", image_patches(x, geo), matrix,
                    precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _patch_conv(x: jax.Array, kernel: jax.Array, geo: ConvGeometry) -> jax.Array:
  return _matmul_conv(x, kernel, geo)


@functools.partial(_patch_conv.defjvp, symbolic_zeros=True)
def _patch_conv_jvp(geo, primals, tangents):
  # Tangent (and, transposed, gradient) rules: the input term as an ordinary convolution,
  # whose transpose is the usual transposed convolution (transposing the patch extraction
  # instead costs a convolution with a kh*kw times larger identity kernel); the kernel term
  # as patches x matrix, whose transpose is patches^T dy, one matmul.
  x, kernel = primals
  dx, dkernel = tangents
  y = _patch_conv(x, kernel, geo)
  terms = []
  if not isinstance(dx, SymbolicZero):
    terms.append(_input_tangent(dx, kernel, geo.strides, geo.padding, geo.lhs_dilation,
                                geo.rhs_dilation, jax.lax.Precision.HIGHEST))
  if not isinstance(dkernel, SymbolicZero):
    terms.append(_matmul_conv(x, dkernel, geo))
  return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


# ------------------------------------------------------------- canonical-layout convolutions
#
# XLA:CPU runs a 2-D convolution fast (Eigen) only in its canonical form: input NHWC, kernel
# HWIO, output NHWC. Its pass that rewrites other forms into that one (transposes around a
# canonical convolution) only visits the program's top level, so convolutions inside a
# `while_loop` body (a client's local steps, `lax.map` over clients) keep the forms JAX's
# derivative rules give them (kernel gradient `f01b_i01o->01bf`, input gradient with the
# kernel's I/O swapped) and run through a naive loop nest, several times slower than the same
# step jitted alone (benchmarks/README.md, "The step inside the round"). `canonical_conv`
# writes its derivatives as convolutions whose transposes (what `grad` runs) are canonical,
# with the transposes explicit, so the same step costs the same in a loop as alone.

_CANONICAL = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5, 6))
def _canonical_conv(x, kernel, strides, padding, lhs_dilation, rhs_dilation, precision):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, lhs_dilation, rhs_dilation,
                                      _CANONICAL, precision=precision)


@functools.partial(_canonical_conv.defjvp, symbolic_zeros=True)
def _canonical_conv_jvp(strides, padding, lhs_dilation, rhs_dilation, precision, primals,
                        tangents):
  # Each tangent is a convolution laid out so that JAX's transpose of it is canonical:
  # - input term: the kernel passed as HWOI (swapped), so the transposed convolution (the
  #   input gradient) sees the flipped kernel as HWIO;
  # - kernel term: x as CHWN, the kernel tangent as IHWO, the output as HWNC (then NHWC), so
  #   the transposed convolution (the kernel gradient) is x^T [C, H, W, N] convolved with
  #   dy [H', W', N, O] into [C, kh, kw, O], NHWC / HWIO / NHWC with C as the batch.
  x, kernel = primals
  dx, dkernel = tangents
  geometry = (strides, padding, lhs_dilation, rhs_dilation, precision)
  y = _canonical_conv(x, kernel, *geometry)
  terms = []
  if not isinstance(dx, SymbolicZero):
    terms.append(_input_tangent(dx, kernel, *geometry))
  if not isinstance(dkernel, SymbolicZero):
    t = jax.lax.conv_general_dilated(
        jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dkernel, (2, 0, 1, 3)), strides,
        padding, lhs_dilation, rhs_dilation, ("CHWN", "IHWO", "HWNC"), precision=precision)
    terms.append(jnp.transpose(t, (2, 0, 1, 3)))
  return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


def _input_tangent(dx, kernel, strides, padding, lhs_dilation, rhs_dilation, precision):
  """conv(dx, kernel) with the kernel passed as HWOI: its transpose (the input gradient) is a
  canonical convolution with the flipped kernel as HWIO."""
  return jax.lax.conv_general_dilated(dx, jnp.swapaxes(kernel, 2, 3), strides, padding,
                                      lhs_dilation, rhs_dilation, ("NHWC", "HWOI", "NHWC"),
                                      precision=precision)


def _standard_2d(dimension_numbers: Any, ndim: int) -> bool:
  if ndim != 4:
    return False
  if dimension_numbers is None:
    return False  # lax's default is NCHW / OIHW
  if isinstance(dimension_numbers, jax.lax.ConvDimensionNumbers):
    return tuple(map(tuple, dimension_numbers)) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  return tuple(dimension_numbers) == _CANONICAL


def canonical_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Any, padding: Any,
                   lhs_dilation: Any = None, rhs_dilation: Any = None,
                   dimension_numbers: Any = None, feature_group_count: int = 1,
                   batch_group_count: int = 1, precision: Any = None,
                   preferred_element_type: Any = None) -> jax.Array:
  """`jax.lax.conv_general_dilated` with the same values and derivatives; for 2-D NHWC / HWIO
  convolutions without groups its derivatives are canonical convolutions (see above), which
  XLA:CPU runs fast inside loops too. Anything else is passed to `conv_general_dilated`.
  Use it as `nn.Conv(..., conv_general_dilated=canonical_conv)`."""
  if (feature_group_count != 1 or batch_group_count != 1 or preferred_element_type is not None
      or not _standard_2d(dimension_numbers, lhs.ndim)):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)
  if not isinstance(padding, str):
    padding = tuple(tuple(int(v) for v in p) for p in padding)
  return _canonical_conv(lhs, rhs, tuple(window_strides), padding,
                         tuple(lhs_dilation or (1, 1)), tuple(rhs_dilation or (1, 1)),
                         precision)


def plain_convs_canonical(next_fun, args, kwargs, context):
  """An `nn.intercept_methods` interceptor giving every plain `nn.Conv` (no
  `conv_general_dilated` of its own) `canonical_conv` for the call: the same values and
  derivatives, and XLA:CPU's fast convolution inside the clients' step loops, without
  changing the user's model (`ModelDef.apply` installs it on CPU)."""
  module = context.module
  if (context.method_name == "__call__" and isinstance(module, nn.Conv)
      and module.conv_general_dilated is None and module.conv_general_dilated_cls is None):
    object.__setattr__(module, "conv_general_dilated", canonical_conv)
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(module, "conv_general_dilated", None)
  return next_fun(*args, **kwargs)
