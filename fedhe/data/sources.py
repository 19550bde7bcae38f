"""Where a job's data comes from: a built-in dataset split across parties, or CSV files.

The same description (`DataSource`) travels from the aggregator to every party, which then
loads only its own share; the aggregator loads only the test set. A CSV job may carry a schema
(`fedhe.data.schema`: column types, categories, units), parsed once at the aggregator and sent
as its JSON form, so every site encodes its columns the same way; with `impute="mean"` missing
feature cells stay NaN until the job's secure global means fill them (`fedhe.tasks.moments`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from fedhe.config import IMPUTE_MODES
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
from fedhe.data.schema import Schema, load_encoded, load_schema, numeric_schema, parse_schema
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
    schema: dict[str, Any] = field(default_factory=dict)  # schema.json's JSON form; {}: none
    impute: str = "none"  # "mean": missing feature cells get the secure global column mean
    # The job's CSV header (features and target), fixed by the aggregator: a site checks its
    # own file against it (deployment: no site can read the coordinator's folder). ()=read it.
    columns: tuple[str, ...] = ()

    @property
    def imputes(self) -> bool:
        return self.impute == "mean"

    @property
    def encoded(self) -> bool:
        """Files are read through a schema (given, or all-numeric when imputing)."""
        return bool(self.schema) or self.imputes

    @property
    def csv_task(self) -> str | None:
        return self.kind or ("classification" if self.classes else None)

    @property
    def from_csv(self) -> bool:
        return bool(self.data_dir)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["classes"] = list(self.classes)
        data["columns"] = list(self.columns)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSource:
        return cls(
            **{
                **data,
                "classes": tuple(float(c) for c in data.get("classes", ())),
                "columns": tuple(str(c) for c in data.get("columns", ())),
            }
        )


def with_columns(source: DataSource, schema_path: str = "", impute: str = "none") -> DataSource:
    """`source` with the schema read from `schema_path` (it travels as its JSON form) and the
    imputation mode; both are for CSV jobs only."""
    if impute not in IMPUTE_MODES:
        raise DataError(f"impute must be one of {list(IMPUTE_MODES)}, got {impute!r}.")
    if (schema_path or impute != "none") and not source.from_csv:
        raise DataError(
            "--schema and --impute apply to your own CSV files: pass --data-dir and --target "
            f"(the built-in dataset {source.dataset!r} has no text or missing cells)."
        )
    schema = load_schema(schema_path) if schema_path else None
    if schema is not None:
        schema.check_target(source.target)
    return replace(source, schema=schema.to_dict() if schema else {}, impute=impute)


def party_data(source: DataSource, index: int, local_file: str | None = None) -> Dataset:
    """Party `index`'s training data: its share of a built-in set, its CSV file in the job's
    data folder (simulation), or `local_file`, the CSV file on its own site (deployment: the
    SuperNode's `data-path`)."""
    if local_file and source.encoded:
        return _load_encoded(source, Path(local_file))
    if local_file:
        return load_csv(
            Path(local_file),
            source.target,
            task=source.csv_task,
            expected_columns=_header(source) if source.from_csv else None,
            classes=source.classes or None,
        )
    if source.from_csv and source.encoded:
        return _load_encoded(source, _party_file(source, index))
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
    if source.encoded:
        path = Path(source.data_dir) / TEST_FILE
        return _load_encoded(source, path) if path.is_file() else None
    return load_test(
        source.data_dir,
        source.target,
        task=source.csv_task,
        expected_columns=_header(source),
        classes=source.classes or None,
    )


def schema_of(source: DataSource, local_file: Path | None = None) -> Schema:
    """The job's schema: the one it carries, or all columns numeric (an imputing job without
    schema.json) as in the job's reference header (`_header`, or the site's own file)."""
    if source.schema:
        return parse_schema(source.schema)
    if source.columns:
        return numeric_schema(source.columns, origin="the job's header")
    if source.from_csv:
        reference = _reference_file(source)
        return numeric_schema(read_header(reference), origin=f"the header of {reference}")
    if local_file is None:
        raise DataError("an imputing job reads CSV files: pass --data-dir and --target.")
    return numeric_schema(read_header(local_file), origin=f"the header of {local_file}")


def _load_encoded(source: DataSource, path: Path) -> Dataset:
    return load_encoded(
        path,
        schema_of(source, path),
        source.target,
        impute=source.imputes,
        task=source.csv_task,
        classes=source.classes or None,
    )


def _party_file(source: DataSource, index: int) -> Path:
    files = _find_party_files(source.data_dir)
    if isinstance(index, bool) or not 0 <= index < len(files):
        raise DataError(
            f"Party index {index} is out of range: {source.data_dir} has {len(files)} party "
            f"files ({files[0].name} .. {files[-1].name}), so use 0..{len(files) - 1}."
        )
    return files[index]


def pin_columns(source: DataSource) -> DataSource:
    """`source` with its header fixed (`columns`): a site checks its file against it without
    reading the coordinator's folder."""
    return replace(source, columns=_header(source)) if source.from_csv else source


def _header(source: DataSource) -> tuple[str, ...]:
    """The columns every file of the job has: the job's own (`columns`, set by the aggregator
    for sites that cannot read its folder), else the party files' (simulation) or test.csv's."""
    return source.columns or read_header(_reference_file(source))


def _reference_file(source: DataSource) -> Path:
    if site_data_only(source):
        return Path(source.data_dir) / TEST_FILE
    return _find_party_files(source.data_dir)[0]


def site_data_only(source: DataSource) -> bool:
    """True when the job's folder has no party files: each party reads its site's own file (the
    folder may hold test.csv, schema.json, or nothing at all)."""
    folder = Path(source.data_dir)
    return source.from_csv and not any(folder.glob(PARTY_GLOB))


def coordinator_test_file(source: DataSource) -> bool:
    """Whether the aggregator holds a test set: the built-in split, or test.csv in its folder
    (a deployment need not: a site that opts in evaluates the model on its own test rows)."""
    return not source.from_csv or (Path(source.data_dir) / TEST_FILE).is_file()


def site_shape(source: DataSource, local_file: str) -> dict[str, Any]:
    """What a site tells the aggregator about its own file when the coordinator holds no data:
    schema-level facts only (the header, the encoded feature names, the task and the label
    values the file uses), never a row."""
    path = Path(local_file)
    header = read_header(path)
    # The site's own header stands in for the job's: the aggregator compares the sites' headers.
    data = party_data(replace(source, columns=header, classes=()), 0, local_file)
    labels: list[float] = []
    if data.task == "classification":
        categories = (
            schema_of(source, path).target_categories(source.target) if source.encoded else ()
        )
        if categories:
            labels = [float(i) for i in range(len(categories))]
        else:
            column = pd.read_csv(path, usecols=[source.target])[source.target]
            labels = sorted(
                float(v) for v in pd.to_numeric(column, errors="coerce").dropna().unique()
            )
            _check_survey_labels(source.target, labels)
    return {
        "columns": list(header),
        "features": list(data.feature_names),
        "labels": labels,
        "task": data.task,
        "n-features": data.n_features,
    }


# The shape survey names the label values a site holds; the aggregator chooses which column
# is the target, so a column that does not look like class labels (whole numbers, few of them)
# is refused rather than listed: otherwise any column's distinct values could be read off.
MAX_SURVEY_LABELS = 20


def _check_survey_labels(target: str, labels: list[float]) -> None:
    if len(labels) > MAX_SURVEY_LABELS or any(v != int(v) for v in labels):
        raise DataError(
            f"column {target!r} does not look like class labels (whole numbers, at most "
            f"{MAX_SURVEY_LABELS} of them): this site does not list its values. Give the job's "
            "classes in a schema.json, or check the target and the task."
        )


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
    categories = schema_of(source).target_categories(source.target) if source.encoded else ()
    if categories:  # a categorical target's labels are its categories' indexes
        return tuple(float(i) for i in range(len(categories)))
    column = pd.read_csv(f"{source.data_dir}/test.csv", usecols=[source.target])[source.target]
    return tuple(sorted(float(v) for v in column.unique()))
