r"""Localization accuracy versus Dirichlet alpha (the paper's non-IID sweep, Fig. 5 style).

  python -m tracefl_jax --config=configs/sweep_alpha.py:cpu --workdir=runs/sweep_alpha --sweep

Presets:
  cpu   the embedded digits dataset, 100 clients, 10 per round, 20 rounds; alpha in
        {0.1, 0.3, 1.0} x seeds {1, 2}: 6 runs, about 2 minutes on 2 CPU cores.
  (none) alpha in {0.1, 0.2, ..., 1.0} x seeds {1, 2, 3}, 40 rounds each.
The paper reports TraceFL at 99% overall (ResNet18 75-91% at other alphas); the random
participant baseline is reported beside every number.
"""

from tracefl_jax.experiment.config import base_config


def get_config(preset: str = ""):
  c = base_config()
  c.rounds = 20 if preset == "cpu" else 40
  c.checkpoint.every = 0
  return c


def get_sweep(preset: str = ""):
  if preset == "cpu":
    return {"partition.alpha": [0.1, 0.3, 1.0], "seed": [1, 2]}
  return {"partition.alpha": [round(0.1 * i, 1) for i in range(1, 11)], "seed": [1, 2, 3]}
