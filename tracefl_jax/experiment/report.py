"""Every table the experiments print or write.

Printed (rich): a run's summary (`print_summary`), a sweep's runs (`print_sweep`), a trace's
attributions (`print_attribution`). Written, for a sweep (`write_sweep_results`, beside the
figures): results.csv and results.md, one row per run (the swept fields, then the headline
numbers); a sweep over clients per round (configs/scale.py) also scale.md, compact tables of
the correct-prediction cells (localization by the paper's rule beside its baselines, then the
leave-one-client-out agreement that does not saturate, TraceFL's and the weight-aware
score's) and the faulty-client cells (TraceFL, FedDebug, chance).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tracefl_jax.experiment import figures


def pct(v: float | None, suffix: str = "") -> str:
  """A fraction as a percentage with one decimal (`0.123` -> `12.3` + suffix); `-` for None."""
  return "-" if v is None else f"{100 * v:.1f}{suffix}"


def num(v: float | None, digits: int = 2) -> str:
  """A number with `digits` decimals; `-` for None."""
  return "-" if v is None else f"{v:.{digits}f}"


def _pct(x: float | None) -> str:
  return pct(x, "%")


def _ms(x: float | None) -> str:
  return "-" if x is None else f"{1000 * x:.2f} ms"


def print_summary(summary: dict[str, Any], workdir: str | None = None,
                  console: Console | None = None) -> None:
  """Prints the run's headline numbers and, when traced, localization beside its baselines."""
  console = console or Console()
  table = Table(title="tracefl_jax run", show_header=False)
  table.add_row("rounds", str(summary["rounds"]))
  table.add_row("global accuracy (final / best)",
                f"{_pct(summary['final_accuracy'])} / {_pct(summary['best_accuracy'])}")
  table.add_row("client strategy", summary["client_strategy"])
  table.add_row("wall time", f"{summary['seconds']:.1f} s")
  if summary.get("round_seconds") is not None:
    table.add_row("seconds per round: training / provenance (steady)",
                  f"{summary['round_seconds']:.2f} / "
                  f"{num(summary.get('provenance_round_seconds'))}")
  peak = (summary.get("memory") or {}).get("peak_rss_bytes")
  if peak:
    table.add_row("peak resident memory", f"{peak / 2**20:,.0f} MB")
  prov = summary.get("provenance")
  if prov:
    table.add_row("rounds traced / skipped", f"{prov['rounds_traced']} / {prov['rounds_skipped']}")
    table.add_row("inputs traced", str(prov["inputs"]))
    table.add_row("TraceFL localization accuracy", _pct(prov["accuracy"]))
    table.add_row("  random participant (expected)", _pct(prov["random_baseline"]))
    table.add_row("  largest client baseline", _pct(prov["largest_client_baseline"]))
    table.add_row("  TraceFL vs max-label-count oracle", _pct(prov["oracle_accuracy"]))
    if prov.get("unattributable"):
      table.add_row("inputs with non-finite scores (left out)", str(prov["unattributable"]))
    if prov.get("counterfactual_top1") is not None:
      table.add_row("leave-one-client-out truth: each client removed by",
                    removal_words(prov.get("counterfactual_removal"), prov.get("aggregation")))
      table.add_row("leave-one-client-out truth: TraceFL top-1 / rank corr.",
                    f"{_pct(prov['counterfactual_top1'])} / "
                    f"{num(prov.get('counterfactual_spearman'))}")
      if prov.get("first_order_counterfactual_top1") is not None:
        table.add_row("  first-order leave-one-out score",
                      f"{_pct(prov['first_order_counterfactual_top1'])} / "
                      f"{num(prov.get('first_order_counterfactual_spearman'))}")
      table.add_row("  random participant (expected)",
                    f"{_pct(prov['counterfactual_random_top1'])} / 0.00")
      table.add_row("  largest client", f"{_pct(prov['counterfactual_largest_top1'])} / "
                                        f"{num(prov.get('counterfactual_largest_spearman'))}")
      if prov.get("counterfactual_accuracy") is not None:
        table.add_row("  the leave-one-out client by the localization rule",
                      _pct(prov["counterfactual_accuracy"]))
    if prov.get("feddebug_accuracy") is not None:
      table.add_row("FedDebug localization accuracy", _pct(prov["feddebug_accuracy"]))
      table.add_row("time per input: TraceFL / FedDebug",
                    f"{_ms(prov.get('tracefl_seconds_per_input'))} / "
                    f"{_ms(prov.get('feddebug_seconds_per_input'))}")
  if workdir:
    table.add_row("results", str(workdir))
  console.print(table)


def removal_words(removal: str | None, aggregation: str | None) -> str:
  """How the run's leave-one-client-out truth removed a client, in words (`removal.py`)."""
  return {"closed_form": "FedAvg's closed form (exact for the mean)",
          "rule": f"re-running the round's {aggregation} without it (exact)",
          "dp_closed_form": "FedAvg's closed form on the noised model (DP: approximate)",
          }.get(str(removal), str(removal))


