"""The byte formats of the dataset releases, decoded without TensorFlow: IDX files (plain or
gzip) and pickles, read with an unpickler that only rebuilds NumPy arrays so that a tampered
file cannot run code. A damaged file (a cut gzip stream, a truncated pickle, an IDX header that
promises more bytes than the file holds) is one `DataFileError` naming the file."""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from tracefl_jax.data.checks import DataFileError

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "the IDX file format"); data is big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
  """One IDX file (plain or gzip-compressed, whatever its name says) as a native-endian array
  of the shape its header gives."""
  path = Path(path)
  data = path.read_bytes()
  if data[:2] == b"\x1f\x8b":  # gzip magic: also catches a compressed file renamed without .gz
    data = _gunzip(data, path)
  if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
    raise DataFileError(f"{path} is not an IDX file (first bytes {data[:4].hex()}, expected "
                        f"0000 + type code + rank)")
  rank = data[3]
  offset = 4 + 4 * rank
  if len(data) < offset:
    raise DataFileError(f"{path}: IDX header of rank {rank} is cut short")
  dims = struct.unpack(f">{rank}I", data[4:offset])
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  expected = math.prod(dims) * dtype.itemsize
  if len(data) - offset != expected:
    raise DataFileError(f"{path}: the IDX header promises shape {dims} ({expected} bytes) but "
                        f"the file holds {len(data) - offset} bytes of data (truncated?)")
  return np.frombuffer(data, dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


class _ArrayUnpickler(pickle.Unpickler):
  """Rebuilds NumPy arrays and plain containers only; any other global is refused."""

  _ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
              ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"),
              ("_codecs", "encode")}  # Python 3 writes bytes as _codecs.encode under protocol 2

  def find_class(self, module: str, name: str) -> Any:
    if module.startswith("numpy.core"):  # files pickled by NumPy 1.x (and the Python 2 era)
      module = "numpy._core" + module[len("numpy.core"):]
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only NumPy arrays are "
                                   f"expected in a dataset pickle")
    return super().find_class(module, name)


def _gunzip(data: bytes, path: Path | str) -> bytes:
  try:
    return gzip.decompress(data)
  except (OSError, EOFError, zlib.error) as e:
    raise DataFileError(f"{path}: a truncated or damaged gzip file ({e})") from e


def unpickle_arrays(data: bytes, path: Path) -> Any:
  """The pickle in `data` (gzip-compressed or not), rebuilding NumPy arrays and plain
  containers only; `path` names the file in errors."""
  if data[:2] == b"\x1f\x8b":
    data = _gunzip(data, path)
  try:
    # latin1: the releases were pickled by Python 2; NumPy documents latin1 for its arrays.
    return _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
  except Exception as e:  # pylint: disable=broad-except  (damaged bytes raise many kinds)
    raise DataFileError(f"{path}: not a dataset pickle, or a truncated one "
                        f"({type(e).__name__}: {e})") from e
