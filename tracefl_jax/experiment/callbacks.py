"""The per-round callbacks a run hands to the library's `run_rounds`, in order:

  evaluation   the global model's test accuracy (`GlobalEvaluator`);
  provenance   the paper's protocol on the round (`provenance_callback`), one provenance.jsonl
               row per traced input;
  privacy      the DP epsilon spent so far;
  storage      the round's models under WORKDIR/rounds/ (`provenance.store_rounds`);
  recorder     the metrics.jsonl row, the history, the checkpoint and the progress bar.

Every row is flushed as soon as its round ends, so a crash loses nothing already computed.
Only the primary process writes rows; every process checkpoints and stores (orbax).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from tracefl_jax.data.base import DIGITS_MEAN, DIGITS_STD
from tracefl_jax.experiment.checkpoints import Checkpointer
from tracefl_jax.experiment.config import typed
from tracefl_jax.experiment.io import JsonlWriter, NullWriter, ProvenanceLog
from tracefl_jax.experiment.resume import Start
from tracefl_jax.experiment.stages import DataStage, ModelStage, normalization_meta
from tracefl_jax.experiment.stored import save_round
from tracefl_jax.experiment.workdir import RunPlan
from tracefl_jax.fl.privacy import dp_epsilon
from tracefl_jax.fl.rounds import RoundInfo
from tracefl_jax.provenance.multiround import MultiRoundAccumulator
from tracefl_jax.provenance.protocol import ProtocolSettings
from tracefl_jax.provenance.round_callback import provenance_callback


def protocol_settings(c: ml_collections.ConfigDict,
                      faulty_clients: list[int] | None = None) -> ProtocolSettings:
  """The config's provenance section as the library's `ProtocolSettings` (`faulty_clients`:
  the ids `faulty.clients` resolved to, needed for "largest")."""
  p, values = c.provenance, typed(c)
  if faulty_clients is None:
    faulty_clients = values.faulty_clients
    if faulty_clients is None:
      raise ValueError("faulty.clients='largest' is resolved on the partition: pass the ids")
  return ProtocolSettings(
      mode=p.mode, per_label=p.per_label, max_faulty_inputs=p.max_faulty_inputs,
      faulty_clients=tuple(faulty_clients), flip=values.flip,
      kernel=p.kernel, decay=p.decay, use_decay=p.use_decay,
      use_size_factor=p.use_size_factor,
      size_unit=c.client.batch_size,  # the original counts the data-size factor in batches
      clients_per_chunk=p.clients_per_chunk, block_mask=p.block_mask,
      shard_clients=p.shard_clients,
      counterfactual=p.counterfactual, feddebug=p.feddebug, score=p.score, output=p.output,
      feddebug_inputs=p.feddebug_inputs, feddebug_threshold=p.feddebug_threshold)


def input_range_of(ds, model) -> list[float] | None:
  """`[lo, hi]` of the test inputs of a float dataset without a
  `Normalization` (digits, synthetic): the trace verb refuses inputs far outside it, such
  as raw pixels given as floats. None for image datasets (their normalisation says the
  range) and token ids."""
  if ds.normalization is not None or not np.issubdtype(np.dtype(model.input_dtype),
                                                       np.floating):
    return None
  x = np.asarray(ds.x_test)
  if not np.issubdtype(x.dtype, np.floating) or not x.size:
    return None
  return [float(np.nanmin(x)), float(np.nanmax(x))]


def feddebug_normalize(ds):
  """The test transform's normalisation for FedDebug's random inputs (in [0, 1]): the image
  dataset's own `Normalization` on a [0, 1] scale; digits are stored normalised (float)."""
  if ds.normalization is not None:
    return dataclasses.replace(ds.normalization, pixel_max=1.0)
  if ds.name == "digits":
    mean, std = np.asarray(DIGITS_MEAN, np.float32), np.asarray(DIGITS_STD, np.float32)
    return lambda x: (x - mean) / std
  return None


