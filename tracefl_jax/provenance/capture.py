"""G's internal view of a batch: each traced unit's input a_l and output gradient g_l.

One eval-mode forward of the global model runs under `nn.intercept_methods`; every traced
unit's output gets a zero perturbation added, so ONE batched backward of sum_n s_n (s_n the
explained output of input n, by default its target logit) w.r.t. the perturbations yields every input's layer-output gradient
at once: in eval mode the inputs are independent, so d(sum_m s_m)/d out_l[n] = d s_n /
d out_l[n]. The same pass records each unit's input; with the unbound copy of the unit from
the model's abstract discovery pass (`ModelDef.units`), a client's own layer can later be
evaluated on G's input (spec section 2, step 3).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tracefl_jax.models.base import LayerPath, ModelDef, Variables


class LayerView(NamedTuple):
  """Per traced unit, in forward order (lists of length L)."""
  units: tuple[nn.Module, ...]          # unbound copies of the traced modules
  inputs: tuple[Any, ...]               # a_l: the unit's positional args, leading axis N
  kwargs: tuple[dict[str, Any], ...]    # the unit's keyword args (e.g. an attention mask)
  grads: tuple[jax.Array, ...]          # g_l = d s_n / d out_l[n], shape of out_l


# The explained output s_n of an input (`explained`): the paper's pre-softmax logit of the
# target class; the margin (that logit minus the log-sum-exp of the other classes, what TRAK
# explains: it moves only when the target gains on its rivals); the log-probability.
OUTPUTS = ("logit", "margin", "log_prob")


def explained(logits: jax.Array, target: jax.Array, output: str = "logit") -> jax.Array:
  """`[N]` the explained output of `logits [N, classes]` for the classes `target [N]`."""
  z = jnp.take_along_axis(logits, target[:, None].astype(jnp.int32), axis=-1)[:, 0]
  if output == "logit":
    return z
  if output == "log_prob":
    return z - jax.nn.logsumexp(logits, axis=-1)
  if output == "margin":
    rivals = jnp.where(jax.nn.one_hot(target, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return z - jax.nn.logsumexp(rivals, axis=-1)
  raise ValueError(f"output={output!r}; valid: {', '.join(OUTPUTS)}")


def target_logits(logits: jax.Array, target: jax.Array | None,
                  output: str = "logit") -> tuple[jax.Array, jax.Array]:
  """(s [N], predicted [N]): the target class's explained output (`explained`; default its
  pre-softmax logit), the target defaulting to the argmax."""
  predicted = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1).astype(jnp.int32)
  target = predicted if target is None else target.astype(jnp.int32)
  return explained(logits, target, output), predicted


def capture(model: ModelDef, global_vars: Variables, x: jax.Array,
            target: jax.Array | None = None,
            output: str = "logit") -> tuple[LayerView, jax.Array]:
  """Runs G once forward and once backward of the explained `output` (`explained`); returns
  (LayerView, predicted labels [N])."""
  order = model.traced_layers
  index = {path: l for l, path in enumerate(order)}
  # One cached abstract pass at this batch shape gives the unbound units and the output
  # shapes the zero perturbations need.
  by_path = {u.path: u for u in model.units(x.shape, x.dtype)}
  units = [by_path[p] for p in order]

  def forward(perturb):
    inputs: dict[int, Any] = {}
    kwargs: dict[int, Any] = {}

    def intercept(next_fun, args, kw, context):
      path = tuple(context.module.path)
      if context.method_name != "__call__" or path not in index:
        return next_fun(*args, **kw)
      l = index[path]
      inputs[l], kwargs[l] = args, kw
      return next_fun(*args, **kw) + perturb[l]

    with nn.intercept_methods(intercept):
      logits = model.logits(global_vars, x)
    s, predicted = target_logits(logits, target, output)
    return jnp.sum(s), (predicted, inputs, kwargs)

  zeros = [jnp.zeros(u.output.shape, u.output.dtype) for u in units]
  grads, (predicted, inputs, kwargs) = jax.grad(forward, has_aux=True)(zeros)
  view = LayerView(tuple(u.module for u in units), tuple(inputs[l] for l in range(len(order))),
                   tuple(kwargs[l] for l in range(len(order))), tuple(grads))
  return view, predicted

