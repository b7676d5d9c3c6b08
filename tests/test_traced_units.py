"""Every layer traced or named: DenseGeneral and Einsum are traced and scored exactly, untraced
parameterised submodules are listed and warned about, a model without a traced unit and a
wrong input_shape / num_classes are clear errors at make_model."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracefl_jax.models import make_model
from tracefl_jax.provenance import trace_clients


class GeneralNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral(features=(2, 4), axis=-1)(x)           # [B, 2, 4]
    h = nn.relu(h.reshape(h.shape[0], -1))
    return nn.Einsum((8, 3), "bi,io->bo")(h)


class RawParam(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    return nn.Dense(3)(x * scale[None])


class OnlyRaw(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x @ self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 3))


def _clients(g, k=4, seed=1):
  keys = iter(jax.random.split(jax.random.key(seed), 32))
  return jax.tree.map(lambda a: a[None] * (1 + 0.3 * jax.random.normal(next(keys), (k, *a.shape))),
                      g)


def test_densegeneral_and_einsum_are_traced_and_scored_exactly():
  model = make_model(GeneralNet(), input_shape=(5,), num_classes=3)
  assert model.traced_layers == (("DenseGeneral_0",), ("Einsum_0",)) and model.untraced == ()
  g = model.init(jax.random.key(0))
  clients = _clients(g)
  x = jax.random.normal(jax.random.key(2), (6, 5))
  res = {k: trace_clients(model, g, clients, x, kernel=k, return_layers=True, use_decay=False)
         for k in ("grad", "jvp", "reference")}
  for k in ("grad", "jvp"):
    np.testing.assert_allclose(res[k].layer_scores, res["reference"].layer_scores,
                               rtol=1e-5, atol=1e-5)
  # The last unit by hand: client k's Einsum on G's input to it, at G's predicted class.
  pg = jax.tree.map(np.asarray, g["params"])
  h = np.maximum(np.einsum("bi,ijk->bjk", np.asarray(x), pg["DenseGeneral_0"]["kernel"])
                 + pg["DenseGeneral_0"]["bias"], 0).reshape(6, -1)
  pred = np.argmax(h @ pg["Einsum_0"]["kernel"] + pg["Einsum_0"]["bias"], axis=1)
  pc = jax.tree.map(np.asarray, clients["params"]["Einsum_0"])
  want = np.einsum("bi,kio->bko", h, pc["kernel"]) + pc["bias"][None]
  want = np.take_along_axis(want, pred[:, None, None], axis=2)[:, :, 0]
  np.testing.assert_allclose(res["reference"].layer_scores[1], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(res["reference"].predicted, pred)


def test_untraced_parameters_are_listed_and_warned_but_norms_and_embeddings_are_not():
  with pytest.warns(UserWarning, match="<the module's own self.param>.*not traced"):
    model = make_model(RawParam(), input_shape=(4,), num_classes=3)
  assert model.untraced == ((),) and model.traced_layers == (("Dense_0",),)

  class BN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Embed(10, 4)(x).reshape(x.shape[0], -1)
      return nn.Dense(3)(nn.BatchNorm(use_running_average=not train)(x))

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    model = make_model(BN(), input_shape=(2,), num_classes=3, input_dtype=jnp.int32)
  assert set(model.untraced) == {("Embed_0",), ("BatchNorm_0",)}


def test_model_without_traced_unit_names_its_parameters_and_the_way_out():
  with pytest.raises(ValueError, match=r"OnlyRaw has no traced unit.*self\.param.*traced_layers"):
    make_model(OnlyRaw(), input_shape=(4,), num_classes=3)


def test_make_model_argument_errors_and_optional_name():
  with pytest.warns(UserWarning):
    positional = make_model(RawParam(), (4,), 3)
  assert positional.name == "RawParam" and positional.input_shape == (4,)
  with pytest.warns(UserWarning):
    legacy = make_model("raw", RawParam(), (4,), 3)
  assert legacy.name == "raw" and legacy == positional  # the name is a label only
  with pytest.raises(ValueError, match=r"input_shape=\(4, 4\).*ONE example"):
    make_model(GeneralNet(), input_shape=(4, 4), num_classes=3)
  with pytest.raises(ValueError, match=r"num_classes=4.*\(1, 3\)"):
    make_model(GeneralNet(), input_shape=(5,), num_classes=4)
  with pytest.raises(ValueError, match=r"input_shape=\[\]"):
    make_model(GeneralNet(), input_shape=[], num_classes=3)
  with pytest.raises(TypeError, match="module must be a Flax"):
    make_model(lambda x: x, input_shape=(5,), num_classes=3)
