"""Text classification data: DBpedia-14 and Yahoo Answers topics from local files, tokenised
as the paper does (max length 128, truncation, padding to max length), and a synthetic
token dataset for CPU presets and benchmarks.

Files (never downloaded at run time), looked up under `data_dir/<name>/`:
  dbpedia   the official CSV release (`train.csv`, `test.csv`: label 1..14, title, content;
            no header) or Hugging Face's `dbpedia_14` Parquet (`train.parquet`, ...: label,
            title, content). Text = "content", as in the paper.
  yahoo     the official CSV release (label 1..10, question title, question content, best
            answer) or `yahoo_answers_topics` Parquet (topic, question_title,
            question_content, ...). Text = question title + " " + question content.
The tokenizer is a local Hugging Face tokenizer directory (`dataset.tokenizer`); GPT's
tokenizer gets a [PAD] token when it has none (the model's vocabulary must include it).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from tracefl_jax.data.base import DatasetNotFoundError
from tracefl_jax.data.checks import DataFileError, check_labels

TEXT_DATASETS = {"dbpedia": 14, "yahoo": 10}
MAX_LENGTH = 128
# The CSV releases' columns (no header); the label counts classes from 1.
CSV_COLUMNS = {"dbpedia": ("label", "title", "content"),
               "yahoo": ("label", "question title", "question content", "best answer")}
# Hugging Face's Parquet columns: (label column, text columns joined by a space).
PARQUET_COLUMNS = {"dbpedia": ("label", ("content",)),
                   "yahoo": ("topic", ("question_title", "question_content"))}


def _csv_label(text: str, where: str, num_classes: int) -> int:
  try:
    label = int(text.strip())
  except ValueError:
    raise DataFileError(f"{where}: label {text!r} is not an integer (the first column holds "
                        f"the class, 1..{num_classes})") from None
  if not 1 <= label <= num_classes:
    raise DataFileError(f"{where}: label {label} is outside 1..{num_classes} (the CSV release "
                        f"counts classes from 1)")
  return label - 1


def _read_csv(path: Path, name: str) -> tuple[list[str], np.ndarray]:
  """Every row checked: the release's column count and an integer label in 1..K; errors name
  `path:line` (the row's first line)."""
  columns, k = CSV_COLUMNS[name], TEXT_DATASETS[name]
  texts, labels = [], []
  line = 1
  try:
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.reader(f)
      for row in reader:
        where, line = f"{path}:{line}", reader.line_num + 1
        if not row:
          continue
        if len(row) != len(columns):
          raise DataFileError(f"{where}: {len(row)} columns, expected {len(columns)} "
                              f"({', '.join(columns)})")
        labels.append(_csv_label(row[0], where, k))
        texts.append(row[2] if name == "dbpedia" else f"{row[1]} {row[2]}".strip())
  except csv.Error as e:
    raise DataFileError(f"{path}:{line}: not a readable CSV row ({e})") from e
  except UnicodeDecodeError as e:
    raise DataFileError(f"{path}: not UTF-8 text ({e.reason})") from e
  if not labels:
    raise DataFileError(f"{path}: no rows")
  return texts, np.array(labels, np.int32)


def _read_parquet(path: Path, name: str) -> tuple[list[str], np.ndarray]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow), or use the CSV "
                      "release") from e
  label_column, text_columns = PARQUET_COLUMNS[name]
  try:
    table = pq.read_table(path).to_pydict()
  except Exception as e:  # pylint: disable=broad-except  (pyarrow's errors for a bad file)
    raise DataFileError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from e
  missing = [c for c in (label_column, *text_columns) if c not in table]
  if missing:
    raise DataFileError(f"{path}: lacks the column(s) {', '.join(missing)} (it has "
                        f"{', '.join(table) or 'none'})")
  empty = [i for i, v in enumerate(table[label_column]) if v is None]
  if empty:  # read as an object array, which check_labels would call a dtype problem
    raise DataFileError(f"{path}: column {label_column!r} row {empty[0]} is empty (null; "
                        f"{len(empty)} such row{'s' if len(empty) > 1 else ''}): every row "
                        f"needs its class label, fill or drop those rows")
  for column in text_columns:
    bad = [i for i, t in enumerate(table[column]) if not isinstance(t, str)]
    if bad:
      raise DataFileError(f"{path}: column {column!r} row {bad[0]} holds "
                          f"{table[column][bad[0]]!r}, not text")
  if len(text_columns) == 1:
    texts = list(table[text_columns[0]])
  else:
    texts = [" ".join(parts).strip() for parts in zip(*(table[c] for c in text_columns))]
  if not texts:
    raise DataFileError(f"{path}: no rows")
  labels = check_labels(np.asarray(table[label_column]), f"{path}[{label_column}]",
                        TEXT_DATASETS[name], len(texts))
  return texts, labels


