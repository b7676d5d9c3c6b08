"""FedDebug, the baseline TraceFL is compared against in faulty-client mode (spec section 7).

FedDebug (Gill et al., ICSE 2023) needs no test data: it feeds k random inputs to every client
model and looks for the client whose neuron activations disagree with all the others. Per
(client, input), the output of every Dense and Conv unit (the original's Linear and Conv2d
layers) is passed through ReLU, min-max scaled to [0, 1] over that layer's whole output for that
input, flattened, and all layers are concatenated; a neuron is active when its scaled value
exceeds `threshold` (0.003). Per input, neurons active in every client are dropped; over the
subsets of K-1 clients in `itertools.combinations` order, the one with the most remaining
neurons active in all its members (first on ties) is benign and the client it leaves out is
faulty; with b faulty clients this repeats b times on the remaining clients.

Here that search is a few array operations for all clients and inputs at once. A neuron active
in every member of S \\ {j} is either active in all of S, or inactive in exactly one member of
S and that member is j; so count_j = C0 + #{neurons inactive in j and in no other member of S},
with C0 common to every j. The tie order follows from `itertools.combinations(S, |S| - 1)`:
its first subset leaves out the LAST member of S, the next one the second to last, ..., so the
first subset with the largest count leaves out the LARGEST position among the tied clients.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.models.base import LayerPath, ModelDef, Variables, inspect_units

# The original takes torch's Conv2d and Linear layers; LayerNorm and BatchNorm are not neurons
# for FedDebug. Subclasses (`layers.PatchConv`) count as what they subclass.
FEDDEBUG_UNIT_TYPES: tuple[type[nn.Module], ...] = (nn.Dense, nn.Conv)


class FedDebugResult(NamedTuple):
  """FedDebug's answer for k inputs over the round's K clients (columns: round positions)."""
  predicted_faulty: jax.Array  # [k, b] int32 positions, in the order they were removed
  counts: jax.Array            # [k, K] int32 first step: neurons active in all but j, not in j
  step_counts: jax.Array       # [k, b, K] int32 every step's subset counts (-1: already removed)


def feddebug_inputs(key: jax.Array, num_inputs: int, input_shape: Sequence[int],
                    normalize: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """The original's random inputs `[k, *input_shape]`, filled like torch's kaiming_uniform_.

  The original draws a C x H x W tensor per input; torch's fan_in of it is H * W, and
  kaiming_uniform_ (a = 0, leaky_relu gain sqrt(2)) draws U(-sqrt(6 / fan_in), +...). Our
  inputs are channels-last (H, W, C), so fan_in is the product of every axis but the last
  (at least two axes are needed, as in torch). Torch's generator is not reproduced, only the
  distribution. `normalize` (e.g. `lambda x: (x - mean) / std`) is applied afterwards, as the
  dataset's test transform; resizing to the model's input size is the caller's business.
  The original's slower input filter (keep an input only when >= 3 clients agree on its label
  in a new group) is off by default there (`faster_input_generation`) and not implemented.
  """
  input_shape = tuple(int(d) for d in input_shape)
  if len(input_shape) < 2:
    raise ValueError(f"input_shape {input_shape} needs a channel axis and at least one more "
                     f"(kaiming_uniform_'s fan_in is undefined for fewer than 2 dimensions)")
  bound = math.sqrt(6.0 / math.prod(input_shape[:-1]))
  x = jax.random.uniform(key, (num_inputs, *input_shape), jnp.float32, -bound, bound)
  return x if normalize is None else normalize(x)


def feddebug_paths(model: ModelDef) -> tuple[LayerPath, ...]:
  """Module paths of the model's Dense and Conv units, in eval-mode execution order."""
  units = inspect_units(model.module, (1, *model.input_shape), model.input_dtype)
  units = [u for u in units if isinstance(u.module, FEDDEBUG_UNIT_TYPES)]
  if not units:
    raise ValueError(f"{type(model.module).__name__} has no nn.Dense or nn.Conv unit: "
                     f"FedDebug has no neurons to compare")
  shared = [u.path for u in units if u.calls > 1]
  if shared:
    raise ValueError(f"units {shared} run more than once per forward pass (shared weights): "
                     f"FedDebug takes one output per layer")
  return tuple(u.path for u in units)


