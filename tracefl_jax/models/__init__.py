"""Model registry: `get_model(name, input_shape, num_classes)` returns a `ModelDef`."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

from tracefl_jax.models.base import (TRACED_UNIT_TYPES, ModelDef, TracedUnit,
                                     discover_traced_layers, get_layer, inspect_units)
from tracefl_jax.models.build import check_shape_and_classes, make_model
from tracefl_jax.models.cnn import LeNet, FedAvgCNN, MLP
from tracefl_jax.models.resnet import DenseNet, ResNet18
from tracefl_jax.models.transformer import BertClassifier, GPTClassifier

# name -> factory(num_classes) returning a linen module.
_REGISTRY: dict[str, Callable[[int], nn.Module]] = {
    "cnn": lambda k: FedAvgCNN(num_classes=k),
    "lenet": lambda k: LeNet(num_classes=k),
    "mlp": lambda k: MLP(num_classes=k),
    # The same networks with the convolution implementation fixed (the plain names pick it
    # per backend): XLA convolutions, or patches x matrix (batched matmuls under vmap).
    "cnn_xla": lambda k: FedAvgCNN(num_classes=k, conv="xla"),
    "cnn_patches": lambda k: FedAvgCNN(num_classes=k, conv="patches"),
    "lenet_xla": lambda k: LeNet(num_classes=k, conv="xla"),
    "lenet_patches": lambda k: LeNet(num_classes=k, conv="patches"),
    "resnet18": lambda k: ResNet18(num_classes=k),
    "resnet18_gn": lambda k: ResNet18(num_classes=k, norm="group"),
    "densenet121": lambda k: DenseNet(num_classes=k),
    # CPU-sized variants of the same architectures, for tests and CPU presets.
    "resnet18_tiny": lambda k: ResNet18(num_classes=k, width=8),
    "densenet_tiny": lambda k: DenseNet(num_classes=k, growth_rate=4, block_config=(2, 2),
                                        num_init_features=8, bn_size=2),
}


# name -> factory(num_classes, seq_len, vocab_size, pad_token_id) for token-id inputs
# [B, seq_len]; `pad_token_id` None picks the model's default (`_TEXT_PAD_DEFAULTS`).
_TEXT_REGISTRY: dict[str, Callable[[int, int, int, int], nn.Module]] = {
    "bert_tiny": lambda k, t, v, pad: BertClassifier(num_classes=k, vocab_size=v, hidden=32,
                                                     layers=2, heads=2, intermediate=64,
                                                     max_positions=t, pad_token_id=pad),
    "gpt_tiny": lambda k, t, v, pad: GPTClassifier(num_classes=k, vocab_size=v, hidden=32,
                                                   layers=2, heads=2, max_positions=t,
                                                   pad_token_id=pad),
    "bert_base": lambda k, t, v, pad: BertClassifier(num_classes=k, vocab_size=v,
                                                     max_positions=max(t, 512),
                                                     pad_token_id=pad),
    "openai_gpt": lambda k, t, v, pad: GPTClassifier(num_classes=k, vocab_size=v,
                                                     max_positions=max(t, 512),
                                                     pad_token_id=pad),
}
# Default pad ids, as functions of vocab_size: BERT's WordPiece [PAD] is 0; the tiny models
# are for `synthetic_text`, which pads with 0; OpenAI GPT's tokenizer has no pad token and
# `load_tokenizer` appends [PAD] as the last id (40478 = len(tokenizer) - 1 for openai-gpt).
_TEXT_PAD_DEFAULTS: dict[str, Callable[[int], int]] = {
    "bert_tiny": lambda v: 0, "gpt_tiny": lambda v: 0, "bert_base": lambda v: 0,
    "openai_gpt": lambda v: v - 1,
}


def available_models() -> list[str]:
  return sorted([*_REGISTRY, *_TEXT_REGISTRY])


def register_model(name: str, factory: Callable[[int], nn.Module]) -> None:
  """Adds a model factory `factory(num_classes) -> nn.Module` under `name`."""
  if name in _REGISTRY:
    raise ValueError(f"model {name!r} is already registered")
  _REGISTRY[name] = factory


# Registered convolutional networks: their examples are images (height, width, channels).
_IMAGE_MODELS = frozenset(n for n in _REGISTRY if not n.startswith("mlp"))


def _check_shape_and_classes(name: str, input_shape: tuple[int, ...], num_classes: int) -> None:
  """One-line errors instead of Flax/XLA tracebacks from inside the first forward pass."""
  shape = check_shape_and_classes(input_shape, num_classes)
  if name in _TEXT_REGISTRY and len(shape) != 1:
    raise ValueError(f"text model {name!r} takes token ids: input_shape must be (seq_len,), "
                     f"got {shape}")
  if name in _IMAGE_MODELS and len(shape) != 3:
    raise ValueError(f"model {name!r} takes images: input_shape must be (height, width, "
                     f"channels), got {shape}")


def get_model(name: str, input_shape: tuple[int, ...], num_classes: int,
              vocab_size: int | None = None, *, pad_token_id: int | None = None) -> ModelDef:
  """The registered model `name` for examples of `input_shape` and `num_classes` labels.

  Text models (`bert_tiny`, `gpt_tiny`, `bert_base`, `openai_gpt`; randomly initialised;
  pretrained checkpoints load through `hf_import.load_hf_classifier`) take token ids of
  shape `(seq_len,)` and need `vocab_size`. Pass the tokenizer's `pad_token_id` (its pads
  are masked out of attention and GPT pools the last non-pad token); None picks the model's
  default: 0 for `bert_*` and `gpt_tiny` (synthetic_text pads with 0), `vocab_size - 1` for
  `openai_gpt` (the [PAD] that `load_tokenizer` appends to GPT's vocabulary).

  Raises ValueError for an unknown name, `num_classes < 1`, an empty or non-positive
  `input_shape`, a text model's shape other than `(seq_len,)` and a convolutional model's
  other than `(height, width, channels)`.
  """
  if name not in _REGISTRY and name not in _TEXT_REGISTRY:
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(available_models())}")
  _check_shape_and_classes(name, input_shape, num_classes)
  if name in _TEXT_REGISTRY:
    if not vocab_size:
      raise ValueError(f"text model {name!r} needs vocab_size")
    if pad_token_id is None:
      pad_token_id = _TEXT_PAD_DEFAULTS[name](vocab_size)
    if not 0 <= pad_token_id < vocab_size:
      raise ValueError(f"text model {name!r}: pad_token_id={pad_token_id} is outside the "
                       f"vocabulary [0, {vocab_size})")
    module = _TEXT_REGISTRY[name](num_classes, input_shape[0], vocab_size, pad_token_id)
    traced = module.traced_layers() if isinstance(module, BertClassifier) else None
    return make_model(name, module, tuple(input_shape), num_classes, input_dtype=jnp.int32,
                      traced_layers=traced)
  return make_model(name, _REGISTRY[name](num_classes), tuple(input_shape), num_classes)


__all__ = ["TRACED_UNIT_TYPES", "ModelDef", "TracedUnit", "available_models",
           "discover_traced_layers", "get_layer", "get_model", "inspect_units", "make_model",
           "register_model"]
