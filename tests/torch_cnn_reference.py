"""ResNet18 and DenseNet in plain PyTorch with torchvision's module names (test-only: there is
no CPU build of torchvision here), so their state dicts have torchvision's keys."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return F.relu(out + identity)


class ResNet18(nn.Module):
  def __init__(self, num_classes, width=64):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    cin = width
    for stage in range(4):
      cout = width * 2 ** stage
      blocks = [BasicBlock(cin, cout, 2 if stage > 0 else 1), BasicBlock(cout, cout, 1)]
      setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
      cin = cout
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    for stage in range(4):
      x = getattr(self, f"layer{stage + 1}")(x)
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _DenseLayer(nn.Module):
  def __init__(self, cin, growth, bn_size):
    super().__init__()
    self.norm1 = nn.BatchNorm2d(cin)
    self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
    self.norm2 = nn.BatchNorm2d(bn_size * growth)
    self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

  def forward(self, x):
    y = self.conv1(F.relu(self.norm1(x)))
    return torch.cat([x, self.conv2(F.relu(self.norm2(y)))], 1)


class DenseNet(nn.Module):
  def __init__(self, num_classes, growth_rate=32, block_config=(6, 12, 24, 16),
               num_init_features=64, bn_size=4):
    super().__init__()
    f = nn.Sequential()
    f.add_module("conv0", nn.Conv2d(3, num_init_features, 7, 2, 3, bias=False))
    f.add_module("norm0", nn.BatchNorm2d(num_init_features))
    f.add_module("relu0", nn.ReLU())
    f.add_module("pool0", nn.MaxPool2d(3, 2, 1))
    c = num_init_features
    for b, n in enumerate(block_config):
      block = nn.Sequential()
      for i in range(n):
        block.add_module(f"denselayer{i + 1}", _DenseLayer(c + i * growth_rate, growth_rate,
                                                           bn_size))
      f.add_module(f"denseblock{b + 1}", block)
      c += n * growth_rate
      if b != len(block_config) - 1:
        t = nn.Sequential()
        t.add_module("norm", nn.BatchNorm2d(c))
        t.add_module("relu", nn.ReLU())
        t.add_module("conv", nn.Conv2d(c, c // 2, 1, bias=False))
        t.add_module("pool", nn.AvgPool2d(2, 2))
        f.add_module(f"transition{b + 1}", t)
        c //= 2
    f.add_module("norm5", nn.BatchNorm2d(c))
    self.features = f
    self.classifier = nn.Linear(c, num_classes)

  def forward(self, x):
    x = F.relu(self.features(x))
    return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
  """Non-trivial running statistics and affine parameters, so eval mode is a real test."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
        m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
