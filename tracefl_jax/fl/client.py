"""Local training for ONE client: exactly its own optimizer steps, no work on padding.

Written once for a single client; `strategies.py` adds the client axis. A client starts every
round from the global variables with a fresh optimizer state (as the original's Flower client
does), shuffles its own examples each epoch with its own key, and trains on batches of
`batch_size`: `local_steps(count) = epochs * ceil(count / batch_size)` optimizer steps, so
slots past the client's count (padding of its index row) cost nothing but their place in the
shuffle. Only the client's last batch of an epoch can be partly empty; its empty slots carry
zero loss weight.

The steps are looped (`local_loop`, `fl/local_loop.py`) by a fixed-trip `lax.scan` over the
client's padded steps, each step under `lax.cond(t < count's steps)` (default "scan": reverse
mode crosses it, so `jax.grad` and `jax.vjp` flow through a round and through rounds, the
client's training rematerialised in the backward pass), or by a `lax.while_loop` whose trip
count is the client's steps ("while": forward only). Both compute the same states bit for
bit and, where the counts are not batched, in the same time; under `vmap` over the clients'
counts the scan runs every padded step (`local_loop.py`: choose "while"). The packed
strategies (`strategies.py`: "vmap", "chunked", "sharded") run their own lane loop over this
module's `step`, a `while_loop` either way: reverse mode crosses the "scan" and "loop"
strategies.

The training set may be stored as uint8 pixels with a `Normalization` (`data.base`): a step
normalises only the batch it gathers, inside the jitted program.

`ClientUpdate` is both the single-client function and its pieces (`schedule_slots`, `init`,
`batch`, `step`, `finish`, `train`), which `strategies.py` uses to run many clients' steps side
by side in a few vmapped lanes (fedjax's init / step / final split).

Many clients' epochs are shuffled at once over their slots laid end to end (`schedule_slots`,
`data.federated.ClientSlots`): one sort of the round's T slots by (client, sort key), each
slot's key the same `(key, slot)` draw `shuffle_order` makes, so a client's batches are the
same whatever its company, padding or layout, and the work follows the round's own sizes
(it was K x the largest client's length: 52.9 s for 1,000 clients at M = 163,840).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tracefl_jax.fl.local_loop import (DEFAULT_LOCAL_LOOP, LOCAL_LOOPS, check_local_loop,
                                       remat_client, run_steps)
from tracefl_jax.fl.losses import (LossFn, check_loss_output, cross_entropy, declares_client,
                                  masked_cross_entropy)
# The local optimizer by name lives in optimizers.py; imported from here too.
from tracefl_jax.fl.optimizers import OPTIMIZERS, make_optimizer  # noqa: F401
from tracefl_jax.models.base import ModelDef, Variables

__all__ = ["ClientOutput", "ClientUpdate", "LOCAL_LOOPS", "LocalState", "local_steps",
           "make_client_update", "make_optimizer", "masked_cross_entropy", "shuffle_order"]


class ClientOutput(NamedTuple):
  """One client's round result (leading `[K]` axis once vmapped)."""
  variables: Variables       # the client's trained variables
  loss: jax.Array            # mean training loss over its real examples and epochs
  num_examples: jax.Array    # int32, its real example count
  num_steps: jax.Array       # int32, optimizer steps actually taken
  start_loss: jax.Array | None = None  # float32 F_k(G_{t-1}): its objective at the round's
                                       # start model, only for rules that read it (q-FFL)


class LocalState(NamedTuple):
  """A client's training state between two local steps."""
  params: Any
  opt_state: Any             # None once training is over (not part of the result)
  model_state: dict          # non-parameter collections (BatchNorm statistics), maybe empty
  loss_sum: jax.Array        # float32, sum over steps of (batch loss * real examples)
  num_steps: jax.Array       # int32, steps taken


def shuffle_order(key: jax.Array, length: int, count: jax.Array) -> jax.Array:
  """A permutation of `range(length)`: the first `count` slots in random order, then padding.

  Each slot's sort key depends only on (key, slot), not on `length`, so a client's batches are
  the same whatever length it is padded to, i.e. whichever clients share its round.
  """
  slots = jnp.arange(length)
  u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(slots)
  return jnp.argsort(jnp.where(slots < count, u, 2.0))


