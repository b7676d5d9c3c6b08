"""tracefl_jax: TraceFL neuron provenance for federated learning, in JAX.

The library surface: plain arrays, Flax modules and optax optimizers in, pytrees out; no
config. The experiment runner that reads configs (`python -m tracefl_jax`) lives in
`tracefl_jax.experiment` and is imported only when used. Everything else (model and optimizer
registries by name, the protocol's steps) stays in its module: `tracefl_jax.models`,
`tracefl_jax.fl.*`, `tracefl_jax.provenance.*`.
"""

# Data: a federation's arrays and partition.
from tracefl_jax.data.base import Normalization
from tracefl_jax.data.federated import FederatedData, federate
from tracefl_jax.data.partition import Partition, fixup_partition, make_partition
# Models.
from tracefl_jax.models import ModelDef, get_model, make_model
from tracefl_jax.models.layers import canonical_conv
# The algorithm: pieces (objective, rule, DP, server optimizer, client state) and assembly;
# the algorithms with memory (SCAFFOLD, FedDyn, FedNova, Ditto, q-FFL, adaptive-clipping
# DP-FedAvg).
from tracefl_jax.fl.adaptive_clipping import AdaptiveClipping, ClipState, adaptive_dp_fedavg
from tracefl_jax.fl.aggregation import client_weights, fedavg
from tracefl_jax.fl.algorithm import (FederatedAlgorithm, federated_averaging,
                                      leave_one_out_variables)
from tracefl_jax.fl.client_state import ClientContext, ClientStatePiece, HostTable
from tracefl_jax.fl.ditto import ditto, ditto_state, personal_accuracy, personal_variables
from tracefl_jax.fl.feddyn import FedDynState, feddyn, feddyn_loss, feddyn_server, feddyn_state
from tracefl_jax.fl.host_round import RoundOutput
from tracefl_jax.fl.hyperparameters import Hyperparameters
from tracefl_jax.fl.losses import cross_entropy, fedprox
from tracefl_jax.fl.privacy import DPSettings, dp_fedavg
from tracefl_jax.fl.qffl import qffl
from tracefl_jax.fl.robust import AggregationRule, krum, median, trimmed_mean, weighted_mean
from tracefl_jax.fl.scaffold import fednova, scaffold, scaffold_loss, scaffold_state
from tracefl_jax.fl.server import (ServerState, load_server_state, save_server_state,
                                   server_optimizer)
# Running rounds: a host loop, or R rounds as one differentiable program.
from tracefl_jax.fl.federation import (Federation, FederationPlan, FederationTrace, federation,
                                       stack_plans)
from tracefl_jax.fl.rounds import (GlobalEvaluator, RoundInfo, TrainingDivergedError, round_key,
                                   run_rounds, sample_clients)
# Provenance: tracing clients, the protocol over a round, stored rounds.
from tracefl_jax.provenance import ProvenanceResult, trace_clients
from tracefl_jax.provenance.across_rounds import AcrossRounds, across_rounds
from tracefl_jax.provenance.protocol import (ProtocolSettings, TracedRound, select_inputs,
                                             summarize_rounds, trace_round)
from tracefl_jax.provenance.round_callback import provenance_callback
from tracefl_jax.provenance.storage import StoredRound, load_round, save_round

__all__ = [
    "AcrossRounds",
    "AdaptiveClipping",
    "AggregationRule",
    "ClientContext",
    "ClientStatePiece",
    "ClipState",
    "DPSettings",
    "FedDynState",
    "FederatedAlgorithm",
    "FederatedData",
    "Federation",
    "FederationPlan",
    "FederationTrace",
    "GlobalEvaluator",
    "HostTable",
    "Hyperparameters",
    "ModelDef",
    "Normalization",
    "Partition",
    "ProtocolSettings",
    "ProvenanceResult",
    "RoundInfo",
    "RoundOutput",
    "ServerState",
    "StoredRound",
    "TracedRound",
    "TrainingDivergedError",
    "across_rounds",
    "adaptive_dp_fedavg",
    "canonical_conv",
    "client_weights",
    "cross_entropy",
    "ditto",
    "ditto_state",
    "dp_fedavg",
    "fedavg",
    "feddyn",
    "feddyn_loss",
    "feddyn_server",
    "feddyn_state",
    "federate",
    "federated_averaging",
    "federation",
    "fednova",
    "fedprox",
    "fixup_partition",
    "get_model",
    "krum",
    "leave_one_out_variables",
    "load_round",
    "load_server_state",
    "make_model",
    "make_partition",
    "median",
    "personal_accuracy",
    "personal_variables",
    "provenance_callback",
    "qffl",
    "round_key",
    "run_rounds",
    "sample_clients",
    "save_round",
    "save_server_state",
    "scaffold",
    "scaffold_loss",
    "scaffold_state",
    "select_inputs",
    "server_optimizer",
    "stack_plans",
    "summarize_rounds",
    "trace_clients",
    "trace_round",
    "trimmed_mean",
    "weighted_mean",
]
