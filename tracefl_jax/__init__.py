"""tracefl_jax: TraceFL neuron provenance for federated learning, in JAX.

The library surface: plain arrays, Flax modules and optax optimizers in, pytrees out; no
config. The experiment runner that reads configs (`python -m tracefl_jax`) lives in
`tracefl_jax.experiment` and is imported only when used.
"""

from tracefl_jax.data.base import Normalization
from tracefl_jax.data.federated import FederatedData, federate
from tracefl_jax.data.partition import Partition, fixup_partition, make_partition
from tracefl_jax.fl.aggregation import client_weights, fedavg
from tracefl_jax.fl.client import make_optimizer
from tracefl_jax.fl.privacy import DPSettings, dp_fedavg
from tracefl_jax.fl.algorithm import leave_one_out_variables
from tracefl_jax.fl.losses import cross_entropy, fedprox
from tracefl_jax.fl.robust import AggregationRule, krum, median, trimmed_mean, weighted_mean
from tracefl_jax.fl.rounds import (FederatedAlgorithm, GlobalEvaluator, RoundInfo, RoundOutput,
                                   ServerState, TrainingDivergedError, federated_averaging,
                                   round_key, run_rounds, sample_clients)
from tracefl_jax.fl.client_state import ClientContext, ClientStatePiece
from tracefl_jax.fl.scaffold import fednova, scaffold, scaffold_loss, scaffold_state
from tracefl_jax.fl.server import load_server_state, save_server_state, server_optimizer
from tracefl_jax.provenance.storage import StoredRound, load_round, save_round
from tracefl_jax.models import ModelDef, available_models, get_model, make_model, register_model
from tracefl_jax.models.layers import canonical_conv
from tracefl_jax.provenance import ProvenanceResult, trace_clients
from tracefl_jax.provenance.protocol import (ProtocolSettings, TracedRound, localization_correct,
                                             round_baselines, select_correct_inputs,
                                             select_faulty_inputs, select_inputs,
                                             summarize_rounds, trace_round)
from tracefl_jax.provenance.round_callback import provenance_callback

__all__ = [
    "AggregationRule", "ClientContext", "ClientStatePiece", "StoredRound", "fednova",
    "scaffold", "scaffold_loss", "scaffold_state", "cross_entropy", "fedprox", "krum",
    "leave_one_out_variables", "load_round", "load_server_state", "save_server_state",
    "median", "save_round", "server_optimizer",
    "trimmed_mean", "weighted_mean",
    "DPSettings", "FederatedAlgorithm", "FederatedData", "GlobalEvaluator", "ModelDef",
    "Normalization", "Partition", "ProtocolSettings", "ProvenanceResult", "RoundInfo", "RoundOutput",
    "ServerState", "TracedRound", "TrainingDivergedError", "available_models", "canonical_conv",
    "client_weights",
    "dp_fedavg", "federate", "federated_averaging", "fedavg", "fixup_partition", "get_model",
    "localization_correct", "make_model", "make_optimizer", "make_partition",
    "provenance_callback", "register_model", "round_baselines", "round_key", "run_rounds",
    "sample_clients", "select_correct_inputs", "select_faulty_inputs", "select_inputs",
    "summarize_rounds", "trace_clients", "trace_round",
]
