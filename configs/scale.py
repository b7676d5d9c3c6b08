r"""Scalability: provenance across thousands of clients (paper section V-D, and beyond it).

The paper's grid (GPT on DBpedia, 15 rounds, 200..1000 total clients x 10..50 per round; it
reports 99.5-100% localization) needs the GPT weights and DBpedia files:

  python -m tracefl_jax --config=configs/scale.py --workdir=runs/scale --sweep \
      --config.model.hf_path=/models/openai-gpt --config.dataset.tokenizer=/models/openai-gpt

The study beyond it runs offline (`cpu`, `gpu`, `smoke`):

  python -m tracefl_jax --config=configs/scale.py:cpu --workdir=runs/scale_cpu --sweep

Total clients {1,000, 10,000} x clients per round {10, 100, 1,000}, Dirichlet alpha 0.3 with
the original's fix-up, LeNet, Adam, 20 rounds, every round traced with the leave-one-client-
out truth; then a label-flipping client (labels 1..9 -> 0) forced into every round among 100
and among 1,000 participants of 10,000 clients, traced in faulty mode beside FedDebug. The
faulty client is the one holding the most examples of labels 1..9 (`faulty.clients=largest`):
client 0, as in configs/faulty.py, held 43 examples here, too few to cause any misprediction
(the leave-one-out truth never named it), so tracing to it measured nothing.

Data: `synthetic_structured` (tracefl_jax/data/structured.py), 8x8x1 images of 10 classes,
each a smooth random class pattern shifted by up to a pixel, rescaled and noised (std 1.5).
Why: it exists offline at any size, LeNet learns it from scratch within the rounds (central
training: 74% after one epoch of 20,000 images, 80% after three), yet not to 100%, so the
global accuracy means something; unstructured prototypes plus noise (the `synthetic` set)
left LeNet near chance for 12 federated rounds. Sizes: 128 examples per client on average
before the fix-up. At Dirichlet 0.3 the fix-up (labels < 10 examples dropped, clients < 32
dropped) removes about 7% of the clients at that size, and still 0.6% at 320 per client, so
no affordable size keeps every one of 10,000 clients; instead the data is partitioned over 15%
more clients and the first 1,000 / 10,000 that survive the fix-up are kept
(`partition.max_clients`), each with at least 32 examples.

A million clients (issue 36 item 5; docs/scale.md):

  python -m tracefl_jax --config=configs/scale.py:million --workdir=runs/million --sweep

1,000,000 clients with log-normal sizes (sigma 1.5, at least 1 example, 24 on average:
median 8, the largest 20,457; `partition.method=heavy_tailed`), IID labels, no fix-up
(its 32-example floor would drop most of them), FedAvg weighted by examples (the original's
batch weighting gives every client under one batch weight 0), 1,000 and 10,000 clients per
round, every round traced with TraceFL, the first-order score and the exact leave-one-out
truth. The 24 M training images are `synthetic_structured` 8x8x1 stored as uint8 (1.5 GB;
float32 would take 6 GB) and stay on the host (`dataset.placement=host`): each round gathers
its clients' examples for the device.

Presets:
  (none)         the paper's grid (GPT, DBpedia).
  cpu            the study above: 8 runs; 7 minutes on 2 CPU cores (docs/scale.md).
  gpu            the same study (the one-command GPU benchmark, benchmarks/gpu.sh, runs it
                 within its time budget); runtime on one H200: not measured yet.
  smoke          the same code paths at toy size (20/40 clients, 2 rounds): about 20 s on 2
                 cores.
  million        a million clients, 1,000 and 10,000 per round (ROUNDS_MILLION rounds each):
                 21 minutes and 5.5 GB peak on 2 CPU cores shared with other jobs (load
                 8-14; docs/scale.md).
  million_gpu    the same for one GPU (benchmarks/gpu.py's million section); not measured
                 on a GPU yet.
  million_smoke  the million presets' code paths at toy size (2,000 clients, 2 rounds).
"""

from tracefl_jax.experiment.config import base_config

