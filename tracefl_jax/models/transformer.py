"""BERT and OpenAI GPT sequence classifiers as Flax modules of our own.

Inputs are int32 token ids `[B, T]`; the attention mask is `ids != pad_token_id` (the
paper pads to max length 128), token types are all 0 (single-segment classification).
Parameter names follow Hugging Face's state-dict names so `hf_import.py` is a rename.
The MLP activation is named as in Hugging Face's `ACT2FN` (`ACTIVATIONS` below): BERT's
`hidden_act="gelu"` is the exact erf GELU; OpenAI GPT's `afn="gelu"` and GPT-2's
`activation_function="gelu_new"` are both the tanh approximation (`gelu_new`), the default
of `GPTClassifier`.

Traced units (spec section 2):
  GPT   per block c_attn, attn c_proj, ln_1, c_fc, mlp c_proj, ln_2 (post-LayerNorm GPT-1),
        then the score head: 12 * 6 + 1 = 73 for openai-gpt. All affine (Dense/LayerNorm).
  BERT  the embedding LayerNorm, each WHOLE encoder block (`BertLayer`, not affine: traced
        with the reference kernel), the pooler dense and the classifier: 15 for BERT-base.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

_NEG = jnp.finfo(jnp.float32).min


# Hugging Face activation names (transformers.activations.ACT2FN) -> JAX functions.
ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # exact: 0.5 x (1 + erf(x / sqrt 2))
    "gelu_python": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),  # 0.5x(1 + tanh(.79788(x + .044715x^3)))
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str):
  """The JAX function for a Hugging Face activation name."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def _attend(q, k, v, bias, heads):
  b, t, d = q.shape
  split = lambda a: a.reshape(b, -1, heads, d // heads).transpose(0, 2, 1, 3)  # noqa: E731
  q, k, v = split(q), split(k), split(v)
  w = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(jnp.float32(d // heads)) + bias
  out = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(w, axis=-1), v)
  return out.transpose(0, 2, 1, 3).reshape(b, t, d)


class BertLayer(nn.Module):
  """One BERT encoder block. `mask` `[B, T]` bool or None (attend everywhere: the original
  TraceFL evaluates client blocks without the mask, a parity mode)."""
  MASK_ARG = 1  # position of `mask` among the call's arguments (provenance parity mode)
  hidden: int
  heads: int
  intermediate: int
  eps: float = 1e-12
  dropout: float = 0.1
  act: str = "gelu"  # Hugging Face `hidden_act`; BERT's "gelu" is the exact erf GELU

  @nn.compact
  def __call__(self, x, mask=None, train: bool = False):
    bias = 0.0 if mask is None else jnp.where(mask[:, None, None, :], 0.0, _NEG)
    q = nn.Dense(self.hidden, name="attention_self_query")(x)
    k = nn.Dense(self.hidden, name="attention_self_key")(x)
    v = nn.Dense(self.hidden, name="attention_self_value")(x)
    a = nn.Dense(self.hidden, name="attention_output_dense")(_attend(q, k, v, bias, self.heads))
    a = nn.Dropout(self.dropout, deterministic=not train)(a)
    x = nn.LayerNorm(self.eps, name="attention_output_LayerNorm")(x + a)
    h = activation(self.act)(nn.Dense(self.intermediate, name="intermediate_dense")(x))
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.Dense(self.hidden,
                                                                   name="output_dense")(h))
    return nn.LayerNorm(self.eps, name="output_LayerNorm")(x + h)


class BertClassifier(nn.Module):
  num_classes: int
  vocab_size: int
  hidden: int = 768
  layers: int = 12
  heads: int = 12
  intermediate: int = 3072
  max_positions: int = 512
  type_vocab_size: int = 2
  pad_token_id: int = 0
  eps: float = 1e-12
  dropout: float = 0.1
  act: str = "gelu"

  @nn.compact
  def __call__(self, ids, train: bool = False):
    mask = ids != self.pad_token_id
    x = (nn.Embed(self.vocab_size, self.hidden, name="embeddings_word_embeddings")(ids)
         + nn.Embed(self.max_positions, self.hidden, name="embeddings_position_embeddings")(
             jnp.arange(ids.shape[1])[None])
         + nn.Embed(self.type_vocab_size, self.hidden,
                    name="embeddings_token_type_embeddings")(jnp.zeros_like(ids)))
    x = nn.LayerNorm(self.eps, name="embeddings_LayerNorm")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for i in range(self.layers):
      x = BertLayer(self.hidden, self.heads, self.intermediate, self.eps, self.dropout,
                    self.act, name=f"encoder_layer_{i}")(x, mask, train)
    pooled = jnp.tanh(nn.Dense(self.hidden, name="pooler_dense")(x[:, 0]))
    pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
    return nn.Dense(self.num_classes, name="classifier")(pooled)

  def traced_layers(self):
    return ((("embeddings_LayerNorm",),) + tuple((f"encoder_layer_{i}",)
                                                  for i in range(self.layers))
            + (("pooler_dense",), ("classifier",)))


class GPTBlock(nn.Module):
  """OpenAI GPT's post-LayerNorm block (x = ln_1(x + attn(x)); x = ln_2(x + mlp(x))), or
  GPT-2's pre-LayerNorm block (x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)))."""
  hidden: int
  heads: int
  eps: float = 1e-5
  dropout: float = 0.1
  pre_ln: bool = False
  act: str = "gelu_new"  # both OpenAI GPT (afn "gelu" -> gelu_new) and GPT-2 use tanh GELU

  @nn.compact
  def __call__(self, x, bias, train: bool = False):
    drop = nn.Dropout(self.dropout, deterministic=not train)
    ln_1, ln_2 = nn.LayerNorm(self.eps, name="ln_1"), nn.LayerNorm(self.eps, name="ln_2")
    act = activation(self.act)

    def attn(h):
      q, k, v = jnp.split(nn.Dense(3 * self.hidden, name="attn_c_attn")(h), 3, axis=-1)
      return drop(nn.Dense(self.hidden, name="attn_c_proj")(_attend(q, k, v, bias,
                                                                    self.heads)))

    def mlp(h):
      return drop(nn.Dense(self.hidden, name="mlp_c_proj")(
          act(nn.Dense(4 * self.hidden, name="mlp_c_fc")(h))))

    if self.pre_ln:
      x = x + attn(ln_1(x))
      return x + mlp(ln_2(x))
    x = ln_1(x + attn(x))
    return ln_2(x + mlp(x))


class GPTClassifier(nn.Module):
  """OpenAIGPTForSequenceClassification (or, with `gpt2=True`, GPT2ForSequenceClassification:
  pre-LayerNorm blocks and a final ln_f): causal + padding mask, the score head (no bias) on
  the last non-pad token (Hugging Face's pooling rule). Traced order is execution order:
  GPT-2's per block is ln_1, c_attn, c_proj, ln_2, c_fc, c_proj, then ln_f and score.

  `pad_token_id`: the tokenizer's pad id (openai-gpt has none; `load_tokenizer` appends
  [PAD] as id `len(original vocabulary)`), or None (no padding: pool the last position).
  `act`: a Hugging Face `ACT2FN` name; "gelu_new" (tanh GELU) for both GPT-1 and GPT-2."""
  num_classes: int
  vocab_size: int
  hidden: int = 768
  layers: int = 12
  heads: int = 12
  max_positions: int = 512
  pad_token_id: int | None = None
  eps: float = 1e-5
  dropout: float = 0.1
  gpt2: bool = False
  act: str = "gelu_new"

  @nn.compact
  def __call__(self, ids, train: bool = False):
    t = ids.shape[1]
    tok, pos = ("wte", "wpe") if self.gpt2 else ("tokens_embed", "positions_embed")
    x = (nn.Embed(self.vocab_size, self.hidden, name=tok)(ids)
         + nn.Embed(self.max_positions, self.hidden, name=pos)(jnp.arange(t)[None]))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if self.pad_token_id is None:
      keep = causal
    else:
      keep = causal & (ids != self.pad_token_id)[:, None, None, :]
    bias = jnp.where(keep, 0.0, _NEG)
    for i in range(self.layers):
      x = GPTBlock(self.hidden, self.heads, self.eps, self.dropout, self.gpt2, self.act,
                   name=f"h_{i}")(x, bias, train)
    if self.gpt2:
      x = nn.LayerNorm(self.eps, name="ln_f")(x)
    logits = nn.Dense(self.num_classes, use_bias=False, name="score")(x)  # [B, T, C]
    if self.pad_token_id is None:
      last = jnp.full((ids.shape[0],), t - 1)
    else:
      last = jnp.argmax(jnp.arange(t)[None] * (ids != self.pad_token_id), axis=-1)
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
