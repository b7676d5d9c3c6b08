"""Which inputs a traced round explains, and the trivial baselines (spec section 3).

Correct-prediction mode: from the first `max_inputs` server test inputs, the first
`per_label` inputs G predicts correctly of every label held by any of the round's
participants (labels with fewer are skipped). Faulty-client mode: the first `max_inputs`
inputs G MISpredicts with true label among the flip's sources and predicted label among its
targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def select_correct_inputs(pred: np.ndarray, labels: np.ndarray,
                          participant_label_counts: np.ndarray, per_label: int = 2,
                          max_inputs: int = 2048) -> np.ndarray:
  """Indices (ascending) of the inputs traced in correct-prediction mode.

  Args:
    pred, labels: `[M]` G's predictions and the true labels of the server test set.
    participant_label_counts: `[K, num_classes]` label counts of the round's participants.
  """
  pred, labels = np.asarray(pred)[:max_inputs], np.asarray(labels)[:max_inputs]
  held = np.nonzero(np.asarray(participant_label_counts).sum(axis=0) > 0)[0]
  chosen: list[int] = []
  for label in held:
    hits = np.nonzero((pred == labels) & (labels == label))[0]
    if len(hits) >= per_label:
      chosen.extend(hits[:per_label].tolist())
  return np.array(sorted(chosen), np.int64)


def select_faulty_inputs(pred: np.ndarray, labels: np.ndarray, flip: Mapping[int, int],
                         max_inputs: int = 10) -> np.ndarray:
  """Indices of the first `max_inputs` mispredictions matching the label flip."""
  pred, labels = np.asarray(pred), np.asarray(labels)
  match = ((pred != labels) & np.isin(labels, list(flip.keys()))
           & np.isin(pred, list(flip.values())))
  return np.nonzero(match)[0][:max_inputs].astype(np.int64)


def round_baselines(participant_label_counts: np.ndarray, labels: np.ndarray,
                    traced_local: np.ndarray,
                    faulty_local: Sequence[int] | None = None) -> dict[str, Any]:
  """Baselines for one traced round (positions are within the round's participants).

  Returns:
    random_baseline: expected accuracy of tracing a uniformly random participant.
    largest_client_baseline: accuracy of always tracing the participant with most examples
      (expected, when several share the largest size: each of them equally likely).
    oracle_accuracy: correct-prediction mode only, how often the traced client is the
      participant with the most examples of the input's label (None in faulty mode).
  """
  counts = np.asarray(participant_label_counts)
  labels = np.asarray(labels)
  sizes = counts.sum(axis=1)
  largest = np.flatnonzero(sizes == sizes.max())  # ties are ties: a uniform pick among them
  if faulty_local is not None:
    faulty = np.zeros(len(counts), bool)
    faulty[list(faulty_local)] = True
    return {"random_baseline": float(faulty.mean()),
            "largest_client_baseline": float(faulty[largest].mean()),
            "oracle_accuracy": None}
  holds = counts[:, labels] > 0                      # [K, N]
  oracle = np.argmax(counts[:, labels], axis=0)      # [N], first on ties
  return {"random_baseline": float(holds.mean(axis=0).mean()),
          "largest_client_baseline": float(holds[largest].mean()),
          "oracle_accuracy": float(np.mean(np.asarray(traced_local) == oracle))}


def localization_correct(traced_local: np.ndarray, labels: np.ndarray,
                         participant_label_counts: np.ndarray) -> np.ndarray:
  """`[N]` bool: the traced participant's data holds the input's true label."""
  counts = np.asarray(participant_label_counts)
  return counts[np.asarray(traced_local), np.asarray(labels)] > 0


def select_inputs(settings: Any, predictions: np.ndarray, labels: np.ndarray,
                  participant_label_counts: np.ndarray) -> np.ndarray:
  """Indices of the round's inputs in the server test set, by the settings' mode."""
  if settings.mode == "faulty":
    return select_faulty_inputs(predictions, labels, settings.flip,
                                max_inputs=settings.max_faulty_inputs)
  return select_correct_inputs(predictions, labels, participant_label_counts,
                               per_label=settings.per_label, max_inputs=len(labels))
