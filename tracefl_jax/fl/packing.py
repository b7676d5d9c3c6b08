"""The packed lane loop of the "vmap", "chunked" and "sharded" strategies (`strategies.py`):
K clients trained through W vmapped lanes, a work queue, in one of two loop forms.

The queue: the round's clients are sorted by step count, longest first; each lane trains one
client at a time, one optimizer step per iteration for all lanes together, and a lane whose
client is done writes that client's result to its row and takes the next client from the
queue (longest-processing-time scheduling). The loop ends when the queue is empty and every
lane idle: `iterations` loop steps, `W * iterations` optimizer steps computed
(`lanes.packed_steps` computes the same count from the sizes alone).

The loop forms, chosen by the client's `local_loop` (`fl/local_loop.py`), the same numbers
bit for bit:

  "while"  a `lax.while_loop` until every lane is idle: forward only (jit, vmap, jvp);
  "scan"   (the default) a fixed-trip `lax.scan` over `pack_trips` iterations, a static
           bound from the round's shapes, in chunks of about `sqrt(bound)` iterations and
           groups of `GROUP` (2) inside them, each chunk and group under `lax.cond(a lane is
           busy, run, identity)`: iterations past the last busy one cost one skipped `cond`
           per group or chunk, and `jax.grad` / `jax.vjp` cross the loop. Each chunk is under
           `jax.checkpoint`: reverse mode keeps the carries at chunk boundaries (about
           `sqrt(bound)` of them: W lanes' states and the K result rows) and recomputes one
           chunk's iterations at a time. Forward it costs what the while loop costs (CPU
           time within 5%, MLP, K = 10 and 50) and computes at most one masked iteration
           more a round (the rest of its last group; not in `steps_executed`).

Under `jax.vmap` over whole rounds with different counts (federations over seeds,
`fl/federation.py`) the `cond`s' predicates are batched and skip nothing: every iteration up
to the bound is computed and selected, where the batched while loop runs to the batch's
longest round; the federation passes the bound of its own largest client (`max_steps`), so
the two run about the same iterations (docs/differentiable.md has the measurements).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tracefl_jax.data.base import Normalization
from tracefl_jax.fl.client import ClientOutput, ClientUpdate, LocalState
from tracefl_jax.fl.client_state import ClientContext
from tracefl_jax.fl.local_loop import check_local_loop, chunk_length
from tracefl_jax.fl.types import Stacked, Variables


def where_lanes(pred: jax.Array, new: Stacked, old: Stacked) -> Stacked:
  """Per lane `new if pred else old`; `pred` is `[W]`, leaves `[W, ...]` (or `[1, ...]`)."""
  def pick(a, b):
    p = pred.reshape(pred.shape + (1,) * (max(a.ndim, b.ndim) - 1))
    return jnp.where(p, a, b)
  return jax.tree.map(pick, new, old)


def context_row(contexts: ClientContext | None, c: jax.Array) -> ClientContext | None:
  """Client row `c`'s context: its state row and id; the shared value is not stacked."""
  if contexts is None:
    return None
  return contexts._replace(state=jax.tree.map(lambda a: a[c], contexts.state),
                           client_id=contexts.client_id[c])


