"""MedMNIST v2's official `.npz` files (pathmnist, organamnist), read and checked, and
fetched from Zenodo with an MD5 check only when asked.

A file holds `train_images` / `test_images` (uint8 `[N, 28, 28]` grey or `[N, 28, 28, 3]`
RGB) and `train_labels` / `test_labels` (integer `[N, 1]`); the validation split is not used.
`read_medmnist` returns them unresized (`image_files.ImageArrays`); the loader in datasets.py
resizes and normalises them like every other image dataset.

What is refused, one line naming the file and the key (checks.py): a truncated or corrupt
archive, a missing key, floating-point images (also in [0, 1]: they are not converted, since
the release is uint8 and a guessed scale silently changes the data), a pixel outside 0..255,
the wrong number of channels for the dataset, float labels (never truncated), a label outside
[0, classes), and a label count that differs from the image count.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
import urllib.request
from pathlib import Path

from tracefl_jax.data.base import DatasetNotFoundError, check_network
from tracefl_jax.data.checks import check_labels, check_pixels, read_npz
from tracefl_jax.data.image_files import ImageArrays

MEDMNIST = {"pathmnist": 9, "organamnist": 11}      # classes
MEDMNIST_CHANNELS = {"pathmnist": 3, "organamnist": 1}
KEYS = ("train_images", "train_labels", "test_images", "test_labels")

# MedMNIST v2's official 28x28 files (Zenodo record 6496656) and their MD5 sums.
MEDMNIST_URL = "https://zenodo.org/record/6496656/files/{name}.npz?download=1"
MEDMNIST_MD5 = {"pathmnist": "a8b06965200029087d5bd730944a56c1",
                "organamnist": "866b832ed4eeba67bfb9edee1d5544e6"}


def download_medmnist(name: str, data_dir: Path) -> Path:
  """Fetches `<name>.npz` into `data_dir`, verifying its MD5; a partial or corrupt download
  never takes the final name."""
  url = MEDMNIST_URL.format(name=name)
  check_network(urllib.parse.urlparse(url).hostname or "zenodo.org")
  data_dir.mkdir(parents=True, exist_ok=True)
  final, part = data_dir / f"{name}.npz", data_dir / f".{name}.npz.part"
  import tqdm  # pylint: disable=g-import-not-at-top
  digest = hashlib.md5()
  with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
    total = int(response.headers.get("Content-Length") or 0) or None
    with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=f"{name}.npz") as bar:
      while chunk := response.read(1 << 20):
        f.write(chunk)
        digest.update(chunk)
        bar.update(len(chunk))
  if digest.hexdigest() != MEDMNIST_MD5[name]:
    part.unlink()
    raise ValueError(f"downloaded {name}.npz has MD5 {digest.hexdigest()}, expected "
                     f"{MEDMNIST_MD5[name]}; nothing was kept, try again")
  os.replace(part, final)
  return final


def find_medmnist(name: str, data_dir: Path, download: bool = False) -> Path:
  """`data_dir/<name>.npz` or `data_dir/medmnist/<name>.npz`, fetched first when missing and
  `download`.

  Raises:
    DatasetNotFoundError: no file (and no download asked for).
  """
  candidates = [data_dir / f"{name}.npz", data_dir / "medmnist" / f"{name}.npz"]
  path = next((p for p in candidates if p.exists()), None)
  if path is None and download:
    path = download_medmnist(name, data_dir)
  if path is None:
    raise DatasetNotFoundError(
        f"dataset {name!r}: no {name}.npz in {data_dir} or {data_dir / 'medmnist'} "
        f"(tracefl_jax never downloads at run time). Get the official 28x28 file from the "
        f"MedMNIST v2 release ({MEDMNIST_URL.format(name=name)}) and copy {name}.npz "
        f"there, set --config.dataset.data_dir, or pass --config.dataset.download=True.")
  return path


def read_medmnist_file(name: str, path: Path) -> ImageArrays:
  """Dataset `name`'s `.npz` at `path`, checked: uint8 `[N, H, W, C]` images (C = 1 for
  organamnist, 3 for pathmnist) and int32 `[N]` labels in [0, classes).

  Raises:
    DataFileError: a file that is not a valid release (see the module docstring).
  """
  arrays = read_npz(path, KEYS, f"a MedMNIST .npz file (keys {', '.join(KEYS)})")
  channels = (MEDMNIST_CHANNELS[name],)
  split = {}
  for part in ("train", "test"):
    x = check_pixels(arrays[f"{part}_images"], f"{path}[{part}_images]", channels=channels)
    y = check_labels(arrays[f"{part}_labels"], f"{path}[{part}_labels]", MEDMNIST[name],
                     len(x))
    split[part] = x, y
  return ImageArrays(*split["train"], *split["test"], path)


def read_medmnist(name: str, data_dir: Path, download: bool = False) -> ImageArrays:
  """`find_medmnist` then `read_medmnist_file`: the checked arrays of dataset `name`."""
  return read_medmnist_file(name, find_medmnist(name, data_dir, download))