class Recorder:
  """The last callback: writes the round's metrics row, keeps the history (which checkpoints
  carry), saves the due checkpoint and moves the progress bar."""

  def __init__(self, plan: RunPlan, checkpointer: Checkpointer, start: Start, rounds: int, *,
               primary: bool, progress: bool):
    self.metrics = JsonlWriter(plan.workdir / "metrics.jsonl") if primary else NullWriter()
    self.checkpointer = checkpointer
    self.history = list(start.history)
    self.seconds_before = start.seconds
    self.t_start = time.perf_counter()
    self.bar = tqdm(total=rounds, initial=int(start.state.round), desc="rounds", unit="round",
                    disable=not (progress and primary))

  def seconds(self) -> float:
    """Wall time of the rounds over every invocation of the run (lost rounds count once)."""
    return self.seconds_before + time.perf_counter() - self.t_start

  def __call__(self, info: RoundInfo) -> None:
    self.metrics.write(info.metrics)
    self.history.append(info.metrics)
    self.checkpointer.maybe_save(info.state, self.history, self.seconds())
    self.bar.update(1)
    prov = info.metrics.get("provenance")
    extra = {} if not prov or prov.get("skipped") else {"trace": f"{prov['accuracy']:.3f}"}
    self.bar.set_postfix(acc=f"{info.metrics['accuracy']:.3f}", **extra)

  def close(self) -> None:
    self.bar.close()
    self.metrics.close()


class RunCallbacks:
  """The run's callbacks (`callbacks`, in order) and what must be closed after the loop."""

  def __init__(self, callbacks: list[Callable[[RoundInfo], Any]], recorder: Recorder,
               closers: list[Callable[[], None]]):
    self.callbacks, self.recorder, self._closers = callbacks, recorder, closers

  def close(self) -> None:
    for close in self._closers:
      close()


def build_callbacks(config: ml_collections.ConfigDict, plan: RunPlan, data: DataStage,
                    model: ModelStage, evaluator: Any, checkpointer: Checkpointer,
                    start: Start, *, primary: bool = True,
                    progress: bool = True) -> RunCallbacks:
  c, ds, values = config, data.dataset, typed(config)
  callbacks: list[Callable[[RoundInfo], Any]] = [evaluator]
  writer = JsonlWriter(plan.workdir / "provenance.jsonl") if primary else NullWriter()
  prov_log = ProvenanceLog(writer, data.data.label_counts, top_k=c.provenance.top_k)
  if c.provenance.enabled:
    settings = dataclasses.replace(protocol_settings(c, data.faulty), flip=data.flip)
    multi_round = None
    if c.provenance.multi_round:
      if start.state.round:  # the accumulated sums are not checkpointed
        raise ValueError(
            f"provenance.multi_round sums every round since round 1, which a run resumed "
            f"after round {start.state.round} cannot rebuild; rerun with --overwrite, or "
            f"trace the stored rounds (provenance.multiround.multi_round_scores)")
      multi_round = MultiRoundAccumulator(model.variables["params"], data.data.num_clients)
    callbacks.append(provenance_callback(
        model.model, evaluator, settings, rounds=list(values.provenance_rounds),
        on_trace=prov_log.write_round, seed=c.seed, feddebug_normalize=feddebug_normalize(ds),
        multi_round=multi_round))
  if c.dp.enabled:
    rate = c.clients_per_round / data.data.num_clients
    callbacks.append(lambda info: {"dp_epsilon": dp_epsilon(c.dp.noise_multiplier, rate,
                                                            info.round, c.dp.delta)})
  store = values.store_rounds
  if store:
    meta = {"model": model.spec, "normalization": normalization_meta(ds)}
    input_range = input_range_of(ds, model.model)

    def keep_round(info: RoundInfo) -> None:
      if info.round in store:  # with its weights and server side (the round's own removal)
        save_round(plan.workdir, info.round, info.output, meta=meta, model=model.model,
                   input_range=input_range)
    callbacks.append(keep_round)
  recorder = Recorder(plan, checkpointer, start, c.rounds, primary=primary, progress=progress)
  return RunCallbacks([*callbacks, recorder], recorder,
                      [recorder.close, prov_log.close, checkpointer.close])
