"""Import Hugging Face BERT / OpenAI GPT checkpoints from a local directory.

`load_hf_classifier(path, num_classes)` reads a directory written by `save_pretrained`
(config.json plus model.safetensors) with transformers' config classes and safetensors, builds
our Flax module from the config, and maps the weights by name: torch Linear weights
[out, in] are transposed, GPT's Conv1D weights are already [in, out], LayerNorm weight ->
scale, embeddings -> embedding. A base checkpoint without a classification head (the paper
fine-tunes pretrained base models) keeps our freshly initialised head. Nothing is fetched
from a hub: transformers runs with HF_HUB_OFFLINE=1 here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from tracefl_jax.models.base import ModelDef
from tracefl_jax.models.build import make_model
from tracefl_jax.models.transformer import ACTIVATIONS, BertClassifier, GPTClassifier

# Module-name pieces whose underscores are part of the Hugging Face name.
_KEEP = ("word_embeddings", "position_embeddings", "token_type_embeddings", "tokens_embed",
         "positions_embed", "c_attn", "c_proj", "c_fc", "ln_1", "ln_2", "ln_f")
_CONV1D = ("c_attn", "c_proj", "c_fc")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}


def _hf_module(name: str) -> str:
  for keep in _KEEP:
    name = name.replace(keep, keep.replace("_", "\0"))
  return name.replace("_", ".").replace("\0", "_")


def _read(path: Path) -> tuple[Any, dict[str, np.ndarray]]:
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from transformers import AutoConfig  # pylint: disable=g-import-not-at-top
  if not (path / "config.json").exists():
    raise FileNotFoundError(f"no Hugging Face checkpoint at {path} (config.json missing)")
  weights = path / "model.safetensors"
  if not weights.exists():
    raise FileNotFoundError(f"{path} has no model.safetensors (save with "
                            "save_pretrained(..., safe_serialization=True))")
  return AutoConfig.from_pretrained(str(path), local_files_only=True), load_file(str(weights))


# OpenAI GPT's own activation table (modeling_openai.ACT_FNS): its "gelu" is the tanh
# approximation gelu_new, unlike ACT2FN["gelu"] (exact erf) used by BERT and GPT-2.
_OPENAI_AFN = {"gelu": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}


def _activation(config: Any) -> str:
  """The ACT2FN name of the config's MLP activation (`afn`, `activation_function`,
  `hidden_act`)."""
  if config.model_type == "openai-gpt":
    name = _OPENAI_AFN.get(config.afn)
    if name is None:
      raise ValueError(f"openai-gpt with afn={config.afn!r} is not supported; supported: "
                       f"{', '.join(_OPENAI_AFN)}")
    return name
  name = config.hidden_act if config.model_type == "bert" else config.activation_function
  if name not in ACTIVATIONS:
    raise ValueError(f"{config.model_type} with activation {name!r} is not supported; "
                     f"supported: {', '.join(ACTIVATIONS)}")
  return name


def build_module(config: Any, num_classes: int):
  """Our module for a transformers config (BertConfig, OpenAIGPTConfig or GPT2Config)."""
  kind = config.model_type
  if kind == "bert":
    return BertClassifier(
        num_classes=num_classes, vocab_size=config.vocab_size, hidden=config.hidden_size,
        layers=config.num_hidden_layers, heads=config.num_attention_heads,
        intermediate=config.intermediate_size, max_positions=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size, pad_token_id=config.pad_token_id or 0,
        eps=config.layer_norm_eps, dropout=config.hidden_dropout_prob,
        act=_activation(config))
  if kind in ("openai-gpt", "gpt2"):
    return GPTClassifier(
        num_classes=num_classes, vocab_size=config.vocab_size, hidden=config.n_embd,
        layers=config.n_layer, heads=config.n_head, max_positions=config.n_positions,
        pad_token_id=config.pad_token_id, eps=config.layer_norm_epsilon,
        dropout=config.resid_pdrop, gpt2=kind == "gpt2", act=_activation(config))
  raise ValueError(f"unsupported model_type {kind!r}; supported: bert, openai-gpt, gpt2")


def import_weights(variables: dict[str, Any], state: dict[str, np.ndarray], kind: str,
                   ) -> dict[str, Any]:
  """Our variables with every leaf replaced by its Hugging Face counterpart (strict)."""
  prefix, head = ("bert.", "classifier") if kind == "bert" else ("transformer.", "score")
  has_prefix = any(k.startswith(prefix) for k in state)
  used, missing, mismatched, leaves = set(), [], [], []
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables["params"])
  for keypath, leaf in flat:
    *modules, leaf_name = (k.key for k in keypath)
    name = ".".join(_hf_module(m) for m in modules) + "." + _LEAF[leaf_name]
    if modules[0] != head and has_prefix:
      name = prefix + name
    if name not in state:
      if modules[0] == head:  # a base checkpoint: keep our fresh classification head
        leaves.append(leaf)
        continue
      missing.append(name)
      leaves.append(leaf)
      continue
    used.add(name)
    value = state[name]
    if leaf_name == "kernel" and not any(c in modules[-1] for c in _CONV1D):
      value = value.T
    if value.shape != leaf.shape:
      mismatched.append(f"{name}: {state[name].shape} does not fit ours {leaf.shape}")
    leaves.append(np.asarray(value, leaf.dtype))
  ignored = ("position_ids", "attn.bias", "masked_bias")  # buffers, not weights
  unexpected = sorted(k for k in state if k not in used and not k.endswith(ignored)
                      and (has_prefix and k.startswith(prefix) or k.split(".")[0] == head))
  if missing or unexpected or mismatched:
    raise ValueError("Hugging Face weights do not match the model:"
                     + (f"\n  missing: {', '.join(missing[:20])}" if missing else "")
                     + (f"\n  unexpected: {', '.join(unexpected[:20])}" if unexpected else "")
                     + (f"\n  shape mismatch: {'; '.join(mismatched[:20])}" if mismatched
                        else ""))
  return {**variables, "params": jax.tree.unflatten(treedef, leaves)}


def _grow_embeddings(state: dict[str, np.ndarray], vocab_size: int,
                     seed: int) -> dict[str, np.ndarray]:
  """Appends rows (N(0, 0.02), as HF initialises them) to token-embedding matrices that are
  smaller than `vocab_size`: the tokenizer gained tokens (GPT's added [PAD])."""
  rng = np.random.default_rng(seed)
  out = dict(state)
  for name in ("transformer.tokens_embed.weight", "tokens_embed.weight",
               "transformer.wte.weight", "wte.weight",
               "bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"):
    if name in out and out[name].shape[0] < vocab_size:
      w = out[name]
      extra = rng.normal(0.0, 0.02, size=(vocab_size - w.shape[0], w.shape[1]))
      out[name] = np.concatenate([w, extra.astype(w.dtype)])
  return out


def load_hf_classifier(path: str | Path, num_classes: int | None = None, *,
                       seq_len: int = 128, seed: int = 0, vocab_size: int | None = None,
                       pad_token_id: int | None = None) -> tuple[ModelDef, dict[str, Any]]:
  """(ModelDef, variables) for the checkpoint in `path`, inputs `[B, seq_len]` token ids.

  `vocab_size` (e.g. `len(tokenizer)` after `load_tokenizer` added GPT's [PAD]) grows the
  token embeddings; `pad_token_id` overrides the checkpoint's (padding is masked out and
  GPT pools the last non-pad token).
  """
  path = Path(path)
  config, state = _read(path)
  if vocab_size and vocab_size > config.vocab_size:
    state = _grow_embeddings(state, vocab_size, seed)
    config.vocab_size = vocab_size
  if pad_token_id is not None:
    config.pad_token_id = pad_token_id
  num_classes = num_classes or config.num_labels
  module = build_module(config, num_classes)
  traced = module.traced_layers() if isinstance(module, BertClassifier) else None
  model = make_model(config.model_type, module, (seq_len,), num_classes,
                     input_dtype=np.int32, traced_layers=traced)
  variables = model.init(jax.random.key(seed))
  return model, import_weights(variables, state, config.model_type)
