"""Truths from retrained federations (`retraining.retrain`): leave-one-client-out retraining,
the noise floor, and the linear datamodeling score (LDS).

For inputs x_n and the base federation's final model G (all clients), s_n(.) is the logit of
the explained class (G's prediction by default).

  LOO retraining:  drop[n, c] = s_n(G) - s_n(G^{-c}), G^{-c} retrained from scratch with client
                   c left out of every round (positive: c pushed the prediction up).
  Noise floor:     noise[n] = |s_n(G) - s_n(G')|, G' the base federation retrained under another
                   data-order seed: a drop within it cannot be told from retraining noise.
  LDS (Park et al., "TRAK", ICML 2023): M random half-subsets S_m of the clients, each retrained;
                   a method's scores tau[n, c] predict s_n(G^{S_m}) by sum_{c in S_m} tau[n, c];
                   LDS[n] = Spearman over m of (predicted, retrained), averaged over inputs.

Rows of the `[F, C]` masks built here: 0 the base, 1 the noise-floor federation (same mask,
another data seed), 2..C+1 one client left out each, then the M subsets.

Over seeds (`seeded_truth_masks`, `truth_over_seeds`): the base and leave-one-out rows are
retrained under S data seeds; methods are scored against the seed-averaged drops, and the
truth's own agreement between seeds (top client, Spearman of the drops) is the ceiling a
method can reach. s_n may be any explained output (`capture.OUTPUTS`; the comparison
explains the margin).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tracefl_jax.models.base import ModelDef, Variables
from tracefl_jax.provenance.capture import explained
from tracefl_jax.provenance.counterfactual import spearman
from tracefl_jax.provenance.federation_masks import FederationMasks


@functools.partial(jax.jit, static_argnames=("model", "output"))
def explained_logits(model: ModelDef, federations: Variables, x: jax.Array,
                     target: jax.Array, output: str = "logit") -> jax.Array:
  """`[F, N]` eval-mode explained output (`capture.explained`: the logit of class
  `target[n]`, its margin over the other classes, or its log-probability) under every
  federation's model (leaves `[F, ...]`)."""
  def one(variables):
    return explained(model.logits(variables, x), target, output)
  return jax.vmap(one)(federations).astype(jnp.float32)


