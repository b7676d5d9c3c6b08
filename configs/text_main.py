r"""The paper's main text results (Table II): OpenAI GPT and BERT-base-cased on DBpedia-14
and Yahoo Answers; Dirichlet alpha 0.3, 100 clients, 10 per round, AdamW 5e-5 constant,
batch 32, 2 local epochs, max length 128, provenance every round.

  python -m tracefl_jax --config=configs/text_main.py:gpt-dbpedia --workdir=runs/gpt-dbpedia \
      --config.model.hf_path=/models/openai-gpt --config.dataset.tokenizer=/models/openai-gpt \
      --config.dataset.data_dir=/data

`model.hf_path` is a local `save_pretrained` directory (config.json + model.safetensors);
`dataset.tokenizer` a local tokenizer directory; nothing is fetched from a hub.
Presets: {gpt, bert}-{dbpedia, yahoo}; `cpu`: tiny GPT on synthetic token data, 2 rounds
(about 20 s on 2 CPU cores).
Runtime on one H100: not measured yet (no GPU was lent to the session that wrote this).
Paper (TraceFL % / best global accuracy %): GPT DBpedia 100/98.58, Yahoo 100/69.04; BERT
DBpedia 98.57/99.12, Yahoo 99.80/70.61.
"""

from tracefl_jax.experiment.config import base_config


def get_config(preset: str = "gpt-dbpedia"):
  c = base_config()
  c.client.optimizer = "adamw"
  c.client.learning_rate = 5e-5
  c.rounds = 25
  if preset == "cpu":
    c.model.name = "gpt_tiny"
    c.dataset.name = "synthetic_text"
    c.dataset.synthetic_shape = "16"
    c.dataset.synthetic_classes = 4
    c.dataset.vocab_size = 60
    c.dataset.synthetic_size = 600
    c.client.learning_rate = 3e-3
    c.num_clients = 20
    c.clients_per_round = 4
    c.rounds = 2
    return c
  model, _, dataset = preset.partition("-")
  c.num_clients, c.clients_per_round = 100, 10
  if model not in ("gpt", "bert") or dataset not in ("dbpedia", "yahoo"):
    raise ValueError(f"unknown preset {preset!r}; valid: cpu, gpt-dbpedia, gpt-yahoo, "
                     "bert-dbpedia, bert-yahoo")
  c.model.name = "openai_gpt" if model == "gpt" else "bert_base"
  c.dataset.name = dataset
  return c
