"""What the tables and figures share: matplotlib on a file-only backend and number formats."""

from __future__ import annotations


def pyplot():
  """matplotlib's pyplot on the file-only Agg backend (no display needed), imported lazily."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def pct(v: float | None, suffix: str = "") -> str:
  """A fraction as a percentage with one decimal (`0.123` -> `12.3` + suffix); `-` for None."""
  return "-" if v is None else f"{100 * v:.1f}{suffix}"


def num(v: float | None, digits: int = 2) -> str:
  """A number with `digits` decimals; `-` for None."""
  return "-" if v is None else f"{v:.{digits}f}"
