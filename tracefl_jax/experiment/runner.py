"""`run(config, workdir)`: a config through named stages into library calls and the workdir.

  plan       check the workdir, lock it, decide: fresh, resume, finished, overwrite;
  data       dataset -> partition -> flipped labels -> stacked clients, server test set;
  model      the model and its initial variables;
  algorithm  the config's `algorithm` (FedAvg's family, DP-FedAvg, SCAFFOLD, FedDyn,
             FedNova) with its optimizer and client-axis strategy; its server state (and
             per-client state table) is what checkpoints carry;
  start      a previous run moved aside, or the latest checkpoint restored and the JSONL
             files reconciled with it; config.json and partition.json;
  callbacks  in `run_rounds`' order (`build_callbacks`): the global model's test accuracy;
             the paper's protocol on the round (one provenance.jsonl row per traced input);
             the DP epsilon spent so far; the round's models under WORKDIR/rounds/
             (`provenance.store_rounds`); the recorder: the metrics.jsonl row, the history,
             the checkpoint and the progress bar;
  loop       the library's `run_rounds`;
  summary    summary.json and the figures.

Writes into `workdir`:
  config.json       the resolved config;
  partition.json    each client's label counts (the provenance ground truth);
  metrics.jsonl     one row per round (global accuracy, client loss, provenance summary);
  provenance.jsonl  one row per traced input (round, input, labels, traced client, top
                    clients with probabilities, correct, the traced client's label counts);
  summary.json      the run's headline numbers (figures too, with `figures=True`);
  run.log           orbax's own messages, when it has any.

Every row is flushed as soon as its round ends, so a crash loses nothing already computed.

Several processes (`distributed.initialize` first): every process runs every stage; process
0 alone decides the plan and writes files (rows included); all of them checkpoint and store
rounds through orbax.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from tracefl_jax.data.base import DIGITS_MEAN, DIGITS_STD
from tracefl_jax.experiment import distributed, resume, stages, summary as outputs
from tracefl_jax.experiment.checkpoints import Checkpointer, quiet_orbax
from tracefl_jax.experiment.config import typed, validate
from tracefl_jax.experiment.io import JsonlWriter, NullWriter, ProvenanceLog
from tracefl_jax.experiment.resume import Start
from tracefl_jax.experiment.stages import DataStage, ModelStage, normalization_meta
from tracefl_jax.experiment.stored import save_round
from tracefl_jax.experiment.workdir import RunPlan, WorkdirLock, check_workdir, plan_run
from tracefl_jax.fl.privacy import dp_epsilon
from tracefl_jax.fl.rounds import RoundInfo, TrainingDivergedError, run_rounds
from tracefl_jax.provenance.multiround import MultiRoundAccumulator
from tracefl_jax.provenance.round_callback import provenance_callback


def run(config: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True,
        allow_cwd: bool = False, figures: bool = False) -> dict[str, Any]:
  """Runs one federated experiment with online provenance; returns the summary dict.

  If `workdir` holds a checkpoint of the same experiment (and `checkpoint.resume`), the run
  continues after the checkpoint's round and ends exactly as an uninterrupted run would; if
  it holds the same experiment's finished run, nothing changes (but missing figures are made
  with `figures`) and its summary is returned.

  Raises:
    WorkdirError: before anything is loaded, for a workdir that is empty, the current
      directory (unless `allow_cwd`), not writable, of the wrong layout, in use by another
      run (`workdir.WorkdirBusyError`), or holding results this run would mix with or lose.
    CheckpointError: a checkpoint that is corrupt or of another experiment (left in place).
    TrainingDivergedError: the loss exploded; earlier rounds' rows and checkpoints stay.
  """
  c = config
  stages.import_modules(c.imports)
  validate(c)
  if c.attribution.enabled:  # one experiment per entrance: the comparison is `compare`'s
    raise ValueError("attribution.enabled=True makes the config a cell of the attribution "
                     "comparison, which the compare command runs: python -m tracefl_jax "
                     "compare --config=PATH.py:PRESET --workdir=DIR (every cell of the "
                     "preset's sweep); or set --config.attribution.enabled=False")
  outputs.reset_peak_rss()  # this run's peak, not an earlier run's of the same process
  primary = distributed.is_primary()
  workdir = distributed.on_primary(lambda: str(check_workdir(workdir, allow_cwd=allow_cwd)))
  lock = WorkdirLock(workdir)
  try:
    plan = RunPlan(*distributed.on_primary(lambda: _plan(c, lock)))
    plan = plan._replace(workdir=Path(plan.workdir))
    with quiet_orbax(plan.workdir if primary else None):
      if plan.action == "finished":
        return outputs.nothing_to_do(plan, c.rounds, figures=figures, primary=primary)
      data = stages.load_data(c)
      model = stages.build_model(c, data)
      algorithm = distributed.host_round(stages.build_algorithm(c, model, data))
      evaluator = stages.build_evaluator(c, model, data)
      if plan.action == "overwrite":  # as late as possible: every check above has passed
        distributed.on_primary(lambda: resume.move_previous(plan))
      checkpointer = Checkpointer(plan.workdir, plan.config_json, c.checkpoint.every)
      initial = algorithm.init(model.variables, num_clients=data.data.num_clients)
      start = resume.restore(plan, checkpointer, initial)
      distributed.on_primary(lambda: resume.write_start_files(plan, start, data))
      cbs = build_callbacks(c, plan, data, model, evaluator, checkpointer, start,
                            primary=primary, progress=progress)
      mem = outputs.memory_start()
      history = _loop(c, plan, algorithm, data, start, cbs)
      summary = outputs.run_summary(c, history, cbs.recorder.seconds(), algorithm.strategy,
                                    data, mem)
      if primary:
        outputs.write_outputs(plan.workdir, summary, figures=figures)
      return summary
  finally:
    lock.release()


def _plan(config: ml_collections.ConfigDict, lock: WorkdirLock) -> list[Any]:
  lock.acquire()  # before anything is written; a second run is refused here, at once
  plan = plan_run(config, lock.path.parent)
  return [str(plan.workdir), *plan[1:]]


def _loop(c: ml_collections.ConfigDict, plan: RunPlan, algorithm, data: stages.DataStage,
          start: Start, cbs: RunCallbacks) -> list[dict[str, Any]]:
  """The rounds after the start's, then a checkpoint of the last; returns the whole history."""
  recorder = cbs.recorder
  try:
    state, _ = run_rounds(algorithm, start.state, data.data, rounds=c.rounds,
                          clients_per_round=c.clients_per_round, seed=c.seed,
                          callbacks=cbs.callbacks, divergence_factor=c.client.divergence_factor,
                          always_sampled=data.faulty if c.faulty.every_round else ())
    recorder.checkpointer.maybe_save(state, recorder.history, recorder.seconds(), force=True)
  except TrainingDivergedError as e:
    history = recorder.history
    kept = (f"The rows of rounds 1-{history[-1]['round']} are in "
            f"{plan.workdir / 'metrics.jsonl'}, checkpoints in "
            f"{recorder.checkpointer.directory}; a run with other values needs another "
            f"--workdir or --overwrite." if history else
            "No round finished, so the workdir holds no results to keep.")
    raise TrainingDivergedError(f"{diverged_message(e, c)} {kept}") from e
  finally:
    cbs.close()
  return recorder.history


