"""A whole federation as one program: R rounds of an algorithm as one jitted, vmappable and
(under the "scan" client strategy) reverse-differentiable function of the initial variables,
the hyperparameters, the sampled rounds and the key.

    fed = federation(lambda hp: federated_averaging(
        model, optax.sgd(hp["client_lr"]), batch_size=32, local_epochs=1, strategy="scan",
        server_optimizer=optax.sgd(hp["server_lr"])), data, rounds=10, clients_per_round=5,
        batch_size=32)
    state, trace = fed(variables, {"client_lr": 0.1, "server_lr": 1.0}, fed.plan(seed),
                       jax.random.key(seed))           # == run_rounds(..., seed=seed)
    jax.grad(lambda hp: val_loss(fed(variables, hp, plan, key)[0].variables))(hp)
    jax.vmap(fed, in_axes=(None, None, 0, 0))(variables, hp, fed.plans(seeds), keys)

The sampling is precomputed on the host (`plan`): round t's clients are `sample_clients(seed,
t, ...)` and its key `round_key(key, t)`, what `run_rounds` uses, so a federation equals
`run_rounds` from `algorithm.init(variables)` (the same programs; float rounding where a vmap
batches the arithmetic). A plan is a pytree of arrays `[R, ...]` (`[S, R, ...]` for several
seeds, one slot length T for all), so seeds and partitions vmap as data.

The algorithm is a `FederatedAlgorithm` or a builder `hparams -> FederatedAlgorithm` called
inside the trace: whatever the builder reads from `hparams` (client and server learning
rates, FedProx's mu, momentum) is a traced input, differentiable and vmappable. Optimizers
built from a traced number: `optax.sgd(lr)`, `optax.adam(lr, eps_root=1e-12)` (Adam's
`sqrt(v)` needs `eps_root > 0` in reverse mode), `server.server_optimizer(name, lr)`.

Rounds are a `lax.scan` (one round compiled once), each under `jax.checkpoint`
(`remat_rounds`): reverse mode keeps one carry (G_t and the server optimizer's state) per
round and recomputes the round's clients, each under its own checkpoint (`local_loop.py`).
Under the "scan" strategy every client's local loop is capped at the steps of the
federation's largest client (`max_steps`), so a vmap over plans whose rounds sample clients
of different sizes runs each client that many steps, not the steps of all T slots (about K
x more; docs/differentiable.md has the measurements). The packed strategies ("vmap",
"chunked") get the same cap as the static trip bound of their lane loop (`fl/packing.py`),
a fixed-trip scan under the default `local_loop="scan"`: reverse mode crosses them too, and
one federation compiles one program whatever its rounds sample. "loop" and "sharded" are not
in-program strategies of one device program.

Every round reads the training set inside the one program, so the whole set is on the
device: data kept on the host (`federate(..., placement="host")`) is refused with an error
naming `placement="device"` (so is `across_rounds`, which takes a federation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.data.federated import ClientSlots, FederatedData
from tracefl_jax.fl.algorithm import FederatedAlgorithm
from tracefl_jax.fl.client import local_steps
from tracefl_jax.fl.host_round import lay_out
from tracefl_jax.fl.hyperparameters import Hyperparameters
from tracefl_jax.fl.rounds import round_key, sample_clients
from tracefl_jax.fl.server import ServerState
from tracefl_jax.fl.types import Metrics, PRNGKey, PyTree, Variables

__all__ = ["Federation", "FederationPlan", "FederationTrace", "federation", "stack_plans"]

Builder = Callable[[PyTree], FederatedAlgorithm]


class FederationPlan(NamedTuple):
  """The sampled rounds as arrays, leading `[R]` (or `[S, R]` for S stacked plans)."""
  indices: ClientSlots   # flat [R, T], offsets [R, K]: each round's clients end to end
  counts: Any            # [R, K] int32 example counts
  client_ids: Any        # [R, K] int32 global ids, in the round's (sorted) order
  weights: Any           # [R, K] float32 aggregation weights


class FederationTrace(NamedTuple):
  """What every round produced, stacked `[R, ...]`."""
  client_loss: jax.Array      # [R, K] each client's mean training loss
  num_steps: jax.Array        # [R, K] optimizer steps each client took
  steps_executed: jax.Array   # [R] steps computed (idle lanes of packed strategies included)
  metrics: Metrics            # the rounds' metrics ("dp_update_norm" [R, K] under DP)
  variables: Variables | None  # [R, ...] G_1 .. G_R with `history=True`, else None


def stack_plans(plans: Sequence[FederationPlan]) -> FederationPlan:
  """Plans of the same R and K stacked `[S, R, ...]`, their slots padded to one length T
  (slots past a round's clients are nobody's: results do not change)."""
  t = max(p.indices.flat.shape[-1] for p in plans)
  pad = lambda flat: np.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, t - flat.shape[-1])])  # noqa: E731
  plans = [p._replace(indices=p.indices._replace(flat=pad(np.asarray(p.indices.flat))))
           for p in plans]
  return jax.tree.map(lambda *leaves: np.stack(leaves), *plans)


class Federation:
  """R rounds of an algorithm as one function (module docstring); build it with `federation`.

  `fed(variables, hparams, plan, key) -> (ServerState, FederationTrace)` runs the jitted
  program on the federation's training set; `fed.run(variables, hparams, plan, key, x, y)`
  is the same pure function with the training set as arguments (under an outer `jax.jit`,
  `fed(...)` embeds `x` as a constant: use `run` for large sets). `plan(seed)` and
  `plans(seeds)` sample the rounds as `run_rounds(seed=...)` does.
  """

  def __init__(self, algorithm: FederatedAlgorithm | Builder, data: FederatedData, *,
               rounds: int, clients_per_round: int, batch_size: int | None = None,
               weighting: str | None = None, always_sampled: Sequence[int] = (),
               history: bool = False, remat_rounds: bool = True):
    fixed = isinstance(algorithm, FederatedAlgorithm)
    hp = algorithm.hyperparameters if fixed else None
    if hp is None and batch_size is None:
      raise ValueError("federation(builder, ...) needs batch_size= (and weighting= unless "
                       "'examples'): the plan lays the rounds out before the builder runs")
    self.batch_size = int(batch_size if batch_size is not None else hp.batch_size)
    self.weighting = weighting or (hp.weighting if hp is not None else "examples")
    if int(rounds) < 1:
      raise ValueError(f"rounds={rounds} must be >= 1")
    data.require_device("federation(...) (every round inside one program)")
    self.algorithm, self.fixed, self.data = algorithm, fixed, data
    self.rounds, self.clients_per_round = int(rounds), int(clients_per_round)
    self.always_sampled = tuple(always_sampled)
    self.history, self.remat_rounds = bool(history), bool(remat_rounds)
    self._jitted = jax.jit(self.run)

  # ------------------------------------------------------------------ the sampled rounds

  def plan(self, seed: int) -> FederationPlan:
    """Rounds 1..R of `run_rounds(seed=seed)`: `sample_clients(seed, t, ...)`, each round's
    clients laid out as `algorithm.round` lays them out (host NumPy, `[R, ...]`)."""
    hp = Hyperparameters(None, None, batch_size=self.batch_size, local_epochs=1,
                         weighting=self.weighting, clients_per_chunk=0, dp=None)
    rounds = [lay_out(self.data, sample_clients(
        seed, t, self.data.num_clients, self.clients_per_round, self.always_sampled), hp,
        lambda k: 0) for t in range(1, self.rounds + 1)]
    one = [FederationPlan(ClientSlots(np.asarray(rd.indices.flat, np.int32),
                                      np.asarray(rd.indices.offsets, np.int32)),
                          rd.counts.astype(np.int32), rd.ids, rd.weights) for rd in rounds]
    t = max(p.indices.flat.shape[0] for p in one)
    one = [p._replace(indices=p.indices._replace(
        flat=np.pad(p.indices.flat, (0, t - p.indices.flat.shape[0])))) for p in one]
    return jax.tree.map(lambda *leaves: np.stack(leaves), *one)

  def plans(self, seeds: Sequence[int]) -> FederationPlan:
    """`[S, R, ...]` the plans of `seeds`, for `jax.vmap` over seeds (with their keys,
    `jax.vmap(jax.random.key)(jnp.asarray(seeds))`)."""
    return stack_plans([self.plan(int(s)) for s in seeds])

  # ------------------------------------------------------------------ the program

  def __call__(self, variables: Variables, hparams: PyTree, plan: FederationPlan,
               key: PRNGKey) -> tuple[ServerState, FederationTrace]:
    return self._jitted(variables, hparams, plan, key, self.data.x, self.data.y)

  def build(self, hparams: PyTree) -> FederatedAlgorithm:
    """The algorithm for `hparams` (the fixed algorithm, or the builder's), checked."""
    alg = self.algorithm if self.fixed else self.algorithm(hparams)
    if not isinstance(alg, FederatedAlgorithm):
      raise TypeError(f"the federation's builder must return a FederatedAlgorithm "
                      f"(federated_averaging(...)), got {type(alg).__name__}")
    if alg.program is None or alg.strategy == "sharded":
      raise ValueError(f"a federation runs as one device program: strategy "
                       f"{alg.strategy!r} is not one (use \"scan\", \"vmap\" or \"chunked\")")
    hp = alg.hyperparameters
    if (hp.batch_size, hp.weighting) != (self.batch_size, self.weighting):
      raise ValueError(f"the algorithm trains with batch_size={hp.batch_size}, weighting="
                       f"{hp.weighting!r}; the federation's plan lays rounds out for "
                       f"batch_size={self.batch_size}, weighting={self.weighting!r}")
    return alg

  def max_steps(self, alg: FederatedAlgorithm) -> int | None:
    """The cap on a client's scanned local loop (and on the packed lane loop's trip bound):
    the steps of the largest client."""
    if alg.strategy not in ("scan", "vmap", "chunked"):
      return None
    hp = alg.hyperparameters
    return int(local_steps(int(self.data.client_sizes.max(initial=1)), hp.batch_size,
                           hp.local_epochs))

  def run(self, variables: Variables, hparams: PyTree, plan: FederationPlan, key: PRNGKey,
          x: jax.Array, y: jax.Array) -> tuple[ServerState, FederationTrace]:
    """Rounds 1..R from `algorithm.init(variables)`: the final `ServerState` (round R) and
    the rounds' `FederationTrace`. Pure; jit, vmap and (under "scan") grad cross it."""
    alg = self.build(hparams)
    start = alg.init(variables, num_clients=self.data.num_clients, placement="device")
    cap, normalization = self.max_steps(alg), self.data.normalization

    def one_round(carry, xs):
      v, opt_state, table = carry
      t, slots, counts, ids, weights = xs
      new, out, _, metrics, executed, opt_state, *rest = alg.program(
          v, x, y, slots, counts, ids, round_key(key, t), weights,
          normalization=normalization, opt_state=opt_state, table=table, max_steps=cap)
      table = rest[0] if rest else table
      row = (out.loss, out.num_steps, executed, metrics, new if self.history else None)
      return (new, opt_state, table), row

    step = jax.checkpoint(one_round, prevent_cse=False) if self.remat_rounds else one_round
    ts = jnp.arange(1, self.rounds + 1, dtype=jnp.int32)
    (v, opt_state, table), rows = jax.lax.scan(
        step, (start.variables, start.opt_state, start.client_state),
        (ts, plan.indices, plan.counts, plan.client_ids, plan.weights))
    return ServerState(v, self.rounds, opt_state, table), FederationTrace(*rows)


def federation(algorithm: FederatedAlgorithm | Builder, data: FederatedData, *, rounds: int,
               clients_per_round: int, batch_size: int | None = None,
               weighting: str | None = None, always_sampled: Sequence[int] = (),
               history: bool = False, remat_rounds: bool = True) -> Federation:
  """R rounds of `algorithm` (a `FederatedAlgorithm`, or a builder `hparams ->
  FederatedAlgorithm`) on `data` as one function (module docstring).

  Args:
    algorithm: the algorithm, or its builder (hyperparameters traced through it).
    data: the federation's training set and partition.
    rounds, clients_per_round: R, and K clients sampled per round (`sample_clients`).
    batch_size, weighting: how the plan lays rounds out; read from a fixed algorithm,
      `batch_size` required with a builder (checked against what it builds).
    always_sampled: clients in every round (`run_rounds(always_sampled=...)`).
    history: the trace keeps every round's G_t (`[R, ...]`, R models of memory).
    remat_rounds: each round under `jax.checkpoint` (reverse mode keeps R carries, not the
      rounds' K client models each; forward only it changes nothing).
  """
  return Federation(algorithm, data, rounds=rounds, clients_per_round=clients_per_round,
                    batch_size=batch_size, weighting=weighting, always_sampled=always_sampled,
                    history=history, remat_rounds=remat_rounds)