def _subset_draws(num_clients: int, num_subsets: int, seed: int) -> list[np.ndarray]:
  """The kept clients of each LDS subset: floor(C / 2) uniformly random ids each."""
  if num_clients < 2 or num_subsets < 0:
    raise ValueError(f"subset_masks needs num_clients >= 2 and num_subsets >= 0, got "
                     f"{num_clients}, {num_subsets}")
  rng = np.random.default_rng([seed, 0x1d5])
  return [rng.choice(num_clients, num_clients // 2, replace=False)
          for _ in range(num_subsets)]


def subset_masks(num_clients: int, num_subsets: int, seed: int = 0) -> np.ndarray:
  """`[M, C]` float32 masks, each keeping a uniformly random half (floor(C / 2)) of the
  clients."""
  out = np.zeros((num_subsets, num_clients), np.float32)
  for m, kept in enumerate(_subset_draws(num_clients, num_subsets, seed)):
    out[m, kept] = 1.0
  return out


def truth_masks(num_clients: int, num_subsets: int = 0, seed: int = 0) -> FederationMasks:
  """`[2 + C + M, C]`: base, noise floor (both all ones), C leave-one-out rows, M subsets
  (those of `subset_masks`), described sparsely (`FederationMasks`: each row lists the
  clients it leaves out; `masks[f]` is row f, `np.asarray(masks)` the dense matrix)."""
  everyone = np.arange(num_clients)
  subsets = [np.setdiff1d(everyone, kept)
             for kept in _subset_draws(num_clients, num_subsets, seed)]
  return FederationMasks.leave_out(num_clients, [[], [], *everyone[:, None], *subsets])


class RetrainingTruth(NamedTuple):
  """Truths for N inputs over the federation's C clients (columns are global client ids)."""
  base_logit: np.ndarray     # [N] s_n(G)
  drops: np.ndarray          # [N, C] s_n(G) - s_n(G^{-c})
  noise: np.ndarray          # [N] |s_n(G) - s_n(G')|, G' retrained under another data seed
  top_client: np.ndarray     # [N] argmax_c drops (first on ties)
  top_above_noise: np.ndarray  # [N] bool: the top drop exceeds the noise floor
  subset_masks: np.ndarray   # [M, C] the LDS subsets
  subset_logits: np.ndarray  # [M, N] s_n(G^{S_m})


def truth_from_logits(logits: Any, num_clients: int) -> RetrainingTruth:
  """Splits `explained_logits` of the `truth_masks` federations `[2 + C + M, N]`."""
  logits = np.asarray(logits, np.float64)
  base, other = logits[0], logits[1]
  drops = (base[None, :] - logits[2:2 + num_clients]).T
  noise = np.abs(base - other)
  top = np.argmax(drops, axis=1)
  return RetrainingTruth(base, drops, noise, top, drops[np.arange(len(top)), top] > noise,
                         np.zeros((0, num_clients)), logits[2 + num_clients:])


def with_subsets(truth: RetrainingTruth, masks: np.ndarray) -> RetrainingTruth:
  """The truth with its LDS subsets' masks `[M, C]` attached (rows 2 + C .. of the masks)."""
  return truth._replace(subset_masks=np.asarray(masks, np.float64))


def lds(scores: Any, masks: Any, subset_logits: Any) -> np.ndarray:
  """`[N]` per-input linear datamodeling score of `scores [N, C]`: the Spearman correlation
  over the M subsets of sum_{c in S_m} scores[n, c] with the retrained `subset_logits [M, N]`
  (NaN where either is constant)."""
  scores, masks = np.asarray(scores, np.float64), np.asarray(masks, np.float64)
  subset_logits = np.asarray(subset_logits, np.float64)
  if scores.ndim != 2 or masks.shape != (subset_logits.shape[0], scores.shape[1]) or (
      subset_logits.shape[1] != scores.shape[0]):
    raise ValueError(f"lds needs scores [N, C], masks [M, C] and subset_logits [M, N]; got "
                     f"{scores.shape}, {masks.shape}, {subset_logits.shape}")
  predicted = scores @ masks.T  # [N, M]
  return spearman(predicted, subset_logits.T)


def compare(scores: Any, truth: Any, candidates: Any = None) -> dict[str, float | None]:
  """One method's `[N, C]` scores against the retraining truths (`RetrainingTruth` or
  `SeededTruth`): top-1 agreement with the LOO retraining drop (the method's top among
  `candidates`, `restricted_top`; first on ties), mean Spearman with the drops, and the mean
  LDS. Scores enter the LDS as they are: pass additive ones (TraceFL's T, never P)."""
  scores = np.asarray(scores, np.float64)
  top1 = float(np.mean(restricted_top(scores, candidates) == truth.top_client))
  rho = spearman(scores, truth.drops)
  out: dict[str, float | None] = {"retrain_top1": top1,
                                  "retrain_spearman": _mean(rho)}
  out["lds"] = (_mean(lds(scores, truth.subset_masks, truth.subset_logits))
                if len(truth.subset_masks) >= 3 else None)
  return out


def _mean(values: np.ndarray) -> float | None:
  values = np.asarray(values)[np.isfinite(values)]
  return float(values.mean()) if values.size else None


# --- truths over seeds -------------------------------------------------------------------


def seeded_truth_masks(num_clients: int, num_subsets: int = 0, seed: int = 0,
                       num_seeds: int = 1) -> tuple[FederationMasks, np.ndarray]:
  """(masks `[S (1 + C) + M, C]`, seed index per row `[S (1 + C) + M]`): for each of the S
  truth seeds the base federation and the C leave-one-out rows, then the M LDS subsets
  (those of `subset_masks`, trained under seed index 0), described sparsely
  (`FederationMasks`). Retrain row r under data seed `seeds[seed_index[r]]`."""
  if num_seeds < 1:
    raise ValueError(f"num_seeds={num_seeds} must be >= 1")
  everyone = np.arange(num_clients)
  block = [[], *everyone[:, None]]
  subsets = [np.setdiff1d(everyone, kept)
             for kept in _subset_draws(num_clients, num_subsets, seed)]
  masks = FederationMasks.leave_out(num_clients, [*block * num_seeds, *subsets])
  index = np.concatenate([np.repeat(np.arange(num_seeds), 1 + num_clients),
                          np.zeros(num_subsets, np.int64)])
  return masks, index


class SeededTruth(NamedTuple):
  """Leave-one-client-out retraining over S seeds, for N inputs and C clients."""
  base_logit: np.ndarray     # [S, N] the explained output of each seed's base federation
  seed_drops: np.ndarray     # [S, N, C] each seed's drops s_n(G_s) - s_n(G_s^{-c})
  drops: np.ndarray          # [N, C] their mean over seeds: what methods are scored against
  top_client: np.ndarray     # [N] argmax_c of the mean drops (first on ties)
  ceiling_top1: float | None      # how often two seeds' top clients agree (mean over pairs)
  ceiling_spearman: float | None  # mean Spearman between two seeds' drops (over pairs, inputs)
  subset_masks: np.ndarray   # [M, C] the LDS subsets
  subset_logits: np.ndarray  # [M, N] the explained output under each subset's federation


def truth_over_seeds(outputs: Any, num_clients: int, num_seeds: int,
                     masks_of_subsets: Any = None) -> SeededTruth:
  """Splits the explained outputs `[S (1 + C) + M, N]` of the `seeded_truth_masks`
  federations. The truth's own reproducibility across seeds is the ceiling a method can
  reach: with S = 1 it is None."""
  outputs = np.asarray(outputs, np.float64)
  c, s = num_clients, num_seeds
  blocks = outputs[:s * (1 + c)].reshape(s, 1 + c, -1)          # [S, 1 + C, N]
  base = blocks[:, 0]                                           # [S, N]
  seed_drops = np.transpose(base[:, None, :] - blocks[:, 1:], (0, 2, 1))  # [S, N, C]
  drops = seed_drops.mean(axis=0)
  tops = np.argmax(seed_drops, axis=2)                          # [S, N]
  pairs = [(a, b) for a in range(s) for b in range(a + 1, s)]
  ceiling_top1 = (float(np.mean([np.mean(tops[a] == tops[b]) for a, b in pairs]))
                  if pairs else None)
  ceiling_spearman = (_mean(np.concatenate([spearman(seed_drops[a], seed_drops[b])
                                            for a, b in pairs])) if pairs else None)
  subsets = outputs[s * (1 + c):]
  m = np.zeros((0, c)) if masks_of_subsets is None else np.asarray(masks_of_subsets,
                                                                   np.float64)
  if m.shape[0] != subsets.shape[0]:
    raise ValueError(f"{subsets.shape[0]} subset rows but masks_of_subsets has {m.shape[0]}")
  return SeededTruth(base, seed_drops, drops, np.argmax(drops, axis=1), ceiling_top1,
                     ceiling_spearman, m, subsets)


def restricted_top(scores: Any, candidates: Any = None) -> np.ndarray:
  """`[N]` argmax of `scores [N, C]` over the clients that could be responsible
  (`candidates`: `[C]` or `[N, C]` bool, default all; first on ties)."""
  scores = np.asarray(scores, np.float64)
  if candidates is None:
    return np.argmax(scores, axis=1)
  allowed = np.broadcast_to(np.asarray(candidates, bool), scores.shape)
  if not allowed.any(axis=1).all():
    raise ValueError("every input needs at least one candidate client")
  return np.argmax(np.where(allowed, scores, -np.inf), axis=1)


# --- client valuation from the subset federations -----------------------------------------


def banzhaf(masks: Any, subset_outputs: Any) -> np.ndarray:
  """`[N, C]` Banzhaf values of the clients for each input's explained output, by the
  maximum-sample-reuse estimator (Wang & Jia, "Data Banzhaf", AISTATS 2023): the mean output
  of the subsets holding client c minus that of the subsets without it (`masks [M, C]`
  > 0 marks membership, `subset_outputs [M, N]`). NaN for a client in all or none of them."""
  member = np.asarray(masks, np.float64) > 0
  out = np.asarray(subset_outputs, np.float64)
  inside = member.sum(0)
  outside = len(member) - inside
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_in = (out.T @ member) / inside
    mean_out = (out.T @ ~member) / outside
  return np.where((inside > 0) & (outside > 0), mean_in - mean_out, np.nan)


def datamodel(masks: Any, subset_outputs: Any, ridge: float = 1e-3) -> np.ndarray:
  """`[N, C]` linear datamodel weights (Ilyas et al. 2022; TRAK's regression target): per
  input, the ridge least-squares fit of the subsets' outputs on their membership masks (an
  intercept unpenalised), as an upper bound for attribution methods (it sees retrained
  federations). Subsets of one size (the LDS's half-subsets) fix the weights only up to a
  shift common to every client, which no ranking and no sum over such a subset sees."""
  x = np.asarray(masks, np.float64)
  y = np.asarray(subset_outputs, np.float64)                    # [M, N]
  xc, yc = x - x.mean(0), y - y.mean(0)
  gram = xc.T @ xc + ridge * len(x) * np.eye(x.shape[1])
  return np.linalg.solve(gram, xc.T @ yc).T                     # [N, C]
