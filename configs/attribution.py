r"""Which client is responsible for the final model's prediction? Attribution methods against
retrained federations (tracefl_jax/experiment/comparison.py).

  python -m tracefl_jax compare --config=configs/attribution.py:cpu \
      --workdir=runs/attribution

Each cell trains one federation, explains up to `attribution.explain_inputs` test inputs of
its final model with every method (TraceFL's last round, the weight-aware score, multi-round
provenance, the exact single-round leave-one-client-out, the largest client, a random
participant) and scores them against every truth (the paper's rule, the last round's exact
leave-one-client-out, leave-one-client-out RETRAINING top-1 and Spearman, the LDS over
`attribution.subsets` random half-subsets), with the noise floor. The 2 + C + M retrained
federations run side by side as one program (`provenance.retraining`).

Presets:
  smoke   6 digits clients, 4 per round, an MLP, 2 rounds, 3 subsets: the code paths, for
          the tests.
  cpu     digits, 20 clients (no fix-up: 35-105 images each) all taking part for 19 rounds
          (the demo's shape); the same with 5 per round for 39 rounds; 100 clients at 10 per
          round for 30 rounds on the synthetic paper-shaped set (configs/scale.py's data with
          noise 0.7 instead of 1.5, and LeNet); 10 digits clients all taking part for 8
          rounds, client 4's labels 1..9 flipped to 0 (faulty mode). 10 subsets for the LDS;
          100 inputs explained (20 in faulty mode); 3 truth seeds; top-k removal (k = 1, 3)
          for the first 10 inputs. The round counts end each digits cell
          above 90% global accuracy: FedAvg on these non-IID splits swings by 5-20 points
          between rounds (5 of 20 per round: 73-96% over rounds 33-40, 96.1% at round 39;
          20 of 20: 94.2% at round 19, 89.7% at 20). At 10 rounds and noise 1.5 the synthetic
          cell ended at 21%; at noise 0.7 it reaches 48-79% over rounds 25-30.
  quick   the first and last cells of `cpu` (digits 20/20 for 19 rounds; the label flip),
          everything else as `cpu`: 36 minutes on 2 cores under load 4-9 (cpu: about 70).
  mnist   real MNIST from a local copy (`--config.dataset.data_dir=DIR` holding
          mnist.pkl.gz or the IDX files; docs/attribution.md says where to get one): its first 3,000
          training images over 10 clients (Dirichlet 0.3, no fix-up), all taking part for 10
          rounds, LeNet (patch convolutions). Not part of `cpu`, which needs nothing but the
          package:
            python -m tracefl_jax compare --config=configs/attribution.py:mnist \
                --workdir=runs/attribution_mnist --config.dataset.data_dir=DIR
  algorithms  the digits 20/20 cell of `cpu` under four algorithms: FedAvg, FedAdam (server
          Adam, learning rate 0.01), the trimmed mean (beta 0.1: 2 of 20 cut from each end)
          and Krum (f = 1); every truth and score removes a client by the cell's own rule and
          server step (docs/algorithms.md, "Provenance that knows the algorithm"). Two truth seeds.
  gpu     the synthetic paper-shaped set at 1,000 clients (configs/scale.py's data and
          LeNet), 10 per round for 20 rounds, then 100 per round for 10 rounds; a client
          never sampled is not retrained (its federation is the base one). The one-command
          GPU benchmark (benchmarks/gpu.sh) runs its cells within its budget.
"""

from tracefl_jax.experiment.config import base_config

PRESETS = ("smoke", "quick", "cpu", "mnist", "algorithms", "gpu")
FLIP = ",".join(f"{k}:0" for k in range(1, 10))
FAULTY = ("attribution.setting", "num_clients", "clients_per_round", "rounds",
          "partition.alpha", "partition.fixup", "provenance.mode", "faulty.clients",
          "faulty.flip", "attribution.explain_inputs")
FLIP_CELL = ("digits flip 10/10", 10, 10, 8, 0.5, True, "faulty", "4", FLIP, 20)


