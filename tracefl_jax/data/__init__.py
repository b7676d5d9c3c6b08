"""Datasets, partitioners and client arrays."""

from tracefl_jax.data.base import Dataset, DatasetNotFoundError, Normalization
from tracefl_jax.data.checks import DataFileError
from tracefl_jax.data.datasets import (available_datasets, load_dataset, make_synthetic,
                                       register_dataset)
from tracefl_jax.data.federated import RoundData, flip_labels, stack_client_indices
from tracefl_jax.data.partition import (Partition, fixup_partition, make_partition,
                                        partition_dirichlet, partition_iid,
                                        partition_pathological, partition_shards)

__all__ = ["DataFileError", "Dataset", "DatasetNotFoundError", "Normalization", "Partition",
           "RoundData", "available_datasets", "fixup_partition", "flip_labels", "load_dataset",
           "make_partition", "make_synthetic", "partition_dirichlet", "partition_iid",
           "partition_pathological", "partition_shards", "register_dataset",
           "stack_client_indices"]