def local_steps(counts: Any, batch_size: int, local_epochs: int) -> Any:
  """Optimizer steps a client with `counts` examples takes: `epochs * ceil(count / batch)`.

  Works elementwise on NumPy arrays, JAX arrays and Python ints.
  """
  return local_epochs * ((counts + batch_size - 1) // batch_size)


def _positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive int")


def check_local_training(batch_size: Any, local_epochs: Any) -> None:
  """One clear error for a batch size or epoch count that is not a positive int."""
  _positive_int("batch_size", batch_size)
  _positive_int("local_epochs", local_epochs)


class ClientUpdate:
  """`client_update(variables, x, y, indices, count, key, normalization=None) -> ClientOutput`
  for one client.

  Build it with `make_client_update`. Arguments of a call:
    variables: the global variables the client starts from.
    x, y: the device-resident training set `[N, ...]`, `[N]`.
    indices: `[M]` int32 indices of the client's examples, `M` a multiple of `batch_size`
      and at least `count`; slots from `count` on are padding and are never trained on.
    count: int32 scalar, how many of `indices` are real.
    key: the client's PRNG key for this round (shuffling and dropout).
    normalization: applied to each gathered batch of `x` (uint8 images), or None. Static
      under jit (hashable).

  Randomness: `key` splits into one key per epoch; each epoch key splits into the shuffle key
  (`shuffle_order`) and a step key that step `j` of the epoch folds `j` into (dropout). None of
  it depends on `M`, on the client's position in the round, or on which clients run beside it.
  """

  def __init__(self, model: ModelDef, optimizer: optax.GradientTransformation,
               batch_size: int, local_epochs: int, compute_dtype: Any = jnp.float32,
               loss_fn: LossFn | None = None, local_loop: str = DEFAULT_LOCAL_LOOP):
    check_local_training(batch_size, local_epochs)
    self.local_loop = check_local_loop(local_loop)
    self.model, self.optimizer = model, optimizer
    self.batch_size, self.local_epochs = int(batch_size), int(local_epochs)
    self.compute_dtype = compute_dtype
    self.loss_fn = cross_entropy if loss_fn is None else loss_fn
    objective = self.loss_fn
    takes_client = declares_client(objective)

    def loss(params, model_state, xb, yb, mb, rng, global_params, client=None):
      if compute_dtype != jnp.float32:
        params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        if jnp.issubdtype(xb.dtype, jnp.floating):
          xb = xb.astype(compute_dtype)
      # ModelDef.apply hands `mask` on only to modules whose __call__ takes it (opt-in
      # masked batch statistics); standard modules never see it.
      # An objective that declares `client` gets the client's state (`fl.client_state`).
      extra = {"client": client} if client is not None and takes_client else {}
      out = objective(model, {"params": params, **model_state}, xb, yb, mb, rng,
                      global_params, **extra)
      check_loss_output(out, objective)
      return out

    self._grad_fn = jax.value_and_grad(loss, has_aux=True)

  def num_steps(self, counts: Any) -> Any:
    """`local_steps` of `counts` at this batch size and epoch count."""
    return local_steps(counts, self.batch_size, self.local_epochs)

  def schedule(self, indices: jax.Array, count: jax.Array,
               key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The client's whole round laid out: `(batches [E, M], step_keys [E])`.

    `batches[e]` lists the example indices of epoch `e` in training order (real examples
    first, in random order, then padding), so step `j` of epoch `e` trains on
    `batches[e, j*B:(j+1)*B]`.
    """
    m = indices.shape[0]
    if m % self.batch_size:
      raise ValueError(f"padded length {m} is not a multiple of batch_size {self.batch_size}")

    def epoch(epoch_key):
      perm_key, step_key = jax.random.split(epoch_key)
      return indices[shuffle_order(perm_key, m, count)], step_key

    return jax.vmap(epoch)(jax.random.split(key, self.local_epochs))

  def schedule_slots(self, slots: Any, counts: jax.Array,
                     keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """K clients' rounds laid out at once: `(batches [E, T], step_keys [K, E])`.

    `slots` is a `ClientSlots(flat [T], offsets [K])` (or `[K, M]` rows); `batches[e]` holds
    client k's epoch-e order at `offsets[k]:`: real examples first, in the order `schedule`
    gives that client alone (the same per-slot draws and a stable sort), then its padding.
    """
    if not hasattr(slots, "offsets"):
      slots = _rows_as_slots(slots)
    flat, offsets = slots
    t_len, k = flat.shape[0], offsets.shape[0]
    counts = jnp.asarray(counts, jnp.int32)
    slot = jnp.arange(t_len, dtype=jnp.int32)
    # Owner of each slot: the last client whose offset is <= the slot (-1 before the first).
    owner = jnp.cumsum(jnp.zeros(t_len, jnp.int32).at[offsets].add(1, mode="drop")) - 1
    row = jnp.clip(owner, 0, k - 1)
    local = slot - offsets[row]
    real = (owner >= 0) & (local < counts[row])
    # Per client and epoch: (perm key, step key) = split(split(key, E)[e]), as `schedule`.
    pairs = jax.vmap(lambda key: jax.vmap(jax.random.split)(
        jax.random.split(key, self.local_epochs)))(keys)  # [K, E, 2]
    perm_keys, step_keys = pairs[:, :, 0], pairs[:, :, 1]

    def epoch(perm_key):  # [K]
      u = jax.vmap(lambda key, i: jax.random.uniform(jax.random.fold_in(key, i)))(
          perm_key[row], local)
      order = jax.lax.sort((owner, jnp.where(real, u, 2.0), slot), num_keys=2,
                           is_stable=True)[2]
      return flat[order]

    return jax.vmap(epoch, in_axes=1)(perm_keys), step_keys

  def init(self, variables: Variables) -> LocalState:
    """The state a client starts its round from: G's variables, a fresh optimizer state."""
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return LocalState(params, self.optimizer.init(params), model_state,
                      jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))

  def batch(self, batches: jax.Array, step_keys: jax.Array, offsets: jax.Array,
            client: jax.Array, count: jax.Array,
            t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Step `t` (counted over all epochs) of client `client` of a stacked schedule.

    Args:
      batches, step_keys: `[E, T]` and `[K, E]` from `schedule_slots`.
      offsets: `[K]` where each client's slots start.
      client: int32 row of the client; count: its example count; t: int32 step,
        `0 <= t < num_steps(count)`.

    Returns:
      `(idx [B], mask [B], rng)`: example indices, which of them are real, the step's key.
    """
    b = self.batch_size
    per_epoch = jnp.maximum((count + b - 1) // b, 1)
    e, j = t // per_epoch, t % per_epoch
    start = offsets[client] + j * b
    idx = jax.lax.dynamic_slice(batches, (e, start), (1, b)).reshape(b)
    mask = j * b + jnp.arange(b, dtype=jnp.int32) < count
    return idx, mask, jax.random.fold_in(step_keys[client, e], j)

  def step(self, state: LocalState, x: jax.Array, y: jax.Array, idx: jax.Array,
           mask: jax.Array, rng: jax.Array, normalization: Any = None,
           global_params: Any = None, client: Any = None) -> LocalState:
    """One optimizer step on the examples `x[idx]` (normalised, if asked) where `mask` is
    True; `global_params` (G's params) reach the loss function (FedProx's anchor), and
    `client` (a `client_state.ClientContext`, or None) a stateful objective."""
    xb = x[idx]
    if normalization is not None:
      xb = normalization(xb)
    return self.train_step(state, xb, y[idx], mask, rng, global_params, client)

  def train_step(self, state: LocalState, xb: jax.Array, yb: jax.Array, mask: jax.Array,
                 rng: jax.Array, global_params: Any = None, client: Any = None) -> LocalState:
    """One optimizer step on the batch `xb [B, ...]`, `yb [B]` where `mask` is True (what a
    step costs without the gather: benchmarks/bench_round.py times it alone)."""
    (loss, model_state), grads = self._grad_fn(state.params, state.model_state, xb, yb, mask,
                                               rng, global_params, client)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    return LocalState(optax.apply_updates(state.params, updates), opt_state, model_state,
                      (state.loss_sum + loss * jnp.sum(mask).astype(jnp.float32)).astype(
                          state.loss_sum.dtype),
                      state.num_steps + 1)

  def finish(self, state: LocalState, count: jax.Array) -> ClientOutput:
    """The client's result from its final state (`opt_state` is not used)."""
    seen = jnp.maximum(count * self.local_epochs, 1).astype(jnp.float32)
    return ClientOutput({"params": state.params, **state.model_state}, state.loss_sum / seen,
                        jnp.asarray(count, jnp.int32), state.num_steps)

  def __call__(self, variables: Variables, x: jax.Array, y: jax.Array, indices: jax.Array,
               count: jax.Array, key: jax.Array, normalization: Any = None) -> ClientOutput:
    count = jnp.asarray(count, jnp.int32)
    batches, step_keys = self.schedule(indices, count, key)
    zero = jnp.zeros((), jnp.int32)
    # The client's padded steps, epochs * M / B: the scanned loop's trip count.
    return self.train(variables, x, y, batches, step_keys[None], zero[None], zero, count,
                      normalization, max_steps=self.num_steps(indices.shape[0]))

  def train(self, variables: Variables, x: jax.Array, y: jax.Array, batches: jax.Array,
            step_keys: jax.Array, offsets: jax.Array, client: jax.Array, count: jax.Array,
            normalization: Any = None, context: Any = None,
            max_steps: int | None = None, anchor: Any = None) -> ClientOutput:
    """Client `client`'s local training from a laid-out round (`batches [E, T]`,
    `step_keys [K, E]`, `offsets [K]`, as `batch` reads them): exactly its own steps.
    `context`: its `client_state.ClientContext` for a stateful objective, or None.
    `anchor`: the params the objective sees as `global_params` (default `variables`'; Ditto's
    personal model starts elsewhere than G but is anchored at G).
    `max_steps` (static): a cap on the client's steps for the scanned loop (`local_loop`);
    default the steps of all T slots, `num_steps(T)`."""
    bound = self.num_steps(batches.shape[1]) if max_steps is None else int(max_steps)

    def run(variables, x, y, batches, step_keys, offsets, client, count, context, anchor):
      def step(t, state):
        return self.step(state, x, y,
                         *self.batch(batches, step_keys, offsets, client, count, t),
                         normalization, anchor, context)

      # "while": the trip count is the client's own step count, nothing runs for padding
      # (under vmap a batched trip count runs to the largest and masks; strategies.py packs
      # lanes instead). "scan": the same steps, reverse-differentiable (local_loop.py).
      state = run_steps(step, self.init(variables), self.num_steps(count), bound,
                        self.local_loop)
      return self.finish(state, count)

    anchor = variables["params"] if anchor is None else anchor
    return remat_client(run, self.local_loop)(variables, x, y, batches, step_keys, offsets,
                                              client, jnp.asarray(count, jnp.int32), context,
                                              anchor)


def _rows_as_slots(indices: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`[K, M]` index rows as `(flat [K * M], offsets [K])` (row k at k * M)."""
  k, m = indices.shape
  return indices.reshape(-1), jnp.arange(k, dtype=jnp.int32) * m


# Any single-client function with `ClientUpdate.__call__`'s signature (strategies run such a
# function plainly; they pack lanes only for a `ClientUpdate`, which exposes its pieces).
ClientUpdateFn = Callable[[Variables, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array],
                          ClientOutput]


def make_client_update(
    model: ModelDef,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    local_epochs: int,
    compute_dtype: Any = jnp.float32,
    loss_fn: LossFn | None = None,
    local_loop: str = DEFAULT_LOCAL_LOOP,
) -> ClientUpdate:
  """Returns `client_update(variables, x, y, indices, count, key) -> ClientOutput`.

  `loss_fn` is the client objective (`losses.LossFn`; default `losses.cross_entropy`, e.g.
  `losses.fedprox(0.01)`).
  With `compute_dtype=jnp.bfloat16` the forward and backward passes run in bfloat16 on a cast
  copy of the parameters while the optimizer updates float32 master weights (mixed precision);
  the loss is reduced in float32. See `ClientUpdate` for the arguments of the returned function.
  `local_loop`: "scan" (reverse mode can cross local training: `jax.grad` through a round) or
  "while" (forward only; `local_loop.LOCAL_LOOPS`); the same numbers either way.
  """
  return ClientUpdate(model, optimizer, batch_size, local_epochs, compute_dtype, loss_fn,
                      local_loop)