def _scaled_activations(model: ModelDef, variables: Variables, x: jax.Array) -> jax.Array:
  """One client's neuron vector per input, `[k, num_neurons]`, each entry in [0, 1]."""
  paths = feddebug_paths(model)
  wanted, outputs, active = set(paths), {}, []

  def intercept(next_fun, args, kwargs, context):
    path = tuple(context.module.path)
    # `active`: a subclass calling `super().__call__` re-enters; keep the outermost output.
    if context.method_name != "__call__" or path not in wanted or path in active:
      return next_fun(*args, **kwargs)
    active.append(path)
    try:
      out = next_fun(*args, **kwargs)
    finally:
      active.pop()
    outputs[path] = out
    return out

  with nn.intercept_methods(intercept):
    model.logits(variables, x)  # eval mode, as the original's model.eval()
  vectors = []
  for path in paths:
    # Flatten order (ours H, W, C vs torch's C, H, W) is irrelevant: neurons are only
    # compared position-wise across clients and counted.
    a = nn.relu(outputs[path].reshape(x.shape[0], -1).astype(jnp.float32))
    lo, hi = a.min(axis=1, keepdims=True), a.max(axis=1, keepdims=True)
    span = hi - lo
    # max == min gives 0/0 = NaN in the original, and NaN > threshold is False: inactive.
    vectors.append(jnp.where(span > 0, (a - lo) / jnp.where(span > 0, span, 1.0), 0.0))
  return jnp.concatenate(vectors, axis=1)


def localize_active(active: jax.Array, num_faulty: int = 1) -> FedDebugResult:
  """FedDebug's subset search on activity masks `active [K, k, num_neurons]` (bool).

  Equal to the original's loop (see the module docstring): step counts are the numbers of
  neurons, among those NOT active in all K clients (dropped once per input, as the original),
  active in every remaining client but j; the largest count is faulty, the largest position
  on ties. (Whether that drop is redone on the remaining clients only shifts every count of a
  step by the same number, so the picks do not depend on it.)

  Returns `FedDebugResult` with `step_counts [k, b, K]` (-1 for clients removed earlier).
  """
  num_clients = active.shape[0]
  inactive = ~active
  kept = ~jnp.all(active, axis=0)                               # [k, n]
  remaining = jnp.ones((active.shape[1], num_clients), bool)   # [k, K]
  positions = jnp.arange(num_clients, dtype=jnp.int32)
  picks, steps = [], []
  for _ in range(num_faulty):  # b is static and small; clients and inputs stay array axes
    members = jnp.transpose(remaining)[:, :, None]              # [K, k, 1]
    misses = jnp.sum(inactive & members, axis=0, dtype=jnp.int32)  # [k, n] members missing it
    common = jnp.sum(kept & (misses == 0), axis=1, dtype=jnp.int32)  # active in all of S
    only = kept & (misses == 1)                                 # missing in exactly one member
    own = jnp.sum(only[None] & inactive, axis=2, dtype=jnp.int32)  # [K, k]
    counts = jnp.where(remaining, common[:, None] + jnp.transpose(own), -1)
    # argmax takes the first maximum; reversing the client axis makes it the largest position.
    pick = (num_clients - 1 - jnp.argmax(counts[:, ::-1], axis=1)).astype(jnp.int32)
    remaining = remaining & (positions[None, :] != pick[:, None])
    picks.append(pick)
    steps.append(counts)
  step_counts = jnp.stack(steps, axis=1)
  return FedDebugResult(jnp.stack(picks, axis=1), step_counts[:, 0], step_counts)


