"""A cache of prepared image datasets beside their source files, so that a dataset read from
local files (mnist, cifar10, the MedMNIST sets) is resized once and then read back in a fraction
of a second.

After a loader prepares a dataset (uint8 `[N, size, size, 3]` images and int32 labels) it is
saved uncompressed (`np.savez`: reading it back is one sequential read) as
`<data_dir>/.tracefl_cache/<name>-<variant>-<sha256 of the source, 16 hex digits>.npz`, where
`variant` names what else decides the pixels (the image size, the backend that resized them).
The next load with the same source bytes reads that file instead of preparing again; a changed
source file has another checksum and so another cache file. The file also records the full
checksum and `FORMAT` (raised whenever the preparation changes), and what it holds is checked
(dtypes, shapes, labels in range) before use: a corrupt, stale or malformed file is ignored,
with a log line, and written anew.

Writing never fails a load: it goes to a temporary file in the same directory, renamed into
place (`os.replace`, atomic: a reader sees the old file or the whole new one); any error, such
as a read-only data directory, is one log line and the load goes on uncached. `cache=False` on
the loaders (`load_dataset(..., cache=False)`) neither reads nor writes it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tracefl_jax.data.checks import DataFileError, read_npz

logger = logging.getLogger(__name__)

CACHE_DIR = ".tracefl_cache"
FORMAT = 1  # the version of the preparation; a cache file of another version is not used
KEYS = ("x_train", "y_train", "x_test", "y_test")
_BLOCK = 1 << 20

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test


def source_digest(files: Sequence[Path]) -> str:
  """The SHA-256 (hex) of the source, read in blocks: of the file's bytes for one file (what
  `sha256sum` prints), else of each file's name and bytes in the order given."""
  digest = hashlib.sha256()
  for path in files:
    if len(files) > 1:
      digest.update(Path(path).name.encode() + b"\0")
    with open(path, "rb") as f:
      while block := f.read(_BLOCK):
        digest.update(block)
  return digest.hexdigest()


def cache_path(data_dir: Path, name: str, variant: str, digest: str) -> Path:
  return Path(data_dir) / CACHE_DIR / f"{name}-{variant}-{digest[:16]}.npz"


def _problem(arrays: dict[str, np.ndarray], digest: str, size: int, num_classes: int
             ) -> str | None:
  """Why the arrays of a cache file cannot be used, or None."""
  if arrays["format"].shape != () or int(arrays["format"]) != FORMAT:
    return f"format {arrays['format']}, expected {FORMAT}"
  if str(arrays["source_sha256"]) != digest:
    return "it was prepared from another source file"
  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (size, size, 3) or not len(x):
      return f"x_{split} is {x.dtype} {x.shape}, expected uint8 [N, {size}, {size}, 3]"
    if y.dtype != np.int32 or y.shape != (len(x),):
      return f"y_{split} is {y.dtype} {y.shape}, expected int32 [{len(x)}]"
    if y.min() < 0 or y.max() >= num_classes:
      return f"y_{split} holds labels outside [0, {num_classes})"
  return None


def read_cache(path: Path, digest: str, size: int, num_classes: int) -> Arrays | None:
  """The arrays of the cache file at `path`, or None when there is none or it is unusable
  (logged)."""
  if not path.is_file():
    return None
  try:
    arrays = read_npz(path, KEYS + ("format", "source_sha256"), "a prepared-dataset cache")
    problem = _problem(arrays, digest, size, num_classes)
  except (DataFileError, OSError, ValueError, TypeError) as e:
    problem = str(e)
  if problem is not None:
    logger.warning("ignoring the prepared-dataset cache %s (%s); preparing the data again",
                   path, problem)
    return None
  logger.info("read the prepared dataset from %s", path)
  return tuple(arrays[k] for k in KEYS)  # type: ignore[return-value]


def write_cache(path: Path, arrays: Arrays, digest: str) -> bool:
  """Saves `arrays` at `path` atomically; True when written. Never raises: a failure (a
  read-only directory, a full disk) is logged and leaves no file behind."""
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **dict(zip(KEYS, arrays)), format=np.int64(FORMAT),
               source_sha256=np.str_(digest))
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from the other users of a shared dir
    os.replace(tmp, path)
    return True
  except Exception as e:  # pylint: disable=broad-except  (caching must never fail a load)
    logger.info("not caching the prepared dataset at %s (%s: %s)", path, type(e).__name__, e)
    if tmp is not None:
      try:
        os.unlink(tmp)
      except OSError:
        pass
    return False


def load_prepared(name: str, data_dir: Path, files: Sequence[Path], variant: str, size: int,
                  num_classes: int, prepare: Callable[[], Arrays], cache: bool = True
                  ) -> Arrays:
  """`prepare()`'s arrays, read from the cache when it holds them for these source `files`
  (uint8 `[N, size, size, 3]` images, labels in [0, num_classes)), else prepared and cached.
  `cache=False`: `prepare()`, nothing read or written."""
  if not cache:
    return prepare()
  try:
    digest = source_digest(files)
  except OSError as e:  # preparing reads the same files and says what is wrong with them
    logger.info("not caching %s: cannot checksum its files (%s)", name, e)
    return prepare()
  path = cache_path(data_dir, name, variant, digest)
  arrays = read_cache(path, digest, size, num_classes)
  if arrays is None:
    arrays = prepare()
    write_cache(path, arrays, digest)
  return arrays