def read_split(name: str, data_dir: str | Path, split: str) -> tuple[list[str], np.ndarray]:
  """(texts, labels) of one split, from `data_dir/<name>/<split>.csv` or `.parquet`."""
  folder = Path(data_dir) / name
  for suffix, reader in ((".csv", _read_csv), (".parquet", _read_parquet)):
    path = folder / f"{split}{suffix}"
    if path.exists():
      return reader(path, name)
  raise DatasetNotFoundError(
      f"dataset {name!r}: no {split}.csv or {split}.parquet in {folder} (tracefl_jax never "
      f"downloads at run time). Put the official CSV release (or the Hugging Face Parquet "
      f"files) there, or set --config.dataset.data_dir.")


def load_tokenizer(path: str | Path, *, add_pad: bool = True) -> Any:
  """A Hugging Face tokenizer from a local directory; a [PAD] token is added if missing."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  if not Path(path).exists():
    raise FileNotFoundError(f"no tokenizer directory at {path}")
  tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  if add_pad and tokenizer.pad_token is None:
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
  return tokenizer


def tokenize(tokenizer: Any, texts: list[str], max_length: int = MAX_LENGTH) -> np.ndarray:
  """int32 ids `[N, max_length]`: truncated and padded to max length (paper section IV)."""
  enc = tokenizer(texts, truncation=True, padding="max_length", max_length=max_length)
  return np.asarray(enc["input_ids"], np.int32)


def make_synthetic_text(num_train: int = 1000, num_test: int = 200, seq_len: int = 32,
                        vocab_size: int = 100, num_classes: int = 4, seed: int = 0,
                        pad_token_id: int = 0) -> tuple[np.ndarray, ...]:
  """Token sequences whose words are drawn from class-specific vocabularies, padded with
  `pad_token_id` after a random length: learnable, any size, deterministic by seed.

  Words are ids in `[0, vocab_size)` other than `pad_token_id` (word ids are drawn from
  `[1, vocab_size)` and a drawn `pad_token_id` becomes 0), so a pad never occurs inside the
  text whatever the pad id; with the default pad id 0 the data are unchanged."""
  if not 0 <= pad_token_id < vocab_size:
    raise ValueError(f"pad_token_id={pad_token_id} is outside the vocabulary [0, {vocab_size})")
  rng = np.random.default_rng(seed)
  n = num_train + num_test
  y = rng.integers(0, num_classes, n).astype(np.int32)
  words = rng.integers(1, vocab_size, size=(num_classes, max(vocab_size // 4, 2)))
  picks = rng.integers(0, words.shape[1], size=(n, seq_len))
  ids = words[y[:, None], picks].astype(np.int32)
  noise = rng.random((n, seq_len)) < 0.3
  ids = np.where(noise, rng.integers(1, vocab_size, size=(n, seq_len)), ids).astype(np.int32)
  ids[ids == pad_token_id] = 0  # the pad id's word slot moves to id 0 (a no-op for pad 0)
  lengths = rng.integers(seq_len // 2, seq_len + 1, n)
  ids[np.arange(seq_len)[None] >= lengths[:, None]] = pad_token_id
  return ids[:num_train], y[:num_train], ids[num_train:], y[num_train:]
