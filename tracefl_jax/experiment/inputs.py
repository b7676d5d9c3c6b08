"""New inputs for a stored round, in the dataset's own form or as the model takes them.

`model_inputs` turns what a user hands the `trace` verb into the model's inputs, as the run
preprocessed its data, and refuses, in one error that says what the round takes
(`expected_form`), whatever it cannot read for sure:

  uint8 image datasets (a `Normalization`)  integer pixels in [0, pixel_max], `[N, H, W, C]`
      (or `[N, H, W]` when C = 1, or one example): normalised here; or float inputs already
      normalised, which must lie in the range normalised pixels take (raw 0..255 pixels as
      floats would be traced silently wrong otherwise);
  token ids (an integer `input_dtype`)      integers in [0, vocab_size);
  other float datasets                      floats, preprocessed as the run's dataset is,
      within the range of the run's own test inputs (`input_range`, widened by a quarter of
      its span on each side): the raw digits pixels (0..16) given as floats are refused.

What the model takes (floats for a float model, integers for a token model, exactly
`[N, *input_shape]`, finite) is accepted here exactly when `trace_clients` accepts it
(`provenance.checks.check_inputs`); the dataset's own form and one example without the batch
axis are what the verb adds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tracefl_jax.data import Normalization
from tracefl_jax.models.base import ModelDef
from tracefl_jax.provenance.checks import widened_range as widened


def _is_int(dtype: np.dtype) -> bool:
  return np.issubdtype(dtype, np.integer) and dtype != np.bool_


def normalised_range(norm: Normalization) -> tuple[float, float]:
  """The smallest and largest value `norm` gives pixels in [0, pixel_max] (over channels)."""
  mean, std = np.asarray(norm.mean), np.asarray(norm.std)
  return float(np.min(-mean / std)), float(np.max((1.0 - mean) / std))


def expected_form(model: ModelDef, norm: Normalization | None,
                  vocab_size: int | None = None, input_range: Any = None) -> str:
  """What a stored round of this model and dataset takes, in words."""
  dims = ", ".join(map(str, model.input_shape))
  shape = f"[N, {dims}] (or one example [{dims}])"
  if norm is not None:
    if model.input_shape[-1] == 1:
      shape += f" or [N, {', '.join(map(str, model.input_shape[:-1]))}] without the channel axis"
    lo, hi = normalised_range(norm)
    return (f"{shape}: integer pixels in [0, {norm.pixel_max:g}] as the dataset stores them "
            f"(e.g. uint8; normalised here with mean {norm.mean}, std {norm.std}), or float "
            f"inputs already normalised so, in [{lo:.4g}, {hi:.4g}]")
  if _is_int(np.dtype(model.input_dtype)):
    ids = f" in [0, {vocab_size})" if vocab_size else ""
    return f"{shape}: integer token ids{ids}, tokenised as the run's dataset is"
  if input_range is not None:
    lo, hi = widened(input_range)
    return (f"{shape}: float inputs preprocessed as the run's dataset is, in [{lo:.4g}, "
            f"{hi:.4g}] (its test inputs lie in [{input_range[0]:.4g}, {input_range[1]:.4g}])")
  return f"{shape}: float inputs preprocessed as the run's dataset is"


def model_inputs(x: Any, model: ModelDef, norm: Normalization | None,
                 vocab_size: int | None = None, *, where: str = "this round",
                 input_range: Any = None) -> np.ndarray:
  """`x` as `model` takes it: `[N, *input_shape]` of `model.input_dtype`.

  Raises:
    ValueError: `x` is not in a form this round takes; the message names `x`'s shape, dtype
      (and range where that is the problem) and the form expected (`expected_form`).
  """
  x = np.asarray(x)
  shape, given = tuple(model.input_shape), list(x.shape)  # errors name the inputs as given

  def refuse(problem: str) -> ValueError:
    return ValueError(f"inputs have shape {given} and dtype {x.dtype}{problem}; "
                      f"{where} traces "
                      f"{expected_form(model, norm, vocab_size, input_range)}")

  if x.dtype == np.bool_ or not (_is_int(x.dtype) or np.issubdtype(x.dtype, np.floating)):
    raise refuse("")
  if x.shape == shape or (norm is not None and shape[-1] == 1 and x.shape == shape[:-1]):
    x = x[None]  # one example
  if norm is not None and shape[-1] == 1 and x.shape[1:] == shape[:-1]:
    x = x[..., None]  # grayscale images without their channel axis
  if x.ndim != len(shape) + 1 or x.shape[1:] != shape or x.shape[0] == 0:
    raise refuse("")
  model_takes_ints = _is_int(np.dtype(model.input_dtype))
  if model_takes_ints:
    if not _is_int(x.dtype):
      raise refuse("")
    if x.size and (x.min() < 0 or (vocab_size and x.max() >= vocab_size)):
      raise refuse(f" with values in [{x.min()}, {x.max()}]")
    return x.astype(model.input_dtype)
  if norm is None:
    if not np.issubdtype(x.dtype, np.floating):
      raise refuse("")
    finite = x[np.isfinite(x)]  # a non-finite row is traced as unattributable, as by
    if input_range is not None and finite.size:  # trace_clients
      lo, hi = widened(input_range)
      if finite.min() < lo or finite.max() > hi:
        raise refuse(f" with values in [{finite.min():.4g}, {finite.max():.4g}] (raw values? "
                     f"give them preprocessed as the run's dataset is)")
    return x.astype(model.input_dtype)
  if _is_int(x.dtype):  # raw pixels, as the dataset stores them
    if x.min() < 0 or x.max() > norm.pixel_max:
      raise refuse(f" with values in [{x.min()}, {x.max()}]")
    return norm(x).astype(model.input_dtype)
  lo, hi = normalised_range(norm)
  slack = 1e-3 * (hi - lo)
  finite = x[np.isfinite(x)]  # a non-finite row is traced as unattributable
  if finite.size and (finite.min() < lo - slack or finite.max() > hi + slack):
    raise refuse(f" with values in [{finite.min():.4g}, {finite.max():.4g}] (raw pixels as "
                 f"floats? give them as integers, e.g. x.astype(np.uint8))")
  return x.astype(model.input_dtype)
