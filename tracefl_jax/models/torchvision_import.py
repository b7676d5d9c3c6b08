"""Import torchvision-format weights (ResNet18, DenseNet121) into the Flax models.

A torchvision state dict (a `.pt`/`.pth` file saved with `torch.save(model.state_dict())`,
or a `.safetensors` file) maps onto our variables by name: our module path with `_` read as
`.` (`layer1_0.conv1` is torchvision's `layer1.0.conv1`), the inner `norm` of our norm
wrappers dropped; conv weights OIHW -> HWIO, linear [out, in] -> [in, out], BatchNorm
weight/bias/running_mean/running_var -> scale/bias (params) and mean/var (batch_stats).
`num_batches_tracked` has no Flax counterpart and is ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight",
         ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
         ("batch_stats", "var"): "running_var"}


def load_state_dict(source: str | Path | dict[str, Any]) -> dict[str, np.ndarray]:
  """A torchvision state dict as NumPy arrays, from a dict, a .pt/.pth or a .safetensors."""
  if isinstance(source, dict):
    return {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
            for k, v in source.items()}
  path = Path(source)
  if not path.exists():
    raise FileNotFoundError(f"no weights file at {path}")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(str(path)))
  import torch  # pylint: disable=g-import-not-at-top
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for corrupt files
    raise ValueError(f"{path} is not a readable PyTorch state dict: {e}") from e
  if not isinstance(state, dict):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
  return load_state_dict(state)


def _torch_name(collection: str, path: tuple[str, ...]) -> str:
  *modules, leaf = path
  if modules and modules[-1] == "norm" and leaf in ("scale", "bias", "mean", "var"):
    modules = modules[:-1]  # our _Norm wrapper's inner BatchNorm
  return ".".join(m.replace("_", ".") for m in modules) + "." + _LEAF[(collection, leaf)]


def import_torchvision(variables: dict[str, Any], state_dict: str | Path | dict[str, Any], *,
                       skip_head: bool = False,
                       head_names: tuple[str, ...] = ("fc", "classifier")) -> dict[str, Any]:
  """`variables` with every leaf replaced by its torchvision counterpart.

  Args:
    variables: our model's variables (`{"params", "batch_stats"}`), e.g. from `init`.
    state_dict: a torchvision state dict or a path to one.
    skip_head: keep our (freshly initialised) classifier, e.g. ImageNet weights for a
      10-class task; the head's torch keys are then ignored.

  Raises:
    ValueError: naming missing keys, unexpected keys and shape mismatches.
  """
  torch_state = {k: v for k, v in load_state_dict(state_dict).items()
                 if not k.endswith("num_batches_tracked")}
  used, missing, mismatched = set(), [], []
  out = {}
  for collection, tree in variables.items():
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    leaves = []
    for keypath, leaf in flat:
      path = tuple(k.key for k in keypath)
      name = _torch_name(collection, path)
      if skip_head and path[0] in head_names:
        used.add(name)
        leaves.append(leaf)
        continue
      if name not in torch_state:
        missing.append(name)
        leaves.append(leaf)
        continue
      used.add(name)
      value = torch_state[name]
      if path[-1] == "kernel":
        value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
      if value.shape != leaf.shape:
        mismatched.append(f"{name}: {torch_state[name].shape} (torch layout) does not fit "
                          f"ours {leaf.shape}")
      leaves.append(np.asarray(value, leaf.dtype))
    out[collection] = jax.tree.unflatten(jax.tree.structure(tree), leaves)
  unexpected = sorted(k for k in torch_state if k not in used
                      and not (skip_head and k.split(".")[0] in head_names))
  if missing or unexpected or mismatched:
    raise ValueError("torchvision weights do not match the model:"
                     + (f"\n  missing: {', '.join(missing[:20])}" if missing else "")
                     + (f"\n  unexpected: {', '.join(unexpected[:20])}" if unexpected else "")
                     + (f"\n  shape mismatch: {'; '.join(mismatched[:20])}" if mismatched
                        else ""))
  return out
