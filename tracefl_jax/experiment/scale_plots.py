"""Tables and plots of a sweep over clients per round (configs/scale.py), from `sweep_table`.

  scale.md                           compact tables: the correct-prediction cells (localization
                                     by the paper's rule beside its baselines, then the
                                     leave-one-client-out agreement that does not saturate,
                                     TraceFL's and the weight-aware score's), and the faulty-client cells (TraceFL, FedDebug, chance);
  scale_vs_clients_per_round.png     localization and leave-one-out top-1 agreement (TraceFL,
                                     weight-aware, largest client) against clients per round,
                                     one line per total-client count, with
                                     the random participant's expectation dashed;
  time_vs_clients_per_round.png      seconds per round of training and of provenance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tracefl_jax.experiment.plotting import num as _num, pct as _pct, pyplot as _pyplot

Table = Sequence[dict[str, Any]]


def _cells(table: Table, mode: str) -> list[dict[str, Any]]:
  rows = [t for t in table if (t["mode"] or "correct") == mode]
  return sorted(rows, key=lambda t: (t["clients_after_fixup"] or 0, t["participants"] or 0))


def scale_markdown(table: Table) -> str:
  """The scale study as Markdown: correct-prediction cells, then faulty-client cells."""
  out = []
  correct = _cells(table, "correct")
  if correct:
    out += ["| total clients | per round | global acc % | localization % | random % | "
            "largest % | max-count agree % | LOO top-1 % | weight-aware LOO top-1 % | "
            "LOO random % | LOO largest % | LOO Spearman | s / round | provenance s / round | "
            "peak RSS MB |",
            "|" + "---|" * 15]
    for t in correct:
      out.append(
          f"| {t['clients_after_fixup']:,} | {t['participants']:,} | "
          f"{_pct(t['final_global_acc'])} | {_pct(t['localization_acc'])} | "
          f"{_pct(t['random_baseline'])} | {_pct(t['largest_client_baseline'])} | "
          f"{_pct(t['oracle_acc'])} | {_pct(t['cf_top1'])} | "
          f"{_pct(t['cf_weight_aware_top1'])} | {_pct(t['cf_random_top1'])} | "
          f"{_pct(t['cf_largest_top1'])} | {_num(t['cf_spearman'])} | "
          f"{_num(t['s_per_round'])} | {_num(t['prov_s_per_round'])} | "
          f"{_num(t['peak_rss_mb'], 0)} |")
  faulty = _cells(table, "faulty")
  if faulty:
    out += ["", "| total clients | per round | global acc % | inputs traced | TraceFL -> faulty % "
            "| FedDebug % | chance (1/K) % | LOO top-1 % | s / round | provenance s / round |",
            "|" + "---|" * 10]
    for t in faulty:
      out.append(
          f"| {t['clients_after_fixup']:,} | {t['participants']:,} | "
          f"{_pct(t['final_global_acc'])} | {t['inputs_traced'] or 0} | "
          f"{_pct(t['localization_acc'])} | {_pct(t['feddebug_acc'])} | "
          f"{_pct(t['random_baseline'])} | {_pct(t['cf_top1'])} | {_num(t['s_per_round'])} | "
          f"{_num(t['prov_s_per_round'])} |")
  return "\n".join(out) + "\n"


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
  plt = _pyplot()
  groups = _by_total(_cells(table, "correct"))
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
  plt = _pyplot()
  groups = _by_total(_cells(table, "correct"))
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


def write_scale_results(table: Table, workdir: str | Path) -> dict[str, Path]:
  """Writes scale.md and, when correct-prediction cells exist, the two plots."""
  workdir = Path(workdir)
  out = {"scale_md": workdir / "scale.md"}
  out["scale_md"].write_text(scale_markdown(table), encoding="utf-8")
  if _cells(table, "correct"):
    out["plot_scale"] = plot_scale(table, workdir / "scale_vs_clients_per_round.png")
    out["plot_time"] = plot_time(table, workdir / "time_vs_clients_per_round.png")
  return out
