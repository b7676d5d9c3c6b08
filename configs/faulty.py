r"""Faulty-client localization (Table I): 10 clients, all participating every round, 15
rounds; client 0's training labels 1..13 flipped to 0; the first 10 test inputs the global
model mispredicts in that direction are traced; correct iff the traced client is faulty.

  python -m tracefl_jax --config=configs/faulty.py:resnet18-mnist --workdir=runs/faulty \
      --config.dataset.data_dir=/data

Presets: MODEL-DATASET as in image_main.py / text_main.py; `cpu`: the FedAvg CNN on the
embedded digits, 5 rounds (about 20 s on 2 CPU cores).
Runtime on one H100: not measured yet.
Paper: TraceFL 94-100% in all 18 settings; the FedDebug baseline 0-86% on images.
"""

from tracefl_jax.experiment.config import base_config


def get_config(preset: str = "cpu"):
  c = base_config()
  c.num_clients = 10
  c.clients_per_round = 10
  c.rounds = 15
  c.partition.method = "dirichlet"
  c.provenance.mode = "faulty"
  c.faulty.clients = "0"
  c.faulty.flip = ",".join(f"{k}:0" for k in range(1, 14))
  if preset == "cpu":
    c.rounds = 5
    c.faulty.flip = ",".join(f"{k}:0" for k in range(1, 10))  # digits has 10 labels
    return c
  model, _, dataset = preset.partition("-")
  c.model.name = {"gpt": "openai_gpt", "bert": "bert_base"}.get(model, model)
  c.dataset.name = dataset
  return c
