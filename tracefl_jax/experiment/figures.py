"""Every figure the experiments draw (PNG, matplotlib on the file-only Agg backend).

A run's (`plot_run`):
  client_probs.png           heatmap of TraceFL's client probabilities per traced input;
  label_distribution.png     the per-client label counts of a run's partition.
A sweep's (with its tables, `report.write_sweep_results`):
  accuracy_vs_<field>.png    localization and global accuracy (mean +- std over the other
                             grid fields, e.g. seeds) versus a swept field (alpha, DP noise,
                             number of clients), with the random-participant baseline;
  scale_vs_clients_per_round.png
                             a sweep over clients per round (configs/scale.py): localization
                             and leave-one-out top-1 agreement (TraceFL, weight-aware, largest
                             client) against clients per round, one line per total-client
                             count, with the random participant's expectation dashed;
  time_vs_clients_per_round.png
                             seconds per round of training and of provenance.
The attribution comparison's (`plot_attribution`):
  attribution.png            one panel per cell, each truth a group of bars, one bar per
                             method.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

Table = Sequence[dict[str, Any]]  # the rows of `report.sweep_table`


def pyplot():
  """matplotlib's pyplot on the file-only Agg backend (no display needed), imported lazily."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


# --- a run -------------------------------------------------------------------------------


def plot_run(run_dir: str | Path, *, only_missing: bool = False) -> list[Path]:
  """The per-run figures that its files support (label distribution, client probabilities);
  with `only_missing`, only those not there yet. Returns the paths drawn."""
  run_dir = Path(run_dir)
  paths = []

  def want(name: str) -> bool:
    return not (only_missing and (run_dir / name).exists())

  if (run_dir / "partition.json").exists() and want("label_distribution.png"):
    paths.append(plot_label_distribution(run_dir))
  prov = run_dir / "provenance.jsonl"
  if want("client_probs.png") and prov.exists() and '"probs"' in prov.read_text():
    paths.append(plot_client_probs(run_dir))
  return paths


def plot_client_probs(run_dir: str | Path, path: str | Path | None = None,
                      round_idx: int | None = None) -> Path:
  """Heatmap of client probabilities per traced input of one round (default: the last)."""
  plt = pyplot()

  run_dir = Path(run_dir)
  rows = [json.loads(l) for l in (run_dir / "provenance.jsonl").read_text().splitlines() if l]
  rows = [r for r in rows if "probs" in r]
  if not rows:
    raise ValueError(f"{run_dir} has no traced inputs with full client probabilities")
  round_idx = round_idx or max(r["round"] for r in rows)
  rows = [r for r in rows if r["round"] == round_idx]
  probs = np.array([r["probs"] for r in rows])
  clients = rows[0]["participants"]
  fig, ax = plt.subplots(figsize=(1 + 0.45 * len(clients), 1 + 0.3 * len(rows)), dpi=150)
  im = ax.imshow(probs, cmap="viridis", vmin=0, vmax=1, aspect="auto")
  ax.set_xticks(range(len(clients)), [str(c) for c in clients], fontsize=7)
  ax.set_yticks(range(len(rows)),
                [f"#{r['input']} y={r['label']}{'' if r['correct'] else ' x'}" for r in rows],
                fontsize=7)
  ax.set_xlabel("client")
  ax.set_title(f"TraceFL client probabilities, round {round_idx}", fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.05)
  fig.tight_layout()
  path = Path(path) if path else run_dir / "client_probs.png"
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_label_distribution(run_dir: str | Path, path: str | Path | None = None,
                            max_clients: int = 50) -> Path:
  """Stacked bars of each client's label counts (the provenance ground truth)."""
  plt = pyplot()

  run_dir = Path(run_dir)
  counts = np.array(json.loads((run_dir / "partition.json").read_text())["label_counts"])
  counts = counts[:max_clients]
  fig, ax = plt.subplots(figsize=(max(5, 0.18 * len(counts)), 3.5), dpi=150)
  bottom = np.zeros(len(counts))
  cmap = plt.get_cmap("tab20")
  for label in range(counts.shape[1]):
    ax.bar(range(len(counts)), counts[:, label], bottom=bottom, color=cmap(label % 20),
           label=str(label), width=0.85)
    bottom += counts[:, label]
  ax.set_xlabel("client")
  ax.set_ylabel("examples")
  ax.legend(title="label", fontsize=6, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
  fig.tight_layout()
  path = Path(path) if path else run_dir / "label_distribution.png"
  fig.savefig(path)
  plt.close(fig)
  return path


# --- a sweep -----------------------------------------------------------------------------


def plot_accuracy_vs(table: Sequence[dict[str, Any]], field: str, path: Path) -> Path:
  """Localization, global and random-baseline accuracy versus `field` (mean +- std)."""
  plt = pyplot()

  series = {"TraceFL localization": "localization_acc",
            "TraceFL top-1 = leave-one-out top-1": "cf_top1",
            "global model (best)": "best_global_acc",
            "random participant": "random_baseline"}
  fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=150)
  for label, column in series.items():
    groups: dict[float, list[float]] = defaultdict(list)
    for t in table:
      if t[column] is not None:
        groups[t[field]].append(100 * t[column])
    if not groups:
      continue
    xs = sorted(groups)
    ax.errorbar(xs, [np.mean(groups[x]) for x in xs], yerr=[np.std(groups[x]) for x in xs],
                marker="o", capsize=3, label=label,
                linestyle="--" if column in ("random_baseline", "cf_top1") else "-")
  ax.set_xlabel(field)
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 105)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def scale_cells(table: Table, mode: str) -> list[dict[str, Any]]:
  """The cells of a scale sweep's table in `mode` ("correct" or "faulty"), by total clients
  and clients per round."""
  rows = [t for t in table if (t["mode"] or "correct") == mode]
  return sorted(rows, key=lambda t: (t["clients_after_fixup"] or 0, t["participants"] or 0))


