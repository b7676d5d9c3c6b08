"""TraceFL neuron provenance: which client is responsible for the global model's prediction."""

from tracefl_jax.provenance.attribution import (KERNELS, SCORES, ProvenanceResult,
                                                choose_kernel, is_affine, layer_betas,
                                                trace_clients)
from tracefl_jax.provenance.capture import LayerView, capture
from tracefl_jax.provenance.kernels import grad_scores, jvp_scores, reference_scores

__all__ = ["KERNELS", "SCORES", "LayerView", "ProvenanceResult", "capture", "choose_kernel",
           "grad_scores", "is_affine", "jvp_scores", "layer_betas", "reference_scores",
           "trace_clients"]
