r"""The paper's main image results (Table II): ResNet18 / DenseNet121 on MNIST, CIFAR-10,
PathMNIST, OrganAMNIST; Dirichlet alpha 0.3, 100 clients, 10 per round, Adam 1e-3, batch 32,
2 local epochs, the original's partition fix-up, provenance every round.

  python -m tracefl_jax --config=configs/image_main.py:resnet18-pathmnist \
      --workdir=runs/resnet18-pathmnist --config.dataset.data_dir=/data
  # ImageNet initialisation (the paper's): --config.model.torchvision_weights=resnet18.pth

Presets: MODEL-DATASET with MODEL in {resnet18, densenet121} and DATASET in {mnist, cifar10,
pathmnist, organamnist}; `cpu`: the tiny ResNet on 32x32x3 synthetic data, 2 rounds (about
30 s on 2 CPU cores), to check the pipeline end to end.
Runtime on one H100: not measured yet (no GPU was lent to the session that wrote this).
Paper (TraceFL % / best global accuracy %): ResNet18 PathMNIST 99.67/71.97, OrganAMNIST
95.25/74.17, MNIST 99.13/93.90, CIFAR-10 97.61/58.64; DenseNet121 PathMNIST 100/81.59,
OrganAMNIST 99.80/82.42, MNIST 100/98.83, CIFAR-10 99.69/71.58.
"""

from tracefl_jax.experiment.config import base_config

MODELS = ("resnet18", "densenet121")
DATASETS = ("mnist", "cifar10", "pathmnist", "organamnist")


def get_config(preset: str = "resnet18-pathmnist"):
  c = base_config()
  c.rounds = 50
  c.partition.fixup = True
  if preset == "cpu":
    c.model.name = "resnet18_tiny"
    c.dataset.name = "synthetic"
    c.dataset.synthetic_size = 600
    c.num_clients = 20
    c.clients_per_round = 4
    c.partition.min_client_size = 8
    c.partition.min_label_count = 2
    c.client.batch_size = 8  # FedAvg weights floor(n_k / 8) >= 1 for every kept client
    c.rounds = 2
    return c
  model, _, dataset = preset.partition("-")
  c.num_clients, c.clients_per_round = 100, 10
  if model not in MODELS or dataset not in DATASETS:
    raise ValueError(f"unknown preset {preset!r}; valid: cpu or MODEL-DATASET with MODEL in "
                     f"{MODELS} and DATASET in {DATASETS}")
  c.model.name, c.dataset.name = model, dataset
  return c
