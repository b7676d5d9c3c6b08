"""A tfds builder for scikit-learn's handwritten digits, prepared from the copy bundled in
scikit-learn (no download), so the embedded default dataset is read through the same
array_record `data_source` path as the real datasets."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from tracefl_jax.data.base import DIGITS_NUM_TRAIN


class TraceflDigits(tfds.core.GeneratorBasedBuilder):
  """1,797 8x8 grayscale digit images (values 0..16), 10 classes; 1,437 train / 360 test."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Seeded 80/20 split of sklearn.datasets.load_digits."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships inside scikit-learn
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    perm = np.random.default_rng(0).permutation(len(digits.target))
    return {"train": self._generate_examples(digits, perm[:DIGITS_NUM_TRAIN]),
            "test": self._generate_examples(digits, perm[DIGITS_NUM_TRAIN:])}

  def _generate_examples(self, digits, indices):
    for i in indices:
      yield int(i), {"image": digits.images[i].astype(np.uint8)[..., None],
                     "label": int(digits.target[i])}
