"""schema.json: the column types every site shares, so that text categories are encoded the same
way everywhere and missing cells wait for the secure global means (`--impute mean`).

Format (one file, the same at every site)::

    {
      "target": "outcome",
      "columns": {
        "age":     {"type": "numeric", "unit": "years"},
        "sex":     {"type": "categorical", "categories": ["F", "M"]},
        "outcome": {"type": "numeric", "unit": "mmol/L"}
      }
    }

`target` is optional (when present it must equal `--target`); the target column may be listed
(a categorical target classifies into its categories) or left out (numeric). `unit` and
`description` are documentation, kept with the model.

Columns are matched by name, so a file may hold them in any order; a file column the schema
lacks, or a schema column the file lacks, is an error naming both. A categorical column becomes
one indicator column per category but the first, the reference level, as scikit-learn's
``OneHotEncoder(categories=[...], drop="first")``: a full one-hot is collinear with the
intercept, and exact linreg's normal equations would be singular. Encoded names read
``sex=M``. Cells are compared with the categories as text (stripped, case-sensitive).

Missing cells (empty, NA, NaN, null, …) are an error, unless the job imputes: then they stay
NaN here (a missing category makes all its indicators NaN) and are filled with the global mean
of their column, which one secure sum computes (`fedhe.tasks.moments`). A missing target is
always an error. Without a schema file an imputing job reads every column as numeric
(`numeric_schema`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedhe.data import csvdata
from fedhe.data.datasets import Dataset
from fedhe.errors import DataError

NUMERIC = "numeric"
CATEGORICAL = "categorical"
TYPES = (NUMERIC, CATEGORICAL)
_SCHEMA_KEYS = ("target", "columns", "description")
_COLUMN_KEYS = {
    NUMERIC: ("type", "unit", "description"),
    CATEGORICAL: ("type", "categories", "unit", "description"),
}
_IMPUTE_FIX = (
    "pass --impute mean to fill missing cells with the global mean of the column (computed by "
    "secure sum), or fill in a value, or remove the row"
)


@dataclass(frozen=True)
class Column:
    """One column of the schema: its type, and for a categorical one its vocabulary."""

    name: str
    kind: str = NUMERIC
    categories: tuple[str, ...] = ()
    unit: str = ""
    description: str = ""

    @property
    def encoded_names(self) -> tuple[str, ...]:
        """Its feature columns after encoding: itself, or one indicator per category but the
        first (the reference level)."""
        if self.kind == NUMERIC:
            return (self.name,)
        return tuple(f"{self.name}={category}" for category in self.categories[1:])

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": self.kind}
        if self.kind == CATEGORICAL:
            entry["categories"] = list(self.categories)
        if self.unit:
            entry["unit"] = self.unit
        if self.description:
            entry["description"] = self.description
        return entry


@dataclass(frozen=True)
class Schema:
    """The parsed schema; `origin` names where it came from in error messages."""

    columns: tuple[Column, ...]
    target: str = ""
    origin: str = "schema.json"

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    def features(self, target: str) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.name != target)

    def feature_names(self, target: str) -> tuple[str, ...]:
        """The encoded feature names, in the schema's column order."""
        return tuple(name for c in self.features(target) for name in c.encoded_names)

    def target_categories(self, target: str) -> tuple[str, ...]:
        """A categorical target's categories (its labels 0..k-1), or () for a numeric one."""
        column = self.column(target)
        return column.categories if column and column.kind == CATEGORICAL else ()

    @property
    def categorical(self) -> tuple[str, ...]:
        """Names of the categorical columns."""
        return tuple(c.name for c in self.columns if c.kind == CATEGORICAL)

    def units(self) -> dict[str, str]:
        return {c.name: c.unit for c in self.columns if c.unit}

    def check_target(self, target: str) -> None:
        if self.target and target != self.target:
            raise DataError(
                f"{self.origin} names the target {self.target!r} but the job's target is "
                f"{target!r}: pass --target {self.target} or change 'target' in {self.origin}."
            )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what travels to every party in the job's data description)."""
        data: dict[str, Any] = {"columns": {c.name: c.to_dict() for c in self.columns}}
        if self.target:
            data["target"] = self.target
        return data


