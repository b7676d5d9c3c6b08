"""ResNet18 / DenseNet: torchvision architecture and names, weight import, BN in training."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from tests import torch_cnn_reference as ref
from tracefl_jax.fl.client import make_client_update
from tracefl_jax.data.federated import stack_client_indices
from tracefl_jax.models import get_model, make_model
from tracefl_jax.models.layers import PatchConv
from tracefl_jax.models.resnet import DenseNet, ResNet18
from tracefl_jax.models.torchvision_import import import_torchvision
from tracefl_jax.provenance import trace_clients


def test_full_size_architectures_match_torchvision_counts():
  for name, params, traced in (("resnet18", 11_689_512, 21), ("densenet121", 7_978_856, 121)):
    model = get_model(name, (32, 32, 3), 1000)
    variables = jax.eval_shape(model.init, jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == params, name
    assert len(model.traced_layers) == traced, name
  resnet = get_model("resnet18", (32, 32, 3), 10).traced_layers
  # The original's order: a block's downsample conv comes after its conv2.
  assert resnet[5:8] == (("layer2_0", "conv1"), ("layer2_0", "conv2"),
                         ("layer2_0", "downsample_0"))


@pytest.mark.parametrize("kind", ["resnet", "densenet"])
def test_imported_weights_give_torch_logits(kind, tmp_path):
  torch.manual_seed(0)
  if kind == "resnet":
    tmodel, ours = ref.ResNet18(7, width=8), ResNet18(num_classes=7, width=8)
  else:
    kw = dict(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2)
    tmodel, ours = ref.DenseNet(7, **kw), DenseNet(num_classes=7, **kw)
  ref.randomize_bn(tmodel)
  tmodel.eval()
  path = tmp_path / "weights.pt"
  torch.save(tmodel.state_dict(), path)
  model = make_model(kind, ours, (32, 32, 3), 7)
  variables = import_torchvision(model.init(jax.random.key(0)), path)
  x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    expected = tmodel(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(model.logits(variables, jnp.asarray(x)), expected, atol=1e-4,
                             rtol=1e-4)


def test_import_is_strict_and_can_skip_the_head(tmp_path):
  tmodel = ref.ResNet18(5, width=8)
  state = tmodel.state_dict()
  model = make_model("r", ResNet18(num_classes=3, width=8), (32, 32, 3), 3)
  variables = model.init(jax.random.key(0))
  with pytest.raises(ValueError, match=r"shape mismatch: fc.bias: \(5,\).*fc.weight: \(5, 64\)"):
    import_torchvision(variables, dict(state))
  out = import_torchvision(variables, dict(state), skip_head=True)
  np.testing.assert_array_equal(out["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"])
  del state["layer1.0.conv1.weight"]
  state["extra.weight"] = torch.zeros(1)
  with pytest.raises(ValueError, match=r"(?s)missing: layer1.0.conv1.weight.*unexpected: extra.weight"):
    import_torchvision(variables, dict(state), skip_head=True)
  with pytest.raises(FileNotFoundError):
    import_torchvision(variables, tmp_path / "nope.pt")


def test_batchnorm_resnet_trains_on_a_padded_client_and_traces():
  # That its batch statistics leave the padding out is asserted exactly in
  # test_model_contract.py (test_project_resnet_still_masks_padding_out_of_batch_statistics).
  model = get_model("resnet18_tiny", (16, 16, 3), 4)
  variables = model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(12, 16, 16, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, 12), jnp.int32)
  update = jax.jit(make_client_update(model, optax.sgd(0.05), 8, 1))
  data = stack_client_indices([np.arange(5)], [0], 8, length=16)  # 5 real, 11 junk slots
  outs = [update(variables, x, y, data.indices[0], data.counts[0], jax.random.key(1))]
  assert int(outs[0].num_steps) == 1
  stats0 = jax.tree.leaves(variables["batch_stats"])
  stats1 = jax.tree.leaves(outs[0].variables["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(stats0, stats1))  # running stats moved
  # The trained clients trace in eval mode; BatchNorm is not a traced unit.
  clients = jax.tree.map(lambda a, b: jnp.stack([a, b]), outs[0].variables, variables)
  res = {k: trace_clients(model, variables, clients, x[:3], kernel=k)
         for k in ("grad", "reference")}
  np.testing.assert_allclose(res["grad"].scores, res["reference"].scores, rtol=1e-4, atol=1e-5)
  assert len(model.traced_layers) == 21


def test_group_norm_variant_runs():
  model = get_model("resnet18_gn", (32, 32, 3), 10)
  variables = model.init(jax.random.key(0))
  assert "batch_stats" not in variables
  assert model.logits(variables, jnp.zeros((2, 32, 32, 3))).shape == (2, 10)


@pytest.mark.parametrize("strides,padding", [(1, "SAME"), (2, "SAME"), (1, "VALID"),
                                             (2, ((1, 2), (0, 1)))])
def test_patch_conv_equals_xla_conv(strides, padding):
  x = jax.random.normal(jax.random.key(0), (3, 9, 9, 4))
  ref = nn.Conv(5, (3, 3), strides=strides, padding=padding)
  variables = ref.init(jax.random.key(1), x)
  patch = PatchConv(5, (3, 3), strides=strides, padding=padding)
  np.testing.assert_allclose(patch.apply(variables, x), ref.apply(variables, x), rtol=1e-5,
                             atol=1e-5)
  # Its custom gradient (transposed convolution for the input, patches^T dy for the kernel).
  loss = lambda m: lambda v, xx: jnp.sum(jnp.sin(m.apply(v, xx)))  # noqa: E731
  for a, b in zip(jax.tree.leaves(jax.grad(loss(patch), argnums=(0, 1))(variables, x)),
                  jax.tree.leaves(jax.grad(loss(ref), argnums=(0, 1))(variables, x))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_patch_conv_dilation_and_unsupported_padding():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  ref = nn.Conv(4, (3, 3), kernel_dilation=2, padding="SAME")
  variables = ref.init(jax.random.key(1), x)
  got = PatchConv(4, (3, 3), kernel_dilation=2, padding="SAME").apply(variables, x)
  np.testing.assert_allclose(got, ref.apply(variables, x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="padding='CIRCULAR'"):
    PatchConv(4, (3, 3), padding="CIRCULAR").init(jax.random.key(1), x)


def test_patches_models_train_and_trace_like_the_xla_ones():
  """lenet_patches / cnn_patches: same parameter tree, same vmapped round, same provenance."""
  from tracefl_jax.data.federated import federate  # pylint: disable=import-outside-toplevel
  from tracefl_jax.fl.rounds import federated_averaging, round_key  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(40, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 40), jnp.int32)
  data = federate(x, y, np.split(np.arange(40), 4))
  outs = []
  for name in ("lenet_xla", "lenet_patches"):
    model = get_model(name, (8, 8, 1), 3)
    variables = model.init(jax.random.key(0))
    algorithm = federated_averaging(model, optax.sgd(0.1), batch_size=4, local_epochs=1,
                                    strategy="vmap")
    outs.append(algorithm.round(algorithm.init(variables), clients=np.arange(4), data=data,
                                key=round_key(jax.random.key(0), 1))[1])
  for a, b in zip(jax.tree.leaves(outs[0].clients.variables),
                  jax.tree.leaves(outs[1].clients.variables), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  cnn, cnn_p = get_model("cnn_xla", (8, 8, 1), 3), get_model("cnn_patches", (8, 8, 1), 3)
  g = cnn.init(jax.random.key(2))
  assert cnn_p.traced_layers == cnn.traced_layers
  clients = jax.tree.map(lambda a: a[None] * jnp.linspace(0.5, 1.5, 5).reshape(
      -1, *([1] * a.ndim)), g)
  ref = trace_clients(cnn, g, clients, x[:6])
  for kernel in ("grad", "reference"):
    got = trace_clients(cnn_p, g, clients, x[:6], kernel=kernel)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="unknown convolution implementation 'fft'; valid: auto"):
    get_model("lenet", (8, 8, 1), 3).module.clone(conv="fft").init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
