"""Data layer: built-in datasets, party partitioning and per-party CSV files."""

from fedhe.data.csvdata import find_party_files, load_csv, load_party, load_test, read_header
from fedhe.data.datasets import BUILTIN_DATASETS, Dataset, load_builtin
from fedhe.data.partition import partition_dirichlet, partition_iid

__all__ = [
    "BUILTIN_DATASETS",
    "Dataset",
    "find_party_files",
    "load_builtin",
    "load_csv",
    "load_party",
    "load_test",
    "partition_dirichlet",
    "partition_iid",
    "read_header",
]
