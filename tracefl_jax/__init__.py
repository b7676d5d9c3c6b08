"""tracefl_jax: TraceFL neuron provenance for federated learning, in JAX.

The curated surface; everything else lives in the submodules named in README.md.
"""

from tracefl_jax.fl.aggregation import client_weights, fedavg
from tracefl_jax.fl.privacy import dp_fedavg
from tracefl_jax.experiment.config import base_config, validate
from tracefl_jax.data import load_dataset, make_partition
from tracefl_jax.provenance.protocol import (localization_correct, round_baselines,
                                    select_correct_inputs, select_faulty_inputs)
from tracefl_jax.experiment.runner import TrainingDivergedError, run
from tracefl_jax.models import ModelDef, available_models, get_model, make_model
from tracefl_jax.fl.privacy import dp_epsilon
from tracefl_jax.provenance import ProvenanceResult, trace_clients
from tracefl_jax.fl.rounds import DPSettings, make_round_fn, sample_clients
from tracefl_jax.fl.strategies import simulate_clients

__all__ = [
    "DPSettings", "ModelDef", "ProvenanceResult", "TrainingDivergedError", "available_models",
    "base_config", "client_weights", "dp_epsilon", "dp_fedavg", "fedavg", "get_model",
    "load_dataset", "localization_correct", "make_model", "make_partition", "make_round_fn",
    "round_baselines", "run", "sample_clients", "select_correct_inputs",
    "select_faulty_inputs", "simulate_clients", "trace_clients", "validate",
]
