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
(before the beta decay; `attribution.py` applies beta and the data-size factor).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tracefl_jax.models.base import ModelDef, Variables, get_layer
from tracefl_jax.provenance.capture import LayerView, capture, target_logits


def _map_clients(fn, client_params: Any, clients_per_chunk: int | None) -> jax.Array:
  """fn(one client's params) -> [..]; stacked over clients, chunked to bound memory."""
  if clients_per_chunk:
    return jax.lax.map(fn, client_params, batch_size=clients_per_chunk)
  return jax.vmap(fn)(client_params)


def _layer_params(params: Any, model: ModelDef) -> list[Any]:
  return [get_layer(params, path) for path in model.traced_layers]


def _dot(out: jax.Array, g: jax.Array) -> jax.Array:
  """< out[n], g[n] > over all positions and features: [N]."""
  return jnp.sum((out * g).reshape(out.shape[0], -1), axis=1)


def reference_scores(model: ModelDef, global_vars: Variables, client_vars: Variables,
                     x: jax.Array, target: jax.Array | None = None,
                     clients_per_chunk: int | None = None,
                     view: tuple[LayerView, jax.Array] | None = None,
                     block_mask: str = "fixed") -> tuple[jax.Array, jax.Array]:
  """(c [L, N, K], predicted [N]) by evaluating each client's units on G's inputs.

  `block_mask="parity"` calls units that take an attention mask (a `MASK_ARG` attribute,
  e.g. BERT blocks) WITHOUT it, as the original did (padded positions are attended);
  "fixed" passes G's mask.
  """
  layers, predicted = view if view is not None else capture(model, global_vars, x, target)
  client_layers = _layer_params(client_vars["params"], model)
  scores = []
  for unit, args, kwargs, g, theta in zip(layers.units, layers.inputs, layers.kwargs,
                                          layers.grads, client_layers):
    mask_arg = getattr(unit, "MASK_ARG", None)
    if block_mask == "parity" and mask_arg is not None and len(args) > mask_arg:
      args = (*args[:mask_arg], None, *args[mask_arg + 1:])
    def one(theta_k, unit=unit, args=args, kwargs=kwargs, g=g):
      return _dot(unit.apply({"params": theta_k}, *args, **kwargs), g)
    scores.append(_map_clients(one, theta, clients_per_chunk).T)   # [N, K]
  return jnp.stack(scores), predicted


def grad_scores(model: ModelDef, global_vars: Variables, client_vars: Variables,
                x: jax.Array, target: jax.Array | None = None,
                clients_per_chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(c [L, N, K], predicted [N]) by per-input parameter gradients x stacked client weights."""
  layers, predicted = capture(model, global_vars, x, target)
  global_layers = _layer_params(global_vars["params"], model)
  client_layers = _layer_params(client_vars["params"], model)
  scores = []
  for unit, args, kwargs, g, theta_g, theta in zip(layers.units, layers.inputs, layers.kwargs,
                                                   layers.grads, global_layers, client_layers):
    def per_input(args_n, g_n, unit=unit, kwargs=kwargs, theta_g=theta_g):
      # Linear in theta, so the gradient is the same at any point; G's weights are handy.
      f = lambda th: unit.apply({"params": th}, *(a[None] for a in args_n), **kwargs)  # noqa: E731
      _, vjp = jax.vjp(f, theta_g)
      return vjp(g_n[None])[0]
    grads = jax.vmap(per_input)(args, g)  # pytree of [N, ...]
    n = g.shape[0]

    def contract(theta_k, grads=grads, n=n):
      return sum(jnp.sum(gr.reshape(n, -1) * th.reshape(1, -1), axis=1)
                 for gr, th in zip(jax.tree.leaves(grads), jax.tree.leaves(theta_k)))
    if clients_per_chunk:
      scores.append(_map_clients(contract, theta, clients_per_chunk).T)
    else:
      scores.append(sum(
          jnp.einsum("np,kp->nk", gr.reshape(n, -1), th.reshape(th.shape[0], -1),
                     precision=jax.lax.Precision.HIGHEST)
          for gr, th in zip(jax.tree.leaves(grads), jax.tree.leaves(theta))))
  return jnp.stack(scores), predicted


def jvp_scores(model: ModelDef, global_vars: Variables, client_vars: Variables,
               x: jax.Array, target: jax.Array | None = None,
               clients_per_chunk: int | None = None,
               per_layer: bool = True, betas: jax.Array | None = None) -> tuple[jax.Array,
                                                                                 jax.Array]:
  """(c [L, N, K] or, with per_layer=False, beta-weighted totals [1, N, K], predicted [N]).

  G is linearised once; each client's direction holds its weights on traced units (times
  beta_l when totals are asked for) and zeros on every other parameter.
  """
  params = global_vars["params"]
  state = {k: v for k, v in global_vars.items() if k != "params"}
  logits = model.logits(global_vars, x)
  _, predicted = target_logits(logits, target)
  tgt = predicted if target is None else target

  def s(p):
    out = model.logits({"params": p, **state}, x)
    return jnp.take_along_axis(out, tgt[:, None].astype(jnp.int32), axis=-1)[:, 0]

  _, s_lin = jax.linearize(s, params)
  paths = model.traced_layers

  def direction(theta_k, layers, scale):
    d = jax.tree.map(jnp.zeros_like, params)
    for l in layers:
      d = _set_layer(d, paths[l], jax.tree.map(lambda a: a * scale[l], get_layer(theta_k,
                                                                                 paths[l])))
    return d

  num_layers = len(paths)
  if per_layer:
    ones = jnp.ones(num_layers)
    groups = [[l] for l in range(num_layers)]
    scale = ones
  else:
    groups = [list(range(num_layers))]
    scale = betas if betas is not None else jnp.ones(num_layers)

  def one(theta_k):
    return jnp.stack([s_lin(direction(theta_k, layers, scale)) for layers in groups])  # [G, N]

  out = _map_clients(one, client_vars["params"], clients_per_chunk)  # [K, G, N]
  return jnp.transpose(out, (1, 2, 0)), predicted


def _set_layer(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
  if len(path) == 1:
    return {**tree, path[0]: value}
  return {**tree, path[0]: _set_layer(tree[path[0]], path[1:], value)}
