"""Local copies of MNIST and CIFAR-10 as their original releases ship them: which layout of
files is present under a data directory. The files are read (offline, without TensorFlow, in
the order of the source files) by image_readers.py, which also says what each reader returns
and checks.

Accepted layouts, looked for in this order (the first complete one wins):
  mnist    Keras' `mnist.npz` (x_train [60000, 28, 28] uint8, y_train, x_test, y_test) at
           `data_dir/mnist.npz` or `data_dir/mnist/mnist.npz`;
           the four original IDX files `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
           `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte` (each plain or `.gz`; the dotted
           spelling `train-images.idx3-ubyte` also works) together in `data_dir`,
           `data_dir/mnist/` or `data_dir/MNIST/raw/` (torchvision's folder);
           the classic pickle `mnist.pkl.gz` (or `mnist.pkl`) at `data_dir/` or
           `data_dir/mnist/`: ((x_train, y_train), (x_valid, y_valid), (x_test, y_test)) with
           float images [N, 784] in [0, 1]; train = train + valid (60,000, file order).
  cifar10  the python release's pickles `data_batch_1` .. `data_batch_5` and `test_batch`
           (b"data" [N, 3072] uint8 channel-major, b"labels") in
           `data_dir/cifar-10-batches-py/` or `data_dir/cifar10/cifar-10-batches-py/`, or
           the unextracted `cifar-10-python.tar.gz` in `data_dir/` or `data_dir/cifar10/`;
           train = batches 1..5 in order.
`locate_local_images` finds a layout without reading it, so that a cached dataset is not read
at all; `find_local_images` reads it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

# The readers live in image_readers.py; they are re-exported here, where callers found them.
from tracefl_jax.data.image_readers import (CIFAR10_BATCHES, MNIST_IDX_FILES, NUM_CLASSES,
                                            ImageArrays, _cifar_arrays, _cifar_batch,
                                            _idx_file, _images, _labels, _scaled_pixels,
                                            _unit_floats_to_uint8, read_cifar10_archive,
                                            read_cifar10_batches, read_idx, read_mnist_idx,
                                            read_mnist_npz, read_mnist_pickle)

__all__ = ["ImageArrays", "LocalImages", "read_idx", "read_mnist_npz", "read_mnist_idx",
           "read_mnist_pickle", "read_cifar10_batches", "read_cifar10_archive",
           "find_local_images", "locate_local_images", "describe_search", "MNIST_IDX_FILES",
           "CIFAR10_BATCHES", "LOCAL_IMAGE_DATASETS"]


# ---------------------------------------------------------------------------------------------
# Where each dataset is looked for.

class _Layout(NamedTuple):
  what: str                               # for the not-found message
  places: tuple[Path, ...]                # files or folders, in the order they are tried
  read: Callable[[Path], ImageArrays]
  present: Callable[[Path], bool]         # complete enough to read
  partial: Callable[[Path], str | None]   # what an incomplete folder lacks, for the message
  files: Callable[[Path], tuple[Path, ...]] = lambda place: (place,)  # what `read` reads


class LocalImages(NamedTuple):
  """A complete layout of one dataset's files, found and not yet read."""
  place: Path                     # the file or folder
  files: tuple[Path, ...]         # the files `read` reads, in a fixed order (a cache's key)
  read: Callable[[], ImageArrays]


def _files_present(path: Path) -> bool:
  return path.is_file()


def _no_partial(path: Path) -> None:
  del path


def _folder_checks(names: tuple[str, ...], find: Callable[[Path, str], Path | None]):
  def missing(folder: Path) -> list[str]:
    return [n for n in names if find(folder, n) is None]

  def partial(folder: Path) -> str | None:
    lacks = missing(folder)
    if folder.is_dir() and 0 < len(lacks) < len(names):
      return f"{folder} has some of the files but lacks {', '.join(lacks)}"
    return None
  return (lambda folder: folder.is_dir() and not missing(folder)), partial


def _batch_file(folder: Path, name: str) -> Path | None:
  return folder / name if (folder / name).is_file() else None


def _layouts(name: str, data_dir: Path) -> list[_Layout]:
  d = data_dir
  if name == "mnist":
    idx_present, idx_partial = _folder_checks(MNIST_IDX_FILES, _idx_file)
    return [
        _Layout("Keras' mnist.npz", (d / "mnist.npz", d / "mnist" / "mnist.npz"),
                read_mnist_npz, _files_present, _no_partial),
        _Layout(f"the four IDX files {', '.join(MNIST_IDX_FILES)} (each plain or .gz), "
                f"together in one folder", (d, d / "mnist", d / "MNIST" / "raw"),
                read_mnist_idx, idx_present, idx_partial,
                lambda folder: tuple(_idx_file(folder, n) for n in MNIST_IDX_FILES)),
        _Layout("the classic pickle mnist.pkl.gz (or mnist.pkl)",
                (d / "mnist.pkl.gz", d / "mnist.pkl", d / "mnist" / "mnist.pkl.gz",
                 d / "mnist" / "mnist.pkl"), read_mnist_pickle, _files_present, _no_partial),
    ]
  if name == "cifar10":
    batches_present, batches_partial = _folder_checks(CIFAR10_BATCHES, _batch_file)
    return [
        _Layout(f"the python release's pickles {', '.join(CIFAR10_BATCHES)} in a folder "
                f"cifar-10-batches-py", (d / "cifar-10-batches-py",
                                         d / "cifar10" / "cifar-10-batches-py"),
                read_cifar10_batches, batches_present, batches_partial,
                lambda folder: tuple(folder / n for n in CIFAR10_BATCHES)),
        _Layout("the unextracted archive cifar-10-python.tar.gz",
                (d / "cifar-10-python.tar.gz", d / "cifar10" / "cifar-10-python.tar.gz"),
                read_cifar10_archive, _files_present, _no_partial),
    ]
  raise ValueError(f"no local-file layouts for dataset {name!r}; known: {LOCAL_IMAGE_DATASETS}")


LOCAL_IMAGE_DATASETS = ("cifar10", "mnist")


def locate_local_images(name: str, data_dir: str | Path) -> LocalImages | None:
  """The first complete layout of `name`'s files under `data_dir`, unread; None if none is
  there."""
  for layout in _layouts(name, Path(data_dir)):
    for place in layout.places:
      if layout.present(place):
        return LocalImages(place, layout.files(place), functools.partial(layout.read, place))
  return None


def find_local_images(name: str, data_dir: str | Path) -> ImageArrays | None:
  """The first complete layout of `name`'s files under `data_dir`, read; None if none is
  there (a present but broken file raises, naming it, rather than being skipped)."""
  found = locate_local_images(name, data_dir)
  return None if found is None else found.read()


def describe_search(name: str, data_dir: str | Path) -> str:
  """The files `find_local_images` looks for and where, one layout a line, plus any folder
  that holds only part of a layout."""
  lines, partial = [], []
  for layout in _layouts(name, Path(data_dir)):
    lines.append(f"  - {layout.what}: {', '.join(str(p) for p in layout.places)}")
    partial += [note for note in map(layout.partial, layout.places) if note]
  return "\n".join(lines + [f"  ! {note}" for note in partial])