def load_schema(path: str | Path) -> Schema:
    """Read and validate a schema.json file; every error names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: schema file not found. Check the path given to --schema.")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err}); save it as UTF-8.") from err
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}. "
            'It must be an object such as {"columns": {"age": {"type": "numeric"}}}.'
        ) from err
    return parse_schema(data, origin=str(path))


def parse_schema(data: Any, *, origin: str = "schema.json") -> Schema:
    """A Schema from its JSON form (a loaded schema.json, or the dict a job carries)."""
    if not isinstance(data, Mapping):
        raise DataError(f"{origin}: the schema must be a JSON object, got {type(data).__name__}.")
    _check_keys(origin, "the schema", data, _SCHEMA_KEYS)
    target = data.get("target", "")
    if not isinstance(target, str):
        raise DataError(f"{origin}: 'target' must be a column name (text), got {target!r}.")
    columns = data.get("columns")
    if not isinstance(columns, Mapping) or not columns:
        raise DataError(
            f"{origin}: 'columns' must be a non-empty object of column name → "
            f'{{"type": ...}}, got {columns!r}.'
        )
    parsed = tuple(_parse_column(origin, name, entry) for name, entry in columns.items())
    if target and all(c.name == target for c in parsed):
        raise DataError(f"{origin}: 'columns' holds only the target {target!r}; add features.")
    return Schema(parsed, target, origin)


def numeric_schema(header: Sequence[str], *, origin: str) -> Schema:
    """Every column numeric: how an imputing job without schema.json reads its files."""
    return Schema(tuple(Column(str(name)) for name in header), origin=origin)


def load_encoded(
    path: str | Path,
    schema: Schema,
    target: str,
    *,
    impute: bool,
    task: str | None = None,
    classes: Sequence[float] | None = None,
) -> Dataset:
    """Read a CSV file through `schema`: columns matched by name, categories one-hot encoded,
    missing feature cells NaN when `impute` (else an error). `task` and `classes` as in
    `fedhe.data.csvdata.load_csv`; a categorical target's labels are its categories' indexes."""
    path = Path(path)
    header, body, lines = csvdata.read_table(path)
    _check_columns(path, header, schema, target)
    cells = {name: body.iloc[:, i].to_numpy(dtype=object) for i, name in enumerate(header)}
    blocks = [
        encode_column(path, column, cells[column.name], lines, impute)
        for column in schema.features(target)
    ]
    X = np.column_stack(blocks) if blocks else np.zeros((len(lines), 0))
    categories = schema.target_categories(target)
    y_raw = _target_values(path, schema, target, cells[target], lines)
    if categories:
        if task == "regression":
            raise DataError(
                f"{path}: the target {target!r} is categorical in {schema.origin}; a regression "
                "needs a numeric target. Declare it numeric or choose a classification task."
            )
        classes = classes or tuple(float(i) for i in range(len(categories)))
    task = csvdata._resolve_task(path, task, classes, y_raw)
    names = schema.feature_names(target)
    if task == "regression":
        return Dataset(X, y_raw, names, target, task, 0)
    y, n_classes = csvdata._map_labels(path, target, y_raw, lines, classes)
    return Dataset(X, y, names, target, task, n_classes)


# -- validation of the schema ---------------------------------------------------------------------


def _check_keys(origin: str, what: str, data: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = [key for key in data if key not in allowed]
    if unknown:
        raise DataError(f"{origin}: {what} has unknown keys {unknown}; allowed: {list(allowed)}.")


def _parse_column(origin: str, name: Any, entry: Any) -> Column:
    where = f"{origin}: column {name!r}"
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise DataError(f"{where}: a column name must be non-empty text without outer spaces.")
    if not isinstance(entry, Mapping):
        raise DataError(f'{where} must be an object such as {{"type": "numeric"}}, got {entry!r}.')
    kind = entry.get("type")
    if kind not in TYPES:
        raise DataError(f"{where}: 'type' must be one of {list(TYPES)}, got {kind!r}.")
    _check_keys(origin, f"column {name!r}", entry, _COLUMN_KEYS[kind])
    unit, description = entry.get("unit", ""), entry.get("description", "")
    for key, value in (("unit", unit), ("description", description)):
        if not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be text, got {value!r}.")
    categories = _parse_categories(where, entry.get("categories")) if kind == CATEGORICAL else ()
    return Column(name, kind, categories, unit, description)


def _parse_categories(where: str, raw: Any) -> tuple[str, ...]:
    example = 'such as ["F", "M"]'
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: 'categories' must be a non-empty list {example}, got {raw!r}.")
    texts = []
    for value in raw:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise DataError(
                f"{where}: category {value!r} must be text or an integer (cells are compared "
                'as text); write it as it appears in the files, e.g. "1.5".'
            )
        text = str(value).strip()
        if not text or text.lower() in csvdata.MISSING_TOKENS:
            raise DataError(
                f"{where}: category {value!r} reads as a missing value; name it otherwise."
            )
        texts.append(text)
    repeated = sorted({t for t in texts if texts.count(t) > 1})
    if repeated:
        raise DataError(f"{where}: categories {repeated} appear more than once; list each once.")
    return tuple(texts)


# -- encoding a file ------------------------------------------------------------------------------


def _check_columns(path: Path, header: tuple[str, ...], schema: Schema, target: str) -> None:
    csvdata.require_target(path, header, target)
    expected = [c.name for c in schema.columns] + ([] if schema.column(target) else [target])
    extra = [name for name in header if name not in expected]
    missing = [name for name in expected if name not in header]
    if extra or missing:
        raise DataError(
            f"{path}: line 1 (header): columns not in {schema.origin}: {extra or 'none'}; "
            f"columns of {schema.origin} missing from the file: {missing or 'none'}. Columns "
            f"are matched by name (any order): make the file and {schema.origin} name the same "
            "columns."
        )


def _missing(cells: np.ndarray) -> np.ndarray:
    return np.array([c == "" or c.lower() in csvdata.MISSING_TOKENS for c in cells], dtype=bool)


def _where(path: Path, line: int, column: str) -> str:
    return f"{path}: row at line {line}, column {column!r}"


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def encode_column(
    path: Path, column: Column, cells: np.ndarray, lines: np.ndarray, impute: bool
) -> np.ndarray:
    """The column's feature block: (n, 1) numbers or (n, k-1) indicators, NaN where missing."""
    missing = _missing(cells)
    if missing.any() and not impute:
        row = int(np.flatnonzero(missing)[0])
        raise DataError(
            f"{_where(path, lines[row], column.name)}: missing value {_shown(cells[row])}: "
            f"{_IMPUTE_FIX}."
        )
    if column.kind == NUMERIC:
        block = _numbers(path, column.name, cells, lines, missing)[:, None]
    else:
        codes = _codes(path, column, cells, lines, missing)
        block = (codes[:, None] == np.arange(1, len(column.categories))[None, :]).astype(float)
    block[missing] = np.nan
    return block


