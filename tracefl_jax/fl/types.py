"""Named pytree types of `fl/`: what a value holds, where `Any` would say nothing.

They are aliases (a type checker sees `Any` or a dict), named for the reader.
"""

from __future__ import annotations

from typing import Any

import jax

from tracefl_jax.models.base import Variables

PyTree = Any            # any nest of arrays: dicts, tuples, NamedTuples
Params = PyTree         # one model's "params" collection
Stacked = PyTree        # a pytree whose every leaf has a leading client axis [K, ...]
OptState = PyTree       # an optax transformation's state
ClientTable = PyTree    # the per-client state, every leaf [C, ...] (`client_state.py`)
Metrics = dict[str, jax.Array]  # a round's named measurements, e.g. {"dp_update_norm": [K]}
PRNGKey = jax.Array     # one JAX PRNG key

__all__ = ["ClientTable", "Metrics", "OptState", "PRNGKey", "Params", "PyTree", "Stacked",
           "Variables"]
