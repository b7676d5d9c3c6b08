"""Save a round's models and load them back for tracing after training, without a config.

    out = ...                                     # a RoundOutput of algorithm.round
    save_round("runs/mine/round_5", out, round_idx=5)
    stored = load_round("runs/mine/round_5", model, algorithm)  # as the round was made
    result = stored.trace(x_new)                  # trace_clients on the stored round
    fo = stored.trace(x_new, score="first_order")  # each client removed by the round's rule
    truth = stored.leave_one_out(x_new)           # the exact leave-one-client-out drops

A stored round is a directory: `arrays/` (orbax-checkpoint; imported here when first used, an
optional dependency) holding G_t, the stacked client variables `[K, ...]`, the client ids,
example counts and aggregation weights and, for a round whose server side is not FedAvg's
mean (a robust rule, a server optimizer), what re-running it needs: G_{t-1} (when the rule
reads it) and the server optimizer's state before the round. Then `round.json`: the round,
its server side in words (`RoundOutput.aggregation`), the model's description, every array's
shape and SHA-256 checksum, every file's size, and the caller's `meta`. It is written whole
beside an older round and swapped in when complete (`storage_files.swap_in`).

Code cannot be stored, so `load_round` takes the `ModelDef` (linen or NNX), checks that the
stored arrays are its variables, and, for a round that is not FedAvg's mean, the
`FederatedAlgorithm` it was made with, whose `server_update` rebuilds the round's
`reaggregate` (checked to give the stored G_t back).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.provenance import storage_files as files
from tracefl_jax.provenance.storage_files import ROUND_FILE, StoredRoundError, array_checksums  # noqa: F401
from tracefl_jax.provenance.stored_round import StoredRound
from tracefl_jax.provenance.stored_round import rebuild_reaggregate, server_arrays
from tracefl_jax.models.base import ModelDef


def describe_model(model: ModelDef) -> dict[str, Any]:
  """The JSON description of a model kept beside its arrays (checked on load)."""
  return {"name": model.name, "module": type(model.module).__qualname__,
          "kind": getattr(model.module, "nnx_kind", None) or type(model.module).__name__,
          "input_shape": list(model.input_shape), "num_classes": model.num_classes,
          "input_dtype": jnp.dtype(model.input_dtype).name,
          "traced_layers": ["/".join(p) for p in model.traced_layers]}


def _per_client(name: str, values: Any, k: int, integer: bool) -> np.ndarray:
  a = np.asarray(values)
  if a.shape != (k,):
    raise ValueError(f"save_round: {name} has shape {list(a.shape)}, but client_vars stacks "
                     f"K = {k} clients: give one value per client of the round")
  if integer and not np.issubdtype(a.dtype, np.integer):
    raise ValueError(f"save_round: {name} has dtype {a.dtype}; it holds integers")
  if not np.all(np.isfinite(a.astype(np.float64))) or np.any(a < 0):
    raise ValueError(f"save_round: {name} must be finite and >= 0, got {a.tolist()}")
  return a.astype(np.int64 if integer else np.float32)


def save_round(path: str | Path, output: Any = None, *, round_idx: int | None = None,
               global_vars: Any = None, client_vars: Any = None, client_ids: Any = None,
               client_sizes: Any = None, weights: Any = None, aggregation: str | None = None,
               model: ModelDef | None = None, meta: dict[str, Any] | None = None,
               input_range: Any = None) -> Path:
  """Writes a round to the directory `path` (replacing a round there only once the new one
  is complete); returns it.

  Args:
    output: a `RoundOutput`; its traced model, client variables, ids, example counts,
      aggregation weights and server side (`aggregation`, and what `reaggregate` re-runs)
      are stored. Or give them one by one: `global_vars`, `client_vars` `[K, ...]`,
      `client_ids` `[K]`, `client_sizes` `[K]`, `weights` `[K]`, `aggregation` (these
      override the output's); a round given so keeps no server state, so only FedAvg's
      mean ("mean") and DP ("dp_fedavg") can remove its clients later.
    round_idx: the round's number (default: `meta["round"]`, else 0).
    model: its description and variables' shapes are stored and checked again on load.
    meta: JSON values kept in `round.json` (returned as `StoredRound.meta`).
    input_range: `[lo, hi]` of the data's own float inputs (e.g. the test set's): the
      stored round's `trace` then refuses float inputs far outside it (raw values).

  Raises:
    ValueError, before anything is written: `meta` JSON cannot hold (numpy scalars), a key
      save_round writes itself, `meta["round"]` other than `round_idx`, client leaves that
      are not G's stacked `[K, ...]`, ids, sizes or weights that are not `[K]` (ids
      distinct integers), variables that are not `model`'s.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from tracefl_jax.provenance.checks import check_variables  # pylint: disable=g-import-not-at-top
  server, server_info = {}, {}
  if output is not None:
    global_vars = output.traced if global_vars is None else global_vars
    client_vars = output.clients.variables if client_vars is None else client_vars
    client_ids = output.client_ids if client_ids is None else client_ids
    client_sizes = output.clients.num_examples if client_sizes is None else client_sizes
    weights = output.weights if weights is None else weights
    aggregation = output.aggregation if aggregation is None else aggregation
    server, server_info = server_arrays(output)
  missing = [n for n, v in (("global_vars", global_vars), ("client_vars", client_vars),
                            ("client_ids", client_ids), ("client_sizes", client_sizes))
             if v is None]
  if missing:
    raise ValueError(f"save_round needs a RoundOutput or {', '.join(missing)}")
  round_idx = files.check_meta(meta, round_idx)
  if aggregation is not None and not isinstance(aggregation, str):
    raise ValueError(f"save_round: aggregation={aggregation!r} must be the round's server "
                     f"side in words (RoundOutput.aggregation)")
  k = check_variables(global_vars, client_vars)
  ids = _per_client("client_ids", client_ids, k, integer=True)
  if len(set(ids.tolist())) != k:
    raise ValueError(f"save_round: client_ids {ids.tolist()} repeat an id; a round's clients "
                     f"are distinct")
  arrays = {"global": global_vars, "clients": client_vars, "client_ids": ids,
            "client_sizes": _per_client("client_sizes", client_sizes, k, integer=True),
            **server}
  if weights is not None:
    arrays["weights"] = _per_client("weights", weights, k, integer=False)
  arrays = jax.tree.map(np.asarray, arrays)  # host values: every process saves the same
  if model is not None:
    wanted = files.shapes(jax.eval_shape(model.init, jax.random.key(0)))
    have = files.shapes(arrays["global"])
    for name in sorted(set(wanted) | set(have)):
      if wanted.get(name) != have.get(name):
        raise ValueError(f"save_round: global_vars are not the variables of model "
                         f"{model.name!r}: leaf {name} is {have.get(name, 'missing')}, the "
                         f"model's is {wanted.get(name, 'absent')}")
  if input_range is not None:
    input_range = [float(v) for v in input_range]
    if len(input_range) != 2 or not input_range[0] <= input_range[1]:
      raise ValueError(f"save_round: input_range={input_range} must be [lo, hi], lo <= hi")
  record = {"round": round_idx, **(meta or {}), "num_clients": k, "aggregation": aggregation,
            "input_range": input_range,
            "checksums": array_checksums(arrays),
            "storage": {"format": 2, "shapes": files.shapes(arrays), **server_info}}
  if model is not None:
    record["model_def"] = describe_model(model)

  path = Path(path).resolve()
  new = files.saving_path(path)
  primary = jax.process_index() == 0  # several processes: each saves, orbax and process 0 write
  try:
    if primary and new.exists():
      shutil.rmtree(new)  # an earlier save that failed
    new.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(new / "arrays", arrays, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    if primary:
      record["storage"]["files"] = files.file_sizes(new)
      import json  # pylint: disable=g-import-not-at-top
      with open(new / ROUND_FILE, "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
      files.swap_in(new, path)
  except BaseException:
    if primary:
      shutil.rmtree(new, ignore_errors=True)  # the round at `path` is untouched
    raise
  return path


def _target(model: ModelDef, k: int, shapes: dict[str, Any]) -> dict[str, Any]:
  """The abstract arrays to restore: the model's variables, and the other parts as
  recorded (`storage.shapes` of round.json)."""
  g = jax.eval_shape(model.init, jax.random.key(0))
  sds = lambda a, lead=(): jax.ShapeDtypeStruct((*lead, *a.shape), a.dtype)  # noqa: E731
  out = {"global": jax.tree.map(sds, g), "clients": jax.tree.map(lambda a: sds(a, (k,)), g),
         "client_ids": jax.ShapeDtypeStruct((k,), np.int64),
         "client_sizes": jax.ShapeDtypeStruct((k,), np.int64)}
  for name, (shape, dtype) in shapes.items():
    top, _, rest = name.partition("/")
    leaf = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
    if top in ("weights", "key"):
      out[top] = leaf
    elif top in ("opt_state", "client_info"):
      out.setdefault(top, {})[rest] = leaf
    elif top == "previous":
      out["previous"] = out["global"]
  return out


def _check_model(path: Path, record: dict[str, Any], recorded: dict[str, Any] | None,
                 model: ModelDef) -> None:
  """The stored variables' shapes (round.json) against `model`'s, before orbax reads."""
  if not recorded:
    return
  stored = {n[len("global/"):]: v for n, v in recorded.items() if n.startswith("global/")}
  wanted = files.shapes(jax.eval_shape(model.init, jax.random.key(0)))
  made_with = (record.get("model_def") or {}).get("name")
  of = f" (a round of model {made_with!r})" if made_with and made_with != model.name else ""
  _check_same_shapes(f"stored round {path}{of}", stored, wanted, model)


def _check_orbax_shapes(path: Path, metadata: Any, target: Any, model: ModelDef) -> None:
  """Rounds stored before round.json recorded shapes: orbax's metadata against `model`."""
  tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
  if not isinstance(tree, dict):
    return  # an orbax without tree metadata: the restore itself checks
  _check_same_shapes(f"stored round {path}", files.shapes(tree), files.shapes(target), model)


def _check_same_shapes(what: str, stored: dict[str, Any], wanted: dict[str, Any],
                       model: ModelDef) -> None:
  """Raises `StoredRoundError` naming the first array whose shape or dtype differs."""
  for name in sorted(set(stored) | set(wanted)):
    if stored.get(name) != wanted.get(name):
      raise StoredRoundError(
          f"{what} does not hold the variables of model {model.name!r}: array {name} is "
          f"{stored.get(name, 'missing')} in the round, {wanted.get(name, 'absent')} in the "
          f"model")


def load_round(path: str | Path, model: ModelDef | None = None,
               algorithm: Any = None) -> StoredRound:
  """A round written by `save_round`, with `model` (the ModelDef it was made with) attached.

  `algorithm`, the `FederatedAlgorithm` the round was made with, is needed only for a round
  whose server side is not FedAvg's mean (a robust rule, a server optimizer): its
  `server_update` then re-runs the round without a client (`StoredRound.reaggregate`), so
  the first-order score and the leave-one-out truth are the round's own.

  Raises:
    StoredRoundError, in one line naming the file or array: the directory holds no complete
      round, `round.json` is torn, a file is missing or truncated, the arrays cannot be
      read, are not `model`'s variables or do not match their checksums; an `algorithm`
      whose server side is not the round's, or that does not give the stored G_t back.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = files.complete_round(Path(path).resolve())
  record = files.read_record(path)
  storage = record.pop("storage", None) or {}
  files.check_files(path, storage.get("files"))
  k = record.get("num_clients")
  if model is not None:
    _check_model(path, record, storage.get("shapes"), model)
  try:
    checkpointer = ocp.StandardCheckpointer()
    if model is None or k is None:  # rounds of older stores do not record K
      arrays = checkpointer.restore(path / "arrays")
    else:
      target = _target(model, int(k), storage.get("shapes") or {})
      if not storage.get("shapes"):
        _check_orbax_shapes(path, checkpointer.metadata(path / "arrays"), target, model)
      arrays = checkpointer.restore(path / "arrays", target)
    checkpointer.close()
  except StoredRoundError:
    raise
  except Exception as e:  # orbax raises many types for unreadable or mismatched arrays
    what = "" if model is None else f" or not the variables of model {model.name!r}"
    first = (str(e).strip().splitlines() or [""])[0][:300]  # one line, as orbax's first
    raise StoredRoundError(f"stored round {path} is unreadable{what} "
                           f"({type(e).__name__}: {first})") from e
  files.verify_checksums(path, record.pop("checksums", None), arrays)
  described = record.get("model_def")
  if model is not None and described is not None:
    now = describe_model(model)
    diff = [f for f in ("input_shape", "num_classes", "traced_layers")
            if described.get(f) != now[f]]
    if diff:
      raise StoredRoundError(f"stored round {path} was made with a model whose "
                             f"{', '.join(diff)} differ from {model.name!r}'s: "
                             + "; ".join(f"{f} {described.get(f)} != {now[f]}" for f in diff))
  record.pop("num_clients", None)
  aggregation = record.pop("aggregation", None)
  input_range = record.pop("input_range", None)
  weights = arrays.get("weights")
  stored = StoredRound(
      int(record.pop("round")), arrays["global"], arrays["clients"],
      np.asarray(arrays["client_ids"]), np.asarray(arrays["client_sizes"]), record, model,
      None if weights is None else np.asarray(weights, np.float32), aggregation,
      input_range=input_range)
  if algorithm is not None:
    stored = stored._replace(reaggregate=rebuild_reaggregate(path, stored, arrays, storage,
                                                             algorithm))
  return stored
