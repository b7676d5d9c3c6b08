"""How a client's local steps are looped: reverse mode can cross a `lax.scan`, not a
`lax.while_loop`.

`run_steps(step, state, total, bound, loop)` applies `state = step(t, state)` for
`t = 0 .. total - 1`, `total` a traced step count and `bound` a static cap on it:

  "while"  a `lax.while_loop` whose trip count is `total`: nothing runs past the client's own
           steps, but only forward mode (`jit`, `vmap`, `jvp`) can cross it;
  "scan"   a fixed-trip `lax.scan` over the `bound` padded steps in which step `t` runs under
           `lax.cond(t < total, step, identity)`: the same states, bit for bit, and `jax.grad`
           and `jax.vjp` flow through it. The steps are scanned in chunks of about
           `sqrt(bound)`, each chunk under its own `cond`, so the padded steps past `total`
           cost one skipped chunk each and a few skipped steps, not `bound - total`
           iterations.

Cost (benchmarks/bench_local_loop.py, results/local_loop_cpu.jsonl): where `total` is not
batched the two loops cost the same (the "scan" client strategy, "auto" on CPU for a CNN;
`vmap` over seeds' keys with shared counts, as `provenance.retraining` does; single clients).
Under `vmap` over the clients' counts a `cond` computes both branches and selects, so every
lane runs all `bound` steps where a batched `while_loop` runs the lanes' largest `total`:
`vmap` of a client over `[K, M]` rows runs the M padded steps and selects whole states (MLP:
5.5x the while loop; LeNet, whose steps outweigh the selects: 1.09x), and `vmap` of the
"scan" strategy over federations' counts runs, for each client, the steps of all the round's
T slots (about K x: 30x at K = 10, MLP). Use "while" there (forward only). The packed
strategies ("vmap", "chunked", "sharded") loop lanes themselves, in the same two forms chosen
by the same `local_loop` (`fl/packing.py`: masked lanes, a static trip bound).

Adam's `sqrt(v)` has an infinite derivative at `v = 0`: reverse mode through Adam (client or
server) gives NaN for a parameter whose gradient is exactly 0 (behind a dead ReLU) unless
`eps_root > 0` (`optax.adam(lr, eps_root=1e-12)`).

`remat_client` wraps a client's whole local training in `jax.checkpoint` when it is scanned:
the backward pass recomputes the client's steps from its inputs, so the residuals a round
keeps for reverse mode are its inputs (the global model, the schedule), not every local
step's state, and R rounds differentiated in one pass hold R models, not R x steps states
(one client's scan at a time under the "scan" client strategy). Measured (XLA temp bytes of
`jit(grad)` through R FedAvg rounds, MLP, K = 10): 156 / 157 / 159 MB at R = 1 / 2 / 4 (about
2 models more per round), against 1.6 / 3.1 / 6.0 GB without it. Forward only, it changes
nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["LOCAL_LOOPS", "DEFAULT_LOCAL_LOOP", "check_local_loop", "run_steps",
           "remat_client"]

LOCAL_LOOPS = ("scan", "while")
# "scan": on every path where the counts are not batched (each the library's own: the "scan"
# strategy, retraining's federations over seeds, single clients) it measured the while loop's
# time (LeNet, K = 10 / 50: 1.00 / 0.89; MLP: 1.01 / 0.94; seeds vmapped: 0.99 / 0.85) and
# the same numbers, and it makes `jax.grad` through a round work as built. Batched counts:
# module docstring (choose "while").
DEFAULT_LOCAL_LOOP = "scan"


def check_local_loop(loop: Any) -> str:
  """One clear error for a local loop that is not one of `LOCAL_LOOPS`."""
  if loop not in LOCAL_LOOPS:
    raise ValueError(f"local_loop={loop!r}; valid local loops: {', '.join(LOCAL_LOOPS)} "
                     f"(\"scan\" is differentiable in reverse mode, \"while\" is not)")
  return loop


def chunk_length(bound: int) -> int:
  """Steps per scanned chunk: `ceil(sqrt(bound))`, at least 1."""
  return max(1, math.isqrt(max(bound, 1) - 1) + 1)


def run_steps(step: Callable[[jax.Array, Any], Any], state: Any, total: jax.Array,
              bound: int, loop: str) -> Any:
  """`state = step(t, state)` for `t` in `range(total)` (int32 `t`); under "scan" at most
  `bound` (static) steps run, so `total` must not exceed it."""
  zero = jnp.zeros((), jnp.int32)
  if loop == "while":
    def body(carry):
      t, s = carry
      return t + 1, step(t, s)
    return jax.lax.while_loop(lambda carry: carry[0] < total, body, (zero, state))[1]
  check_local_loop(loop)
  bound = int(bound)
  if bound <= 0:
    return state
  size = chunk_length(bound)
  chunks = -(-bound // size)

  def one(s, t):
    return jax.lax.cond(t < total, lambda s: step(t, s), lambda s: s, s), None

  def chunk(s, start):
    def run(s):
      return jax.lax.scan(one, s, start + jnp.arange(size, dtype=jnp.int32))[0]
    return jax.lax.cond(start < total, run, lambda s: s, s), None

  starts = jnp.arange(chunks, dtype=jnp.int32) * size
  return jax.lax.scan(chunk, state, starts)[0]


def remat_client(fn: Callable[..., Any], loop: str) -> Callable[..., Any]:
  """`fn` under `jax.checkpoint` when the loop is "scan" (module docstring), else `fn`."""
  return jax.checkpoint(fn) if loop == "scan" else fn
