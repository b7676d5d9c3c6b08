"""Save a round's models and load them back for tracing after training, without a config.

    out = ...                                     # a RoundOutput of algorithm.round
    save_round("runs/mine/round_5", out, round_idx=5)
    stored = load_round("runs/mine/round_5", model)  # the ModelDef the round was made with
    result = stored.trace(x_new)                  # trace_clients on the stored round

A stored round is a directory: `arrays/` (orbax-checkpoint; imported here when first used, an
optional dependency) holding G_t, the stacked client variables `[K, ...]`, the client ids and
example counts, then `round.json` (the round, the model's description, the caller's `meta`,
a SHA-256 checksum of every array), written last: a directory without it was interrupted.
Code cannot be stored, so `load_round` takes the `ModelDef` (linen or NNX) and checks that
the stored arrays are its variables.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.models.base import ModelDef

ROUND_FILE = "round.json"


class StoredRoundError(RuntimeError):
  """A stored round that is missing, interrupted, corrupt, or not the given model's."""


class StoredRound(NamedTuple):
  """A round's models as stored by `save_round`."""
  round: int
  global_vars: Any          # the model provenance explains (G_t)
  client_vars: Any          # the round's client models, every leaf stacked [K, ...]
  client_ids: np.ndarray    # [K] global ids, in the round's order
  client_sizes: np.ndarray  # [K] example counts
  meta: dict[str, Any]      # the caller's metadata and the model's description
  model: ModelDef | None = None  # the ModelDef given to `load_round`

  def trace(self, x: Any, **kwargs: Any) -> Any:
    """`trace_clients(self.model, G_t, clients, x, client_ids=..., **kwargs)` for inputs
    `[N, *input_shape]` (as the model takes them: normalised floats or token ids)."""
    from tracefl_jax.provenance import trace_clients  # pylint: disable=g-import-not-at-top
    if self.model is None:
      raise ValueError("this StoredRound has no model: load it with load_round(path, model)")
    x = jnp.asarray(x, self.model.input_dtype)
    if x.shape[1:] != self.model.input_shape:
      raise ValueError(f"x has shape {x.shape}; the model takes [N, "
                       f"{', '.join(map(str, self.model.input_shape))}]")
    kwargs.setdefault("client_ids", self.client_ids)
    return trace_clients(self.model, self.global_vars, self.client_vars, x, **kwargs)


