r"""Scalability (paper section V-D): total clients 200..1000 x clients per round 10..50,
GPT on DBpedia, 15 rounds; the paper reports 99.5-100% localization.

  python -m tracefl_jax --config=configs/scale.py --workdir=runs/scale --sweep \
      --config.model.hf_path=/models/openai-gpt --config.dataset.tokenizer=/models/openai-gpt

Presets: (none) the paper's grid; `cpu`: the MLP on 20,000 synthetic 8x8 images, 200 and 400
clients x 10 and 20 per round, 2 rounds each (about 1 minute on 2 CPU cores).
Runtime on one H100: not measured yet.
"""

from tracefl_jax.experiment.config import base_config


def get_config(preset: str = ""):
  c = base_config()
  c.rounds = 15
  c.checkpoint.every = 0
  if preset == "cpu":
    c.model.name = "mlp"
    c.dataset.name = "synthetic"
    c.dataset.synthetic_shape = "8,8,1"
    c.dataset.synthetic_size = 20000  # >= 32 examples per client after the fix-up
    c.num_clients = 200
    c.rounds = 2
    return c
  c.model.name = "openai_gpt"
  c.dataset.name = "dbpedia"
  c.client.optimizer = "adamw"
  c.client.learning_rate = 5e-5
  c.num_clients = 1000
  return c


def get_sweep(preset: str = ""):
  if preset == "cpu":
    return {"num_clients": [200, 400], "clients_per_round": [10, 20]}
  return {"num_clients": [200, 400, 600, 800, 1000], "clients_per_round": [10, 20, 30, 40, 50]}
