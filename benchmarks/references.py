"""Hand-written JAX references for `bench_reference.py`: what a user who knows JAX writes in
25 lines, without the library, for the same work.

- `reference_round`: one FedAvg round on pre-shaped client data `[K, S, ...]` (S the largest
  client, padded, a real-example mask): a vmap over clients of a `lax.scan` over epochs of a
  `lax.scan` of SGD steps, then the example-weighted mean. Every client runs the largest
  client's step count (padding steps have an all-zero mask, so with SGD they change nothing).
  Each epoch is shuffled with the library's `shuffle_order` on the library's keys, so on the
  same data the reference's G_t equals the library's (the benchmark checks it).
- `einsum_scores`: TraceFL's T [N, K] from the formula of `provenance.kernels`: G's traced
  layer inputs a_l and output gradients g_l (a forward with zero perturbations on every
  layer's output, differentiated), then per layer one einsum with the stacked client weights
  (Dense: a^T W_k g; Conv: image patches, G's per-input kernel gradient, then a contraction).
- `jvp_scores`: the same T as one `jax.jvp` of the target logit per client, along the
  client's beta-scaled weights.

The models are the library's MLP and FedAvg CNN written out by hand (`forward`); parameters
are the library's own pytrees (`Dense_i`, `Conv_i` with `kernel`, `bias`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tracefl_jax.fl.client import shuffle_order

HI = jax.lax.Precision.HIGHEST


def _layer_names(params):
  """Traced layers in forward order: convolutions first, then dense layers, by index."""
  convs = sorted((k for k in params if k.startswith("Conv_")), key=lambda k: int(k[5:]))
  dense = sorted((k for k in params if k.startswith("Dense_")), key=lambda k: int(k[6:]))
  return convs + dense


def forward(params, x, eps=None):
  """Logits [N, C] of the MLP (Dense layers, ReLU between) or the FedAvg CNN (5x5 SAME
  convolutions, ReLU, 2x2 max pooling, then Dense layers); `eps[l]` is added to traced layer
  l's output. Returns (logits, inputs of each traced layer, their outputs)."""
  names = _layer_names(params)
  inputs, outputs, h = [], [], x
  for l, name in enumerate(names):
    p = params[name]
    if name.startswith("Dense_") and h.ndim > 2:
      h = h.reshape(h.shape[0], -1)
    inputs.append(h)
    if name.startswith("Conv_"):
      h = jax.lax.conv_general_dilated(h, p["kernel"], (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=HI) + p["bias"]
    else:
      h = jnp.dot(h, p["kernel"], precision=HI) + p["bias"]
    if eps is not None:
      h = h + eps[l]
    outputs.append(h)
    if l < len(names) - 1:
      h = jax.nn.relu(h)
      if name.startswith("Conv_"):
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                  "VALID")
  return h, inputs, outputs


def reference_round(params, xs, ys, counts, keys, *, lr, batch_size, epochs):
  """G_t after one FedAvg round of plain SGD. xs [K, S, ...], ys [K, S], counts [K] (real
  examples first in each row), keys [K] client keys; S a multiple of batch_size."""
  s = xs.shape[1]
  steps = s // batch_size

  def loss(p, x, y, m):
    logits = forward(p, x)[0]
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)

  def client(x, y, n, key):
    def epoch(p, epoch_key):
      order = shuffle_order(jax.random.split(epoch_key)[0], s, n)
      m = (order < n).astype(jnp.float32).reshape(steps, batch_size)
      xb = x[order].reshape(steps, batch_size, *x.shape[1:])
      yb = y[order].reshape(steps, batch_size)

      def step(p, b):
        g = jax.grad(loss)(p, *b)
        return jax.tree.map(lambda a, d: a - lr * d, p, g), None
      return jax.lax.scan(step, p, (xb, yb, m))[0], None
    return jax.lax.scan(epoch, params, jax.random.split(key, epochs))[0]

  trained = jax.vmap(client)(xs, ys, counts, keys)
  w = counts.astype(jnp.float32) / jnp.sum(counts)
  return jax.tree.map(lambda a: jnp.tensordot(w, a, axes=1), trained)


def _betas(num_layers, decay=0.9):
  return decay ** jnp.arange(num_layers - 1, -1, -1, dtype=jnp.float32)


def _target_logit(params, x):
  return jnp.argmax(forward(params, x)[0], -1)


def einsum_scores(g_params, client_params, x):
  """T [N, K]: sum_l beta_l < f_l(a_l; theta_{k,l}), g_l > for G's predicted logit."""
  names = _layer_names(g_params)
  target = _target_logit(g_params, x)
  _, inputs, outputs = forward(g_params, x)
  zeros = [jnp.zeros_like(o) for o in outputs]

  def s(eps):
    out = forward(g_params, x, eps)[0]
    return jnp.sum(jnp.take_along_axis(out, target[:, None], axis=1))
  grads = jax.grad(s)(zeros)
  betas = _betas(len(names))
  total = 0.0
  for l, name in enumerate(names):
    a, g, th = inputs[l], grads[l], client_params[name]
    if name.startswith("Conv_"):
      _, kh, kw, cin, cout = th["kernel"].shape
      patches = jax.lax.conv_general_dilated_patches(
          a, (kh, kw), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
          precision=HI)  # [N, H, W, cin * kh * kw], channel-major
      n = a.shape[0]
      per_input = jnp.einsum("ntp,nto->npo", patches.reshape(n, -1, patches.shape[-1]),
                             g.reshape(n, -1, cout), precision=HI)
      w = jnp.transpose(th["kernel"], (0, 3, 1, 2, 4)).reshape(-1, cin * kh * kw, cout)
      c = jnp.einsum("npo,kpo->nk", per_input, w, precision=HI)
      c = c + jnp.einsum("nto,ko->nk", g.reshape(n, -1, cout), th["bias"], precision=HI)
    else:
      c = jnp.einsum("ni,kio,no->nk", a, th["kernel"], g, precision=HI)
      c = c + jnp.einsum("no,ko->nk", g, th["bias"], precision=HI)
    total = total + betas[l] * c
  return total


def jvp_scores(g_params, client_params, x):
  """T [N, K]: per client one jvp of the target logits along its beta-scaled weights."""
  names = _layer_names(g_params)
  target = _target_logit(g_params, x)
  betas = _betas(len(names))

  def s(p):
    out = forward(p, x)[0]
    return jnp.take_along_axis(out, target[:, None], axis=1)[:, 0]

  def one(theta):
    v = {name: jax.tree.map(lambda a, b=betas[l]: a * b, theta[name])
         for l, name in enumerate(names)}
    return jax.jvp(s, (g_params,), (v,))[1]
  return jax.vmap(one)(client_params).T
