"""The model contract (`ModelDef`): any standard linen module trains, traces and caches."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tracefl_jax.fl.client import make_client_update
from tracefl_jax.models import ModelDef, get_model, inspect_units, make_model
from tracefl_jax.provenance import attribution, is_affine, trace_clients


class UserNet(nn.Module):
  """A textbook Flax module: standard BatchNorm and Dropout, no project conventions."""
  num_classes: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(6, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class NoTrainNet(nn.Module):
  """`__call__(x)` without a train argument."""

  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(8)(x.reshape(x.shape[0], -1)))
    return nn.Dense(3)(nn.LayerNorm()(h))


class SharedDense(nn.Module):
  """One Dense applied twice: shared weights."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    shared = nn.Dense(x.shape[-1], name="shared")
    return nn.Dense(3, name="head")(shared(nn.relu(shared(x))))


class _TwiceBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(x.shape[-1], name="shared")
    return shared(nn.relu(shared(x)))


class BlockNet(nn.Module):
  """The shared Dense inside a block that is traced as one (non-affine) unit."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3, name="head")(_TwiceBlock(name="block")(x))


class _SuperDense(nn.Dense):
  """A Dense subclass whose __call__ re-enters nn.Dense.__call__ on the same module."""

  @nn.compact
  def __call__(self, inputs):
    return super().__call__(inputs) * 2.0


class SuperNet(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3)(nn.relu(_SuperDense(5)(x)))


def _data(n, shape, classes, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(n, *shape)), jnp.float32),
          jnp.asarray(rng.integers(0, classes, n), jnp.int32))


def _train_clients(model, variables, x, y, counts, batch_size=4, epochs=2):
  """Trains one client per count (each on its own slice, padded to 8 slots); stacked outputs."""
  update = jax.jit(make_client_update(model, optax.sgd(0.1), batch_size, epochs))
  outs = []
  for k, count in enumerate(counts):
    indices = jnp.arange(8 * k, 8 * k + 8, dtype=jnp.int32)
    outs.append(update(variables, x, y, indices, jnp.int32(count), jax.random.key(10 + k)))
  return jax.tree.map(lambda *a: jnp.stack(a), *outs)


def _assert_scores_close(a, b, rtol=1e-5):
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def test_standard_batchnorm_dropout_module_trains_and_traces():
  model = make_model("user", UserNet(), (8, 8, 3), 4)
  assert model.traced_layers == (("Conv_0",), ("Dense_0",))
  assert model.accepts_train and not model.accepts_mask
  g = model.init(jax.random.key(0))
  assert set(g) == {"params", "batch_stats"}
  x, y = _data(32, (8, 8, 3), 4)

  # Train mode: batch statistics are updated, dropout draws from the "dropout" stream.
  out1, state1 = model.apply(g, x[:8], train=True, rng=jax.random.key(1))
  out2, _ = model.apply(g, x[:8], train=True, rng=jax.random.key(2))
  assert not np.allclose(out1, out2)
  assert not np.allclose(state1["batch_stats"]["BatchNorm_0"]["mean"],
                         g["batch_stats"]["BatchNorm_0"]["mean"])
  # A mask is dropped for a module that does not take one.
  out3, _ = model.apply(g, x[:8], train=True, rng=jax.random.key(1), mask=jnp.ones(8, bool))
  np.testing.assert_array_equal(out1, out3)

  clients = _train_clients(model, g, x, y, counts=(8, 5, 7))
  assert np.all(np.isfinite(clients.loss))
  np.testing.assert_array_equal(clients.num_steps, [4, 4, 4])
  for k in range(3):
    assert not np.allclose(clients.variables["batch_stats"]["BatchNorm_0"]["var"][k],
                           g["batch_stats"]["BatchNorm_0"]["var"])
  # G with non-trivial running statistics, so eval mode is observable.
  glob = jax.tree.map(lambda a: a[0], clients.variables)
  xq = x[:6]
  res = {k: trace_clients(model, glob, clients.variables, xq, kernel=k, return_layers=True)
         for k in ("grad", "reference")}
  _assert_scores_close(res["grad"].layer_scores, res["reference"].layer_scores)
  _assert_scores_close(res["grad"].scores, res["reference"].scores)
  assert attribution.choose_kernel(model) == "grad"
  # Eval mode: G's prediction uses running statistics, and an input's scores do not depend
  # on the rest of its batch (batch statistics would couple them).
  eval_logits = model.module.apply(glob, xq, train=False)
  np.testing.assert_array_equal(res["grad"].predicted, np.argmax(eval_logits, -1))
  single = trace_clients(model, glob, clients.variables, xq[:1], kernel="grad")
  _assert_scores_close(single.scores[0], res["grad"].scores[0])


def test_module_without_train_argument():
  model = make_model("notrain", NoTrainNet(), (2, 3), 3)
  assert not model.accepts_train and not model.accepts_mask
  assert model.traced_layers == (("Dense_0",), ("LayerNorm_0",), ("Dense_1",))
  g = model.init(jax.random.key(0))
  assert set(g) == {"params"}
  x, y = _data(24, (2, 3), 3)
  logits, state = model.apply(g, x, train=True, rng=jax.random.key(1), mask=jnp.ones(24, bool))
  np.testing.assert_array_equal(logits, model.logits(g, x))
  assert state == {} and logits.shape == (24, 3)
  clients = _train_clients(model, g, x, y, counts=(8, 3, 6))
  assert np.all(np.isfinite(clients.loss))
  assert not np.allclose(clients.variables["params"]["Dense_1"]["kernel"][1],
                         g["params"]["Dense_1"]["kernel"])
  res = {k: trace_clients(model, g, clients.variables, x[:5], kernel=k)
         for k in ("grad", "jvp", "reference")}
  _assert_scores_close(res["grad"].scores, res["reference"].scores)
  _assert_scores_close(res["jvp"].scores, res["reference"].scores)


def test_model_defs_equal_by_value_and_do_not_recompile():
  a, b = get_model("cnn", (8, 8, 1), 10), get_model("cnn", (8, 8, 1), 10)
  assert a is not b and a == b and hash(a) == hash(b)
  # The name is not part of the identity; the architecture and shapes are.
  renamed = make_model("other", a.module, (8, 8, 1), 10)
  assert renamed == a and hash(renamed) == hash(a)
  assert a != get_model("cnn", (8, 8, 1), 9)
  assert a != get_model("cnn", (12, 12, 1), 10)
  assert a != make_model("cnn", a.module, (8, 8, 1), 10, traced_layers=a.traced_layers[1:])
  g = a.init(jax.random.key(0))
  clients = jax.tree.map(lambda p: jnp.stack([p, 1.1 * p]), g)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  first = trace_clients(a, g, clients, x)
  before = attribution._trace._cache_size()  # pylint: disable=protected-access
  second = trace_clients(b, g, clients, x)
  assert attribution._trace._cache_size() == before  # pylint: disable=protected-access
  np.testing.assert_array_equal(first.scores, second.scores)


def test_unhashable_module_field_still_hashes():
  class ListNet(nn.Module):
    widths: list

    @nn.compact
    def __call__(self, x, train=False):
      for w in self.widths:
        x = nn.Dense(w)(x)
      return x

  a = make_model("l", ListNet([4, 3]), (2,), 3)
  b = make_model("l", ListNet([4, 3]), (2,), 3)
  assert a == b and hash(a) == hash(b)
  assert a != make_model("l", ListNet([5, 3]), (2,), 3)


def test_shared_traced_unit_is_rejected_with_its_path():
  with pytest.raises(ValueError, match=r"(?s)'shared'.*called 2 times.*overwrite"):
    make_model("shared", SharedDense(), (4,), 3)
  with pytest.raises(ValueError, match=r"'block/shared'"):
    make_model("block", BlockNet(), (4,), 3)
  # Tracing the enclosing block as one unit is the sanctioned way around it.
  model = make_model("block", BlockNet(), (4,), 3, traced_layers=(("block",), ("head",)))
  assert not is_affine(model)
  assert attribution.choose_kernel(model) == "reference"
  with pytest.raises(ValueError, match="never ran"):
    make_model("block", BlockNet(), (4,), 3, traced_layers=(("nope",),))


def test_reentrant_unit_counts_once_and_units_report_shapes():
  model = make_model("super", SuperNet(), (4,), 3)
  assert model.traced_layers == (("_SuperDense_0",), ("Dense_0",))
  units = inspect_units(UserNet(), (5, 8, 8, 3))
  assert [u.path for u in units] == [("Conv_0",), ("Dense_0",)]
  assert [u.output.shape for u in units] == [(5, 8, 8, 6), (5, 4)]
  assert [u.calls for u in units] == [1, 1]
  assert all(u.module.parent is None for u in units)
  assert isinstance(units[0].module, nn.Conv) and units[0].module.features == 6


def test_project_resnet_still_masks_padding_out_of_batch_statistics():
  model = get_model("resnet18_tiny", (16, 16, 3), 10)
  assert model.accepts_mask
  g = model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 16, 16, 3)).astype(np.float32)
  x[11] = 50.0  # the padding slots point here: it would dominate unmasked statistics
  x, y = jnp.asarray(x), jnp.asarray(rng.integers(0, 10, 12), jnp.int32)
  # One local step on 5 real examples in a batch of 8 (3 padded slots). Its BatchNorm
  # statistics are those of G's train-mode forward on the 5 real examples alone.
  padded = jax.jit(make_client_update(model, optax.sgd(0.05), 8, 1))(
      g, x, y, jnp.asarray([0, 1, 2, 3, 4, 11, 11, 11], jnp.int32), jnp.int32(5),
      jax.random.key(3))
  assert int(padded.num_steps) == 1
  train_stats = jax.jit(lambda xb: model.apply(g, xb, train=True)[1]["batch_stats"])
  plain = train_stats(x[:5])
  unmasked = train_stats(x[jnp.asarray([0, 1, 2, 3, 4, 11, 11, 11])])
  got = jax.tree.leaves(padded.variables["batch_stats"])
  for a, b in zip(got, jax.tree.leaves(plain), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert any(not np.allclose(a, b, rtol=1e-2)
             for a, b in zip(got, jax.tree.leaves(unmasked)))


def test_model_def_normalises_shapes():
  model = ModelDef("lin", NoTrainNet(), [2, 3], 3, traced_layers=[["Dense_0"]])
  assert model.input_shape == (2, 3) and model.traced_layers == (("Dense_0",),)
  assert hash(model) == hash(ModelDef("x", NoTrainNet(), (2, 3), 3, jnp.dtype("float32"),
                                      (("Dense_0",),)))


@pytest.mark.parametrize("build", [lambda: get_model("cnn", (8, 8, 1), 10),
                                   lambda: get_model("lenet", (28, 28, 1), 10),
                                   lambda: make_model(UserNet(), input_shape=(6, 6, 2),
                                                      num_classes=4)],
                         ids=["cnn", "lenet", "user_net"])
def test_init_is_bit_identical_to_flax_default_compilation(build):
  # ModelDef.init compiles at XLA:CPU optimisation level 1 (3-5x faster to compile than the
  # default); its variables must not move by a single bit.
  model = build()
  key = jax.random.key(7)
  ours = model.init(key)
  default = jax.jit(lambda k: model.module.init({"params": k, "dropout": k},
                                                jnp.zeros((1, *model.input_shape)),
                                                train=False))(key)
  assert jax.tree.structure(ours) == jax.tree.structure(dict(default))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(dict(default))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
