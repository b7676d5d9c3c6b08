"""`trace_clients`: TraceFL's answer for a batch of inputs (spec section 2, steps 1-6).

T[n, k] = sum_l beta_l c[l, n, k], beta_l = decay ** (L - 1 - l); P = softmax_k T (float32,
temperature 1); the traced client is argmax_k P, the first in the round's order on ties.
Optional data-size factor p_k = n_k / sum_j n_j multiplies every client parameter (paper
Eq. 5); for affine units that scales client k's scores by p_k.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tracefl_jax.models.base import TRACED_UNIT_TYPES, ModelDef, Variables
from tracefl_jax.provenance import kernels

KERNELS = ("auto", "grad", "jvp", "reference")


class ProvenanceResult(NamedTuple):
  """TraceFL's answer for N inputs over the round's K clients.

  Columns of `scores`, `probs` and `layer_scores` are positions in the round's client order;
  `client_ids[k]` is the global id of the client at position k. `traced_client` is a global
  id (equal to the position when `trace_clients` got no `client_ids`), `traced_position` the
  column it came from.
  """
  scores: jax.Array               # T [N, K] float32
  probs: jax.Array                # P [N, K] softmax over clients
  traced_client: jax.Array        # [N] int32, global id of the responsible client
  traced_position: jax.Array      # [N] int32, its position (column) in the round
  client_ids: jax.Array           # [K] int32, global id of each column
  predicted: jax.Array            # [N] int32, G's eval-mode argmax
  layer_scores: jax.Array | None  # c [L, N, K] with beta applied, when requested


def layer_betas(num_layers: int, decay: float = 0.9, use_decay: bool = True) -> jax.Array:
  """beta_l = decay ** (L - 1 - l): the last traced layer weighs 1 (spec step 4)."""
  if not use_decay:
    return jnp.ones(num_layers, jnp.float32)
  return jnp.asarray(decay, jnp.float32) ** jnp.arange(num_layers - 1, -1, -1, dtype=jnp.float32)


def is_affine(model: ModelDef) -> bool:
  """Whether every traced unit is linear in its own parameters (grad and jvp are exact).

  True when all units are of the default `TRACED_UNIT_TYPES`; explicit whole-block units
  (a BERT layer) are not.
  """
  return all(isinstance(u.module, TRACED_UNIT_TYPES) for u in model.units())


def choose_kernel(model: ModelDef, num_inputs: int, num_clients: int) -> str:
  """The fastest exact kernel for the shapes.

  Non-affine units need "reference". Otherwise "grad": one forward/backward of G plus a
  2 N P K contraction, measured fastest at every K (benchmarks/bench_provenance.py, FedAvg
  CNN, 20 inputs, 2 CPU cores: grad 8.2 ms vs reference 10.6 ms at K = 10, 19 ms vs 149 ms
  at K = 100, 0.20 s vs 1.6 s at K = 1000; "jvp", K linearised forward passes, 3.0 s).
  """
  del num_inputs, num_clients
  return "grad" if is_affine(model) else "reference"


@functools.partial(jax.jit, static_argnames=("model", "kernel", "decay", "use_decay",
                                             "use_size_factor", "return_layers",
                                             "clients_per_chunk", "block_mask"))
def _trace(model, global_vars, client_vars, x, target, client_sizes, client_ids, *, kernel,
           decay,
           use_decay, use_size_factor, return_layers, clients_per_chunk, block_mask):
  num_layers = len(model.traced_layers)
  betas = layer_betas(num_layers, decay, use_decay)
  if use_size_factor:
    p = client_sizes.astype(jnp.float32) / jnp.sum(client_sizes)
    if kernel == "reference":  # a non-affine unit: scale the parameters themselves
      client_vars = {**client_vars, "params": jax.tree.map(
          lambda a: a * p.reshape(-1, *([1] * (a.ndim - 1))).astype(a.dtype),
          client_vars["params"])}
  if kernel == "jvp" and not return_layers:
    totals, predicted = kernels.jvp_scores(model, global_vars, client_vars, x, target,
                                           clients_per_chunk, per_layer=False, betas=betas)
    layer_scores, scores = None, totals[0]
  else:
    fn = {"grad": kernels.grad_scores, "jvp": kernels.jvp_scores,
          "reference": functools.partial(kernels.reference_scores,
                                         block_mask=block_mask)}[kernel]
    c, predicted = fn(model, global_vars, client_vars, x, target, clients_per_chunk)
    layer_scores = c * betas[:, None, None]
    scores = jnp.sum(layer_scores, axis=0)
  if use_size_factor and kernel != "reference":
    scores = scores * p[None, :]
    layer_scores = None if layer_scores is None else layer_scores * p[None, None, :]
  scores = scores.astype(jnp.float32)
  probs = jax.nn.softmax(scores, axis=-1)
  position = jnp.argmax(probs, axis=-1).astype(jnp.int32)  # argmax takes the first on ties
  return ProvenanceResult(scores, probs, client_ids[position], position, client_ids, predicted,
                          layer_scores if return_layers else None)


def trace_clients(
    model: ModelDef,
    global_vars: Variables,
    client_vars: Variables,
    x: jax.Array,
    *,
    target: jax.Array | None = None,
    kernel: str = "auto",
    decay: float = 0.9,
    use_decay: bool = True,
    client_sizes: jax.Array | None = None,
    use_size_factor: bool = False,
    return_layers: bool = False,
    clients_per_chunk: int | None = None,
    block_mask: str = "fixed",
    client_ids: jax.Array | None = None,
) -> ProvenanceResult:
  """Scores every client for every input: which client is responsible for G's prediction?

  Args:
    model: the `ModelDef` of G and the clients.
    global_vars: G's variables (eval mode: BatchNorm running statistics are used).
    client_vars: the round's client variables, every leaf stacked `[K, ...]`.
    x: `[N, ...]` inputs.
    target: optional `[N]` classes whose logit is explained (faulty-client mode explains the
      predicted wrong class, which is the default anyway); default G's prediction.
    kernel: "grad", "jvp", "reference" or "auto" (see `choose_kernel`).
    decay, use_decay: beta_l = decay ** (L - 1 - l), or all 1.
    client_sizes: `[K]` n_k for the data-size factor (the original counts batches).
    use_size_factor: multiply client parameters by p_k = n_k / sum n (off in the paper).
    return_layers: also return beta-weighted per-layer scores `[L, N, K]`.
    clients_per_chunk: bound memory by processing this many clients at a time.
    block_mask: for whole-block units with an attention mask (BERT): "fixed" evaluates the
      client's block with G's mask; "parity" without it, as the original did.
    client_ids: `[K]` global ids of the round's clients; `traced_client` then holds ids
      (default: positions 0..K-1).
  """
  if block_mask not in ("fixed", "parity"):
    raise ValueError(f"block_mask={block_mask!r}; valid: fixed, parity")
  if kernel not in KERNELS:
    raise ValueError(f"unknown provenance kernel {kernel!r}; valid: {', '.join(KERNELS)}")
  num_clients = jax.tree.leaves(client_vars["params"])[0].shape[0]
  if kernel == "auto":
    kernel = choose_kernel(model, x.shape[0], num_clients)
  elif kernel in ("grad", "jvp") and not is_affine(model):
    raise ValueError(f"kernel {kernel!r} is exact only for affine traced units; this model "
                     f"has whole-block units: use kernel='reference' or 'auto'")
  if use_size_factor and client_sizes is None:
    raise ValueError("use_size_factor=True needs client_sizes")
  if client_sizes is None:
    client_sizes = jnp.ones(num_clients, jnp.float32)
  if client_ids is None:
    client_ids = jnp.arange(num_clients, dtype=jnp.int32)
  client_ids = jnp.asarray(client_ids, jnp.int32)
  if client_ids.shape != (num_clients,):
    raise ValueError(f"client_ids has shape {client_ids.shape}; the round has {num_clients} "
                     f"clients (leading axis of client_vars), so it must be ({num_clients},)")
  if not 0 < decay <= 1:
    raise ValueError(f"decay={decay} must be in (0, 1]")
  return _trace(model, global_vars, client_vars, x, target,
                jnp.asarray(client_sizes), client_ids, kernel=kernel, decay=float(decay),
                use_decay=bool(use_decay), use_size_factor=bool(use_size_factor),
                return_layers=bool(return_layers),
                clients_per_chunk=int(clients_per_chunk) if clients_per_chunk else None,
                block_mask=block_mask)