def _numbers(
    path: Path, name: str, cells: np.ndarray, lines: np.ndarray, missing: np.ndarray
) -> np.ndarray:
    values = pd.to_numeric(pd.Series(cells, dtype=object), errors="coerce").to_numpy(
        float, copy=True
    )
    bad = ~missing & ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        text = cells[row]
        where = _where(path, lines[row], name)
        if np.isinf(values[row]):
            raise DataError(
                f"{where}: infinite value {_shown(text)}. Replace it with a finite number."
            )
        raise DataError(
            f"{where}: {_shown(text)} is not a number. The column is numeric; use plain "
            "numbers such as 3 or -1.5e-2, or declare it categorical in schema.json."
        )
    return values


def _codes(
    path: Path, column: Column, cells: np.ndarray, lines: np.ndarray, missing: np.ndarray
) -> np.ndarray:
    """Each cell's category index (-1 where missing)."""
    index = {category: i for i, category in enumerate(column.categories)}
    codes = np.array([index.get(c, -1) for c in cells], dtype=np.int64)
    unknown = ~missing & (codes < 0)
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise DataError(
            f"{_where(path, lines[row], column.name)}: {_shown(cells[row])} is not one of the "
            f"categories {list(column.categories)} (compared as text, case-sensitive). Add it "
            f"to schema.json's categories of {column.name!r} (the same file at every site) or "
            "fix the cell."
        )
    return codes


def _target_values(
    path: Path, schema: Schema, target: str, cells: np.ndarray, lines: np.ndarray
) -> np.ndarray:
    missing = _missing(cells)
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise DataError(
            f"{_where(path, lines[row], target)}: missing target value {_shown(cells[row])}. "
            "The target is never imputed: fill it in or remove the row."
        )
    column = schema.column(target)
    if column is not None and column.kind == CATEGORICAL:
        return _codes(path, column, cells, lines, missing).astype(float)
    return _numbers(path, target, cells, lines, missing)