# Above these a value is far outside what federated training uses (a step of the whole
# update or more; a proximal pull that dwarfs the loss).
_USUAL_MAX = {"client.learning_rate": 1.0, "server.learning_rate": 1.0, "client.prox_mu": 10.0}


def diverged_message(e: TrainingDivergedError, c: ml_collections.ConfigDict) -> str:
  """The library's divergence message with the config fields that could have caused it
  (the client's and the server's learning rates, FedProx's mu), their values, and which of
  them are unusually large, instead of its generic 'Lower the learning rate.'."""
  text = str(e).split(" Lower the learning rate")[0]
  causes = {"client.learning_rate": (c.client.learning_rate,
                                     f"client.optimizer={c.client.optimizer}")}
  if c.server.optimizer != "none":
    causes["server.learning_rate"] = (c.server.learning_rate,
                                      f"server.optimizer={c.server.optimizer}")
  if c.client.loss == "fedprox":
    causes["client.prox_mu"] = (c.client.prox_mu, "client.loss=fedprox")
  large = [f for f, (value, _) in causes.items() if value > _USUAL_MAX[f]]
  listed = ", ".join(f"{f}={value:g} ({why})" for f, (value, why) in causes.items())
  advice = (f"{' and '.join(large)} {'is' if len(large) == 1 else 'are'} unusually large: "
            f"lower {'it' if len(large) == 1 else 'them'}" if large else
            "lower one of them")
  if "non-finite training loss" in text:
    advice += ", or check the data for NaN/inf values"
  return f"{text} The fields that set its steps: {listed}; {advice}."


# --- the callbacks -----------------------------------------------------------------------


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
    settings = dataclasses.replace(stages.protocol_settings(c, data.faulty), flip=data.flip)
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
