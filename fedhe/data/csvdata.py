"""Load numeric CSV files (one per party, plus an optional test.csv) into Datasets.

Layout of a data directory::

    party-1.csv, party-2.csv, ..., party-10.csv   one file per party, same columns
    test.csv                                      optional held-out test set

Every file has a header line (line 1) and one numeric row per sample. Errors name the file,
the line as an editor shows it (the header is line 1, the first data row line 2) and the column.
Blank lines are skipped. Files are matched by column name: a file with the same columns in
another order is read in the first file's order.

Class labels: when several files hold one classification problem, pass the same `classes`
(all label values of the whole problem) to every load; otherwise each file maps only the labels
it holds to 0..k-1, and a party that lacks a class would number the others differently.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedhe.data.datasets import TASKS, Dataset
from fedhe.errors import DataError

PARTY_GLOB = "party-*.csv"
PARTY_PATTERN = "party-<N>.csv (e.g. party-1.csv, party-2.csv)"
TEST_FILE = "test.csv"
MAX_INFERRED_CLASSES = 20
_PARTY_RE = re.compile(r"party-(\d+)\.csv")
MISSING_TOKENS = frozenset({"nan", "-nan", "na", "n/a", "null", "none", "#n/a"})


def load_csv(
    path: str | Path,
    target: str,
    *,
    task: str | None = None,
    expected_columns: Sequence[str] | None = None,
    classes: Sequence[float] | None = None,
) -> Dataset:
    """Read a numeric CSV; `target` is the label column, every other column is a feature.

    Parameters
    ----------
    path : the CSV file.
    target : name of the target column.
    task : "classification", "regression" or None to infer: classification when every target
        value is an integer and there are at most 20 distinct values (or `classes` is given).
    expected_columns : when given, the header must hold exactly these names; files are matched
        by name, so a file with the same columns in another order is read in this order.
    classes : classification only: all label values of the problem; label `classes[i]` becomes
        i and n_classes is len(classes). Without it, the file's own sorted labels become 0..k-1.

    Raises
    ------
    DataError : missing or empty file, bad header, missing target, a non-numeric, empty,
        NaN or infinite cell, or a label outside `classes`.
    """
    path = Path(path)
    header, body, lines = read_table(path)
    if expected_columns is not None:
        header, body = _match_header(path, header, body, [str(c) for c in expected_columns])
    require_target(path, header, target)
    if len(header) < 2:
        raise DataError(f"{path}: only the target column {target!r}; add feature columns.")
    values = _to_numbers(path, header, body, lines)
    t = header.index(target)
    y_raw = values[:, t]
    X = np.delete(values, t, axis=1)
    features = tuple(c for c in header if c != target)
    task = _resolve_task(path, task, classes, y_raw)
    if task == "regression":
        return Dataset(X, y_raw, features, target, task, 0)
    y, n_classes = _map_labels(path, target, y_raw, lines, classes)
    return Dataset(X, y, features, target, task, n_classes)


def require_target(path: Path, header: Sequence[str], target: str) -> None:
    """Raise a DataError naming the columns there are when `target` is not among them."""
    if target in header:
        return
    hint = _separator_hint(header, "The header looks")
    raise DataError(
        f"{path}: target column {target!r} not found. Available columns: "
        f"{', '.join(header)}. Pass one of these as the target.{hint}"
    )


def read_header(path: str | Path) -> tuple[str, ...]:
    """Return the column names on line 1 of a CSV file (stripped)."""
    path = Path(path)
    return read_table(path, nrows=1)[0]


def find_party_files(data_dir: str | Path) -> list[Path]:
    """Return the party-<N>.csv files of `data_dir`, sorted by N (party-2 before party-10)."""
    directory = Path(data_dir)
    if not directory.is_dir():
        raise DataError(
            f"Data directory {directory} does not exist or is not a directory. "
            f"Create it with one file per party named {PARTY_PATTERN}."
        )
    numbered: dict[int, Path] = {}
    for file in directory.glob(PARTY_GLOB):
        if not file.is_file():
            continue
        match = _PARTY_RE.fullmatch(file.name)
        if match is None:
            raise DataError(f"{file}: party files must be named {PARTY_PATTERN}; rename it.")
        number = int(match.group(1))
        if number in numbered:
            raise DataError(
                f"{numbered[number]} and {file} both claim party number {number}; keep one of them."
            )
        numbered[number] = file
    if not numbered:
        raise DataError(f"No party files in {directory}: expected files named {PARTY_PATTERN}.")
    return [numbered[k] for k in sorted(numbered)]


def load_party(
    data_dir: str | Path,
    party_index: int,
    target: str,
    *,
    task: str | None = None,
    classes: Sequence[float] | None = None,
) -> Dataset:
    """Load the `party_index`-th file (0-based) of find_party_files(data_dir).

    Its columns must be the first party file's (in any order; read in that file's order).
    Pass `classes` for classification so every party numbers labels the same way (see the
    module docstring).
    """
    files = find_party_files(data_dir)
    if isinstance(party_index, bool) or not 0 <= party_index < len(files):
        raise DataError(
            f"Party index {party_index} is out of range: {data_dir} has {len(files)} party "
            f"files ({files[0].name} .. {files[-1].name}), so use 0..{len(files) - 1}."
        )
    expected = read_header(files[0])
    return load_csv(
        files[party_index], target, task=task, expected_columns=expected, classes=classes
    )


def load_test(
    data_dir: str | Path,
    target: str,
    *,
    task: str | None = None,
    expected_columns: Sequence[str] | None = None,
    classes: Sequence[float] | None = None,
) -> Dataset | None:
    """Load `data_dir`/test.csv, or return None when there is none.

    Pass the party files' header (read_header) as `expected_columns` and the same `classes`
    as for the parties so the test set lines up with the training data.
    """
    directory = Path(data_dir)
    if not directory.is_dir():
        raise DataError(f"Data directory {directory} does not exist or is not a directory.")
    path = directory / TEST_FILE
    if not path.exists():
        return None
    return load_csv(path, target, task=task, expected_columns=expected_columns, classes=classes)


def read_table(
    path: Path, nrows: int | None = None
) -> tuple[tuple[str, ...], pd.DataFrame, np.ndarray]:
    """Return (header, data cells as stripped strings, file line number of each data row)."""
    if not path.is_file():
        raise DataError(
            f"{path}: file not found (or not a file). Check the path or create the file."
        )
    try:
        raw = pd.read_csv(
            path,
            header=None,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            encoding="utf-8-sig",
            nrows=nrows,
        )
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: file is empty; it needs a header line and data rows.") from exc
    except pd.errors.ParserError as exc:
        raise DataError(
            f"{path}: cannot parse as CSV ({str(exc).strip()}). "
            "Every row needs as many comma-separated fields as the header."
        ) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc}); save it as UTF-8 CSV.") from exc
    cells = raw.fillna("").apply(lambda col: col.str.strip())
    header = tuple(cells.iloc[0])
    _check_header_names(path, header)
    body = cells.iloc[1:]
    lines = np.arange(2, len(cells) + 1)
    blank = (body == "").all(axis=1).to_numpy()
    body, lines = body[~blank], lines[~blank]
    if nrows is None and body.empty:
        raise DataError(f"{path}: header only, no data rows. Add at least one data row.")
    return header, body, lines


def _check_header_names(path: Path, header: tuple[str, ...]) -> None:
    if not any(header):
        raise DataError(f"{path}: line 1 must be a header with column names, it is blank.")
    for position, name in enumerate(header, start=1):
        if not name:
            raise DataError(f"{path}: line 1 (header): column {position} has no name; name it.")
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataError(f"{path}: line 1 (header): column {name!r} appears twice; rename one.")
        seen.add(name)


def _match_header(
    path: Path, header: tuple[str, ...], body: pd.DataFrame, expected: list[str]
) -> tuple[tuple[str, ...], pd.DataFrame]:
    """Header and cells in the `expected` column order: files are matched by column name."""
    _check_header(path, header, expected)
    if list(header) == expected:
        return header, body
    order = [header.index(name) for name in expected]
    return tuple(expected), body.iloc[:, order]


def _separator_hint(header: Sequence[str], subject: str) -> str:
    """A hint when a one-column header holds another separator (a semicolon-separated file)."""
    if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
        return f" {subject} like it uses another separator; save the file with commas."
    return ""


def _check_header(path: Path, header: tuple[str, ...], expected: list[str]) -> None:
    """The same column names as `expected`, in any order."""
    missing = [c for c in expected if c not in header]
    extra = [c for c in header if c not in expected]
    if not missing and not extra:
        return
    hint = _separator_hint(header, "It looks")
    raise DataError(
        f"{path}: header (line 1) differs from the expected columns (missing columns: "
        f"{missing or 'none'}; extra columns: {extra or 'none'}). Give it the same column names "
        f"as the other files (their order may differ).{hint}"
    )


def _to_numbers(
    path: Path, header: tuple[str, ...], body: pd.DataFrame, lines: np.ndarray
) -> np.ndarray:
    """Convert the stripped string cells to float64, or raise at the first bad cell."""
    strings = body.to_numpy(dtype=object)
    numbers = body.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(numbers)
    if not bad.any():
        return numbers
    row, col = np.argwhere(bad)[0]
    where = f"{path}: row at line {lines[row]}, column {header[col]!r}"
    text = strings[row, col]
    shown = text if len(text) <= 40 else text[:37] + "..."
    if text == "":
        problem = "empty cell. Fill in a number or remove the row."
    elif np.isinf(numbers[row, col]):
        problem = f"infinite value {shown!r}. Replace it with a finite number or remove the row."
    elif text.lower() in MISSING_TOKENS:
        problem = f"missing value {shown!r}. Fill in a number or remove the row."
    else:
        problem = f"{shown!r} is not a number. Use plain numbers such as 3 or -1.5e-2."
    raise DataError(f"{where}: {problem}")


def _resolve_task(
    path: Path, task: str | None, classes: Sequence[float] | None, y: np.ndarray
) -> str:
    if task is not None and task not in TASKS:
        raise DataError(f"{path}: task must be one of {TASKS} or None, got {task!r}.")
    if classes is not None:
        if task == "regression":
            raise DataError(f"{path}: classes were given but task is 'regression'; drop one.")
        return "classification"
    if task is not None:
        return task
    integral = bool(np.all(y == np.round(y)))
    if integral and np.unique(y).size <= MAX_INFERRED_CLASSES:
        return "classification"
    return "regression"


def _map_labels(
    path: Path,
    target: str,
    y: np.ndarray,
    lines: np.ndarray,
    classes: Sequence[float] | None,
) -> tuple[np.ndarray, int]:
    if classes is None:
        known = np.unique(y)
    else:
        known = np.asarray(classes, dtype=np.float64)
        distinct = np.unique(known).size == known.size
        if known.ndim != 1 or known.size == 0 or not distinct or not np.isfinite(known).all():
            raise DataError(
                f"classes must be a non-empty list of distinct finite numbers, got {classes}."
            )
    order = np.argsort(known, kind="stable")
    pos = np.searchsorted(known[order], y)
    pos = np.clip(pos, 0, known.size - 1)
    found = known[order][pos] == y
    if not found.all():
        i = int(np.flatnonzero(~found)[0])
        raise DataError(
            f"{path}: row at line {lines[i]}, column {target!r}: label {y[i]:g} is not one of the "
            f"classes {[float(c) for c in known]}. Fix the label or add it to classes."
        )
    return order[pos].astype(np.int64), int(known.size)
