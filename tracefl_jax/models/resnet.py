"""ResNet18 and DenseNet121 with torchvision's architectures, in Flax.

Module and parameter names follow torchvision's state-dict names (`conv1`, `layer1_0.conv1`,
`features.denseblock1.denselayer1.conv1`, ...) with `.` replaced by nesting and `layerX.Y`
spelt `layerX_Y`, so importing torchvision weights is a rename (`torchvision_import.py`).
Execution order equals torchvision's registration order (a BasicBlock's downsample runs after
its conv2), so the traced-layer order is the original's: ResNet18 21 traced layers (20 conv
+ fc), DenseNet121 121 (120 conv + classifier).

BatchNorm matches torch's eval semantics (running statistics, eps 1e-5, momentum 0.1 as
flax momentum 0.9) and takes an example `mask` in training, so padded slots of a client's
last, partial batch do not enter the batch statistics. `norm="group"` swaps every BatchNorm
for GroupNorm (32 groups, or fewer for narrow layers).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tracefl_jax.models.layers import canonical_conv


class _Norm(nn.Module):
  """BatchNorm (torch semantics) or GroupNorm, with an optional example mask."""
  kind: str = "batch"

  @nn.compact
  def __call__(self, x, train: bool, mask: jax.Array | None = None):
    if self.kind == "group":
      return nn.GroupNorm(num_groups=_groups(x.shape[-1]), epsilon=1e-5, name="norm")(x)
    m = None if mask is None else mask.reshape(-1, *([1] * (x.ndim - 1)))
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        name="norm")(x, mask=None if m is None else jnp.broadcast_to(m, x.shape))


def _groups(channels: int) -> int:
  g = min(32, channels)
  while channels % g:
    g -= 1
  return g


def _conv(features, kernel, stride=1, name=None):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False, name=name,
                 conv_general_dilated=canonical_conv)  # fast in local-step loops on CPU


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class BasicBlock(nn.Module):
  features: int
  stride: int = 1
  norm: str = "batch"

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    out = _conv(self.features, 3, self.stride, "conv1")(x)
    out = nn.relu(_Norm(self.norm, name="bn1")(out, train, mask))
    out = _conv(self.features, 3, 1, "conv2")(out)
    out = _Norm(self.norm, name="bn2")(out, train, mask)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.stride, "downsample_0")(x)
      x = _Norm(self.norm, name="downsample_1")(x, train, mask)
    return nn.relu(out + x)


class ResNet18(nn.Module):
  """torchvision.models.resnet18 (7x7/2 stem, 3x3/2 max pool, [2, 2, 2, 2] BasicBlocks)."""
  num_classes: int
  width: int = 64
  norm: str = "batch"

  @nn.compact
  def __call__(self, x, train: bool = False, mask: jax.Array | None = None):
    x = _conv(self.width, 7, 2, "conv1")(x)
    x = _max_pool_3x3_s2(nn.relu(_Norm(self.norm, name="bn1")(x, train, mask)))
    for stage in range(4):
      features = self.width * 2 ** stage
      for block in range(2):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, stride, self.norm, name=f"layer{stage + 1}_{block}")(
            x, train, mask)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)


class DenseLayer(nn.Module):
  growth_rate: int
  bn_size: int
  norm: str = "batch"

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    y = nn.relu(_Norm(self.norm, name="norm1")(x, train, mask))
    y = _conv(self.bn_size * self.growth_rate, 1, 1, "conv1")(y)
    y = nn.relu(_Norm(self.norm, name="norm2")(y, train, mask))
    y = _conv(self.growth_rate, 3, 1, "conv2")(y)
    return jnp.concatenate([x, y], axis=-1)


class DenseNet(nn.Module):
  """torchvision.models.densenet121 by default (growth 32, blocks (6, 12, 24, 16), bn 4)."""
  num_classes: int
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int = 4
  norm: str = "batch"

  @nn.compact
  def __call__(self, x, train: bool = False, mask: jax.Array | None = None):
    x = _conv(self.num_init_features, 7, 2, "features_conv0")(x)
    x = _max_pool_3x3_s2(nn.relu(_Norm(self.norm, name="features_norm0")(x, train, mask)))
    channels = self.num_init_features
    for b, layers in enumerate(self.block_config):
      for i in range(layers):
        x = DenseLayer(self.growth_rate, self.bn_size, self.norm,
                       name=f"features_denseblock{b + 1}_denselayer{i + 1}")(x, train, mask)
      channels += layers * self.growth_rate
      if b != len(self.block_config) - 1:
        name = f"features_transition{b + 1}"
        x = nn.relu(_Norm(self.norm, name=f"{name}_norm")(x, train, mask))
        channels //= 2
        x = _conv(channels, 1, 1, f"{name}_conv")(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(_Norm(self.norm, name="features_norm5")(x, train, mask))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="classifier")(x)
