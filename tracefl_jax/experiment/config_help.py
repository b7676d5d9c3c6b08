"""`FIELD_HELP`: one line of meaning per field of `base_config()` (config.py).

`python -m tracefl_jax --help` and `python -m tracefl_jax config` print them beside each
field's default; a test checks that every field of `base_config()` has one and no other.
"""

from __future__ import annotations

from tracefl_jax.data.partition import PARTITION_METHODS
from tracefl_jax.experiment.algorithms import LOSSES
from tracefl_jax.fl.aggregation import WEIGHTINGS
from tracefl_jax.fl.client import OPTIMIZERS
from tracefl_jax.fl.robust import RULES
from tracefl_jax.fl.server import SERVER_OPTIMIZERS
from tracefl_jax.fl.strategies import STRATEGIES
from tracefl_jax.provenance.attribution import KERNELS, SCORES
from tracefl_jax.provenance.protocol import MODES as PROVENANCE_MODES


def _choices(names) -> str:
  return ", ".join(names)


FIELD_HELP: dict[str, str] = {
    "imports": "comma-separated Python modules imported before the run (they may register "
               "datasets and models by name)",
    "seed": "root seed: partition, client sampling, initialisation and training keys",
    "rounds": "federated rounds to run (a larger value continues a finished run)",
    "num_clients": "clients the training set is partitioned into (before the fix-up)",
    "clients_per_round": "clients sampled uniformly per round",
    "dataset.name": "dataset, built in or registered by a module in `imports`",
    "dataset.data_dir": "directory holding local dataset files (default: TRACEFL_DATA_DIR)",
    "dataset.download": "fetch missing mnist/cifar10/MedMNIST data into data_dir",
    "dataset.num_train": "keep the first num_train training examples (0: all)",
    "dataset.num_test": "keep the first num_test test examples (0: all)",
    "dataset.tokenizer": "text datasets: a local Hugging Face tokenizer directory",
    "dataset.max_length": "text datasets: tokens per example (truncated and padded)",
    "dataset.synthetic_size": "synthetic / synthetic_text: training examples",
    "dataset.synthetic_shape": "synthetic: image shape 'H,W,C'; synthetic_text: 'seq_len'",
    "dataset.synthetic_classes": "synthetic / synthetic_text: number of labels",
    "dataset.synthetic_noise": "synthetic: standard deviation of the Gaussian noise added to "
                               "the class prototypes (larger is harder)",
    "dataset.vocab_size": "text models without a tokenizer (synthetic_text): vocabulary size "
                          "(0: from the data)",
    "partition.method": f"how examples are split over clients: {_choices(PARTITION_METHODS)}",
    "partition.alpha": "dirichlet: concentration (smaller is more non-IID)",
    "partition.self_balancing": "dirichlet: stop giving a class to clients above the average "
                                "size (flwr-datasets)",
    "partition.min_partition_size": "dirichlet: redraw until every client has this many "
                                    "examples",
    "partition.classes_per_client": "pathological: labels per client",
    "partition.shards_per_client": "shards: label-sorted shards per client",
    "partition.fixup": "the original's per-client fix-up (drop rare labels and small clients, "
                       "cap sizes); False: the raw partition",
    "partition.min_label_count": "fix-up: drop a client's labels with fewer examples",
    "partition.max_per_client": "fix-up: keep at most this many examples per client",
    "partition.min_client_size": "fix-up: drop clients with fewer examples",
    "partition.max_clients": "keep the first max_clients clients after the fix-up (0: all), so "
                             "that a partition over more clients yields exactly this many",
    "model.name": "model, built in or registered by a module in `imports`",
    "model.hf_path": "a local Hugging Face checkpoint directory (its architecture and weights)",
    "model.torchvision_weights": "a torchvision .pt/.safetensors file to start from (head "
                                 "skipped)",
    "client.optimizer": f"local optimizer: {_choices(OPTIMIZERS)}",
    "client.learning_rate": "local learning rate",
    "client.weight_decay": "local weight decay (adamw, sgd)",
    "client.momentum": "sgd momentum",
    "client.batch_size": "local batch size",
    "client.local_epochs": "local epochs per round",
    "client.divergence_factor": "stop with an error when a round's mean client loss exceeds "
                                "this multiple of ln(classes), the loss of a uniform guess "
                                "(0: off)",
    "aggregation.weighting": f"FedAvg weights: {_choices(WEIGHTINGS)} (batches: the original's "
                             f"floor(n_k / batch_size))",
    "aggregation.rule": f"aggregation rule: {_choices(RULES)} (robust rules are unweighted "
                        f"over the round's clients of weight > 0)",
    "aggregation.trim_beta": "trimmed_mean: fraction of values cut from each end, in [0, 0.5)",
    "aggregation.num_byzantine": "krum: assumed faulty clients f (neighbours scored: n - f - 2)",
    "aggregation.num_selected": "krum: clients averaged (1: Krum, more: multi-Krum)",
    "client.loss": f"client objective: {_choices(LOSSES)} (fedprox: + prox_mu / 2 ||w - G||^2)",
    "client.prox_mu": "fedprox: proximal coefficient mu",
    "server.optimizer": f"server optimizer on the pseudo-gradient G - aggregate: "
                        f"{_choices(SERVER_OPTIMIZERS)} (none: FedAvg; sgd + momentum: "
                        f"FedAvgM; adam/yogi/adagrad: FedOpt)",
    "server.learning_rate": "server learning rate",
    "server.momentum": "server sgd momentum (FedAvgM)",
    "server.b1": "server adam/yogi beta1",
    "server.b2": "server adam/yogi beta2",
    "server.eps": "server adam/yogi/adagrad epsilon (tau, adaptivity)",
    "simulation.strategy": f"how the client axis runs: {_choices(STRATEGIES)}",
    "simulation.clients_per_chunk": "chunked: clients per chunk (0: one chunk)",
    "simulation.compute_dtype": "local training precision: float32, or bfloat16 with float32 "
                                "master weights",
    "eval.batch_size": "batch size of global-model evaluation",
    "eval.max_test_inputs": "server test set: the first max_test_inputs test examples",
    "provenance.enabled": "trace the round's clients online (TraceFL)",
    "provenance.rounds": "rounds to trace: '' every round, else comma-separated round numbers",
    "provenance.mode": f"which inputs are traced: {_choices(PROVENANCE_MODES)} (faulty: "
                       f"mispredictions of label-flipping clients, Table I)",
    "provenance.kernel": f"provenance kernel: {_choices(KERNELS)}",
    "provenance.decay": "per-layer decay beta of the layer weights, in (0, 1]",
    "provenance.use_decay": "weight layers by decay**depth as the paper does",
    "provenance.use_size_factor": "multiply scores by the client's data size (in batches)",
    "provenance.score": f"client score: {_choices(SCORES)} (first_order: the weight-aware "
                        "first-order leave-one-client-out drop, no decay)",
    "provenance.multi_round": "also attribute each traced prediction over all rounds so far "
                              "(multi-round provenance; one [clients, params] accumulator)",
    "provenance.per_label": "correct mode: traced inputs per label held by the participants",
    "provenance.max_faulty_inputs": "faulty mode: traced inputs per round",
    "provenance.clients_per_chunk": "clients scored at once (0: all; bounds memory)",
    "provenance.shard_clients": "score the clients sharded over all devices (every process's "
                                "after jax.distributed.initialize)",
    "provenance.top_k": "top clients written per input to provenance.jsonl",
    "provenance.block_mask": "BERT blocks scored without the attention mask as the original "
                             "(parity), or with it (fixed)",
    "provenance.counterfactual": "exact leave-one-client-out truth per traced input",
    "provenance.feddebug": "faulty mode: FedDebug beside TraceFL (image models)",
    "provenance.feddebug_inputs": "FedDebug: random inputs per round",
    "provenance.feddebug_threshold": "FedDebug: neuron activation threshold",
    "provenance.store_rounds": "keep rounds' models in WORKDIR/rounds to trace new inputs "
                               "later (the trace verb): 'last' (the final round, so every "
                               "finished run can be traced), 'all', '3,7,10', or 'none'/'' to "
                               "store nothing; disk per round: clients_per_round + 1 copies of "
                               "the model's variables (e.g. 10 x 110M-param BERT: 4.4 GB)",
    "attribution.enabled": "compare attribution methods against retrained federations "
                           "(experiment/attribution.py) instead of the plain run",
    "attribution.setting": "the cell's name in the comparison table",
    "attribution.explain_inputs": "test inputs explained (correct mode: the first the final "
                                  "model predicts correctly; faulty: matching mispredictions)",
    "attribution.subsets": "random half-subsets of clients retrained for the LDS (0: none)",
    "attribution.noise_seed": "noise floor: the base federation retrained with data seed "
                              "seed + noise_seed",
    "attribution.round_decay": "multi-round provenance: weight gamma^(R - r) of round r, in "
                               "[0, 1]",
    "attribution.federations_per_chunk": "retrained federations run side by side (0: all)",
    "attribution.per_round": "also trace every round (paper's and weight-aware score)",
    "dp.enabled": "DP-FedAvg: server-side clipping and Gaussian noise",
    "dp.noise_multiplier": "DP noise multiplier z (sigma = z * clip_norm / clients_per_round)",
    "dp.clip_norm": "DP clipping norm C of each client's update",
    "dp.delta": "DP delta of the reported epsilon",
    "dp.parity": "DP as the original (noise BatchNorm statistics, trace the pre-noise "
                 "aggregate)",
    "checkpoint.every": "rounds between checkpoints (0: only at the end)",
    "checkpoint.resume": "continue the same config's run found in the workdir; False refuses "
                         "a workdir that holds results",
    "checkpoint.overwrite": "move a previous run in the workdir to WORKDIR/previous/<time>/ and "
                            "start afresh (the CLI's --overwrite)",
    "faulty.clients": "comma-separated faulty client ids, e.g. '0'; or 'largest': the client "
                      "holding the most examples of the flipped labels (after the fix-up)",
    "faulty.flip": "label flips of the faulty clients, 'src:dst,...', e.g. '1:0,2:0'",
    "faulty.every_round": "the faulty clients take part in every round (the others are "
                          "sampled around them)",
}
