"""`trace_clients`: TraceFL's answer for a batch of inputs (spec section 2, steps 1-6).

T[n, k] = sum_l beta_l c[l, n, k], beta_l = decay ** (L - 1 - l); P = softmax_k T (float32,
temperature 1); the traced client is argmax_k P, the first in the round's order on ties.
Optional data-size factor p_k = n_k / sum_j n_j multiplies every client parameter (paper
Eq. 5); for affine units that scales client k's scores by p_k.

score="first_order" (weight-aware provenance) scores client k by the first-order
leave-one-client-out drop of the explained logit (spec section 8):

  F[n, k] = w_k / (W - w_k) * (T[n, k] - T_G[n]),   T = sum_l c[l, n, k] (no decay),

with the round's aggregation weights w_k, W = sum_k w_k, and T_G the same sum for G's own
parameters. For affine traced units T[n, k] - T_G[n] = < grad s_n(G), theta_k - G > restricted
to the traced units, and G_{-k} - G = w_k (G - theta_k) / (W - w_k), so F[n, k] is
s_n(G) - s_n(G_{-k}) to first order (exact for a model linear in its parameters). TraceFL's T
drops the factor w_k / (W - w_k) and the decay; with unequal weights its argmax is then not the
counterfactual's. The kernels, sharding and chunking are TraceFL's; G is scored as one more
client (cost K + 1 instead of K).

That closed form is FedAvg's. For any other server side (median, trimmed mean, Krum, a server
optimizer), `trace_clients(score="first_order", weights=w, reaggregate=output.reaggregate)`
scores the round's own removal (`removal.py`):

  F[n, k] = < grad s_n(G), G - G_{-k} >  over the traced units,

with G and every G_{-k} re-computed by the round's rule and server step (K + 1
re-aggregations, then the same kernels and contraction). Under FedAvg the two are equal
(G - G_{-k} = w_k (theta_k - G) / (W - w_k)); for a whole-block (non-affine) unit the
difference of the unit's outputs replaces the inner product.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.models.base import TRACED_UNIT_TYPES, ModelDef, Variables
from tracefl_jax.provenance import kernels, sharded
from tracefl_jax.provenance.checks import (check_client_ids, check_inputs, check_removal_weights,
                                           check_sizes, check_target, check_variables)
from tracefl_jax.provenance.capture import OUTPUTS, target_logits

KERNELS = ("auto", "grad", "jvp", "reference")
SCORES = ("tracefl", "first_order")


class ProvenanceResult(NamedTuple):
  """TraceFL's answer for N inputs over the round's K clients.

  Columns of `scores`, `probs` and `layer_scores` are positions in the round's client order;
  `client_ids[k]` is the global id of the client at position k. `traced_client` is a global
  id (equal to the position when `trace_clients` got no `client_ids`), `traced_position` the
  column it came from.

  A non-finite score is never an attribution: an input with any NaN or infinite score (NaN
  in a client's or G's parameters, or in the input) has `attributable` False, its
  `traced_client` and `traced_position` are -1 and its `probs` row is NaN; `scores` keep the
  raw values for inspection.
  """
  scores: jax.Array               # T [N, K] float32
  probs: jax.Array                # P [N, K] softmax over clients
  traced_client: jax.Array        # [N] int32, global id of the responsible client
  traced_position: jax.Array      # [N] int32, its position (column) in the round
  client_ids: jax.Array           # [K] int32, global id of each column
  predicted: jax.Array            # [N] int32, G's eval-mode argmax
  layer_scores: jax.Array | None  # c [L, N, K] with beta applied, when requested
  attributable: jax.Array         # [N] bool, every score of the input finite
  # [N, K] the weight-aware score beside the paper's T, from the same kernel pass, when
  # score="tracefl" got the round's weights (see `trace_clients`).
  first_order_scores: jax.Array | None = None


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


def choose_kernel(model: ModelDef) -> str:
  """The fastest exact kernel for the model: "reference" when a traced unit is not affine,
  else "grad" (one forward/backward of G plus a 2 N P K contraction), measured fastest at
  every K (benchmarks/README.md, "Measurements behind the library's choices")."""
  return "grad" if is_affine(model) else "reference"


def layer_sum(c: jax.Array, betas: jax.Array) -> jax.Array:
  """sum_l betas[l] * c[l] over the short leading layer axis of c [L, N, K], as L - 1
  elementwise adds: XLA:CPU (jax 0.10, its YNNPACK reduce fusion) runs it as a reduction
  far slower (benchmarks/README.md, "Speed of light"). Not a dot:
  a dot may round two equal columns differently, and equal clients must tie exactly."""
  return functools.reduce(operator.add, [c[l] * betas[l] for l in range(c.shape[0])])


@functools.partial(jax.jit, static_argnames=("model", "kernel", "decay", "use_decay",
                                             "use_size_factor", "return_layers",
                                             "clients_per_chunk", "block_mask", "mesh",
                                             "score", "with_first_order", "output"))
def _trace(model, global_vars, client_vars, x, target, client_sizes, client_ids, weights,
           reaggregate=None, *, kernel, decay, use_decay, use_size_factor, return_layers,
           clients_per_chunk, block_mask, mesh, score, with_first_order=False,
           output="logit"):
  num_layers = len(model.traced_layers)
  first_order = score == "first_order"
  need_g = first_order or with_first_order  # G scored as one more client
  betas = layer_betas(num_layers, decay, use_decay and not first_order)
  if use_size_factor:
    p = client_sizes.astype(jnp.float32) / jnp.sum(client_sizes)
    if kernel == "reference":  # a non-affine unit: scale the parameters themselves
      client_vars = {**client_vars, "params": jax.tree.map(
          lambda a: a * p.reshape(-1, *([1] * (a.ndim - 1))).astype(a.dtype),
          client_vars["params"])}
  totals_only = kernel == "jvp" and not return_layers and not with_first_order
  if totals_only:
    make = functools.partial(kernels.jvp_scorer, per_layer=False, betas=betas, output=output)
  else:
    make = {"grad": functools.partial(kernels.grad_scorer, output=output),
            "jvp": functools.partial(kernels.jvp_scorer, output=output),
            "reference": functools.partial(kernels.reference_scorer, block_mask=block_mask,
                                           output=output)}[kernel]
  g_params = jax.tree.map(lambda a: a[None], global_vars["params"])  # G as one client
  by_rule = need_g and reaggregate is not None
  if mesh is None:
    scorer, predicted = make(model, global_vars, x, target, clients_per_chunk)
    c = scorer(client_vars["params"])
  elif kernel == "jvp":
    # G's linearisation cannot be closed over by a shard_map (its residuals carry the outer
    # mesh), so each device linearises G itself: one more linear pass next to its K / D.
    _, predicted = target_logits(model.logits(global_vars, x), target)

    def scorer(th):
      return make(model, global_vars, x, target, clients_per_chunk)[0](th)
    c = sharded.score_clients(scorer, client_vars["params"], mesh)
  else:
    # G's forward/backward is split over the devices by input and its results gathered into
    # every device's scorer, not repeated on each device.
    x = jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(mesh.axis_names[0])))
    scorer, predicted = make(model, global_vars, x, target, clients_per_chunk)
    c = sharded.score_clients(scorer, client_vars["params"], mesh)
  if by_rule:  # G re-computed and every G_{-k}, dealt to the devices with a mesh
    c_g = sharded.removal_scores(scorer, reaggregate, weights, clients_per_chunk, mesh)
  else:  # G scored as one client, on every device
    c_g = scorer(g_params) if need_g else None
  c, predicted, c_g = sharded.replicated((c, predicted, c_g), mesh)
  fo_scores = None
  if by_rule:  # [L, N, 1] (G re-computed) - [L, N, K] (each G_{-k}): < grad s, G - G_{-k} >
    fo = c_g[:, :, :1] - c_g[:, :, 1:]
  elif need_g:  # [L, N, K] - [L, N, 1], then w_k / (W - w_k) per client, all layers alike
    w = weights.astype(jnp.float32)
    fo = (c - c_g) * (w / (jnp.sum(w) - w))[None, None, :]
  if need_g:
    if first_order:
      c = fo
    else:
      fo_scores = layer_sum(fo, jnp.ones(num_layers, jnp.float32)).astype(jnp.float32)
  if totals_only:
    layer_scores, scores = None, c[0]
  else:
    layer_scores = c * betas[:, None, None]
    scores = layer_sum(c, betas)
  if use_size_factor and kernel != "reference" and not first_order:
    scores = scores * p[None, :]
    layer_scores = None if layer_scores is None else layer_scores * p[None, None, :]
  scores = scores.astype(jnp.float32)
  attributable = jnp.all(jnp.isfinite(scores), axis=-1)
  probs = jax.nn.softmax(scores, axis=-1)
  # argmax takes the first on ties; a NaN row would otherwise report client 0.
  position = jnp.where(attributable, jnp.argmax(probs, axis=-1), -1).astype(jnp.int32)
  # Softmax over a row holding -inf next to finite scores would look valid; poison it too.
  probs = jnp.where(attributable[:, None], probs, jnp.nan)
  traced = jnp.where(attributable, client_ids[jnp.maximum(position, 0)], -1)
  return sharded.replicated(ProvenanceResult(
      scores, probs, traced, position, client_ids, predicted,
      layer_scores if return_layers else None, attributable, fo_scores), mesh)


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
    mesh: jax.sharding.Mesh | None = None,
    score: str = "tracefl",
    weights: jax.Array | None = None,
    reaggregate: Any = None,
    output: str = "logit",
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
    clients_per_chunk: bound memory by processing this many clients at a time (None or 0:
      all at once).
    block_mask: for whole-block units with an attention mask (BERT): "fixed" evaluates the
      client's block with G's mask; "parity" without it, as the original did.
    client_ids: `[K]` integer global ids of the round's clients in [0, 2**31 - 1);
      `traced_client` then holds ids (default: positions 0..K-1).
    score: "tracefl" (the paper's T) or "first_order" (weight-aware: w_k / (W - w_k) *
      (T_k - T_G) over all traced units, no decay; see the module docstring). `scores`,
      `probs` (softmax of the scores) and `layer_scores` (per-layer terms of the sum) then
      hold that score.
    weights: `[K]` the round's aggregation weights w_k: needed by "first_order"; with
      "tracefl" (and not `use_size_factor` with the reference kernel, which scales the
      clients' parameters), `first_order_scores` then holds the weight-aware score too,
      from the same kernel pass (one compiled program for both).
    reaggregate: the round's server side (`RoundOutput.reaggregate`, weights -> G): the
      first-order score (`score="first_order"`, or `first_order_scores` beside TraceFL) then
      removes each client by the round's own rule and server optimizer, < grad s(G),
      G - G_{-k} > (module docstring), instead of FedAvg's closed form. Needs `weights`.
    output: the explained output s_n (`capture.OUTPUTS`): "logit" (the paper's pre-softmax
      logit of the target class), "margin" (that logit minus the log-sum-exp of the other
      classes: what TRAK explains, and the attribution comparison's default) or "log_prob".
      The kernels only need G's gradient of s, so every kernel and score takes any of them.

  Returns:
    `ProvenanceResult`; inputs with a non-finite score have `attributable` False and
    `traced_client == traced_position == -1` (see `ProvenanceResult`).

  Raises:
    ValueError, before anything is traced or compiled, with the bad value and the valid
    choices: client leaves that are not G's leaves stacked `[K, ...]` (the first mismatching
    leaf is named), K = 0, N = 0, inputs not `[N, *model.input_shape]` or of the wrong kind
    (integer inputs for a float model, float inputs for a token model), a target not `[N]`
    integers or (when concrete) outside [0, num_classes), `client_sizes` not `[K]`, negative,
    non-finite or (with `use_size_factor`) all zero, `clients_per_chunk` < 0, decay outside
    (0, 1], unknown kernel, block_mask or score names, a mesh that is not 1-D; client_ids
    that are not `[K]` integers in [0, 2**31 - 1); for "first_order": missing weights, weights
    not `[K]`, negative or non-finite, a client holding all the weight, or use_size_factor.
  """
  if score not in SCORES:
    raise ValueError(f"score={score!r}; valid: {', '.join(SCORES)}")
  if score == "first_order" and use_size_factor:
    raise ValueError("use_size_factor=True applies to score='tracefl' only; score="
                     "'first_order' weighs clients by their aggregation weights")
  if block_mask not in ("fixed", "parity"):
    raise ValueError(f"block_mask={block_mask!r}; valid: fixed, parity")
  if kernel not in KERNELS:
    raise ValueError(f"unknown provenance kernel {kernel!r}; valid: {', '.join(KERNELS)}")
  if output not in OUTPUTS:
    raise ValueError(f"output={output!r}; valid: {', '.join(OUTPUTS)}")
  if not 0 < decay <= 1:
    raise ValueError(f"decay={decay} must be in (0, 1]")
  if clients_per_chunk is not None and not (isinstance(clients_per_chunk, (int, np.integer))
                                            and clients_per_chunk >= 0):
    raise ValueError(f"clients_per_chunk={clients_per_chunk!r} must be None or 0 (off) or a "
                     f"positive int")
  if mesh is not None and len(mesh.axis_names) != 1:
    raise ValueError(f"mesh has axes {mesh.axis_names}; provenance shards clients over a 1-D "
                     f"mesh (tracefl_jax.fl.strategies.client_mesh())")
  # Checks at the Python boundary: inside the jitted kernels these are JAX/Flax tracebacks
  # or, for values, silent wrong answers (a target of -1 wraps around).
  num_clients = check_variables(global_vars, client_vars)
  if not hasattr(x, "shape"):
    x = np.asarray(x)
  check_inputs(model, x)
  if target is not None:
    target = check_target(model, target, x.shape[0])
  if kernel == "auto":
    kernel = choose_kernel(model)
  elif kernel in ("grad", "jvp") and not is_affine(model):
    raise ValueError(f"kernel {kernel!r} is exact only for affine traced units; this model "
                     f"has whole-block units: use kernel='reference' or 'auto'")
  with_first_order = (score == "tracefl" and weights is not None
                      and not (use_size_factor and kernel == "reference"))
  if score == "first_order" or with_first_order:
    weights = check_removal_weights(weights, num_clients, "first_order")
  else:
    weights = None
  if reaggregate is not None and weights is None:
    raise ValueError("reaggregate= scores the round's own removal of each client: it needs "
                     "the round's aggregation weights (weights=output.weights) and "
                     "score='first_order' (or score='tracefl' for first_order_scores beside)")
  if reaggregate is not None and not callable(reaggregate):
    raise TypeError(f"reaggregate must be the round's RoundOutput.reaggregate (weights -> "
                    f"global variables), got {type(reaggregate).__name__}")
  if use_size_factor and client_sizes is None:
    raise ValueError("use_size_factor=True needs client_sizes")
  if client_sizes is None:
    client_sizes = jnp.ones(num_clients, jnp.float32)
  else:
    client_sizes = check_sizes(client_sizes, num_clients, use_size_factor)
  if client_ids is None:
    client_ids = jnp.arange(num_clients, dtype=jnp.int32)
  client_ids = check_client_ids(client_ids, num_clients)
  client_sizes = jnp.asarray(client_sizes)
  if mesh is not None:
    # Every device needs these whole. Left uncommitted, they may be given an uneven input
    # sharding by XLA's propagation (from the split of G's work over inputs) that jax cannot
    # express as a NamedSharding (IndivisibleError at compile).
    global_vars, x, target, client_sizes, client_ids, weights, reaggregate = jax.device_put(
        (global_vars, x, target, client_sizes, client_ids, weights, reaggregate),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return _trace(model, global_vars, client_vars, x, target,
                client_sizes, client_ids, weights, reaggregate, score=score, kernel=kernel,
                decay=float(decay),
                use_decay=bool(use_decay), use_size_factor=bool(use_size_factor),
                return_layers=bool(return_layers),
                clients_per_chunk=int(clients_per_chunk) if clients_per_chunk else None,
                block_mask=block_mask, mesh=mesh, with_first_order=with_first_order,
                output=output)
