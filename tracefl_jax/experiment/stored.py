"""Tracing after training: new inputs against a round stored in a workdir.

A run with `--config.provenance.store_rounds=...` keeps the chosen rounds' models (the traced
global model, the stacked client models, their ids and sizes) under `WORKDIR/rounds/`. Later,

  python -m tracefl_jax trace --workdir=runs/demo --round=40 --inputs=x.npy [--out=a.jsonl]

answers "which client is responsible for THIS prediction?" for inputs that were never seen
during training, with the run's own provenance settings; the numbers equal the online trace of
the same round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.data import Normalization
from tracefl_jax.experiment.checkpointing import StoredRound, load_round
from tracefl_jax.experiment.runner import build_model
from tracefl_jax.experiment.tracing import top_clients
from tracefl_jax.provenance import ProvenanceResult, trace_clients


def trace_stored_round(workdir: str | Path, x: Any, round_idx: int | None = None, *,
                       kernel: str | None = None) -> tuple[ProvenanceResult, StoredRound]:
  """Traces inputs `x` (`[N, *input_shape]`, or one example) against a stored round.

  For a run on uint8 images (mnist, cifar10, MedMNIST) `x` may be uint8 pixels, normalised
  here as the run normalised its data, or already normalised floats.

  Returns the `ProvenanceResult` (global client ids in `traced_client`) and the round.
  """
  workdir = Path(workdir)
  stored = load_round(workdir, round_idx)
  config = json.loads((workdir / "config.json").read_text())
  p, batch_size = config["provenance"], config["client"]["batch_size"]
  model, _ = build_model(stored.meta["model"], jax.random.key(0))
  x = np.asarray(x)
  norm = stored.meta.get("normalization")
  if norm and x.dtype == np.uint8:  # raw pixels of a uint8 image dataset: as the run saw them
    x = Normalization(**norm)(x)
  if x.shape == model.input_shape:
    x = x[None]
  if x.shape[1:] != model.input_shape:
    raise ValueError(f"inputs have shape {x.shape}; round {stored.round} of {workdir} traces "
                     f"inputs of shape [N, {', '.join(map(str, model.input_shape))}] "
                     f"(preprocessed as the run's dataset is)")
  if np.issubdtype(np.dtype(model.input_dtype), np.integer) != np.issubdtype(x.dtype,
                                                                             np.integer):
    raise ValueError(f"inputs have dtype {x.dtype}; this model takes {np.dtype(model.input_dtype)}")
  result = trace_clients(
      model, stored.global_vars, stored.client_vars, jnp.asarray(x, model.input_dtype),
      kernel=kernel or p["kernel"], decay=p["decay"], use_decay=p["use_decay"],
      client_sizes=jnp.asarray(stored.client_sizes // batch_size),
      use_size_factor=p["use_size_factor"], clients_per_chunk=p["clients_per_chunk"] or None,
      client_ids=stored.client_ids)
  return result, stored


def attribution_rows(result: ProvenanceResult, round_idx: int,
                     top_k: int = 3) -> list[dict[str, Any]]:
  """One JSON-ready row per input: prediction, traced client, its probability, top clients."""
  probs, ids = np.asarray(result.probs), np.asarray(result.client_ids)
  rows = []
  for n in range(probs.shape[0]):
    row = {"round": round_idx, "input": n, "predicted": int(result.predicted[n]),
           "traced_client": int(result.traced_client[n])}
    if not result.attributable[n]:  # a non-finite score: no client is named
      row.update(attributable=False, probability=None, top_clients=[])
    else:
      row.update(probability=float(probs[n, result.traced_position[n]]),
                 top_clients=top_clients(probs[n], ids, top_k))
    rows.append(row)
  return rows
