"""Where a job's data comes from: a built-in dataset split across parties, or CSV files.

The same description (`DataSource`) travels from the aggregator to every party, which then
loads only its own share; the aggregator loads only the test set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fedhe.data.csvdata import (
    PARTY_GLOB,
    TEST_FILE,
    load_csv,
    load_party,
    load_test,
    read_header,
)
from fedhe.data.csvdata import find_party_files as _find_party_files
from fedhe.data.datasets import Dataset, load_builtin
from fedhe.data.partition import partition_dirichlet, partition_iid
from fedhe.errors import DataError


@dataclass(frozen=True)
class DataSource:
    dataset: str = "breast_cancer"
    data_dir: str = ""
    target: str = ""
    seed: int = 0
    n_parties: int = 1
    classes: tuple[float, ...] = ()
    kind: str = ""  # CSV: "classification" or "regression"; empty: inferred from the target
    alpha: float = 0.0  # built-in data: Dirichlet(alpha) label skew across parties; 0: IID

    @property
    def csv_task(self) -> str | None:
        return self.kind or ("classification" if self.classes else None)

    @property
    def from_csv(self) -> bool:
        return bool(self.data_dir)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["classes"] = list(self.classes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSource:
        return cls(**{**data, "classes": tuple(float(c) for c in data.get("classes", ()))})


def party_data(source: DataSource, index: int, local_file: str | None = None) -> Dataset:
    """Party `index`'s training data: its share of a built-in set, its CSV file in the job's
    data folder (simulation), or `local_file`, the CSV file on its own site (deployment: the
    SuperNode's `data-path`)."""
    if local_file:
        return load_csv(
            Path(local_file),
            source.target,
            task=source.csv_task,
            expected_columns=_header(source) if source.from_csv else None,
            classes=source.classes or None,
        )
    if source.from_csv:
        return load_party(
            source.data_dir,
            index,
            source.target,
            task=source.csv_task,
            classes=source.classes or None,
        )
    train, _ = load_builtin(source.dataset, seed=source.seed)
    if source.alpha > 0 and train.task == "classification":
        shares = partition_dirichlet(
            train.y, source.n_parties, alpha=source.alpha, seed=source.seed
        )
    else:
        shares = partition_iid(train.n_samples, source.n_parties, seed=source.seed)
    if not 0 <= index < len(shares):
        raise DataError(f"party index {index} is outside 0..{len(shares) - 1}.")
    return train.subset(shares[index])


def test_data(source: DataSource) -> Dataset | None:
    """The held-out test set: the built-in split, or test.csv (None when the folder has none)."""
    if not source.from_csv:
        return load_builtin(source.dataset, seed=source.seed)[1]
    return load_test(
        source.data_dir,
        source.target,
        task=source.csv_task,
        expected_columns=_header(source),
        classes=source.classes or None,
    )


def _header(source: DataSource) -> tuple[str, ...]:
    """The columns every file of the job has: the party files' (simulation) or test.csv's
    (deployment: the aggregator's folder holds test.csv only, each site its own file)."""
    if site_data_only(source):
        return read_header(Path(source.data_dir) / TEST_FILE)
    return read_header(_find_party_files(source.data_dir)[0])


def site_data_only(source: DataSource) -> bool:
    """True when the job's folder has test.csv but no party files: parties read their own."""
    folder = Path(source.data_dir)
    return source.from_csv and (folder / TEST_FILE).is_file() and not any(folder.glob(PARTY_GLOB))


def count_party_files(source: DataSource) -> int:
    if not source.from_csv or site_data_only(source):
        return source.n_parties
    return len(_find_party_files(source.data_dir))


def csv_classes(source: DataSource) -> tuple[float, ...]:
    """Label values of a CSV classification job, read from test.csv (validated first)."""
    if test_data(source) is None:
        raise DataError(
            f"{source.data_dir} has no test.csv: a classification job needs it to evaluate the "
            "model and to fix the label set every party uses."
        )
    column = pd.read_csv(f"{source.data_dir}/test.csv", usecols=[source.target])[source.target]
    return tuple(sorted(float(v) for v in column.unique()))
