"""Online provenance inside the experiment loop: select inputs, trace, score, log.

At each traced round the runner picks the paper's inputs from the server test set (spec
section 3), traces them over the round's participants with `provenance.trace_clients`, and
writes one row per input to provenance.jsonl and a round summary (TraceFL accuracy beside the
random-participant, largest-client and max-label-count-oracle numbers) for metrics.jsonl.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from tracefl_jax.provenance import protocol as evaluation
from tracefl_jax.models.base import ModelDef, Variables
from tracefl_jax.provenance import trace_clients

# Full per-client probability vectors are logged when a round has at most this many clients.
_FULL_PROBS_MAX_CLIENTS = 64


def _bucket(n: int, usual: int) -> int:
  """`usual` (the most inputs a correct-mode round can have) when n fits, else a power of 2."""
  return usual if n <= usual else 1 << (n - 1).bit_length()


class RoundTracer:
  """Traces the configured inputs of a round and logs them."""

  def __init__(self, c: ml_collections.ConfigDict, model: ModelDef, label_counts: np.ndarray,
               x_test: np.ndarray, y_test: np.ndarray, faulty: list[int],
               flip: dict[int, int], writer: Any):
    self.c = c
    self.model = model
    self.label_counts = label_counts      # [num_clients, num_classes]
    self.x_test, self.y_test = x_test, y_test
    self.faulty = set(faulty)
    self.flip = flip
    self.writer = writer

  def select(self, preds: np.ndarray, participants: np.ndarray) -> tuple[np.ndarray, bool]:
    """Indices of the round's inputs, and whether the gradient target is the prediction
    of a wrong class (faulty mode)."""
    p = self.c.provenance
    if p.mode == "faulty":
      return evaluation.select_faulty_inputs(preds, self.y_test, self.flip,
                                             max_inputs=p.max_faulty_inputs), True
    return evaluation.select_correct_inputs(
        preds, self.y_test, self.label_counts[participants], per_label=p.per_label,
        max_inputs=self.c.eval.max_test_inputs), False

  def trace_round(self, round_idx: int, global_vars: Variables, client_vars: Variables,
                  participants: np.ndarray, counts: np.ndarray,
                  preds: np.ndarray) -> dict[str, Any]:
    """Traces round `round_idx`; returns its summary dict (`skipped` when no input fits)."""
    p = self.c.provenance
    idx, faulty_mode = self.select(preds, participants)
    if len(idx) == 0:
      return {"skipped": True, "inputs": 0, "mode": p.mode,
              "reason": "no test input matched the selection rule"}
    # Pad the inputs to a fixed bucket so that every round reuses one compiled kernel.
    bucket = _bucket(len(idx), self.c.provenance.per_label * self.label_counts.shape[1])
    padded = np.concatenate([idx, np.full(bucket - len(idx), idx[0])])
    result = trace_clients(
        self.model, global_vars, client_vars, jnp.asarray(self.x_test[padded]),
        kernel=p.kernel, decay=p.decay, use_decay=p.use_decay,
        # The original counts the data-size factor in batches (spec section 2, step 6).
        client_sizes=jnp.asarray(counts // self.c.client.batch_size),
        use_size_factor=p.use_size_factor,
        clients_per_chunk=p.clients_per_chunk or None)
    traced_local = np.asarray(result.traced_client)[: len(idx)]
    probs = np.asarray(result.probs)[: len(idx)]
    traced = participants[traced_local]
    labels = self.y_test[idx]
    part_counts = self.label_counts[participants]       # [K, classes]
    if faulty_mode:
      correct = np.array([t in self.faulty for t in traced])
    else:
      correct = evaluation.localization_correct(traced_local, labels, part_counts)
    summary = evaluation.round_baselines(part_counts, labels, traced_local,
                                         faulty_local=[k for k, c in enumerate(participants)
                                                       if c in self.faulty] if faulty_mode
                                         else None)
    summary.update({"skipped": False, "mode": p.mode, "inputs": int(len(idx)),
                    "accuracy": float(np.mean(correct))})
    top_k = min(p.top_k, len(participants))
    for n in range(len(idx)):
      order = np.argsort(-probs[n], kind="stable")[:top_k]
      row = {
          "round": round_idx, "input": int(idx[n]), "label": int(labels[n]),
          "predicted": int(preds[idx[n]]), "traced_client": int(traced[n]),
          "correct": bool(correct[n]),
          "top_clients": [[int(participants[k]), float(probs[n, k])] for k in order],
          "traced_client_label_counts": part_counts[traced_local[n]].tolist(),
      }
      if len(participants) <= _FULL_PROBS_MAX_CLIENTS:
        row["participants"] = participants.tolist()
        row["probs"] = probs[n].tolist()
      self.writer.write(row)
    return summary

  def close(self) -> None:
    self.writer.close()


def summarize_rounds(traced: list[dict[str, Any]]) -> dict[str, Any]:
  """Mean of per-round numbers over traced rounds; skipped rounds counted, not averaged."""
  used = [t for t in traced if not t.get("skipped")]

  def mean(key: str) -> float | None:
    vals = [t[key] for t in used if t.get(key) is not None]
    return float(np.mean(vals)) if vals else None

  return {
      "rounds_traced": len(used),
      "rounds_skipped": len(traced) - len(used),
      "inputs": int(sum(t["inputs"] for t in used)),
      "accuracy": mean("accuracy"),
      "random_baseline": mean("random_baseline"),
      "largest_client_baseline": mean("largest_client_baseline"),
      "oracle_accuracy": mean("oracle_accuracy"),
  }