def get_config(preset: str = "smoke"):
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
  c = base_config()
  c.attribution.enabled = True
  c.provenance.output = "margin"  # what TRAK explains: the logit against its rivals
  c.checkpoint.every = 0
  c.partition.fixup = False
  c.num_clients = 20
  c.clients_per_round = 20
  c.rounds = 15
  c.attribution.subsets = 10
  if preset in ("quick", "cpu", "mnist"):
    c.attribution.topk_inputs = 10
    # Forward mode (one JVP lane per sampled client, 2.0 trainings of the federation each):
    # about 40 trainings for the first quick cell, an estimated 2 hours on 2 cores at load
    # 10-12 (benchmarks/results/across_rounds_cpu.jsonl, docs/differentiable.md); off until a
    # cell's measured time says it is small; on with --config.attribution.across_rounds=True.
    c.attribution.across_rounds = False
  if preset == "smoke":
    c.model.name = "mlp"
    c.num_clients, c.clients_per_round = 6, 4
    c.rounds = 2
    c.attribution.subsets = 3
    c.attribution.explain_inputs = 10
    c.attribution.topk_inputs = 3
  if preset == "mnist":
    # Patch convolutions: the retrained federations vmap the clients' convolutions, which as
    # XLA convolutions become grouped ones, slow on CPU (benchmarks/README.md).
    c.dataset.name, c.model.name = "mnist", "lenet_patches"
    c.dataset.num_train = 3000
    c.num_clients, c.clients_per_round = 10, 10
    c.rounds = 10
  if preset == "algorithms":  # four cells in about an hour on 2 cores: two truth seeds
    c.attribution.truth_seeds = 2
  if preset == "gpu":
    c.attribution.federations_per_chunk = 64  # up to 6,400 client lanes at once
  return c


def get_sweep(preset: str = "smoke"):
  if preset == "smoke":
    return {"attribution.setting": ["smoke"]}
  if preset == "mnist":
    return {"attribution.setting": ["mnist 10/10"]}
  digits = ("attribution.setting", "clients_per_round", "rounds")
  paper = ("attribution.setting", "num_clients", "partition.max_clients",
           "dataset.synthetic_size", "dataset.name", "dataset.synthetic_shape",
           "dataset.synthetic_noise", "model.name", "client.learning_rate", "partition.fixup",
           "clients_per_round", "rounds", "attribution.per_round")
  if preset == "algorithms":
    algorithm = ("attribution.setting", "clients_per_round", "rounds", "aggregation.rule",
                 "aggregation.trim_beta", "aggregation.num_byzantine", "server.optimizer",
                 "server.learning_rate")
    return {algorithm: [("digits 20/20 fedavg", 20, 19, "mean", 0.2, 0, "none", 1.0),
                        ("digits 20/20 fedadam", 20, 19, "mean", 0.2, 0, "adam", 0.01),
                        ("digits 20/20 trimmed", 20, 19, "trimmed_mean", 0.1, 0, "none", 1.0),
                        ("digits 20/20 krum", 20, 19, "krum", 0.2, 1, "none", 1.0)]}
  if preset == "gpu":  # 1,000 clients kept of 1,150 partitioned (the fix-up), 128 images each
    return [{paper: [
        (f"synthetic {k}/1000", 1150, 1000, 1150 * 128, "synthetic_structured", "8,8,1", 1.5,
         "lenet", 3e-3, True, k, rounds, False) for k, rounds in ((10, 20), (100, 10))]}]
  if preset == "quick":
    return [{digits: [("digits 20/20", 20, 19)]},
            {FAULTY: [FLIP_CELL]}]
  return [
      {digits: [("digits 20/20", 20, 19), ("digits 5/20", 5, 39)]},
      {paper: [("synthetic 10/100", 115, 100, 115 * 128, "synthetic_structured", "8,8,1",
                0.7, "lenet", 3e-3, True, 10, 30, False)]},
      {FAULTY: [FLIP_CELL]},
  ]