@functools.partial(jax.jit, static_argnames=("model", "num_faulty", "clients_per_chunk"))
def _localize(model, client_vars, x, threshold, *, num_faulty, clients_per_chunk):
  def client_active(variables):
    return _scaled_activations(model, variables, x) > threshold

  if clients_per_chunk:
    active = jax.lax.map(client_active, client_vars, batch_size=clients_per_chunk)
  else:
    active = jax.vmap(client_active)(client_vars)
  return localize_active(active, num_faulty)


def feddebug_localize(model: ModelDef, client_vars: Variables, x: jax.Array, *,
                      threshold: float = 0.003, num_faulty: int = 1,
                      clients_per_chunk: int | None = None) -> FedDebugResult:
  """FedDebug's faulty clients for every input (spec section 7), all clients at once.

  Args:
    model: the clients' `ModelDef`; its Dense and Conv units are the neurons.
    client_vars: the round's client variables, every leaf stacked `[K, ...]`; each client
      runs in eval mode.
    x: `[k, *input_shape]` inputs (`feddebug_inputs`).
    threshold: a neuron is active when its scaled activation exceeds this.
    num_faulty: b, how many clients to remove per input (1 <= b < K).
    clients_per_chunk: compute activations this many clients at a time (memory bound).
  """
  num_clients = jax.tree.leaves(client_vars["params"])[0].shape[0]
  if not 1 <= num_faulty < num_clients:
    raise ValueError(f"num_faulty={num_faulty} must be in [1, {num_clients - 1}] for "
                     f"{num_clients} clients")
  return _localize(model, client_vars, jnp.asarray(x, model.input_dtype),
                   jnp.float32(threshold), num_faulty=int(num_faulty),
                   clients_per_chunk=int(clients_per_chunk) if clients_per_chunk else None)


def feddebug_accuracy(predicted_faulty: np.ndarray, true_faulty: Sequence[int]) -> float:
  """Mean over inputs of |true faulty AND predicted| / |true faulty| x 100 (spec section 7).

  Args:
    predicted_faulty: `[k, b]` positions (`FedDebugResult.predicted_faulty`).
    true_faulty: positions of the truly faulty clients in the same round order.
  """
  true = np.unique(np.asarray(true_faulty, np.int64))
  if true.size == 0:
    raise ValueError("true_faulty is empty: FedDebug's accuracy is undefined")
  hits = np.isin(np.asarray(predicted_faulty), true).sum(axis=-1)
  return float(np.mean(hits / true.size * 100.0))


def feddebug_round(model: ModelDef, client_vars: Variables, faulty_positions: Sequence[int],
                   key: jax.Array, *, num_inputs: int = 10, threshold: float = 0.003,
                   normalize: Callable[[jax.Array], jax.Array] | None = None,
                   clients_per_chunk: int | None = None) -> dict[str, float]:
  """FedDebug on one round as the original ran it beside TraceFL in faulty mode (spec 7).

  Draws `num_inputs` random inputs, removes as many clients as there are faulty ones, and
  returns `feddebug_accuracy` (a fraction, as TraceFL's is) and `feddebug_seconds_per_input`
  (wall time of the localisation, synchronised; the first call includes compilation).
  """
  faulty = sorted(set(int(f) for f in faulty_positions))
  x = feddebug_inputs(key, num_inputs, model.input_shape, normalize)
  t0 = time.perf_counter()
  result = feddebug_localize(model, client_vars, x, threshold=threshold,
                             num_faulty=len(faulty), clients_per_chunk=clients_per_chunk)
  predicted = np.asarray(jax.block_until_ready(result.predicted_faulty))
  seconds = time.perf_counter() - t0
  return {"feddebug_accuracy": feddebug_accuracy(predicted, faulty) / 100.0,
          "feddebug_seconds_per_input": seconds / num_inputs}
