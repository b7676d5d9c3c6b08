r"""Localization accuracy versus Dirichlet alpha (the paper's non-IID sweep, Fig. 5 style),
scored by the paper's rule and against the exact leave-one-client-out truth.

  python -m tracefl_jax --config=configs/sweep_alpha.py:cpu --workdir=runs/sweep_alpha --sweep

Presets (all with the original's partition fix-up and batch-count FedAvg weights):
  cpu        the embedded digits, 20 clients (15-18 after the fix-up), 5 per round, 20
             rounds; alpha in {0.1, 0.3, 1.0} x seeds {1, 2}: 6 runs, about 1.5 minutes on 2
             CPU cores.
  synthetic  paper-shaped: 100 clients (79-96 after the fix-up), 10 per round, on 12,000
             synthetic 16x16 images of 10 classes (class prototypes plus noise), the FedAvg
             CNN, 20 rounds; alpha in {0.1, 0.3, 1.0} x seeds {1, 2}: 6 runs, about 4 minutes.
  (none)     digits, alpha in {0.1, 0.2, ..., 1.0} x seeds {1, 2, 3}, 40 rounds each.
The paper reports TraceFL at 99% overall (ResNet18 75-91% at other alphas); the random
participant and largest-client baselines are reported beside every number.
"""

from tracefl_jax.experiment.config import base_config


def get_config(preset: str = ""):
  c = base_config()
  c.rounds = 20 if preset in ("cpu", "synthetic") else 40
  c.checkpoint.every = 0
  if preset == "synthetic":
    c.num_clients, c.clients_per_round = 100, 10
    c.dataset.name = "synthetic"
    c.dataset.synthetic_size = 12000
    c.dataset.synthetic_shape = "16,16,1"
    c.dataset.synthetic_classes = 10
  elif preset not in ("", "cpu"):
    raise ValueError(f"unknown preset {preset!r}; valid: cpu, synthetic, or none")
  return c


def get_sweep(preset: str = ""):
  if preset in ("cpu", "synthetic"):
    return {"partition.alpha": [0.1, 0.3, 1.0], "seed": [1, 2]}
  return {"partition.alpha": [round(0.1 * i, 1) for i in range(1, 11)], "seed": [1, 2, 3]}