def array_checksums(tree: Any) -> dict[str, str]:
  """SHA-256 of every array leaf (dtype, shape and bytes), keyed by its path."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    out[jax.tree_util.keystr(path, simple=True, separator="/")] = h.hexdigest()
  return out


def describe_model(model: ModelDef) -> dict[str, Any]:
  """The JSON description of a model kept beside its arrays (checked on load)."""
  return {"name": model.name, "module": type(model.module).__qualname__,
          "kind": getattr(model.module, "nnx_kind", None) or type(model.module).__name__,
          "input_shape": list(model.input_shape), "num_classes": model.num_classes,
          "input_dtype": jnp.dtype(model.input_dtype).name,
          "traced_layers": ["/".join(p) for p in model.traced_layers]}


def save_round(path: str | Path, output: Any = None, *, round_idx: int | None = None,
               global_vars: Any = None, client_vars: Any = None, client_ids: Any = None,
               client_sizes: Any = None, model: ModelDef | None = None,
               meta: dict[str, Any] | None = None) -> Path:
  """Writes a round to the directory `path`; returns it.

  Args:
    output: a `RoundOutput`; its traced model, client variables, ids and example counts are
      stored (or give them one by one: `global_vars`, `client_vars` `[K, ...]`, `client_ids`
      `[K]`, `client_sizes` `[K]`, which override the output's).
    round_idx: the round's number (default: unknown, stored as 0).
    model: its description is stored and checked again on `load_round`.
    meta: JSON-ready metadata kept in `round.json` (returned as `StoredRound.meta`).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if output is not None:
    global_vars = output.traced if global_vars is None else global_vars
    client_vars = output.clients.variables if client_vars is None else client_vars
    client_ids = output.client_ids if client_ids is None else client_ids
    client_sizes = output.clients.num_examples if client_sizes is None else client_sizes
  missing = [n for n, v in (("global_vars", global_vars), ("client_vars", client_vars),
                            ("client_ids", client_ids), ("client_sizes", client_sizes))
             if v is None]
  if missing:
    raise ValueError(f"save_round needs a RoundOutput or {', '.join(missing)}")
  path = Path(path).resolve()
  primary = jax.process_index() == 0  # several processes: each saves, orbax and process 0 write
  path.mkdir(parents=True, exist_ok=True)
  if primary:
    (path / ROUND_FILE).unlink(missing_ok=True)
  arrays = {"global": global_vars, "clients": client_vars,
            "client_ids": np.asarray(client_ids, np.int64),
            "client_sizes": np.asarray(client_sizes, np.int64)}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / "arrays", arrays, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  record = {"round": int(round_idx or 0), **(meta or {}),
            "num_clients": int(arrays["client_ids"].shape[0]),
            "checksums": array_checksums(arrays)}
  if model is not None:
    record["model_def"] = describe_model(model)
  if primary:
    (path / ROUND_FILE).write_text(json.dumps(record, indent=2) + "\n")
  return path


def _abstract(model: ModelDef, k: int) -> dict[str, Any]:
  g = jax.eval_shape(model.init, jax.random.key(0))
  sds = lambda a, lead=(): jax.ShapeDtypeStruct((*lead, *a.shape), a.dtype)  # noqa: E731
  return {"global": jax.tree.map(sds, g), "clients": jax.tree.map(lambda a: sds(a, (k,)), g),
          "client_ids": jax.ShapeDtypeStruct((k,), np.int64),
          "client_sizes": jax.ShapeDtypeStruct((k,), np.int64)}


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  return {jax.tree_util.keystr(p, simple=True, separator="/"):
          (tuple(a.shape), np.dtype(a.dtype).name)
          for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_shapes(path: Path, metadata: Any, target: Any, model: ModelDef) -> None:
  """Compares the stored arrays' shapes and dtypes (orbax's metadata) with `model`'s before
  restoring (a restore that fails midway leaves orbax's reads pending)."""
  tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
  if not isinstance(tree, dict):
    return  # an orbax without tree metadata: the restore itself checks
  stored, wanted = _shapes(tree), _shapes(target)
  for name in sorted(set(stored) | set(wanted)):
    if stored.get(name) != wanted.get(name):
      has = stored.get(name, "missing")
      raise StoredRoundError(
          f"stored round {path} does not hold the variables of model {model.name!r}: array "
          f"{name} is {has} in the round, {wanted.get(name, 'absent')} in the model")


def _verify_checksums(path: Path, saved: dict[str, str] | None, arrays: Any) -> None:
  """Raises `StoredRoundError` naming the first array whose data differs from its checksum
  (rounds stored before checksums existed have none: nothing to check)."""
  if saved is None:
    return
  now = array_checksums(arrays)
  for name in sorted(set(saved) | set(now)):
    if saved.get(name) != now.get(name):
      problem = ("is missing" if name not in now else "was not written with a checksum"
                 if name not in saved else "does not match the SHA-256 checksum written with "
                 "it")
      raise StoredRoundError(f"stored round {path} is corrupt: array {name} {problem}.")


def load_round(path: str | Path, model: ModelDef | None = None) -> StoredRound:
  """A round written by `save_round`, with `model` (the ModelDef it was made with) attached.

  Raises:
    StoredRoundError: the directory holds no complete round, its arrays cannot be read or
      are not `model`'s variables, or an array does not match its checksum.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = Path(path).resolve()
  if not (path / ROUND_FILE).is_file():
    raise StoredRoundError(f"{path} holds no stored round (no {ROUND_FILE}: never saved, or "
                           f"the save was interrupted); save one with save_round(path, ...)")
  meta = json.loads((path / ROUND_FILE).read_text())
  try:
    checkpointer = ocp.StandardCheckpointer()
    k = meta.get("num_clients")
    if model is None or k is None:  # rounds of older stores do not record K
      arrays = checkpointer.restore(path / "arrays")
    else:
      target = _abstract(model, int(k))
      _check_shapes(path, checkpointer.metadata(path / "arrays"), target, model)
      arrays = checkpointer.restore(path / "arrays", target)
    checkpointer.close()
  except StoredRoundError:
    raise
  except Exception as e:  # orbax raises many types for unreadable or mismatched arrays
    what = "" if model is None else f" or not the variables of model {model.name!r}"
    first = (str(e).strip().splitlines() or [""])[0][:300]  # one line, as orbax's first
    raise StoredRoundError(f"stored round {path} is unreadable{what} "
                           f"({type(e).__name__}: {first})") from e
  _verify_checksums(path, meta.pop("checksums", None), arrays)
  described = meta.get("model_def")
  if model is not None and described is not None:
    now = describe_model(model)
    diff = [f for f in ("input_shape", "num_classes", "traced_layers")
            if described.get(f) != now[f]]
    if diff:
      raise StoredRoundError(f"stored round {path} was made with a model whose "
                             f"{', '.join(diff)} differ from {model.name!r}'s: "
                             + "; ".join(f"{f} {described.get(f)} != {now[f]}" for f in diff))
  meta.pop("num_clients", None)
  return StoredRound(int(meta.pop("round")), arrays["global"], arrays["clients"],
                     np.asarray(arrays["client_ids"]), np.asarray(arrays["client_sizes"]), meta,
                     model)
