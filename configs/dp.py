r"""DP-FedAvg (server-side fixed clipping) versus noise multiplier z, at clip norm C.

  python -m tracefl_jax --config=configs/dp.py:cpu --workdir=runs/dp --sweep

The paper's DP settings (GPT on DBpedia) are (z, C) in {(0.003, 15), (0.006, 10),
(0.012, 15)}, all with 100% localization; such small z give an epsilon the accountant
reports as unbounded. This sweep spans z from 0 to 1 on the embedded digits dataset.

Presets:
  cpu   z in {0.0, 0.003, 0.1, 0.5} at C = 1.0, 20 rounds: 4 runs, about 1.5 min on CPU.
  (none) z in {0.0, 0.003, 0.006, 0.012, 0.1, 0.3, 1.0} x C in {1, 10, 15}, 40 rounds.
"""

from tracefl_jax.experiment.config import base_config


def get_config(preset: str = ""):
  c = base_config()
  c.dp.enabled = True
  c.dp.clip_norm = 1.0
  c.rounds = 20 if preset == "cpu" else 40
  c.checkpoint.every = 0
  return c


def get_sweep(preset: str = ""):
  if preset == "cpu":
    return {"dp.noise_multiplier": [0.0, 0.003, 0.1, 0.5]}
  return {"dp.noise_multiplier": [0.0, 0.003, 0.006, 0.012, 0.1, 0.3, 1.0],
          "dp.clip_norm": [1.0, 10.0, 15.0]}
