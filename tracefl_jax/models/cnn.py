"""Small CNNs for the engine, the demo and the tests.

`FedAvgCNN` is the CNN of McMahan et al. (2017), "Communication-Efficient Learning of Deep
Networks from Decentralized Data": two 5x5 convolutions (32, 64 channels) each followed by
ReLU and 2x2 max pooling, a 512-unit dense layer and the classifier. `LeNet` is LeNet-5 sized
(6 and 16 channels, 120 and 84 hidden units) with average pooling. Both accept any image size
whose sides survive two 2x2 poolings ("SAME" convolutions). Their convolutions run as XLA
convolutions (`canonical_conv`, the default) or as patches x matrix (`PatchConv`); both have
the same parameters and give the same numbers.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from tracefl_jax.models.layers import CONV_IMPLS, PatchConv, canonical_conv


def _conv(impl: str):
  """The convolution module for `impl`: "xla" (the default, "auto") is `nn.Conv` with
  `canonical_conv`, whose derivatives XLA:CPU runs as fast inside the clients' step loops as
  alone; "patches" is `PatchConv` (a batched matmul under vmap over per-client kernels, where
  XLA would emit grouped convolutions); their speeds: benchmarks/README.md, "Convolution as
  patches x matrix".
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"unknown convolution implementation {impl!r}; valid: "
                     f"{', '.join(CONV_IMPLS)}")
  if impl in ("auto", "xla"):
    return functools.partial(nn.Conv, conv_general_dilated=canonical_conv)
  return PatchConv


class FedAvgCNN(nn.Module):
  num_classes: int
  features: tuple[int, int] = (32, 64)
  hidden: int = 512
  conv: str = "auto"  # "xla" (nn.Conv) or "patches" (`PatchConv`): same parameters and numbers

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout or BatchNorm
    for i, f in enumerate(self.features):
      x = _conv(self.conv)(f, (5, 5), padding="SAME", name=f"Conv_{i}")(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


class LeNet(nn.Module):
  num_classes: int
  conv: str = "auto"  # "xla" (nn.Conv) or "patches" (`PatchConv`): same parameters and numbers

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    for i, f in enumerate((6, 16)):
      x = _conv(self.conv)(f, (5, 5), padding="SAME", name=f"Conv_{i}")(x)
      x = nn.relu(x)
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(120)(x))
    x = nn.relu(nn.Dense(84)(x))
    return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
  """A dense network; cheap to vmap over clients on every backend."""
  num_classes: int
  hidden: tuple[int, ...] = (128, 64)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = x.reshape(x.shape[0], -1)
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.num_classes)(x)
