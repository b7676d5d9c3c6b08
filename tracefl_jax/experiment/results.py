"""Publication-ready results: sweep tables (CSV, Markdown) and plots like the paper's figures.

Plots (PNG, matplotlib with the Agg backend):
  accuracy_vs_<field>.png    localization and global accuracy (mean +- std over the other
                             grid fields, e.g. seeds) versus a swept field (alpha, DP noise,
                             number of clients), with the random-participant baseline;
  scale_vs_clients_per_round.png, time_vs_clients_per_round.png
                             sweeps over clients per round (configs/scale.py): localization,
                             leave-one-out agreement and seconds per round against clients
                             per round, one line per total-client count;
  client_probs.png           heatmap of TraceFL's client probabilities per traced input;
  label_distribution.png     the per-client label counts of a run's partition.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tracefl_jax.experiment.plotting import pyplot as _pyplot

# (column, summary path) pairs of the sweep table.
_COLUMNS = (
    ("mode", ("provenance_mode",)),
    ("clients_after_fixup", ("clients",)),
    ("participants", ("clients_per_round",)),
    ("client_size_median", ("client_size_median",)),
    ("localization_acc", ("provenance", "accuracy")),
    ("random_baseline", ("provenance", "random_baseline")),
    ("largest_client_baseline", ("provenance", "largest_client_baseline")),
    ("oracle_acc", ("provenance", "oracle_accuracy")),
    ("cf_top1", ("provenance", "counterfactual_top1")),
    ("cf_spearman", ("provenance", "counterfactual_spearman")),
    ("cf_random_top1", ("provenance", "counterfactual_random_top1")),
    ("cf_largest_top1", ("provenance", "counterfactual_largest_top1")),
    ("cf_largest_spearman", ("provenance", "counterfactual_largest_spearman")),
    ("cf_weight_aware_top1", ("provenance", "first_order_counterfactual_top1")),
    ("weight_aware_acc", ("provenance", "first_order_accuracy")),
    ("cf_client_rule_acc", ("provenance", "counterfactual_accuracy")),
    ("feddebug_acc", ("provenance", "feddebug_accuracy")),
    ("tracefl_s_per_input", ("provenance", "tracefl_seconds_per_input")),
    ("feddebug_s_per_input", ("provenance", "feddebug_seconds_per_input")),
    ("best_global_acc", ("best_accuracy",)),
    ("final_global_acc", ("final_accuracy",)),
    ("inputs_traced", ("provenance", "inputs")),
    ("rounds_traced", ("provenance", "rounds_traced")),
    ("rounds_skipped", ("provenance", "rounds_skipped")),
    ("epsilon", ("dp", "epsilon")),
    ("seconds", ("seconds",)),
    ("s_per_round", ("round_seconds",)),
    ("first_round_s", ("first_round_seconds",)),
    ("prov_s_per_round", ("provenance_round_seconds",)),
    ("first_prov_s", ("first_provenance_seconds",)),
    ("peak_rss_mb", ("memory", "peak_rss_bytes")),
    ("device_peak_mb", ("memory", "device_peak_bytes")),
    ("clients_per_chunk", ("memory_plan", "clients_per_chunk")),
)
_MEGABYTES = ("peak_rss_mb", "device_peak_mb")  # stored in bytes


def _get(row: dict[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    if not isinstance(row, dict) or key not in row:
      return None
    row = row[key]
  return row


def sweep_table(rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> list[dict[str, Any]]:
  """Flat rows: the swept fields (None where a run's grid does not set one), then the
  headline numbers of each run."""
  def value(r, name, path):
    v = _get(r, path)
    return v / 2**20 if name in _MEGABYTES and v is not None else v

  return [{"run": r["run"], **{f: r.get(f) for f in fields},
           **{name: value(r, name, path) for name, path in _COLUMNS}} for r in rows]


def _fmt(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def write_sweep_results(rows: Sequence[dict[str, Any]], fields: Sequence[str],
                        workdir: str | Path) -> dict[str, Path]:
  """Writes results.csv, results.md and the accuracy plots; returns their paths."""
  from tabulate import tabulate  # pylint: disable=g-import-not-at-top

  workdir = Path(workdir)
  table = sweep_table(rows, fields)
  out = {"csv": workdir / "results.csv", "md": workdir / "results.md"}
  with open(out["csv"], "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
  shown = [k for k in table[0] if any(t[k] is not None for t in table)]
  out["md"].write_text(tabulate([[_fmt(t[k]) for k in shown] for t in table],
                                headers=shown, tablefmt="github") + "\n")
  if len({t["participants"] for t in table}) > 1:
    from tracefl_jax.experiment import scale_plots  # pylint: disable=g-import-not-at-top
    out.update(scale_plots.write_scale_results(table, workdir))
  for field in fields:
    if field == "seed" or "plot_scale" in out:  # seeds: repetitions, averaged in the plots;
      continue                                  # scale sweeps have their own plots
    values = [t[field] for t in table]
    if len(set(values)) > 1 and all(isinstance(v, (int, float)) for v in values):
      out[f"plot_{field}"] = plot_accuracy_vs(table, field, workdir / f"accuracy_vs_{field}.png")
  return out


def plot_accuracy_vs(table: Sequence[dict[str, Any]], field: str, path: Path) -> Path:
  """Localization, global and random-baseline accuracy versus `field` (mean +- std)."""
  plt = _pyplot()

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


def plot_client_probs(run_dir: str | Path, path: str | Path | None = None,
                      round_idx: int | None = None) -> Path:
  """Heatmap of client probabilities per traced input of one round (default: the last)."""
  plt = _pyplot()

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
  plt = _pyplot()

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