def pack_trips(client_update: ClientUpdate, slots: int, clients: int, lanes: int,
               max_steps: int | None = None) -> int:
  """A static bound on the packed loop's iterations for `clients` clients in `lanes` lanes
  whose round has `slots` slots (T): no client takes more than `cap` steps (`max_steps`, or
  the steps of all T slots), all of them together at most `total = min(K * cap,
  num_steps(T))` (each client's slots are whole batches of its own). With one lane per client
  a lane runs only its client: `cap`. Otherwise the queue starts the last-finishing client
  (p steps) only when every lane was busy until then, so the loop ends by
  `(total - p) // W + p <= (total + (W - 1) * cap) // W`."""
  cap = int(client_update.num_steps(int(slots)))
  if max_steps is not None:
    cap = min(cap, int(max_steps))
  k, w = int(clients), int(lanes)
  if w >= k:
    return cap
  total = min(k * cap, int(client_update.num_steps(int(slots))))
  return min(total, (total + (w - 1) * cap) // w)


# Iterations per group inside a chunk (`_loop`), run without a `cond` of their own: a `cond`
# around every single iteration costs 5-10% of a packed round on CPU (MLP, K = 10 and 50),
# and so does choosing per group between running it plainly and one `cond` per iteration;
# groups of 2 under one `cond` cost about what the while loop costs (benchmarks/README.md,
# "A federation as one program") and compute at most one masked iteration (W masked steps)
# past a round's end, which `steps_executed` does not count.
GROUP = 2


def _loop(remaining: Callable[[Any], jax.Array], body: Callable[[Any], Any], carry: Any,
          trips: int | None) -> Any:
  """`lax.while_loop(remaining(c) > 0, body, carry)`, or with `trips` (static, at least the
  while loop's trip count) its fixed-trip form, the same carry, reverse-differentiable
  (module docstring): `trips` iterations in chunks of about `sqrt(trips)` (each under
  `jax.checkpoint`), each chunk in groups of `GROUP`; a chunk or group with nothing left to do
  is skipped (`lax.cond`). `body` must leave the carry unchanged where nothing remains (the
  group's masked iterations; under `vmap` the `cond`s compute and select)."""
  def cond(c):
    return remaining(c) > 0

  if trips is None:
    return jax.lax.while_loop(cond, body, carry)

  def skip(c, run):
    return jax.lax.cond(cond(c), run, lambda c: c, c)

  def repeat(c, n, step):
    return jax.lax.scan(lambda c, _: (step(c), None), c, None, length=n)[0]

  def span(c, n):  # n iterations: groups of GROUP, then the rest, each group skippable
    groups, rest = divmod(n, GROUP)
    if groups:
      c = repeat(c, groups, lambda c: skip(c, lambda c: repeat(c, GROUP, body)))
    return skip(c, lambda c: repeat(c, rest, body)) if rest else c

  def chunk(n):
    return jax.checkpoint(lambda c: skip(c, lambda c: span(c, n)), prevent_cse=False)

  size = chunk_length(trips)
  full, tail = divmod(max(int(trips), 0), size)
  if full:
    carry = repeat(carry, full, chunk(size))
  return chunk(tail)(carry) if tail else carry


def pack(client_update: ClientUpdate, variables: Variables, x: jax.Array, y: jax.Array,
         schedule: tuple[jax.Array, jax.Array], offsets: jax.Array, counts: jax.Array,
         lanes: int, normalization: Normalization | None = None,
         contexts: ClientContext | None = None,
         max_steps: int | None = None) -> tuple[ClientOutput, jax.Array]:
  """K clients through `lanes` vmapped lanes (module docstring), reading their batches from
  the laid-out round `schedule` (`ClientUpdate.schedule_slots`: `[E, T]`, `[K, E]`) at
  `offsets [K]`; returns the outputs `[K]` in the given order and the number of loop
  iterations (each computes `lanes` steps). The loop form is `client_update.local_loop`;
  `max_steps` (static) caps any client's steps in the fixed-trip form's bound (`pack_trips`);
  no client may take more."""
  cu = client_update
  k, w = counts.shape[0], int(lanes)
  loop = check_local_loop(getattr(cu, "local_loop", "while"))
  batches, step_keys = schedule
  trips = (pack_trips(cu, batches.shape[1], k, w, max_steps) if loop == "scan" else None)
  counts = counts.astype(jnp.int32)
  total = cu.num_steps(counts)
  queue = jnp.argsort(-total, stable=True).astype(jnp.int32)
  n_work = jnp.sum(total > 0).astype(jnp.int32)
  start = cu.init(variables)
  start_1 = jax.tree.map(lambda a: a[None], start)
  # Results, row per client; a client with no steps keeps G's variables, as it would alone.
  kept = (start.params, start.model_state, start.loss_sum, start.num_steps)
  results = jax.tree.map(lambda a: jnp.broadcast_to(a, (k, *a.shape)), kept)
  lane = jnp.arange(w, dtype=jnp.int32)
  client = jnp.where(lane < n_work, queue[jnp.minimum(lane, k - 1)], k)  # k: idle lane
  state = jax.tree.map(lambda a: jnp.broadcast_to(a, (w, *a.shape)), start)
  zeros = jnp.zeros(w, jnp.int32)

  batch = jax.vmap(functools.partial(cu.batch, batches, step_keys, offsets))
  anchor = variables["params"]  # G's params, for objectives that need them (FedProx)
  # Stateful objectives: each lane reads its client's `ClientContext` row (`contexts` [K]).
  step = jax.vmap(lambda s, i, m, r, c: cu.step(s, x, y, i, m, r, normalization, anchor,
                                               context_row(contexts, c)))

  if w == k:
    # One lane per client (what the queue would give): lane c trains client c and then
    # stays put, so its final state is the client's result; no queue, no per-iteration
    # write-back of results, no reset.
    own = jnp.arange(k, dtype=jnp.int32)

    def body_own(carry):
      state, t, iters = carry
      active = t < total
      state = where_lanes(active, step(state, *batch(own, counts, t), own), state)
      return state, t + active.astype(jnp.int32), iters + jnp.any(active).astype(jnp.int32)

    state, _, iters = _loop(lambda carry: jnp.max(total - carry[1]), body_own,
                            (state, zeros, jnp.zeros((), jnp.int32)), trips)
    out = jax.vmap(cu.finish)(state._replace(opt_state=None), counts)
    return out, iters

  def body(carry):
    state, client, t, taken, results, iters = carry
    active = client < k
    c = jnp.minimum(client, k - 1)  # idle lanes compute a throwaway step on a valid row
    state = where_lanes(active, step(state, *batch(c, counts[c], t), c), state)
    t = t + active.astype(jnp.int32)
    done = active & (t >= total[c])
    dest = jnp.where(done, c, k)  # out of range: dropped
    results = jax.tree.map(lambda r, v: r.at[dest].set(v, mode="drop"), results,
                           (state.params, state.model_state, state.loss_sum, state.num_steps))
    slot = taken + jnp.cumsum(done.astype(jnp.int32)) - 1  # freed lanes take the queue in order
    client = jnp.where(done, jnp.where(slot < n_work, queue[jnp.clip(slot, 0, k - 1)], k),
                       client)
    state = where_lanes(done, start_1, state)
    return (state, client, jnp.where(done, 0, t), taken + jnp.sum(done).astype(jnp.int32),
            results, iters + jnp.any(active).astype(jnp.int32))

  carry = (state, client, zeros, jnp.minimum(n_work, w), results, jnp.zeros((), jnp.int32))
  def remaining(carry):  # the longest rest of a client in training: at least the loop's
    _, client, t, *_ = carry
    return jnp.max(jnp.where(client < k, total[jnp.minimum(client, k - 1)] - t, 0))

  *_, results, iters = _loop(remaining, body, carry, trips)
  params, model_state, loss_sum, num_steps = results
  out = jax.vmap(cu.finish)(LocalState(params, None, model_state, loss_sum, num_steps), counts)
  return out, iters
