"""Readable console summaries of a run (rich tables)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from tracefl_jax.experiment.plotting import num as _num, pct


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
                  f"{_num(summary.get('provenance_round_seconds'))}")
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
                    f"{_num(prov.get('counterfactual_spearman'))}")
      if prov.get("first_order_counterfactual_top1") is not None:
        table.add_row("  first-order leave-one-out score",
                      f"{_pct(prov['first_order_counterfactual_top1'])} / "
                      f"{_num(prov.get('first_order_counterfactual_spearman'))}")
      table.add_row("  random participant (expected)",
                    f"{_pct(prov['counterfactual_random_top1'])} / 0.00")
      table.add_row("  largest client", f"{_pct(prov['counterfactual_largest_top1'])} / "
                                        f"{_num(prov.get('counterfactual_largest_spearman'))}")
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
