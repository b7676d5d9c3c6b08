"""Uncertainty of an attribution comparison: bootstrap intervals and paired differences.

A method's top-1 agreement is a mean over N inputs, so it is resampled over inputs; its LDS
is a mean over inputs of a Spearman correlation over M retrained subsets, and with M = 10-20
subsets the subset draw is the larger uncertainty (+-0.3-0.5 per input), so the LDS is
resampled over subsets. A paired difference resamples the same inputs (or subsets) for both
methods, which is what tells two methods apart when their inputs are correlated.

Every interval is the percentile interval of `draws` resamples drawn by
`np.random.default_rng(seed).integers(0, n, (draws, n))` (so a plain loop can recompute it),
at `level` (default 95%). The paired test's p-value is two-sided: twice the smaller share of
resampled differences on either side of 0 (at most 1).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from tracefl_jax.provenance import retrained
from tracefl_jax.provenance.counterfactual import spearman

DRAWS = 1000


class Interval(NamedTuple):
  """A point estimate and its bootstrap interval (`p`: the paired test's p-value)."""
  value: float
  low: float
  high: float
  p: float | None = None


def resamples(n: int, draws: int = DRAWS, seed: int = 0) -> np.ndarray:
  """`[draws, n]` indices drawn with replacement."""
  return np.random.default_rng(seed).integers(0, n, (draws, n))


def _interval(value: float, samples: np.ndarray, level: float, paired: bool) -> Interval:
  samples = samples[np.isfinite(samples)]
  if not samples.size:
    return Interval(value, float("nan"), float("nan"), None)
  lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
  p = None
  if paired:
    p = float(min(1.0, 2 * min(np.mean(samples <= 0), np.mean(samples >= 0))))
  return Interval(float(value), float(lo), float(hi), p)


def mean_interval(values: Any, *, draws: int = DRAWS, seed: int = 0,
                  level: float = 0.95) -> Interval:
  """The mean of `values [N]` with its interval over resampled inputs."""
  values = np.asarray(values, np.float64)
  idx = resamples(len(values), draws, seed)
  return _interval(values.mean(), values[idx].mean(axis=1), level, False)


def paired_interval(a: Any, b: Any, *, draws: int = DRAWS, seed: int = 0,
                    level: float = 0.95) -> Interval:
  """mean(a - b) over paired per-input values `[N]`, its interval and p-value."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  idx = resamples(len(d), draws, seed)
  return _interval(d.mean(), d[idx].mean(axis=1), level, True)


def _lds_over(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray,
              rows: np.ndarray) -> np.ndarray:
  """`[draws]` mean LDS with the subsets `rows [draws, M]` (NaN inputs left out)."""
  predicted = scores @ masks.T                                   # [N, M]
  out = np.empty(len(rows))
  for i, r in enumerate(rows):
    rho = spearman(predicted[:, r], outputs[r].T)
    rho = rho[np.isfinite(rho)]
    out[i] = rho.mean() if rho.size else np.nan
  return out


def lds_interval(scores: Any, masks: Any, outputs: Any, *, draws: int = DRAWS,
                 seed: int = 0, level: float = 0.95) -> Interval:
  """The mean LDS of `scores [N, C]` over the subsets `masks [M, C]` with retrained
  `outputs [M, N]`, and its interval over resampled subsets."""
  scores, masks = np.asarray(scores, np.float64), np.asarray(masks, np.float64)
  outputs = np.asarray(outputs, np.float64)
  m = masks.shape[0]
  value = _lds_over(scores, masks, outputs, np.arange(m)[None])[0]
  return _interval(value, _lds_over(scores, masks, outputs, resamples(m, draws, seed)),
                   level, False)


def paired_lds_interval(a: Any, b: Any, masks: Any, outputs: Any, *, draws: int = DRAWS,
                        seed: int = 0, level: float = 0.95) -> Interval:
  """LDS(a) - LDS(b) over the same resampled subsets, its interval and p-value."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  masks, outputs = np.asarray(masks, np.float64), np.asarray(outputs, np.float64)
  m = masks.shape[0]
  everything = np.arange(m)[None]
  value = (_lds_over(a, masks, outputs, everything) - _lds_over(b, masks, outputs,
                                                                everything))[0]
  rows = resamples(m, draws, seed)
  return _interval(value, _lds_over(a, masks, outputs, rows) - _lds_over(b, masks, outputs,
                                                                          rows), level, True)


def _flat(prefix: str, interval: Interval, into: dict[str, Any]) -> None:
  into[prefix] = interval.value
  into[f"{prefix}_low"], into[f"{prefix}_high"] = interval.low, interval.high
  if interval.p is not None:
    into[f"{prefix}_p"] = interval.p


def compare_methods(scores: dict[str, Any], truth: Any,
                    candidates: dict[str, Any] | None = None, *, reference: str = "tracefl",
                    draws: int = DRAWS, seed: int = 0) -> dict[str, dict[str, Any]]:
  """Every method's `[N, C]` scores against a retraining truth (`retrained.SeededTruth` or
  `RetrainingTruth`), with intervals, as flat JSON-ready rows keyed by method:

    retrain_top1 (+ _low, _high)   the method's top client among its `candidates[name]`
                                   (`retrained.restricted_top`) is the truth's, over inputs;
    retrain_top1_diff (+ _low, _high, _p)  paired with `reference` on the same inputs;
    retrain_spearman               mean per-input Spearman with the drops;
    lds (+ _low, _high), lds_diff (+ _low, _high, _p)  over resampled subsets (M >= 3).

  Scores enter the LDS as given: pass additive ones (TraceFL's T, not P)."""
  candidates = candidates or {}
  hits = {name: (retrained.restricted_top(s, candidates.get(name)) == truth.top_client
                 ).astype(np.float64) for name, s in scores.items()}
  has_lds = len(truth.subset_masks) >= 3
  out: dict[str, dict[str, Any]] = {}
  for name, s in scores.items():
    row: dict[str, Any] = {}
    _flat("retrain_top1", mean_interval(hits[name], draws=draws, seed=seed), row)
    if name != reference and reference in scores:
      _flat("retrain_top1_diff", paired_interval(hits[name], hits[reference], draws=draws,
                                                 seed=seed), row)
    rho = spearman(np.asarray(s, np.float64), truth.drops)
    rho = rho[np.isfinite(rho)]
    row["retrain_spearman"] = float(rho.mean()) if rho.size else None
    if has_lds:
      _flat("lds", lds_interval(s, truth.subset_masks, truth.subset_logits, draws=draws,
                                seed=seed), row)
      if name != reference and reference in scores:
        _flat("lds_diff", paired_lds_interval(s, scores[reference], truth.subset_masks,
                                              truth.subset_logits, draws=draws, seed=seed),
              row)
    else:
      row["lds"] = None
    out[name] = row
  return out