STUDY = ("cpu", "gpu", "smoke")
MILLION = ("million", "million_gpu", "million_smoke")
ROUNDS_MILLION = 10
MILLION_PER_CLIENT = 24  # training examples per client, on average (heavy-tailed)
OVERSHOOT = 1.15     # partition over this many times the clients kept after the fix-up
PER_CLIENT = 128     # training examples per client (partitioned), on average
FLIP = ",".join(f"{k}:0" for k in range(1, 10))  # as configs/faulty.py, on 10 labels


def _totals(preset: str) -> list[int]:
  return [20, 40] if preset == "smoke" else [1000, 10000]


def _clients_axis(totals: list[int]) -> dict:
  """(num_clients, partition.max_clients, dataset.synthetic_size) move together."""
  values = [(round(OVERSHOOT * t), t, round(OVERSHOOT * t) * PER_CLIENT) for t in totals]
  return {("num_clients", "partition.max_clients", "dataset.synthetic_size"): values}


def _million_clients(preset: str) -> int:
  return 2000 if preset == "million_smoke" else 1_000_000


def million_config(preset: str):
  """The million-client presets (module docstring)."""
  c = base_config()
  c.num_clients = _million_clients(preset)
  c.clients_per_round = 1000 if preset != "million_smoke" else 20
  c.rounds = 2 if preset == "million_smoke" else ROUNDS_MILLION
  c.checkpoint.every = 0
  c.provenance.store_rounds = "none"
  c.model.name = "lenet"
  c.dataset.name = "synthetic_structured"
  c.dataset.synthetic_shape = "8,8,1"
  c.dataset.synthetic_noise = 1.5
  c.dataset.synthetic_pixels = "uint8"
  c.dataset.placement = "host"
  c.dataset.synthetic_size = c.num_clients * MILLION_PER_CLIENT
  c.client.learning_rate = 3e-3
  c.aggregation.weighting = "examples"
  c.partition.method = "heavy_tailed"
  c.partition.sizes = "lognormal"
  c.partition.size_spread = 1.5
  c.partition.min_partition_size = 1
  c.partition.fixup = False
  return c


def get_config(preset: str = ""):
  if preset in MILLION:
    return million_config(preset)
  c = base_config()
  c.rounds = 15
  c.checkpoint.every = 0
  c.provenance.store_rounds = "none"  # a timing study: its last round would hold up to 1,000
                                      # client models (the paper's grid: 50 GPTs, 23 GB)
  if preset in STUDY:
    c.model.name = "lenet"
    c.dataset.name = "synthetic_structured"
    c.dataset.synthetic_shape = "8,8,1"
    c.dataset.synthetic_noise = 1.5
    c.client.learning_rate = 3e-3  # 1e-3 (the paper's, from pretrained models) learns too
                                   # slowly from scratch in 20 non-IID rounds
    c.partition.alpha = 0.3
    c.rounds = 2 if preset == "smoke" else 20
    total = _totals(preset)[0]
    c.num_clients, c.partition.max_clients = round(OVERSHOOT * total), total
    c.dataset.synthetic_size = c.num_clients * PER_CLIENT
    c.clients_per_round = 10 if preset != "smoke" else 5
    return c
  if preset:
    raise ValueError(f"unknown preset {preset!r}; valid: cpu, gpu, smoke, million, "
                     f"million_gpu, million_smoke, or none")
  c.model.name = "openai_gpt"
  c.dataset.name = "dbpedia"
  c.client.optimizer = "adamw"
  c.client.learning_rate = 5e-5
  c.num_clients = 1000
  c.clients_per_round = 10
  return c


def get_sweep(preset: str = ""):
  if preset in MILLION:
    return {"clients_per_round": [20, 100] if preset == "million_smoke" else [1000, 10000]}
  if preset not in STUDY:
    return {"num_clients": [200, 400, 600, 800, 1000], "clients_per_round": [10, 20, 30, 40, 50]}
  totals = _totals(preset)
  per_round = [5, 20] if preset == "smoke" else [10, 100, 1000]
  faulty_per_round = [20] if preset == "smoke" else [100, 1000]
  main = {**_clients_axis(totals), "clients_per_round": per_round}
  faulty = {**_clients_axis(totals[-1:]), "clients_per_round": faulty_per_round,
            ("provenance.mode", "faulty.clients", "faulty.flip", "faulty.every_round"):
                [("faulty", "largest", FLIP, True)]}
  return [main, faulty]