def print_sweep(rows: list[dict[str, Any]], workdir: str, console: Console | None = None,
                missing: list[str] | None = None) -> None:
  """Prints one line per run of a sweep (and the runs `missing`, not finished) and where its
  table and plots are."""
  console = console or Console()
  table = Table(title=f"sweep: {len(rows)} runs")
  table.add_column("run", overflow="fold")
  for col in ("localization", "random", "global best", "skipped rounds", "time"):
    table.add_column(col)
  for r in rows:
    prov = r.get("provenance") or {}
    table.add_row(r["run"], _pct(prov.get("accuracy")), _pct(prov.get("random_baseline")),
                  _pct(r["best_accuracy"]), str(prov.get("rounds_skipped", "-")),
                  "reused" if r["skipped_existing"] else f"{r['seconds']:.1f} s")
  for name in missing or ():
    table.add_row(name, "-", "-", "-", "-", "not finished")
  console.print(table)
  console.print(f"table: {workdir}/results.csv, {workdir}/results.md; plots: {workdir}/*.png")


def print_attribution(rows: list[dict[str, Any]], workdir: str, out: str | None = None,
                      console: Console | None = None) -> None:
  """Prints the responsible client of each traced input (`python -m tracefl_jax trace`)."""
  console = console or Console()
  title = f"TraceFL attribution, round {rows[0]['round']} of {workdir}" if rows else "no inputs"
  table = Table(title=title)
  for col in ("input", "predicted", "traced client", "probability", "top clients"):
    table.add_column(col)
  for r in rows:
    table.add_row(str(r["input"]), str(r["predicted"]), str(r["traced_client"]),
                  "-" if r["probability"] is None else f"{r['probability']:.3f}",
                  ", ".join(f"{c} ({p:.2f})" for c, p in r["top_clients"]))
  console.print(table)
  if out:
    console.print(f"rows written to {out}")


# --- a sweep's tables, written -----------------------------------------------------------

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
  """Writes results.csv, results.md and the accuracy plots (a sweep over clients per round:
  scale.md and its plots instead); returns their paths."""
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
    out.update(write_scale_results(table, workdir))
  for field in fields:
    if field == "seed" or "plot_scale" in out:  # seeds: repetitions, averaged in the plots;
      continue                                  # scale sweeps have their own plots
    values = [t[field] for t in table]
    if len(set(values)) > 1 and all(isinstance(v, (int, float)) for v in values):
      out[f"plot_{field}"] = figures.plot_accuracy_vs(table, field,
                                                      workdir / f"accuracy_vs_{field}.png")
  return out


def scale_markdown(table: figures.Table) -> str:
  """The scale study as Markdown: correct-prediction cells, then faulty-client cells."""
  out = []
  correct = figures.scale_cells(table, "correct")
  if correct:
    out += ["| total clients | per round | global acc % | localization % | random % | "
            "largest % | max-count agree % | LOO top-1 % | weight-aware LOO top-1 % | "
            "LOO random % | LOO largest % | LOO Spearman | s / round | provenance s / round | "
            "peak RSS MB |",
            "|" + "---|" * 15]
    for t in correct:
      out.append(
          f"| {t['clients_after_fixup']:,} | {t['participants']:,} | "
          f"{pct(t['final_global_acc'])} | {pct(t['localization_acc'])} | "
          f"{pct(t['random_baseline'])} | {pct(t['largest_client_baseline'])} | "
          f"{pct(t['oracle_acc'])} | {pct(t['cf_top1'])} | "
          f"{pct(t['cf_weight_aware_top1'])} | {pct(t['cf_random_top1'])} | "
          f"{pct(t['cf_largest_top1'])} | {num(t['cf_spearman'])} | "
          f"{num(t['s_per_round'])} | {num(t['prov_s_per_round'])} | "
          f"{num(t['peak_rss_mb'], 0)} |")
  faulty = figures.scale_cells(table, "faulty")
  if faulty:
    out += ["", "| total clients | per round | global acc % | inputs traced | TraceFL -> faulty % "
            "| FedDebug % | chance (1/K) % | LOO top-1 % | s / round | provenance s / round |",
            "|" + "---|" * 10]
    for t in faulty:
      out.append(
          f"| {t['clients_after_fixup']:,} | {t['participants']:,} | "
          f"{pct(t['final_global_acc'])} | {t['inputs_traced'] or 0} | "
          f"{pct(t['localization_acc'])} | {pct(t['feddebug_acc'])} | "
          f"{pct(t['random_baseline'])} | {pct(t['cf_top1'])} | {num(t['s_per_round'])} | "
          f"{num(t['prov_s_per_round'])} |")
  return "\n".join(out) + "\n"


def write_scale_results(table: figures.Table, workdir: str | Path) -> dict[str, Path]:
  """Writes scale.md and, when correct-prediction cells exist, the two plots."""
  workdir = Path(workdir)
  out = {"scale_md": workdir / "scale.md"}
  out["scale_md"].write_text(scale_markdown(table), encoding="utf-8")
  if figures.scale_cells(table, "correct"):
    out["plot_scale"] = figures.plot_scale(table, workdir / "scale_vs_clients_per_round.png")
    out["plot_time"] = figures.plot_time(table, workdir / "time_vs_clients_per_round.png")
  return out
