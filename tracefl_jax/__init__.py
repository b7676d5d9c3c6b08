"""tracefl_jax: TraceFL neuron provenance for federated learning, in JAX."""
