"""`canonical_conv`: the values and derivatives of `lax.conv_general_dilated`, and canonical
(NHWC / HWIO / NHWC) convolutions in the compiled gradient, also inside a loop."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracefl_jax.models.layers import canonical_conv

GEOMETRIES = [  # strides, padding, lhs_dilation, rhs_dilation, input shape
    ((1, 1), "SAME", (1, 1), (1, 1), (4, 9, 9, 3)),
    ((2, 2), "SAME", (1, 1), (1, 1), (4, 9, 9, 3)),
    ((2, 1), "VALID", (1, 1), (2, 1), (3, 11, 10, 2)),
    ((1, 1), ((1, 2), (0, 1)), (2, 1), (1, 1), (2, 7, 6, 3)),
]


@pytest.mark.parametrize("strides,padding,lhs_dil,rhs_dil,shape", GEOMETRIES)
def test_values_gradients_and_jvp_match_lax(strides, padding, lhs_dil, rhs_dil, shape):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, shape[-1], 5)), jnp.float32)
  args = (strides, padding, lhs_dil, rhs_dil, ("NHWC", "HWIO", "NHWC"))

  def ref(x, k):
    return jax.lax.conv_general_dilated(x, k, *args)

  def new(x, k):
    return canonical_conv(x, k, *args)

  def loss(conv):
    return lambda x, k: jnp.sum(jnp.sin(conv(x, k)))

  np.testing.assert_allclose(new(x, k), ref(x, k), rtol=1e-6, atol=1e-5)
  for a, b in zip(jax.grad(loss(new), (0, 1))(x, k), jax.grad(loss(ref), (0, 1))(x, k)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  tangents = (0.3 * x, 0.7 * k)
  np.testing.assert_allclose(jax.jvp(new, (x, k), tangents)[1],
                             jax.jvp(ref, (x, k), tangents)[1], rtol=1e-5, atol=1e-4)


def test_other_layouts_fall_back_to_lax():
  x = jnp.ones((2, 3, 8, 8))
  k = jnp.ones((4, 3, 3, 3))
  out = canonical_conv(x, k, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
  np.testing.assert_allclose(out, jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")))


def test_gradient_in_a_loop_uses_canonical_convolutions():
  """XLA:CPU canonicalises only top-level convolutions; in a while body the gradient's
  convolutions must already be NHWC / HWIO / NHWC (b01f_01io->b01f) to run fast."""
  conv = nn.Sequential([nn.Conv(4, (3, 3), padding="SAME", conv_general_dilated=canonical_conv),
                        nn.Conv(2, (3, 3), padding="SAME", conv_general_dilated=canonical_conv)])
  x = jnp.ones((2, 8, 8, 3))
  params = conv.init(jax.random.key(0), x)

  def steps(params):
    grad = jax.grad(lambda p: jnp.sum(conv.apply(p, x) ** 2))
    return jax.lax.fori_loop(0, 3, lambda i, p: jax.tree.map(lambda a, g: a - 0.1 * g, p,
                                                             grad(p)), params)

  hlo = jax.jit(steps).lower(params).compile().as_text()
  labels = re.findall(r"convolution\(.*?dim_labels=([^,]+)", hlo)
  assert len(labels) == 5  # 2 forward, 2 kernel gradients, 1 input gradient
  assert set(labels) == {"b01f_01io->b01f"}, labels


def test_plain_conv_model_gets_canonical_convolutions_through_modeldef():
  """A user's plain `nn.Conv` (no conv_general_dilated) trained through `ModelDef.apply` on
  CPU: canonical convolutions in the loop's gradient (issue 21's silent 7x trap), and the
  same loss and gradient as the module applied directly."""
  from tracefl_jax.models import make_model  # pylint: disable=g-import-not-at-top

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))
      x = nn.Conv(2, (3, 3), padding="SAME")(x)
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  model = make_model("plain_conv", Plain(), (8, 8, 3), 3)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
  params = model.init(jax.random.key(0))["params"]
  loss = lambda p: jnp.sum(model.logits({"params": p}, x) ** 2)  # noqa: E731
  direct = lambda p: jnp.sum(model.module.apply({"params": p}, x) ** 2)  # noqa: E731
  np.testing.assert_allclose(loss(params), direct(params), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(jax.grad(loss)(params)),
                  jax.tree.leaves(jax.grad(direct)(params))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  def steps(params):
    return jax.lax.fori_loop(0, 2, lambda i, p: jax.tree.map(
        lambda a, g: a - 0.1 * g, p, jax.grad(loss)(p)), params)
  hlo = jax.jit(steps).lower(params).compile().as_text()
  labels = re.findall(r"convolution\(.*?dim_labels=([^,]+)", hlo)
  assert labels and set(labels) == {"b01f_01io->b01f"}, labels
