"""Layers shared by the models and by provenance: convolution geometry, image patches, and
`PatchConv`, an `nn.Conv` (same parameters, same numbers) computed as image patches times a
matrix. `provenance/` imports these from here, not from a model module.
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


def _xla_conv(x: jax.Array, kernel: jax.Array, geo: ConvGeometry) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, geo.strides, geo.padding, lhs_dilation=geo.lhs_dilation,
      rhs_dilation=geo.rhs_dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
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
    terms.append(_xla_conv(dx, kernel, geo))
  if not isinstance(dkernel, SymbolicZero):
    terms.append(_matmul_conv(x, dkernel, geo))
  return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)
