"""A deployed querier's own queries: the CSV file its site names (`query-path`), read with the
job's columns.

The file holds the job's feature columns (matched by name, any order) and may hold the target
column: its labels are read only so that a site that opts in (`report-metrics`) can report
counts about its answers. Its rows go through the job's schema (categories, missing cells) as
the parties' training rows do; the job's standardizer is applied where the queries are made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedhe.data import csvdata
from fedhe.data.datasets import Dataset, load_builtin
from fedhe.data.schema import encode_column
from fedhe.data.sources import DataSource, _header, party_data, schema_of
from fedhe.errors import DataError


@dataclass(frozen=True, eq=False)
class Queries:
    """The rows a querier asks about (features in the job's column order) and, when its file
    has the target column, their labels (numbered as the job numbers them) or targets."""

    X: np.ndarray
    y: np.ndarray | None = None

    @property
    def n_samples(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    @classmethod
    def of(cls, data: Dataset) -> Queries:
        return cls(data.X, data.y)


def load_queries(source: DataSource, path: Path, local_file: Path | None = None) -> Queries:
    """The queries in `path` for a job reading `source`. `local_file`: the site's own training
    file (its header is the job's, as checked when the site joined); else the job's header."""
    target = _target(source)
    with_target = target in csvdata.read_header(path)
    if not source.from_csv:
        return _builtin_queries(source, path, with_target)
    if source.encoded:
        if with_target:
            return Queries.of(party_data(source, -1, str(path)))
        return Queries(_encoded_features(source, path, local_file))
    reference = list(csvdata.read_header(local_file) if local_file else _header(source))
    if not with_target:
        return Queries(_plain_features(path, [c for c in reference if c != target]))
    data = csvdata.load_csv(
        path,
        target,
        task=source.csv_task,
        expected_columns=reference,
        classes=source.classes or None,
    )
    return Queries.of(data)


def _target(source: DataSource) -> str:
    if source.from_csv:
        return source.target
    return load_builtin(source.dataset, seed=source.seed)[1].target_name


def _builtin_queries(source: DataSource, path: Path, with_target: bool) -> Queries:
    """A built-in dataset's columns, by their names (`fedhe.data.datasets`)."""
    _, test = load_builtin(source.dataset, seed=source.seed)
    features = list(test.feature_names)
    if not with_target:
        return Queries(_plain_features(path, features))
    classes = tuple(float(c) for c in range(test.n_classes)) or None
    data = csvdata.load_csv(
        path,
        test.target_name,
        task=test.task,
        expected_columns=[*features, test.target_name],
        classes=classes,
    )
    return Queries.of(data)


def _plain_features(path: Path, features: list[str]) -> np.ndarray:
    header, body, lines = csvdata.read_table(path)
    header, body = csvdata._match_header(path, header, body, features)
    return csvdata._to_numbers(path, header, body, lines)


def _encoded_features(source: DataSource, path: Path, local_file: Path | None) -> np.ndarray:
    """Feature columns through the job's schema (one-hot categories; missing cells NaN when
    the job imputes, to get the job's global means)."""
    schema = schema_of(source, local_file)
    columns = schema.features(source.target)
    header, body, lines = csvdata.read_table(path)
    names = [c.name for c in columns]
    extra = [name for name in header if name not in names]
    missing = [name for name in names if name not in header]
    if extra or missing:
        raise DataError(
            f"{path}: line 1 (header): columns that are no feature of {schema.origin}: "
            f"{extra or 'none'}; features missing from the file: {missing or 'none'}. A query "
            f"file holds the job's feature columns (any order) and, optionally, its target "
            f"{source.target!r}."
        )
    cells = {name: body.iloc[:, i].to_numpy(dtype=object) for i, name in enumerate(header)}
    blocks = [
        encode_column(path, column, cells[column.name], lines, source.imputes) for column in columns
    ]
    return np.column_stack(blocks)
