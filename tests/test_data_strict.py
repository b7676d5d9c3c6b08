"""Strict loaders and partitions (issue 23): fault-injected files, written here on tiny data,
each refused with one line naming the file and the key (or CSV line) that is wrong; valid files
still load, and integer pixels of another dtype load exactly as uint8 ones. The readers are
called directly (no resizing, no tokenizer), so the whole file runs in a few seconds."""

from __future__ import annotations

import csv
import gzip
import io
import pickle
import struct
import tarfile

import numpy as np
import pytest

from tracefl_jax.data import Dataset, load_dataset, make_partition
from tracefl_jax.data.federated import federate
from tracefl_jax.data import datasets, image_files, medmnist, text
from tracefl_jax.data.checks import DataFileError, read_npy
from tracefl_jax.data.federated import bucket_length, stack_client_indices
from tracefl_jax.data.partition import Partition, fixup_partition


def _one_line(excinfo, *parts):
  """The error is one line holding every one of `parts`."""
  message = str(excinfo.value)
  assert "\n" not in message, message
  for part in parts:
    assert str(part) in message, (part, message)
  return message


# ---------------------------------------------------------------------------------------------
# .npz archives: Keras' mnist.npz and MedMNIST.

def _mnist_arrays():
  rng = np.random.default_rng(0)
  return dict(x_train=rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
              y_train=np.arange(6) % 10, x_test=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
              y_test=np.arange(3))


def _medmnist_arrays():
  rng = np.random.default_rng(1)
  return dict(train_images=rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8),
              train_labels=(np.arange(6) % 9).reshape(6, 1).astype(np.uint8),
              test_images=rng.integers(0, 256, (3, 28, 28, 3), dtype=np.uint8),
              test_labels=np.array([[0], [1], [8]], np.uint8))


def _npz_bytes(arrays):
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def _read_npz_file(kind, tmp_path, data):
  if kind == "mnist":
    (tmp_path / "mnist.npz").write_bytes(data)
    return tmp_path / "mnist.npz", lambda: image_files.read_mnist_npz(tmp_path / "mnist.npz")
  (tmp_path / "pathmnist.npz").write_bytes(data)
  return tmp_path / "pathmnist.npz", lambda: medmnist.read_medmnist("pathmnist", tmp_path)


def _corrupt_member(data):
  """Flips bytes inside the first member's stored data (np.savez stores without compression):
  the zip directory is intact, the member's CRC-32 is not."""
  data = bytearray(data)
  name_len, extra_len = struct.unpack("<HH", data[26:30])
  start = 30 + name_len + extra_len + 200
  data[start:start + 8] = bytes(255 - b for b in data[start:start + 8])
  return bytes(data)


