"""The attribution comparison's figure (experiment/attribution.py): one panel per cell, each
truth a group of bars, one bar per method."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tracefl_jax.experiment.plotting import pyplot

# (row key, axis label): the truths, from the lenient paper's rule to the LDS.
TRUTHS = (("paper_rule", "paper's rule"), ("loo_last_top1", "last-round\nLOO top-1"),
          ("retrain_top1", "retrain\ntop-1"), ("retrain_spearman", "retrain\nSpearman"),
          ("lds", "LDS"))
LABELS = {"tracefl": "TraceFL (last round)", "first_order": "first-order (last round)",
          "multi_round": "multi-round", "loo_last": "exact last-round LOO",
          "banzhaf": "Banzhaf (subsets)", "datamodel": "datamodel (subsets)",
          "largest": "largest client", "random": "random participant"}


def plot_attribution(cells: Sequence[tuple[str, dict[str, Any]]], path: Path) -> Path:
  """Bars of every method against every truth, a panel per `(name, summary)` cell; a missing
  value (None: e.g. no LDS without subsets) leaves its bar out."""
  plt = pyplot()
  n = max(len(cells), 1)
  fig, axes = plt.subplots(n, 1, figsize=(9, 2.6 * n), dpi=110, squeeze=False)
  colors = plt.get_cmap("tab10")
  for ax, (name, s) in zip(axes[:, 0], cells):
    rows = s["rows"]
    width = 0.8 / max(len(rows), 1)
    for j, r in enumerate(rows):
      xs = [i + (j - (len(rows) - 1) / 2) * width for i, (key, _) in enumerate(TRUTHS)
            if r.get(key) is not None]
      ys = [r[key] for key, _ in TRUTHS if r.get(key) is not None]
      ax.bar(xs, ys, width, color=colors(j), label=LABELS.get(r["method"], r["method"]))
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(TRUTHS)), [label for _, label in TRUTHS], fontsize=8)
    ax.set_ylim(-0.5, 1.05)
    ax.set_title(f"{name} (global accuracy {100 * s['global_accuracy']:.1f}%)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
  axes[0, 0].legend(fontsize=7, ncol=3, loc="lower left")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
