r"""The default demo: TraceFL on the embedded digits dataset (scikit-learn, 1,797 images).

100 clients, Dirichlet alpha 0.3, 10 clients per round, FedAvg-paper CNN, Adam 1e-3,
batch 32, 2 local epochs; provenance traced online every round in correct-prediction mode.

  python -m tracefl_jax --config=configs/demo.py --workdir=runs/demo

Presets (`--config=configs/demo.py:PRESET`):
  (none)   the demo above, 40 rounds.
  quick    3 rounds, for smoke tests.
  faulty   10 clients all participating, client 4's labels 1..9 flipped to 0 (Table I mode;
           the paper flips client 0, which here happens to be the largest client).

Measured on 2 CPU cores: see README.md ("Demo") for runtime and accuracies.
"""

from tracefl_jax.experiment.config import base_config


def get_config(preset: str = ""):
  c = base_config()
  c.rounds = 40
  if preset == "quick":
    c.rounds = 3
  elif preset == "faulty":
    c.num_clients = 10
    c.clients_per_round = 10
    c.rounds = 8
    c.provenance.mode = "faulty"
    c.faulty.clients = "4"  # not the largest client, so "largest client" is no shortcut
    c.faulty.flip = ",".join(f"{k}:0" for k in range(1, 10))
  elif preset:
    raise ValueError(f"unknown preset {preset!r}; valid: quick, faulty")
  return c
