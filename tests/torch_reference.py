"""The original TraceFL procedure, written plainly in PyTorch (test-only reference).

As the original does it: for each input separately (batch 1), a forward pass with hooks that
record every traced layer's input and retain its output gradient, one backward of the
predicted class's logit, then a Python loop over layers x clients that evaluates the CLIENT's
layer (its own weights and bias) on the GLOBAL model's layer input and dots it with the
global output gradient; per-layer decay 0.9 ** (L - 1 - l); sum; softmax over clients.

Also: PyTorch twins of the test models, built from Flax parameters so both frameworks hold
identical weights (conv HWIO -> OIHW, dense [in, out] -> [out, in]; the torch models flatten
in NHWC order like Flax).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class TorchFedAvgCNN(nn.Module):
  """tracefl_jax.models.cnn.FedAvgCNN in PyTorch (max or average pooling)."""

  def __init__(self, in_ch: int, num_classes: int, features=(32, 64), hidden=512, flat=0,
               pool: str = "max"):
    super().__init__()
    self.conv1 = nn.Conv2d(in_ch, features[0], 5, padding=2)
    self.conv2 = nn.Conv2d(features[0], features[1], 5, padding=2)
    self.fc1 = nn.Linear(flat, hidden)
    self.fc2 = nn.Linear(hidden, num_classes)
    self.pool = F.max_pool2d if pool == "max" else F.avg_pool2d

  def traced(self):
    return [self.conv1, self.conv2, self.fc1, self.fc2]

  def forward(self, x):  # x: NHWC, like the Flax model
    x = x.permute(0, 3, 1, 2)
    x = self.pool(F.relu(self.conv1(x)), 2, 2)
    x = self.pool(F.relu(self.conv2(x)), 2, 2)
    x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return self.fc2(F.relu(self.fc1(x)))


class TorchNormNet(nn.Module):
  """The test models' Conv -> ReLU -> LayerNorm -> avg pool -> Dense -> ReLU -> Dense."""

  def __init__(self, in_ch: int, num_classes: int, ch: int, flat: int, hidden: int):
    super().__init__()
    self.conv = nn.Conv2d(in_ch, ch, 3, padding=1)
    self.norm = nn.LayerNorm(ch, eps=1e-6)
    self.fc1 = nn.Linear(flat, hidden)
    self.fc2 = nn.Linear(hidden, num_classes)

  def traced(self):
    return [self.conv, self.norm, self.fc1, self.fc2]

  def forward(self, x):
    x = F.relu(self.conv(x.permute(0, 3, 1, 2)))
    x = self.norm(x.permute(0, 2, 3, 1))                     # NHWC, normalise channels
    x = F.avg_pool2d(x.permute(0, 3, 1, 2), 2, 2).permute(0, 2, 3, 1)
    x = x.reshape(x.shape[0], -1)
    return self.fc2(F.relu(self.fc1(x)))


def torch_layer_params(flax_layer: dict) -> dict[str, torch.Tensor]:
  """One Flax layer's params as the torch module's state (weight, bias)."""
  out = {}
  for name, value in flax_layer.items():
    v = np.asarray(value, np.float32)
    if name == "kernel":
      v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
      out["weight"] = torch.from_numpy(np.ascontiguousarray(v))
    elif name == "scale":
      out["weight"] = torch.from_numpy(v.copy())
    else:
      out[name] = torch.from_numpy(v.copy())
  return out


def load_flax(model: nn.Module, flax_params: dict, paths) -> None:
  """Copies Flax params (traced layers at `paths`, forward order) into the torch model."""
  with torch.no_grad():
    for module, path in zip(model.traced(), paths):
      layer = flax_params
      for key in path:
        layer = layer[key]
      for name, tensor in torch_layer_params(layer).items():
        getattr(module, name).copy_(tensor)


def original_scores(model: nn.Module, client_layers: list[list[dict[str, torch.Tensor]]],
                    x: np.ndarray, decay: float = 0.9, forward=None,
                    layers: list[nn.Module] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """TraceFL as the original computes it: (T [N, K], predicted [N]).

  Args:
    model: the global model in eval mode, with `traced()` listing its traced modules.
    client_layers: per client, per traced layer, the layer's torch params.
    x: `[N, ...]` inputs.
    forward: optional `forward(x_n_batch1) -> logits [1, C]` (default `model(...)` on a
      float tensor); `layers`: the traced modules (default `model.traced()`).
  """
  model.eval()
  layers = layers if layers is not None else model.traced()
  if forward is None:
    forward = lambda xn: model(torch.from_numpy(np.asarray(xn, np.float32))[None])  # noqa: E731
  num_layers = len(layers)
  scores, predicted = [], []
  for xn in x:
    inputs, outputs = {}, {}
    hooks = []
    for l, layer in enumerate(layers):
      def hook(module, args, out, l=l):
        inputs[l] = args[0].detach()
        out.retain_grad()
        outputs[l] = out
      hooks.append(layer.register_forward_hook(hook))
    logits = forward(xn)
    for h in hooks:
      h.remove()
    y_hat = int(torch.argmax(logits[0]))
    logits[0, y_hat].backward()
    row = np.zeros(len(client_layers), np.float64)
    for l, layer in enumerate(layers):
      grad = outputs[l].grad
      beta = decay ** (num_layers - 1 - l)
      for k, client in enumerate(client_layers):
        out = torch.func.functional_call(layer, client[l], (inputs[l],))
        row[k] += beta * float(torch.sum(out * grad))
    scores.append(row)
    predicted.append(y_hat)
  return np.array(scores), np.array(predicted)


def pooling_near_ties(model: TorchFedAvgCNN, x: np.ndarray, rtol: float = 1e-5) -> np.ndarray:
  """`[N]` bool: some max-pooling window of the input holds two values within rtol of its
  maximum (gradient routing there is decided by float rounding, not by the math)."""
  ties = []
  with torch.no_grad():
    for xn in x:
      h = torch.from_numpy(np.asarray(xn, np.float32))[None].permute(0, 3, 1, 2)
      found = False
      for conv in (model.conv1, model.conv2):
        h = F.relu(conv(h))
        windows = F.unfold(h.reshape(-1, 1, *h.shape[2:]), 2, stride=2)  # [C, 4, P]
        top2 = torch.topk(windows, 2, dim=1).values
        close = (top2[:, 0] - top2[:, 1]) <= rtol * top2[:, 0].abs().clamp_min(1e-12)
        found |= bool(torch.any(close & (top2[:, 0] > 0)))
        h = F.max_pool2d(h, 2, 2)
      ties.append(found)
  return np.array(ties)