def _by_total(rows: Table) -> dict[int, list[dict[str, Any]]]:
  groups: dict[int, list[dict[str, Any]]] = {}
  for t in rows:
    groups.setdefault(t["clients_after_fixup"], []).append(t)
  return {k: sorted(v, key=lambda t: t["participants"]) for k, v in sorted(groups.items())}


def _log_ticks(ax, ks: Sequence[int]) -> None:
  """A log x axis labelled at the swept values only."""
  ax.set_xscale("log")
  ax.set_xticks(list(ks), [f"{k:,}" for k in ks])
  ax.minorticks_off()


def _series(ax, rows, column, label, color, **style):
  pts = [(t["participants"], t[column]) for t in rows if t[column] is not None]
  if pts:
    xs, ys = zip(*pts)
    ax.plot(xs, [100 * y for y in ys], color=color, label=label, marker="o", **style)


def plot_scale(table: Table, path: Path) -> Path:
  """Localization (paper rule) and leave-one-out top-1 against clients per round."""
  plt = pyplot()
  groups = _by_total(scale_cells(table, "correct"))
  colors = plt.get_cmap("tab10")
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110, sharey=True)
  for i, (total, rows) in enumerate(groups.items()):
    c = colors(i)
    _series(axes[0], rows, "localization_acc", f"TraceFL, {total:,} clients", c)
    _series(axes[0], rows, "oracle_acc", f"max-count agreement, {total:,}", c,
            linestyle=":", alpha=0.8)
    _series(axes[0], rows, "random_baseline", f"random participant, {total:,}", c,
            linestyle="--", alpha=0.7)
    _series(axes[1], rows, "cf_top1", f"TraceFL, {total:,} clients", c)
    _series(axes[1], rows, "cf_weight_aware_top1", f"weight-aware, {total:,}", c,
            linestyle="-.", alpha=0.9)
    _series(axes[1], rows, "cf_largest_top1", f"largest client, {total:,}", c,
            linestyle=":", alpha=0.7)
  all_rows = [t for rows in groups.values() for t in rows]
  ks = sorted({t["participants"] for t in all_rows})
  axes[1].plot(ks, [100 / k for k in ks], color="gray", linestyle="--", label="random (1/K)")
  axes[0].set_title("localization, paper's rule (holds the label)", fontsize=9)
  axes[1].set_title("top-1 = leave-one-client-out top-1", fontsize=9)
  axes[0].set_ylabel("%")
  for ax in axes:
    _log_ticks(ax, ks)
    ax.set_xlabel("clients per round (K)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_time(table: Table, path: Path) -> Path:
  """Seconds per round of training and of provenance against clients per round."""
  plt = pyplot()
  groups = _by_total(scale_cells(table, "correct"))
  colors = plt.get_cmap("tab10")
  fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
  for i, (total, rows) in enumerate(groups.items()):
    for column, style, what in (("s_per_round", "-", "training"),
                                ("prov_s_per_round", "--", "provenance")):
      pts = [(t["participants"], t[column]) for t in rows if t[column] is not None]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, linestyle=style, marker="o", color=colors(i),
                label=f"{what}, {total:,} clients")
  _log_ticks(ax, sorted({t["participants"] for rows in groups.values() for t in rows}))
  ax.set_yscale("log")
  ax.set_xlabel("clients per round (K)")
  ax.set_ylabel("seconds per round (steady state)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


# --- the attribution comparison ----------------------------------------------------------

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