@pytest.mark.parametrize("kind", ["mnist", "medmnist"])
@pytest.mark.parametrize("fault,says", [
    (lambda d: d[: len(d) // 2], "BadZipFile"),          # cut in half: no zip directory
    (lambda d: d[:-30], "BadZipFile"),                    # the end of the directory cut
    (_corrupt_member, "reading key"),                     # a member's bytes damaged
    (lambda d: b"not an archive at all" * 10, "cannot be read as"),
])
def test_truncated_or_corrupt_npz_is_one_line(tmp_path, kind, fault, says):
  arrays = _mnist_arrays() if kind == "mnist" else _medmnist_arrays()
  path, read = _read_npz_file(kind, tmp_path, fault(_npz_bytes(arrays)))
  with pytest.raises(DataFileError) as e:
    read()
  _one_line(e, path, says)


def test_npz_missing_key_object_array_and_single_array(tmp_path):
  arrays = _mnist_arrays()
  del arrays["y_test"]
  path, read = _read_npz_file("mnist", tmp_path, _npz_bytes(arrays))
  with pytest.raises(DataFileError) as e:
    read()
  _one_line(e, path, "lacks the key(s) y_test", "it holds x_train, y_train, x_test")
  arrays = {**_mnist_arrays(), "y_test": np.array([0, "a", None], dtype=object)}
  path, read = _read_npz_file("mnist", tmp_path, _npz_bytes(arrays))
  with pytest.raises(DataFileError) as e:  # never unpickled
    read()
  _one_line(e, path, "reading key 'y_test'")
  buf = io.BytesIO()
  np.save(buf, np.zeros(3))
  path, read = _read_npz_file("mnist", tmp_path, buf.getvalue())
  with pytest.raises(DataFileError) as e:
    read()
  _one_line(e, path, "holds a single .npy array of shape (3,)")


@pytest.mark.parametrize("key,value,says", [
    ("train_images", lambda x: x.astype(np.float32) / 255, "pixels have dtype float32 in [0"),
    ("train_images", lambda x: np.where(x > 250, np.nan, x.astype(np.float64)),
     "with NaN or inf at index"),
    ("test_images", lambda x: np.where(x > 200, 300, x.astype(np.int64)), "pixel 300 at index"),
    ("train_images", lambda x: x[..., 0], "images have 1 channels (shape (6, 28, 28)); valid: 3"),
    ("train_labels", lambda y: y.astype(np.float64), "labels must be integers in [0, 9), got "
                                                     "dtype float64"),
    ("train_labels", lambda y: y + np.float64(0.5), "got dtype float64 (first values 0.5"),
    ("train_labels", lambda y: np.where(y == 3, 9, y), "label 9 at index 3 is outside [0, 9)"),
    ("test_labels", lambda y: y.astype(np.int64) - 1, "label -1 at index 0"),
    ("train_labels", lambda y: np.hstack([y, y]), "labels must be [N] or [N, 1]"),
    ("test_labels", lambda y: y[:2], "2 labels for 3 examples"),
    ("test_labels", lambda y: y.astype(bool), "got dtype bool"),
])
def test_medmnist_refuses_bad_arrays_naming_file_and_key(tmp_path, key, value, says):
  arrays = _medmnist_arrays()
  arrays[key] = value(arrays[key])
  path, read = _read_npz_file("medmnist", tmp_path, _npz_bytes(arrays))
  with pytest.raises(DataFileError) as e:
    read()
  _one_line(e, f"{path}[{key}]", says)


def test_medmnist_valid_file_and_exact_integer_pixels(tmp_path):
  arrays = _medmnist_arrays()
  _, read = _read_npz_file("medmnist", tmp_path, _npz_bytes(arrays))
  got = read()
  np.testing.assert_array_equal(got.x_train, arrays["train_images"])
  assert got.y_test.tolist() == [0, 1, 8] and got.y_train.dtype == np.int32
  widened = {**arrays, "train_images": arrays["train_images"].astype(np.int64)}
  _, read = _read_npz_file("medmnist", tmp_path, _npz_bytes(widened))
  again = read()
  assert again.x_train.dtype == np.uint8
  np.testing.assert_array_equal(again.x_train, got.x_train)


@pytest.mark.parametrize("key,value,says", [
    ("x_train", lambda x: x.astype(np.float32) / 255, "pixels have dtype float32"),
    ("x_test", lambda x: x[:, :27, :27], "images are 27x27, expected 28x28"),
    ("y_test", lambda y: np.array([0, 10, 1]), "label 10 at index 1 is outside [0, 10)"),
    ("y_train", lambda y: y.astype(np.float32), "labels must be integers"),
])
def test_mnist_npz_refuses_bad_arrays(tmp_path, key, value, says):
  arrays = _mnist_arrays()
  arrays[key] = value(arrays[key])
  path, read = _read_npz_file("mnist", tmp_path, _npz_bytes(arrays))
  with pytest.raises(DataFileError) as e:
    read()
  _one_line(e, f"{path}[{key}]", says)


def test_load_dataset_reports_a_truncated_archive_before_any_work(tmp_path):
  data = _npz_bytes(_mnist_arrays())
  (tmp_path / "mnist.npz").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError) as e:  # the CLI prints a ValueError as its one-line error
    load_dataset("mnist", data_dir=tmp_path)
  _one_line(e, tmp_path / "mnist.npz", "BadZipFile")


# ---------------------------------------------------------------------------------------------
# IDX files, the classic pickle and CIFAR-10's batches.

def _idx(array, code=0x08, dtype=">u1"):
  return (struct.pack(">BBBB", 0, 0, code, array.ndim)
          + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(dtype).tobytes())


def test_idx_float_images_and_out_of_range_labels(tmp_path):
  x = np.random.default_rng(0).integers(0, 256, (4, 28, 28))
  names = image_files.MNIST_IDX_FILES
  files = {names[0]: _idx(x / 255.0, 0x0D, ">f4"), names[1]: _idx(np.array([0, 1, 2, 3])),
           names[2]: _idx(x), names[3]: _idx(np.array([0, 12, 2, 3]))}
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  with pytest.raises(DataFileError) as e:
    image_files.read_mnist_idx(tmp_path)
  _one_line(e, tmp_path / names[0], "pixels have dtype float32")
  (tmp_path / names[0]).write_bytes(_idx(x))
  with pytest.raises(DataFileError) as e:
    image_files.read_mnist_idx(tmp_path)
  _one_line(e, tmp_path / names[3], "label 12 at index 1")
  (tmp_path / names[3]).write_bytes(gzip.compress(_idx(np.array([0, 1, 2, 3])))[:-12])
  with pytest.raises(DataFileError) as e:
    image_files.read_mnist_idx(tmp_path)
  _one_line(e, tmp_path / names[3], "truncated or damaged gzip")


def _classic_pickle(x_train, y_train):
  x = np.full((2, 784), 3 / 256, np.float32)
  return gzip.compress(pickle.dumps(((x_train, y_train), (x, np.array([0, 1])),
                                     (x, np.array([1, 0]))), protocol=2))


@pytest.mark.parametrize("x,y,says", [
    (np.full((2, 784), np.nan, np.float32), np.array([0, 1]), "(train images): images hold NaN"),
    (np.full((2, 784), 3 / 256, np.float32), np.array([0.0, 1.0]), "(train labels): labels "
                                                                      "must be integers"),
    (np.full((2, 784), 3 / 256, np.float32), np.array([0, 11]), "label 11 at index 1"),
])
def test_classic_pickle_faults(tmp_path, x, y, says):
  (tmp_path / "mnist.pkl.gz").write_bytes(_classic_pickle(x, y))
  with pytest.raises(DataFileError) as e:
    image_files.read_mnist_pickle(tmp_path / "mnist.pkl.gz")
  _one_line(e, tmp_path / "mnist.pkl.gz", says)


def test_truncated_pickles(tmp_path):
  data = _classic_pickle(np.full((2, 784), 3 / 256, np.float32), np.array([0, 1]))
  (tmp_path / "mnist.pkl.gz").write_bytes(data[: len(data) // 2])
  with pytest.raises(DataFileError) as e:
    image_files.read_mnist_pickle(tmp_path / "mnist.pkl.gz")
  _one_line(e, tmp_path / "mnist.pkl.gz", "truncated or damaged gzip")
  (tmp_path / "mnist.pkl").write_bytes(gzip.decompress(data)[:100])
  with pytest.raises(DataFileError) as e:
    image_files.read_mnist_pickle(tmp_path / "mnist.pkl")
  _one_line(e, tmp_path / "mnist.pkl", "not a dataset pickle, or a truncated one")


def _cifar_tar(labels_of_batch_3=(0, 1)):
  rng = np.random.default_rng(2)
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    for i, name in enumerate(image_files.CIFAR10_BATCHES):
      labels = list(labels_of_batch_3) if i == 2 else [0, 1]
      data = pickle.dumps({b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8),
                           b"labels": labels}, protocol=2)
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def test_cifar_archive_truncated_and_bad_labels(tmp_path):
  path = tmp_path / "cifar-10-python.tar.gz"
  path.write_bytes(_cifar_tar())
  assert image_files.read_cifar10_archive(path).x_train.shape == (10, 32, 32, 3)
  data = _cifar_tar()
  path.write_bytes(data[: len(data) * 2 // 3])
  with pytest.raises(DataFileError) as e:
    image_files.read_cifar10_archive(path)
  _one_line(e, path, "truncated")
  path.write_bytes(_cifar_tar(labels_of_batch_3=(0, 10)))
  with pytest.raises(DataFileError) as e:
    image_files.read_cifar10_archive(path)
  _one_line(e, path / "data_batch_3", "[labels]: label 10 at index 1")


# ---------------------------------------------------------------------------------------------
# tfds-prepared splits (mnist, cifar10) and the embedded digits (pixels 0..16).

class _Source:
  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitems__(self, indices):
    return [self.records[i] for i in indices]


@pytest.mark.parametrize("image,label,max_value,says", [
    (np.full((8, 8, 1), 17, np.uint8), 3, 16, "images: pixel 17 at index (0, 0, 0, 0) is "
                                              "outside 0..16"),
    (np.zeros((8, 8, 1), np.uint8), 10, 16, "labels: label 10 at index 0"),
    (np.zeros((8, 8, 1), np.float32), 1, 255, "images: pixels have dtype float32"),
    (np.zeros((8, 8, 4), np.uint8), 1, 255, "images have 4 channels"),
])
def test_tfds_splits_are_checked(image, label, max_value, says):
  read_split = datasets._read_split  # pylint: disable=protected-access
  source = _Source([{"image": image, "label": label}] * 2)
  with pytest.raises(DataFileError) as e:
    read_split(source, "tfds x (train split)", max_value=max_value)
  _one_line(e, "tfds x (train split)", says)
  good = _Source([{"image": np.zeros((8, 8, 1), np.uint8), "label": 9}])
  x, y = read_split(good, "ok", max_value=max_value)
  assert x.shape == (1, 8, 8, 1) and y.tolist() == [9]


# ---------------------------------------------------------------------------------------------
# CSV and Parquet text files.

def _write_csv(folder, name, rows, split="train"):
  (folder / name).mkdir(parents=True, exist_ok=True)
  path = folder / name / f"{split}.csv"
  with open(path, "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows(rows)
  return path


GOOD = [[1, "Title", "a town"], [14, "Other", "an album\nover two lines"]]  # rows at lines 1, 2


@pytest.mark.parametrize("name,bad_row,says", [
    ("dbpedia", [3, "only a title"], ":4: 2 columns, expected 3 (label, title, content)"),
    ("dbpedia", [3, "t", "c", "extra"], ":4: 4 columns, expected 3"),
    ("dbpedia", ["x", "t", "c"], ":4: label 'x' is not an integer"),
    ("dbpedia", ["2.5", "t", "c"], ":4: label '2.5' is not an integer"),
    ("dbpedia", [0, "t", "c"], ":4: label 0 is outside 1..14"),
    ("dbpedia", [15, "t", "c"], ":4: label 15 is outside 1..14"),
    ("yahoo", [3, "q", "c"], ":4: 3 columns, expected 4 (label, question title"),
])
def test_csv_rows_are_checked_naming_file_and_line(tmp_path, name, bad_row, says):
  rows = GOOD if name == "dbpedia" else [r + ["answer"] for r in GOOD]
  rows = [[min(r[0], 10) if name == "yahoo" else r[0], *r[1:]] for r in rows]
  path = _write_csv(tmp_path, name, rows + [bad_row])  # the quoted newline: row 3 is line 4
  with pytest.raises(DataFileError) as e:
    text.read_split(name, tmp_path, "train")
  _one_line(e, f"{path}{says}")
  _write_csv(tmp_path, name, rows)
  texts, labels = text.read_split(name, tmp_path, "train")
  assert len(texts) == 2 and labels.tolist() == ([0, 13] if name == "dbpedia" else [0, 9])


def test_csv_empty_and_not_utf8(tmp_path):
  path = _write_csv(tmp_path, "dbpedia", [])
  with pytest.raises(DataFileError) as e:
    text.read_split("dbpedia", tmp_path, "train")
  _one_line(e, path, "no rows")
  path.write_bytes(b"1,t,caf\xe9\n")
  with pytest.raises(DataFileError) as e:
    text.read_split("dbpedia", tmp_path, "train")
  _one_line(e, path, "not UTF-8 text")


def test_parquet_columns_and_labels_are_checked(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  (tmp_path / "dbpedia").mkdir()
  path = tmp_path / "dbpedia" / "train.parquet"
  pq.write_table(pa.table({"label": [0, 13], "text": ["a", "b"]}), path)
  with pytest.raises(DataFileError) as e:
    text.read_split("dbpedia", tmp_path, "train")
  _one_line(e, path, "lacks the column(s) content", "it has label, text")
  pq.write_table(pa.table({"label": [0.0, 13.0], "content": ["a", "b"]}), path)
  with pytest.raises(DataFileError) as e:
    text.read_split("dbpedia", tmp_path, "train")
  _one_line(e, f"{path}[label]", "labels must be integers")
  pq.write_table(pa.table({"label": [0, 14], "content": ["a", "b"]}), path)
  with pytest.raises(DataFileError) as e:
    text.read_split("dbpedia", tmp_path, "train")
  _one_line(e, f"{path}[label]", "label 14 at index 1 is outside [0, 14)")
  pq.write_table(pa.table({"label": [0, 13], "content": ["a", None]}), path)
  with pytest.raises(DataFileError) as e:
    text.read_split("dbpedia", tmp_path, "train")
  _one_line(e, path, "column 'content' row 1 holds None")
  # A null label was "labels must be integers ..., got dtype object" (issue 38).
  pq.write_table(pa.table({"label": [0, None, None], "content": ["a", "b", "c"]}), path)
  with pytest.raises(DataFileError) as e:
    text.read_split("dbpedia", tmp_path, "train")
  _one_line(e, path, "column 'label' row 1 is empty (null; 2 such rows)", "fill or drop")
  path.write_bytes(b"PAR1 truncated")
  with pytest.raises(DataFileError) as e:
    text.read_split("dbpedia", tmp_path, "train")
  _one_line(e, path, "not a readable Parquet file")


# ---------------------------------------------------------------------------------------------
# Arrays in memory: Dataset, partitions, round batching.

def test_dataset_refuses_non_finite_inputs_and_negative_token_ids():
  x = np.zeros((4, 3), np.float32)
  y = np.array([0, 1, 0, 1], np.int32)
  Dataset("ok", x, y, x, y, 2)
  bad = x.copy()
  bad[2, 1] = np.inf
  with pytest.raises(ValueError) as e:
    Dataset("d", x, y, bad, y, 2)
  _one_line(e, "dataset 'd': x_test", "value inf at index (2, 1) is not finite")
  tokens = np.ones((4, 5), np.int32)
  tokens[3, 0] = -1
  with pytest.raises(ValueError) as e:
    Dataset("t", tokens, y, np.ones((4, 5), np.int32), y, 2)
  _one_line(e, "x_train holds token id -1 < 0")


LABELS = np.arange(40) % 4


@pytest.mark.parametrize("method,options", [("iid", {}), ("dirichlet", {"alpha": 0.5}),
                                            ("pathological", {"classes_per_client": 1}),
                                            ("shards", {"shards_per_client": 1})])
def test_partition_checks_labels_against_num_classes(method, options):
  part = make_partition(LABELS, method, 4, 0, num_classes=4, **options)  # labels 0..3 fit 4
  assert part.label_counts.shape == (4, 4) and part.label_counts.sum() == 40
  with pytest.raises(ValueError) as e:
    make_partition(LABELS, method, 4, 0, num_classes=2, **options)
  _one_line(e, "labels hold class 3", "num_classes=2", "[0, 2)")


@pytest.mark.parametrize("labels,num_clients,seed,num_classes,says", [
    (LABELS + 0.5, 4, 0, None, "labels must be integer class ids 0..K-1, got dtype float64"),
    (LABELS.astype(np.float32), 4, 0, None, "got dtype float32"),
    (LABELS - 1, 4, 0, None, "labels must be class ids >= 0, got -1 at index 0"),
    (LABELS > 1, 4, 0, None, "got dtype bool"),
    (LABELS.reshape(4, 10), 4, 0, None, "labels must be a vector [N]"),
    (LABELS, 4, 0, 0, "num_classes=0 must be a positive int"),
    (LABELS, 4, 0, 4.0, "num_classes=4.0 must be a positive int"),
    (LABELS, 4, -1, None, "seed=-1 must be a non-negative int"),
    (LABELS, 2.5, 0, None, "num_clients=2.5 must be an int >= 1"),
    (LABELS, 0, 0, None, "num_clients=0 must be an int >= 1"),
])
def test_partition_argument_errors_name_the_argument(labels, num_clients, seed, num_classes,
                                                     says):
  for method, options in (("iid", {}), ("dirichlet", {"alpha": 0.5})):
    with pytest.raises(ValueError) as e:
      make_partition(labels, method, num_clients, seed, num_classes=num_classes, **options)
    _one_line(e, says)


def test_partition_from_indices_fixup_and_batching_arguments():
  with pytest.raises(ValueError) as e:
    Partition.from_indices([[0, 1], [2.0, 3.0]], LABELS)
  _one_line(e, "client 1's indices must be integers, got dtype float64")
  with pytest.raises(ValueError) as e:
    Partition.from_indices([[0, 1], [-1, 3]], LABELS)
  _one_line(e, "client 1's indices span [-1, 3], outside the 40 examples' [0, 40)")
  with pytest.raises(ValueError) as e:  # federate checks through the same partition
    federate(np.zeros((40, 2), np.float32), LABELS, [[0, 1], [5, 40]])
  _one_line(e, "client 1's indices span [5, 40], outside the 40 examples' [0, 40)")
  part = Partition.from_indices([np.arange(20), np.arange(20, 40), []], LABELS)
  assert part.client_sizes.tolist() == [20, 20, 0]
  with pytest.raises(ValueError) as e:
    fixup_partition(part, LABELS, max_per_client=0)
  _one_line(e, "max_per_client=0 must be an int >= 1")
  with pytest.raises(ValueError) as e:
    fixup_partition(part, LABELS + 0.0)
  _one_line(e, "labels must be integer class ids")
  for bad in (0, -32, 2.0):
    with pytest.raises(ValueError) as e:
      stack_client_indices(part.client_indices, [0, 1], bad)
    _one_line(e, f"batch_size={bad!r} must be an int >= 1")
    with pytest.raises(ValueError):
      bucket_length(20, bad)
  assert bucket_length(20, 8) == 32


def test_read_npy_names_the_file_and_what_is_wrong(tmp_path):
  """`trace --inputs x.npz` was reported as "inputs have shape (1,)" (issue 23)."""
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  np.save(tmp_path / "x.npy", x)
  np.testing.assert_array_equal(read_npy(tmp_path / "x.npy"), x)
  np.savez(tmp_path / "x.npz", a=x, b=x)
  with pytest.raises(DataFileError) as e:
    read_npy(tmp_path / "x.npz", "--inputs")
  _one_line(e, "--inputs", "x.npz' is an .npz archive (keys a, b)", "np.save")
  data = (tmp_path / "x.npy").read_bytes()
  (tmp_path / "cut.npy").write_bytes(data[:-10])
  with pytest.raises(DataFileError) as e:
    read_npy(tmp_path / "cut.npy")
  _one_line(e, "cut.npy", "cannot be read as a .npy array")
  np.save(tmp_path / "obj.npy", np.array([1, None], dtype=object), allow_pickle=True)
  with pytest.raises(DataFileError) as e:
    read_npy(tmp_path / "obj.npy")
  _one_line(e, "obj.npy", "cannot be read as a .npy array")
  for path, says in ((tmp_path / "none.npy", "does not exist"), (tmp_path, "is a directory")):
    with pytest.raises(DataFileError) as e:
      read_npy(path)
    _one_line(e, says)
