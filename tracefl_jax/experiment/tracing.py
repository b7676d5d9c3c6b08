"""provenance.jsonl: one row per traced input of the library's `TracedRound`s.

Each row: round, input (index in the server test set), label, predicted, traced_client (global
id; -1 when a score was not finite, with `attributable: false`), correct, top_clients ([id,
probability] pairs), the traced client's label counts, counterfactual_client (the client
whose removal lowers the predicted logit most, when computed), and, for rounds with at most 64
participants, every participant's probability.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tracefl_jax.provenance.protocol import TracedRound

# Full per-client probability vectors are logged when a round has at most this many clients.
_FULL_PROBS_MAX_CLIENTS = 64


def top_clients(probs: np.ndarray, client_ids: np.ndarray, k: int) -> list[list[Any]]:
  """`[[id, probability], ...]` of the k most probable clients of one input (stable order)."""
  order = np.argsort(-probs, kind="stable")[:k]
  return [[int(client_ids[j]), float(probs[j])] for j in order]


class ProvenanceLog:
  """Writes a traced round's rows through `writer.write(row)`."""

  def __init__(self, writer: Any, label_counts: np.ndarray, top_k: int = 3):
    self.writer = writer
    self.label_counts = np.asarray(label_counts)  # [num_clients, num_classes]
    self.top_k = top_k

  def write_round(self, round_idx: int, traced: TracedRound) -> None:
    ids = traced.client_ids
    top_k = min(self.top_k, len(ids))
    for n in range(len(traced.inputs)):
      row = {
          "round": round_idx, "input": int(traced.inputs[n]), "label": int(traced.labels[n]),
          "predicted": int(traced.predicted[n]), "traced_client": int(traced.traced_client[n]),
          "correct": bool(traced.correct[n]),
      }
      if not traced.attributable[n]:
        row["attributable"] = False
      else:
        row["top_clients"] = top_clients(traced.probs[n], ids, top_k)
        row["traced_client_label_counts"] = (
            self.label_counts[traced.traced_client[n]].tolist())
      if traced.counterfactual_client[n] >= 0:
        row["counterfactual_client"] = int(traced.counterfactual_client[n])
      if len(ids) <= _FULL_PROBS_MAX_CLIENTS:
        row["participants"] = ids.tolist()
        row["probs"] = traced.probs[n].tolist()
      self.writer.write(row)

  def close(self) -> None:
    self.writer.close()
