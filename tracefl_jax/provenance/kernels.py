"""TraceFL client scores `c[l, n, k]` for all clients at once: three exact kernels.

Spec section 2: c[n,k,l] = beta_l * < f_l(a_{l-1}; theta_{k,l}), g_l >, client k's OWN unit l
evaluated on the GLOBAL model's input to it, dotted with G's output gradient of the target
logit. Dense, Conv and LayerNorm units are linear in their own parameters (no parameter-free
term), so < f_l(a; theta), g > = < theta, grad_theta < f_l(a; theta), g > > and:

  "reference"  evaluates each client's unit on G's captured input and dots with g_l: the
               original's procedure, vectorised over clients; exact for ANY unit, including
               non-affine whole blocks (a BERT layer).
  "grad"       gradient contraction: per-input gradients of < f_l(a_n; .), g_n > w.r.t. the
               unit's parameters (one vjp per unit, vmapped over inputs; independent of the
               parameters) contracted with the stacked client parameters: [N, P_l] x [K, P_l].
               Cost: one forward/backward of G plus 2 N P K multiply-adds; best when clients
               outnumber inputs.
  "jvp"        G's target-logit function linearised once (jax.linearize) and pushed along each
               client's beta-scaled traced weights (zeros elsewhere): T[n, k] is the
               directional derivative d/de s(x_n; G + e v_k). Cost: K linear forward passes.

All operate on `client_vars` stacked `[K, ...]` and return per-layer scores `[L, N, K]`
(before the beta decay; `attribution.py` applies beta and the data-size factor). Each kernel is
split in two: a `*_scorer` does G's share of the work once (capture, per-input gradients, the
linearisation) and returns a `Scorer`, a function of stacked client params alone; the client
axis is then added by calling it on all clients, or on each device's clients of a mesh
(`attribution.trace_clients(mesh=...)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tracefl_jax.models.base import ModelDef, Variables, get_layer
from tracefl_jax.models.layers import PatchConv, conv_geometry, image_patches
from tracefl_jax.provenance.capture import LayerView, capture, explained, target_logits

# Stacked client params (leaves [c, ...]) -> scores [L, N, c]; closes over G's work.
Scorer = Callable[[Any], jax.Array]


def _map_clients(fn, client_params: Any, clients_per_chunk: int | None) -> jax.Array:
  """fn(one client's params) -> [..]; stacked over clients, chunked to bound memory."""
  if clients_per_chunk:
    return jax.lax.map(fn, client_params, batch_size=clients_per_chunk)
  return jax.vmap(fn)(client_params)


def _map_client_chunks(fn, client_params: Any, clients_per_chunk: int) -> jax.Array:
  """fn(params of a chunk of clients, leaves [c, ...]) -> [N, c]; concatenated to [N, K]."""
  k = jax.tree.leaves(client_params)[0].shape[0]
  if k <= clients_per_chunk:
    return fn(client_params)
  full = k // clients_per_chunk * clients_per_chunk
  chunks = jax.tree.map(lambda a: a[:full].reshape(-1, clients_per_chunk, *a.shape[1:]),
                        client_params)
  out = jax.lax.map(fn, chunks)  # [K // c, N, c]
  out = jnp.moveaxis(out, 0, 1).reshape(out.shape[1], full)
  if full < k:
    out = jnp.concatenate([out, fn(jax.tree.map(lambda a: a[full:], client_params))], axis=1)
  return out


# Columns per block of the grad kernel's contraction: XLA:CPU's dot runs below peak when the
# contracted axis (a dense kernel's 0.5 M entries) overflows the caches; a scan over
# cache-sized blocks of it restores the rate (benchmarks/README.md, "Provenance").
CONTRACT_BLOCK = 8192


def contract_blocked(grads: jax.Array, theta: jax.Array,
                     block: int = CONTRACT_BLOCK) -> jax.Array:
  """[N, P] x [K, P] -> [N, K] in float32 (full precision), blocked over P."""
  hi = jax.lax.Precision.HIGHEST
  p = grads.shape[1]
  if p <= 2 * block:
    return jnp.einsum("np,kp->nk", grads, theta, precision=hi,
                      preferred_element_type=jnp.float32)
  num_blocks = p // block

  def body(acc, i):
    start = i * block
    g = jax.lax.dynamic_slice_in_dim(grads, start, block, axis=1)
    t = jax.lax.dynamic_slice_in_dim(theta, start, block, axis=1)
    return acc + jnp.einsum("kp,np->kn", t, g, precision=hi,
                            preferred_element_type=jnp.float32), None

  acc0 = jnp.zeros((theta.shape[0], grads.shape[0]), jnp.float32)
  acc, _ = jax.lax.scan(body, acc0, jnp.arange(num_blocks))
  out = acc.T
  tail = num_blocks * block
  if tail < p:
    out = out + jnp.einsum("np,kp->nk", grads[:, tail:], theta[:, tail:], precision=hi,
                           preferred_element_type=jnp.float32)
  return out


def _layer_params(params: Any, model: ModelDef) -> list[Any]:
  return [get_layer(params, path) for path in model.traced_layers]


def _dot(out: jax.Array, g: jax.Array) -> jax.Array:
  """< out[n], g[n] > over all positions and features: [N]."""
  return jnp.sum((out * g).reshape(out.shape[0], -1), axis=1)


def reference_scorer(model: ModelDef, global_vars: Variables, x: jax.Array,
                     target: jax.Array | None = None, clients_per_chunk: int | None = None,
                     view: tuple[LayerView, jax.Array] | None = None,
                     block_mask: str = "fixed", output: str = "logit"
                     ) -> tuple[Scorer, jax.Array]:
  """(Scorer evaluating each client's units on G's captured inputs, predicted [N]).

  `block_mask="parity"` calls units that take an attention mask (a `MASK_ARG` attribute,
  e.g. BERT blocks) WITHOUT it, as the original did (padded positions are attended);
  "fixed" passes G's mask.
  """
  layers, predicted = (view if view is not None
                       else capture(model, global_vars, x, target, output))

  def score(client_params: Any) -> jax.Array:
    scores = []
    for unit, args, kwargs, g, theta in zip(layers.units, layers.inputs, layers.kwargs,
                                            layers.grads, _layer_params(client_params, model)):
      mask_arg = getattr(unit, "MASK_ARG", None)
      if block_mask == "parity" and mask_arg is not None and len(args) > mask_arg:
        args = (*args[:mask_arg], None, *args[mask_arg + 1:])
      def one(theta_k, unit=unit, args=args, kwargs=kwargs, g=g):
        return _dot(unit.apply({"params": theta_k}, *args, **kwargs), g)
      scores.append(_map_clients(one, theta, clients_per_chunk).T)   # [N, c]
    return jnp.stack(scores)
  return score, predicted


def reference_scores(model: ModelDef, global_vars: Variables, client_vars: Variables,
                     x: jax.Array, target: jax.Array | None = None,
                     clients_per_chunk: int | None = None,
                     view: tuple[LayerView, jax.Array] | None = None,
                     block_mask: str = "fixed") -> tuple[jax.Array, jax.Array]:
  """(c [L, N, K], predicted [N]) by evaluating each client's units on G's inputs."""
  score, predicted = reference_scorer(model, global_vars, x, target, clients_per_chunk, view,
                                      block_mask)
  return score(client_vars["params"]), predicted


def per_input_grads(unit: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    g: jax.Array, theta_g: Any) -> Any:
  """grad_theta < unit(a_n; theta), g_n > for every input n: a pytree like theta, leaves [N, ...].

  Dense and Conv units get it in closed form from G's batched capture (an outer product of
  inputs and output gradients; for Conv, over image patches): one einsum for all inputs.
  Anything else takes one vjp per input, vmapped (a vmapped batch-1 convolution lowers to a
  grouped convolution, several times slower, hence the closed forms). Both are exact because
  the units are linear in their parameters.
  """
  hi = jax.lax.Precision.HIGHEST
  n = g.shape[0]
  if not kwargs and len(args) == 1 and isinstance(unit, nn.Dense):
    a = args[0].reshape(n, -1, args[0].shape[-1])
    gg = g.reshape(n, -1, g.shape[-1])
    out = {"kernel": jnp.einsum("nti,nto->nio", a, gg, precision=hi)}
    if unit.use_bias:
      out["bias"] = jnp.sum(gg, axis=1)
    return out
  if not kwargs and len(args) == 1 and _plain_conv(unit, args[0]):
    a = args[0]
    geo = conv_geometry(unit)
    patches = image_patches(a, geo)  # [N, H', W', C_in * prod(window)], channel-major
    cin, cout = a.shape[-1], g.shape[-1]
    kgrad = jnp.einsum("nop,noc->npc", patches.reshape(n, -1, patches.shape[-1]),
                       g.reshape(n, -1, cout), precision=hi)
    kgrad = kgrad.reshape(n, cin, *geo.window, cout)
    out = {"kernel": jnp.moveaxis(kgrad, 1, -2)}  # [N, *window, C_in, C_out]
    if unit.use_bias:
      out["bias"] = jnp.sum(g.reshape(n, -1, cout), axis=1)
    return out

  def one(args_n, g_n):
    # Linear in theta, so the gradient is the same at any point; G's weights are handy.
    f = lambda th: unit.apply({"params": th}, *(x[None] for x in args_n), **kwargs)  # noqa: E731
    _, vjp = jax.vjp(f, theta_g)
    return vjp(g_n[None])[0]
  return jax.vmap(one)(args, g)


def _plain_conv(unit: nn.Module, a: jax.Array) -> bool:
  """An nn.Conv whose weight gradient the patch formula covers (see `conv_geometry`)."""
  if type(unit) not in (nn.Conv, PatchConv) or a.ndim != 4:  # pylint: disable=unidiomatic-typecheck
    return False
  try:
    conv_geometry(unit)
  except ValueError:
    return False
  return True


def _unit_contraction(unit: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                      g: jax.Array, theta_g: Any) -> Callable[[Any], jax.Array]:
  """theta stacked [c, ...] -> < unit(a_n; theta_k), g_n > as [N, c] for one traced unit.

  A Dense unit on flat inputs a_n^T W_k g_n is contracted in the order whose intermediate is
  smaller: (W_k g_n) first, `[K, I, N]`, when K <= O (K * I * N <= N * I * O; its contracted
  axis, the unit's outputs, stays cache-sized); else the per-input outer products
  `[N, I * O]` contracted with the clients' kernels (benchmarks/README.md, "Measurements
  behind the library's choices"). Other units: per-input parameter gradients, then a
  P-blocked contraction.
  """
  hi = jax.lax.Precision.HIGHEST
  n = g.shape[0]
  if (not kwargs and len(args) == 1 and isinstance(unit, nn.Dense) and args[0].ndim == 2
      and g.ndim == 2):
    a = args[0]
    # Unused (and removed by XLA) when every call has at most O clients.
    outer = [gr.reshape(n, -1)
             for gr in jax.tree.leaves(per_input_grads(unit, args, kwargs, g, theta_g))]

    def dense(theta: Any) -> jax.Array:
      if theta["kernel"].shape[0] > g.shape[1]:
        return sum(contract_blocked(gr, th.reshape(th.shape[0], -1))
                   for gr, th in zip(outer, jax.tree.leaves(theta)))
      wg = jnp.einsum("kio,no->kin", theta["kernel"], g, precision=hi,
                      preferred_element_type=jnp.float32)
      out = jnp.einsum("kin,ni->nk", wg, a, precision=hi, preferred_element_type=jnp.float32)
      if unit.use_bias:
        out = out + jnp.einsum("no,ko->nk", g, theta["bias"], precision=hi,
                               preferred_element_type=jnp.float32)
      return out
    return dense

  grads = [gr.reshape(n, -1)
           for gr in jax.tree.leaves(per_input_grads(unit, args, kwargs, g, theta_g))]

  def blocked(theta: Any) -> jax.Array:
    return sum(contract_blocked(gr, th.reshape(th.shape[0], -1))
               for gr, th in zip(grads, jax.tree.leaves(theta)))
  return blocked


def grad_scorer(model: ModelDef, global_vars: Variables, x: jax.Array,
                target: jax.Array | None = None, clients_per_chunk: int | None = None,
                output: str = "logit") -> tuple[Scorer, jax.Array]:
  """(Scorer contracting G's per-input parameter gradients with client weights, predicted)."""
  layers, predicted = capture(model, global_vars, x, target, output)
  contractions = [_unit_contraction(unit, args, kwargs, g, theta_g)
                  for unit, args, kwargs, g, theta_g in zip(
                      layers.units, layers.inputs, layers.kwargs, layers.grads,
                      _layer_params(global_vars["params"], model))]

  def score(client_params: Any) -> jax.Array:
    scores = []
    for contract, theta in zip(contractions, _layer_params(client_params, model)):
      if clients_per_chunk:
        scores.append(_map_client_chunks(contract, theta, clients_per_chunk))
      else:
        scores.append(contract(theta))
    return jnp.stack(scores)
  return score, predicted


def grad_scores(model: ModelDef, global_vars: Variables, client_vars: Variables,
                x: jax.Array, target: jax.Array | None = None,
                clients_per_chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(c [L, N, K], predicted [N]) by per-input parameter gradients x stacked client weights."""
  score, predicted = grad_scorer(model, global_vars, x, target, clients_per_chunk)
  return score(client_vars["params"]), predicted


def jvp_scorer(model: ModelDef, global_vars: Variables, x: jax.Array,
               target: jax.Array | None = None, clients_per_chunk: int | None = None,
               per_layer: bool = True, betas: jax.Array | None = None,
               output: str = "logit") -> tuple[Scorer, jax.Array]:
  """(Scorer pushing each client's direction through G linearised once, predicted [N]).

  The Scorer returns c [L, N, c] or, with per_layer=False, beta-weighted totals [1, N, c].
  Each client's direction holds its weights on traced units (times beta_l when totals are
  asked for) and zeros on every other parameter.
  """
  params = global_vars["params"]
  state = {k: v for k, v in global_vars.items() if k != "params"}
  logits = model.logits(global_vars, x)
  _, predicted = target_logits(logits, target)
  tgt = predicted if target is None else target

  def s(p):
    return explained(model.logits({"params": p, **state}, x), tgt, output)

  _, s_lin = jax.linearize(s, params)
  paths = model.traced_layers

  def direction(theta_k, layers, scale):
    # Not zeros_like: it would copy a committed G's mesh sharding, which clashes with the
    # manual mesh inside a shard_map (trace_clients(mesh=...)).
    d = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params)
    for l in layers:
      d = _set_layer(d, paths[l], jax.tree.map(lambda a: a * scale[l], get_layer(theta_k,
                                                                                 paths[l])))
    return d

  num_layers = len(paths)
  if per_layer:
    groups = [[l] for l in range(num_layers)]
    scale = jnp.ones(num_layers)
  else:
    groups = [list(range(num_layers))]
    scale = betas if betas is not None else jnp.ones(num_layers)

  def one(theta_k):
    return jnp.stack([s_lin(direction(theta_k, layers, scale)) for layers in groups])  # [G, N]

  def score(client_params: Any) -> jax.Array:
    out = _map_clients(one, client_params, clients_per_chunk)  # [c, G, N]
    return jnp.transpose(out, (1, 2, 0))
  return score, predicted


def jvp_scores(model: ModelDef, global_vars: Variables, client_vars: Variables,
               x: jax.Array, target: jax.Array | None = None,
               clients_per_chunk: int | None = None,
               per_layer: bool = True, betas: jax.Array | None = None) -> tuple[jax.Array,
                                                                                 jax.Array]:
  """(c [L, N, K] or, with per_layer=False, beta-weighted totals [1, N, K], predicted [N])."""
  score, predicted = jvp_scorer(model, global_vars, x, target, clients_per_chunk, per_layer,
                                betas)
  return score(client_vars["params"]), predicted


def _set_layer(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
  if len(path) == 1:
    return {**tree, path[0]: value}
  return {**tree, path[0]: _set_layer(tree[path[0]], path[1:], value)}
