"""uint8 images on the device, normalised inside the jitted step: the same training as on the
float32 array normalised beforehand, a quarter of the device bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tracefl_jax.data import Dataset, Normalization
from tracefl_jax.data.federated import federate
from tracefl_jax.fl.rounds import GlobalEvaluator, federated_averaging, round_key
from tracefl_jax.models import get_model

NORM = Normalization((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
SIZES = (24, 7, 40, 0, 17)  # uneven, one empty client


@pytest.fixture(scope="module")
def pixels():
  rng = np.random.default_rng(0)
  n = sum(SIZES)
  return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, n, np.int32)


def _parts():
  starts = np.cumsum((0,) + SIZES)
  return [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]


def test_normalization_is_totensor_then_normalize(pixels):
  x = pixels[0][:4]
  expected = (x.astype(np.float32) / 255.0 - np.float32(NORM.mean)) / np.float32(NORM.std)
  np.testing.assert_array_equal(NORM(x), expected.astype(np.float32))
  np.testing.assert_allclose(np.asarray(jax.jit(NORM)(jnp.asarray(x))), expected, atol=1e-6)
  assert NORM(x).dtype == np.float32 and hash(NORM) == hash(Normalization(NORM.mean, NORM.std))


@pytest.mark.parametrize("strategy", ["scan", "vmap"])
def test_uint8_round_equals_normalised_float_round(pixels, strategy):
  x_u8, y = pixels
  model = get_model("mlp", (8, 8, 3), 10)  # the data path is what differs: a cheap model
  variables = model.init(jax.random.key(0))
  # SGD: Adam's first step is lr * sign(g), which turns a last-bit difference in a near-zero
  # gradient into a 1e-5 difference in the weights, whatever the data path.
  algorithm = federated_averaging(model, optax.sgd(0.05), batch_size=8, local_epochs=2,
                                  strategy=strategy)
  key = round_key(jax.random.key(0), 1)
  raw = federate(x_u8, y, _parts(), normalization=NORM)
  # The float array normalised by XLA, as the step normalises (NumPy rounds differently in
  # the last bit).
  floats = federate(jax.jit(NORM)(jnp.asarray(x_u8)), y, _parts())
  assert raw.x.dtype == jnp.uint8 and raw.x.nbytes * 4 == floats.x.nbytes
  _, a = algorithm.round(algorithm.init(variables), clients=[0, 1, 2, 3, 4], data=raw, key=key)
  _, b = algorithm.round(algorithm.init(variables), clients=[0, 1, 2, 3, 4], data=floats,
                         key=key)
  for u, v in zip(jax.tree.leaves((a.variables, a.clients)),
                  jax.tree.leaves((b.variables, b.clients))):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-6)
  assert int(a.steps_executed) == int(b.steps_executed)


def test_evaluator_holds_normalised_test_inputs(pixels):
  x_u8, y = pixels
  model = get_model("mlp", (8, 8, 3), 10)
  evaluator = GlobalEvaluator(model, x_u8[:20], y[:20], normalization=NORM)
  assert evaluator.x.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(evaluator.x), NORM(x_u8[:20]), atol=1e-6)
  variables = model.init(jax.random.key(1))
  plain = GlobalEvaluator(model, NORM(x_u8[:20]), y[:20])
  np.testing.assert_array_equal(evaluator.predictions(variables), plain.predictions(variables))


def test_uint8_needs_a_normalization(pixels):
  x_u8, y = pixels
  with pytest.raises(ValueError, match="uint8 pixels"):
    federate(x_u8, y, _parts())
  with pytest.raises(ValueError, match="uint8 pixels"):
    Dataset("d", x_u8[:4], y[:4], x_u8[:2], y[:2], 10)
  ds = Dataset("d", x_u8[:4], y[:4], x_u8[:2], y[:2], 10, normalization=NORM)
  np.testing.assert_array_equal(ds.normalize(ds.x_test), NORM(x_u8[:2]))
  with pytest.raises(ValueError, match="3 channel means but the inputs have 1"):
    Dataset("d", x_u8[:4, ..., :1], y[:4], x_u8[:2, ..., :1], y[:2], 10, normalization=NORM)


def test_runner_on_uint8_mnist_trains_traces_and_stores(tmp_path):
  """The experiment on a (tiny, random) local mnist.npz: the device holds uint8 pixels, the
  evaluator and provenance see normalised floats, and a stored round traces raw pixels as
  the run normalised them."""
  from tracefl_jax.experiment import runner  # pylint: disable=g-import-not-at-top
  from tracefl_jax.experiment.config import base_config
  from tracefl_jax.experiment.stored import trace_stored_round

  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (160, 28, 28), dtype=np.uint8)
  y = np.repeat(np.arange(10, dtype=np.uint8), 16)
  np.savez(tmp_path / "mnist.npz", x_train=x, y_train=y, x_test=x[:40], y_test=y[:40])
  c = base_config()
  c.dataset.name, c.dataset.data_dir, c.model.name = "mnist", str(tmp_path), "mlp"
  c.num_clients, c.clients_per_round, c.rounds = 4, 2, 1
  c.partition.fixup = False
  c.client.batch_size, c.client.local_epochs = 16, 1
  c.provenance.store_rounds = "1"
  summary = runner.run(c, tmp_path / "run", progress=False)
  assert summary["rounds"] == 1 and "provenance" in summary
  result, _ = trace_stored_round(tmp_path / "run", np.zeros((32, 32, 3), np.uint8), 1)
  mnist = Normalization((0.1307,), (0.3081,))
  expected, _ = trace_stored_round(tmp_path / "run", mnist(np.zeros((1, 32, 32, 3), np.uint8)),
                                   1)
  np.testing.assert_allclose(np.asarray(result.scores), np.asarray(expected.scores), rtol=1e-6)
