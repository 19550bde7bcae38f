"""Check CSV data before a job starts: every problem of every file at once, each on one line.

`check_files` reads a hospital's own file, or a whole data folder (party-*.csv plus test.csv),
and reports every problem it finds as a `Problem` naming the file, the line (as an editor shows
it: the header is line 1), the column, the raw cell and what to do. Errors stop a job; warnings
do not. `fedhe check-data` prints the report; `fedhe simulate --data-dir` runs the same checks
(`check_job_data`) before Flower or Ray start.

What counts as what:
- errors: a missing, empty or non-UTF-8 file; another separator than the comma; blank or
  duplicate column names; rows with another field count than the header; column sets that differ
  between files (another order is fine: files are matched by name); a missing target column;
  text in a numeric column; missing, NaN or infinite cells (missing feature cells are fine with
  `--impute mean`); a class label that is no whole number, or that test.csv lacks (it fixes the
  job's classes); more than two classes for logreg; values the encrypted sums cannot hold.
- warnings: a file with fewer than `SMALL_FILE_ROWS` rows (it trains, but adds little and its
  share of a round is noisy); a party whose rows all carry one class; value bounds estimated
  from a single file's own statistics (the job standardizes with all parties' statistics).

Value bounds are the tasks' own (`encryption_limits`): each party's Σx² per column must fit
`fedhe.tasks.moments.SUM_BOUND` shared by the parties; KNN's standardized points ‖z‖² ≤ 64·d and
targets |z| ≤ 2^8; the MLP querier's standardized inputs |z| ≤ 2^8. A folder's standardization
is computed here from all its party files, as the job's secure moments will compute it.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhe.data.csvdata import (
    MAX_INFERRED_CLASSES,
    MISSING_TOKENS,
    PARTY_GLOB,
    TEST_FILE,
    find_party_files,
)
from fedhe.errors import DataError

if TYPE_CHECKING:
    from fedhe.config import JobConfig

log = logging.getLogger("fedhe.data")

ERROR, WARNING = "error", "warning"
SMALL_FILE_ROWS = 10
_SEPARATORS = {";": "semicolon", "\t": "tab", "|": "pipe"}
_REGRESSION_TASKS = {"linreg"}
_CLASSIFIER_TASKS = {"aggregate", "logreg", "mlp"}
_LISTED_LINES = 5
_IMPUTE_FIX = (
    "--impute mean fills missing values from the secure global means; or fill in the cell or "
    "remove the row"
)
_UNIT_FIX = (
    "change the column's unit (e.g. grams to kilograms) or rescale it (divide it by a power of "
    "ten) in every site's file"
)


@dataclass(frozen=True)
class Problem:
    """One problem of one file; `line`, `column` and `raw_value` when it has a place."""

    file: str
    message: str
    fix: str
    line: int | None = None
    column: str | None = None
    raw_value: str | None = None
    severity: str = ERROR

    def __str__(self) -> str:
        place = [f"line {self.line}"] if self.line is not None else []
        if self.column is not None:
            place.append(f"column {self.column!r}")
        if self.raw_value is not None:
            place.append(f"value {_shorten(self.raw_value)!r}")
        where = f" {', '.join(place)}:" if place else ""
        return f"{self.severity}: {self.file}:{where} {self.message}; {self.fix}."


@dataclass(frozen=True)
class FileSummary:
    file: str
    rows: int
    features: int


@dataclass
class CheckReport:
    """Every problem found, grouped per file in the order the files were checked."""

    files: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    summaries: dict[str, FileSummary] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def render(self, *, severities: Sequence[str] = (ERROR, WARNING)) -> str:
        lines = []
        for file in self.files + sorted({p.file for p in self.problems} - set(self.files)):
            own = [p for p in self.problems if p.file == file and p.severity in severities]
            summary = self.summaries.get(file)
            if summary is not None and not any(p.severity == ERROR for p in own):
                lines.append(f"ok: {file}: {summary.rows} rows, {summary.features} features")
            lines.extend(str(p) for p in own)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    def collapse(self) -> CheckReport:
        """One problem for what every file shares (a --target typo), naming the others."""
        merged: dict[tuple[Any, ...], list[Problem]] = {}
        for problem in self.problems:
            key = (problem.message, problem.fix, problem.line, problem.column, problem.raw_value)
            merged.setdefault(key, []).append(problem)
        self.problems = [
            same[0]
            if len(same) == 1
            else replace(same[0], message=f"{same[0].message} (nor in {_others(same[1:])})")
            for same in merged.values()
        ]
        return self


@dataclass
class _Table:
    """One file's parsed cells: header, stripped fields per row, and each row's file line."""

    path: Path
    header: list[str]
    rows: list[list[str]]
    lines: list[int]
    numbers: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    categorical: set[str] = field(default_factory=set)  # the schema's: not numbers

    def numeric(self, target: str) -> list[str]:
        """The numeric feature columns."""
        return [c for c in self.header if c != target and c not in self.categorical]

    def column(self, name: str) -> np.ndarray:
        return self.numbers[:, self.header.index(name)]

    def raw(self, row: int, name: str) -> str:
        return self.rows[row][self.header.index(name)]


def check_files(
    paths_or_dir: str | Path | Sequence[str | Path],
    target: str,
    task: str | None = None,
    schema: str | Path | None = None,
    *,
    parties: int | None = None,
    impute: str = "",
    standardize: bool = True,
) -> CheckReport:
    """Check a data folder (party-*.csv and test.csv), one file, or a list of files.

    `task` is a fedhe task (aggregate, linreg, logreg, knn, mlp) or None (labels: classes when
    the target holds few whole numbers); `parties` the job's party count (default: the party
    files checked); `impute` "mean" accepts missing feature cells; `standardize` False: KNN
    bounds apply to raw features."""
    report = CheckReport()
    party_paths, test_path = _resolve(paths_or_dir, report)
    categorical = _schema_categoricals(schema, report)
    tables: dict[str, _Table] = {}
    for path in [*party_paths, *([test_path] if test_path else [])]:
        report.files.append(str(path))
        table = _read(path, report)
        if table is not None and _check_header(table, target, report):
            table.categorical = categorical & set(table.header)
            _check_cells(table, target, impute, report)
            tables[str(path)] = table
    _check_same_columns(list(tables.values()), report)
    party_tables = [tables[str(p)] for p in party_paths if str(p) in tables]
    test = tables.get(str(test_path)) if test_path else None
    _check_rows(party_tables, test, report)
    if not tables or any(target not in t.header for t in tables.values()):
        return report.collapse()
    all_tables = [*party_tables, *([test] if test else [])]
    labels = np.concatenate([t.column(target) for t in all_tables])
    regression = not _is_classification(task, labels[np.isfinite(labels)])
    if not regression:
        _check_labels(party_tables, test, target, task, report)
    limits = encryption_limits()
    n_parties = parties or max(len(party_paths), 1)
    _check_sum_bounds(party_tables, target, regression, n_parties, limits, report)
    if task in ("knn", "mlp") and report.ok:
        bounds = _Standardized(target, regression, standardize, limits)
        bounds.check(party_tables, test, task, report)
    return report.collapse()


def check_job_data(config: JobConfig) -> None:
    """Before a simulation starts: check `config`'s data folder and its party count; raise one
    DataError listing every error (warnings are logged). Built-in datasets pass unchecked."""
    if not config.data_dir:
        return
    folder = Path(config.data_dir)
    if not folder.is_dir():
        raise DataError(
            f"--data-dir {folder}: no such folder. Pass a folder holding party-1.csv, "
            "party-2.csv, … (one per party) and test.csv."
        )
    report = check_files(
        config.data_dir,
        config.target,
        config.task,
        getattr(config, "schema", "") or None,
        parties=config.parties,
        impute=str(getattr(config, "impute", "") or ""),
        standardize=config.knn.standardize,
    )
    found = sorted(folder.glob(PARTY_GLOB))
    if not found:
        report.problems.append(
            Problem(
                str(folder),
                "holds no party files, so the simulation has no parties to run",
                "add one file per party named party-1.csv, party-2.csv, …",
            )
        )
    elif len(found) != config.parties:
        report.problems.append(
            Problem(
                str(folder),
                f"holds {len(found)} party files but --parties is {config.parties}",
                f"pass --parties {len(found)}, or add or remove party files",
            )
        )
    for warning in report.warnings:
        log.warning("%s", warning)
    if not report.ok:
        errors = "\n".join(str(p) for p in report.errors)
        raise DataError(f"the data in {config.data_dir} cannot run this job:\n{errors}")


def encryption_limits() -> dict[str, float]:
    """The tasks' bounds on what they encrypt, read from the tasks so they never drift (imported
    here, not at module level: fedhe.data sits below fedhe.tasks and must import without it)."""
    from fedhe.tasks import knn, mlp, moments

    return {
        "sum": moments.SUM_BOUND,
        "knn_norm_sq_per_feature": knn.NORM_SQ_PER_FEATURE,
        "knn_target": knn.LABEL_BOUND,
        "mlp_input": mlp.INPUT_BOUND,
    }


# -- files and tables -------------------------------------------------------------------------


def _resolve(
    paths_or_dir: str | Path | Sequence[str | Path], report: CheckReport
) -> tuple[list[Path], Path | None]:
    """(party files, test.csv or None). One file or a list: each is checked as a party file."""
    if isinstance(paths_or_dir, (str, Path)):
        path = Path(paths_or_dir)
        if not path.is_dir():
            return [path], None
        test = path / TEST_FILE
        has_parties = any(path.glob(PARTY_GLOB))
        try:
            parties = find_party_files(path) if has_parties else []
        except DataError as err:
            report.problems.append(Problem(str(path), str(err).rstrip("."), "rename the files"))
            parties = []
        if not test.is_file():
            report.problems.append(
                Problem(
                    str(path),
                    f"has no {TEST_FILE}: a job evaluates its model on it (and takes its "
                    "classes from it)",
                    f"add {TEST_FILE} with the same columns as the party files",
                )
            )
            return parties, None
        return parties, test
    return [Path(p) for p in paths_or_dir], None


def _read(path: Path, report: CheckReport) -> _Table | None:
    name = str(path)
    if not path.is_file():
        fix = "check the path, or create the file"
        report.problems.append(Problem(name, "no such file", fix))
        return None
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raw = data[max(0, err.start - 10) : err.end + 10].decode("latin-1")
        report.problems.append(
            Problem(name, "is not UTF-8 text", "save it as UTF-8 CSV", line, raw_value=raw)
        )
        return None
    if not text.strip():
        fix = "it needs a header line and data rows"
        report.problems.append(Problem(name, "file is empty", fix))
        return None
    return _parse(path, text, report)


def _parse(path: Path, text: str, report: CheckReport) -> _Table | None:
    reader = csv.reader(io.StringIO(text))
    rows: list[list[str]] = []
    lines: list[int] = []
    start = 1
    try:
        for fields in reader:
            stripped = [f.strip() for f in fields]
            if any(stripped):
                rows.append(stripped)
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as err:
        fix = "save it again as plain CSV"
        report.problems.append(Problem(str(path), f"cannot be read as CSV ({err})", fix, start))
        return None
    if not rows or lines[0] != 1:
        fix = "put the column names on line 1, separated by commas"
        report.problems.append(Problem(str(path), "line 1 must be a header, it is blank", fix, 1))
        return None
    return _Table(path, rows[0], rows[1:], lines[1:])


def _check_header(table: _Table, target: str, report: CheckReport) -> bool:
    """Header problems; False when the cells cannot be checked against the header."""
    name, header = str(table.path), table.header
    separator = _foreign_separator(header)
    if separator:
        report.problems.append(
            Problem(
                name,
                f"looks {_SEPARATORS[separator]}-separated: the header is one field",
                "save it with commas as the separator (e.g. Excel: 'CSV UTF-8 (comma delimited)')",
                1,
                raw_value=header[0],
            )
        )
        return False
    before = len(report.problems)
    for position, column in enumerate(header, start=1):
        if not column:
            report.problems.append(Problem(name, f"column {position} has no name", "name it", 1))
    for column in sorted({c for c in header if c and header.count(c) > 1}):
        report.problems.append(
            Problem(name, "this name appears twice in the header", "rename one", 1, column)
        )
    if target not in header:
        report.problems.append(_missing_target(name, target, header))
    elif len(header) < 2:
        fix = "add the feature columns"
        report.problems.append(Problem(name, "holds only the target column", fix, 1, target))
    _check_field_counts(table, report)
    return len(report.problems) == before


def _foreign_separator(header: list[str]) -> str:
    if len(header) != 1:
        return ""
    counts = {sep: header[0].count(sep) for sep in _SEPARATORS}
    best = max(counts, key=lambda sep: counts[sep])
    return best if counts[best] else ""


def _missing_target(name: str, target: str, header: list[str]) -> Problem:
    close = difflib.get_close_matches(target, header, n=1, cutoff=0.6)
    close += [c for c in header if c.lower() == target.lower() and c not in close]
    guess = f"did you mean {close[0]!r}? " if close else ""
    return Problem(
        name,
        f"target column {target!r} is not in the header (columns: {', '.join(header)})",
        f"{guess}pass the label column's name to --target",
        1,
    )


def _check_field_counts(table: _Table, report: CheckReport) -> None:
    width = len(table.header)
    bad = [i for i, row in enumerate(table.rows) if len(row) != width]
    for i in bad[:_LISTED_LINES]:
        more = f" ({len(bad) - 1} such rows in all)" if len(bad) > 1 and i == bad[0] else ""
        report.problems.append(
            Problem(
                str(table.path),
                f"has {len(table.rows[i])} fields, the header {width}{more}",
                "give every row one field per column (quote fields that hold a comma)",
                table.lines[i],
                raw_value=",".join(table.rows[i]),
            )
        )


# -- cells ------------------------------------------------------------------------------------


def _check_cells(table: _Table, target: str, impute: str, report: CheckReport) -> None:
    """Parse every cell to float64 (NaN where it is no number) and report bad cells per column."""
    import pandas as pd

    frame = pd.DataFrame(table.rows, columns=table.header, dtype=str)
    table.numbers = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    for j, column in enumerate(table.header):
        if column in table.categorical:
            continue
        raw = frame.iloc[:, j].to_numpy(dtype=object)
        _check_column(table, column, raw, table.numbers[:, j], report, target, impute)


def _check_column(
    table: _Table,
    column: str,
    raw: np.ndarray,
    numbers: np.ndarray,
    report: CheckReport,
    target: str,
    impute: str,
) -> None:
    lowered = np.array([text.lower() for text in raw], dtype=object)
    missing = (raw == "") | np.isin(lowered, list(MISSING_TOKENS))
    infinite = np.isinf(numbers)
    text = np.isnan(numbers) & ~missing
    name, lines = str(table.path), np.asarray(table.lines)
    if text.any():
        report.problems.append(_text_problem(name, column, raw, lines, text, missing))
    if missing.any() and (column == target or impute != "mean"):
        fix = "fill in the label or remove the row" if column == target else _IMPUTE_FIX
        first = int(np.flatnonzero(missing)[0])
        report.problems.append(
            Problem(
                name,
                f"missing value{_more_lines(lines[missing])}",
                fix,
                int(lines[first]),
                column,
                str(raw[first]),
            )
        )
    if infinite.any():
        first = int(np.flatnonzero(infinite)[0])
        report.problems.append(
            Problem(
                name,
                f"infinite value{_more_lines(lines[infinite])}: it cannot be encrypted",
                "replace it with a finite number or remove the row",
                int(lines[first]),
                column,
                str(raw[first]),
            )
        )


def _text_problem(
    name: str,
    column: str,
    raw: np.ndarray,
    lines: np.ndarray,
    text: np.ndarray,
    missing: np.ndarray,
) -> Problem:
    first = int(np.flatnonzero(text)[0])
    example = str(raw[first])
    if text.sum() * 2 >= (~missing).sum():
        return Problem(
            name,
            f"column {column!r} holds text (e.g. {example!r} on line {lines[first]})",
            "give it a schema.json entry as categorical, or encode it as numbers",
            int(lines[first]),
            column,
            example,
        )
    decimal_comma = example.replace(",", "", 1).lstrip("-").isdigit() and "," in example
    fix = (
        "write it with a decimal point"
        if decimal_comma
        else "use a plain number such as 3 or -1.5e-2"
    )
    return Problem(
        name, f"not a number{_more_lines(lines[text])}", fix, int(lines[first]), column, example
    )


def _more_lines(lines: np.ndarray) -> str:
    if lines.size < 2:
        return ""
    listed = ", ".join(str(n) for n in lines[1 : 1 + _LISTED_LINES])
    etc = ", …" if lines.size > 1 + _LISTED_LINES else ""
    plural = "s" if lines.size > 2 else ""
    return f" (and {lines.size - 1} more in this column: line{plural} {listed}{etc})"


# -- across files -----------------------------------------------------------------------------


def _check_same_columns(tables: list[_Table], report: CheckReport) -> None:
    """Every file holds the first file's column names; another order is fine (matched by name)."""
    if not tables:
        return
    reference = tables[0]
    expected = set(reference.header)
    for table in tables[1:]:
        missing = [c for c in reference.header if c not in table.header]
        extra = [c for c in table.header if c not in expected]
        if missing or extra:
            report.problems.append(
                Problem(
                    str(table.path),
                    f"its columns differ from {reference.path.name}'s (missing: "
                    f"{missing or 'none'}; extra: {extra or 'none'})",
                    "give every file the same column names (their order may differ)",
                    1,
                )
            )


def _check_rows(parties: list[_Table], test: _Table | None, report: CheckReport) -> None:
    for table in [*parties, *([test] if test else [])]:
        rows, features = len(table.rows), len(table.header) - 1
        report.summaries[str(table.path)] = FileSummary(str(table.path), rows, features)
        if rows == 0:
            fix = "add at least one data row"
            report.problems.append(Problem(str(table.path), "header only, no data rows", fix))
        elif rows < SMALL_FILE_ROWS:
            report.problems.append(
                Problem(
                    str(table.path),
                    f"only {rows} data rows (fewer than {SMALL_FILE_ROWS}): it adds little to "
                    "the model and its results are noisy",
                    "check that the export is complete, or leave this site out",
                    severity=WARNING,
                )
            )


def _check_labels(
    parties: list[_Table],
    test: _Table | None,
    target: str,
    task: str | None,
    report: CheckReport,
) -> None:
    """Whole-number labels, all of them in test.csv (its labels are the job's classes)."""
    tables = [*parties, *([test] if test else [])]
    for table in tables:
        _check_whole_labels(table, target, report)
    labels = sorted(set(np.concatenate([_labels(t, target) for t in tables]).tolist()))
    if task == "logreg" and len(labels) > 2:
        report.problems.append(
            Problem(
                str(tables[0].path),
                f"logreg is binary but the labels are {labels[:10]}",
                "use the aggregate task (softmax model) for more classes",
                column=target,
            )
        )
    if test is not None:
        classes = tuple(sorted(set(_labels(test, target).tolist())))
        for table in parties:
            _check_known_labels(table, target, classes, report)
    for table in parties:
        distinct = np.unique(_labels(table, target))
        if distinct.size == 1 and len(table.rows) >= SMALL_FILE_ROWS:
            report.problems.append(
                Problem(
                    str(table.path),
                    f"every row has label {distinct[0]:g}",
                    "fine for the protocol; check that the export is not one class only",
                    column=target,
                    severity=WARNING,
                )
            )


def _labels(table: _Table, target: str) -> np.ndarray:
    y = table.column(target)
    return y[np.isfinite(y)]


def _check_whole_labels(table: _Table, target: str, report: CheckReport) -> None:
    y = table.column(target)
    fraction = np.flatnonzero(np.isfinite(y) & (y != np.round(y)))
    if fraction.size:
        i = int(fraction[0])
        report.problems.append(
            Problem(
                str(table.path),
                "a class label must be a whole number"
                + _more_lines(np.asarray(table.lines)[fraction]),
                "use labels such as 0, 1, 2, or a regression task (linreg) for numeric targets",
                table.lines[i],
                target,
                table.raw(i, target),
            )
        )


def _is_classification(task: str | None, labels: np.ndarray) -> bool:
    if task in _REGRESSION_TASKS:
        return False
    if task in _CLASSIFIER_TASKS:
        return True
    whole = bool(np.all(labels == np.round(labels)))
    return whole and np.unique(labels).size <= MAX_INFERRED_CLASSES


def _check_known_labels(
    table: _Table, target: str, classes: tuple[float, ...], report: CheckReport
) -> None:
    y = table.column(target)
    unknown = np.flatnonzero(np.isfinite(y) & ~np.isin(y, classes))
    if unknown.size:
        i = int(unknown[0])
        report.problems.append(
            Problem(
                str(table.path),
                f"label not in {TEST_FILE}, whose labels {list(classes)} are the job's classes"
                f"{_more_lines(np.asarray(table.lines)[unknown])}",
                f"fix the label, or add {TEST_FILE} rows of that class",
                table.lines[i],
                target,
                table.raw(i, target),
            )
        )


# -- what the job can encrypt -----------------------------------------------------------------


def _check_sum_bounds(
    parties: list[_Table],
    target: str,
    regression: bool,
    n_parties: int,
    limits: dict[str, float],
    report: CheckReport,
) -> None:
    """Each party sends Σ x² of every feature (and a regression target) under one sum bound
    shared by all parties: report the column's largest raw cell where Σ x² would pass it."""
    limit = limits["sum"] / n_parties
    for table in parties:
        for column in table.numeric(target) + ([target] if regression else []):
            values = table.column(column)
            if float(np.nansum(values**2)) <= limit:
                continue
            i = int(np.nanargmax(np.abs(values)))
            within = math.sqrt(limit / max(len(values), 1))
            report.problems.append(
                Problem(
                    str(table.path),
                    f"{values[i]:g} is too large to encrypt: the job sums squares of each column "
                    f"under a bound of 2^50 shared by {n_parties} parties, so this file's "
                    f"values of {column!r} must stay within about ±{within:.3g}",
                    _UNIT_FIX,
                    table.lines[i],
                    column,
                    table.raw(i, column),
                )
            )


@dataclass(frozen=True)
class _Standardized:
    """KNN points and queries, KNN regression targets and MLP queries, standardized with the
    statistics of all party files as the job's secure moments compute them (from one file
    alone: its own statistics, so a finding is only a warning)."""

    target: str
    regression: bool
    standardize: bool
    limits: dict[str, float]

    def check(
        self, parties: list[_Table], test: _Table | None, task: str, report: CheckReport
    ) -> None:
        pooled = parties or ([test] if test else [])
        features = pooled[0].numeric(self.target)
        severity = ERROR if len(parties) > 1 else WARNING
        mean, std = _moments(pooled, features, self.standardize)
        if task == "mlp":
            if test is not None:
                bound = self.limits["mlp_input"]
                _cells_within(test, features, (mean, std), bound, severity, report)
            return
        bound = self.limits["knn_norm_sq_per_feature"] * len(features)
        for table in [*parties, *([test] if test else [])]:
            _rows_within(table, features, (mean, std), bound, severity, report)
        if self.regression:
            target_moments = _moments(pooled, [self.target], True)
            for table in parties:
                bound = self.limits["knn_target"]
                _cells_within(table, [self.target], target_moments, bound, severity, report)


def _moments(
    tables: list[_Table], columns: list[str], standardize: bool
) -> tuple[np.ndarray, np.ndarray]:
    if not standardize:
        return np.zeros(len(columns)), np.ones(len(columns))
    values = np.vstack([np.column_stack([t.column(c) for c in columns]) for t in tables])
    mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
    return mean, np.where(std > 0, std, 1.0)


def _standardized(
    table: _Table, columns: list[str], moments: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """Standardized cells; a missing cell (imputed later to the mean) counts as 0."""
    z = (np.column_stack([table.column(c) for c in columns]) - moments[0]) / moments[1]
    return np.nan_to_num(z, nan=0.0)


def _rows_within(
    table: _Table,
    features: list[str],
    moments: tuple[np.ndarray, np.ndarray],
    bound: float,
    severity: str,
    report: CheckReport,
) -> None:
    z = _standardized(table, features, moments)
    for i in np.flatnonzero(np.sum(z**2, axis=1) > bound)[:_LISTED_LINES]:
        j = int(np.argmax(np.abs(z[i])))
        report.problems.append(
            Problem(
                str(table.path),
                f"this row lies too far out for KNN's encrypted distances: its standardized "
                f"squared length {np.sum(z[i] ** 2):.4g} passes {bound:g} (64 per feature); this "
                f"cell lies {z[i, j]:+.3g} standard deviations from the mean",
                "check the cell for a unit or typing error, or remove the outlier row",
                table.lines[i],
                features[j],
                table.raw(int(i), features[j]),
                severity,
            )
        )


def _cells_within(
    table: _Table,
    columns: list[str],
    moments: tuple[np.ndarray, np.ndarray],
    bound: float,
    severity: str,
    report: CheckReport,
) -> None:
    z = _standardized(table, columns, moments)
    for i, j in np.argwhere(np.abs(z) > bound)[:_LISTED_LINES]:
        report.problems.append(
            Problem(
                str(table.path),
                f"lies {z[i, j]:+.3g} standard deviations from the mean, past the {bound:g} the "
                "job can encrypt",
                "check the cell for a unit or typing error, or remove the outlier row",
                table.lines[i],
                columns[j],
                table.raw(int(i), columns[j]),
                severity,
            )
        )


# -- schema -----------------------------------------------------------------------------------


def _schema_categoricals(schema: str | Path | None, report: CheckReport) -> set[str]:
    """Columns the schema declares categorical: their text is the schema's to check.
    TODO(lead): validate the cells against the vocabularies once fedhe.data.schema lands."""
    if not schema:
        return set()
    try:
        from fedhe.data import schema as schema_module
    except ImportError:
        fix = "drop --schema, or update fedhe"
        report.problems.append(Problem(str(schema), "this fedhe cannot read schema files", fix))
        return set()
    loaded = schema_module.load_schema(Path(schema))
    return set(getattr(loaded, "categorical", ()) or ())


# -- command line -----------------------------------------------------------------------------


def add_check_data_command(commands: Any) -> None:
    """`fedhe check-data DIR_OR_FILE --target COL [--task T] [--schema F]` on `commands`
    (argparse sub-parsers)."""
    parser = commands.add_parser(
        "check-data",
        help="check CSV files before a job: one site's file, or a data folder",
        description="Check one site's CSV file, or a data folder (party-*.csv and test.csv), "
        "the way a job will read it: every problem with its file, line, column and value.",
    )
    parser.add_argument("path", help="a CSV file, or a folder with party-*.csv and test.csv")
    parser.add_argument("--target", required=True, help="the label column")
    parser.add_argument(
        "--task",
        choices=("aggregate", "linreg", "logreg", "knn", "mlp"),
        default=None,
        help="the job's task: its labels and the values it can encrypt (default: labels are "
        "classes when the target holds few whole numbers)",
    )
    parser.add_argument("--schema", default=None, help="the schema.json all sites share")
    parser.add_argument("--parties", type=int, default=None, help="the job's party count")
    parser.add_argument(
        "--impute", choices=("", "mean"), default="", help="mean: missing feature cells are filled"
    )


def check_data_command(args: argparse.Namespace) -> int:
    """Print the report of `fedhe check-data`; 0 when the job can run, 1 on errors."""
    report = check_files(
        args.path, args.target, args.task, args.schema, parties=args.parties, impute=args.impute
    )
    print(report.render())
    if report.ok:
        return 0
    print(f"{len(report.errors)} errors: fix them and run fedhe check-data again.")
    return 1


def _others(problems: list[Problem]) -> str:
    names = [Path(p.file).name for p in problems]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more files" if len(names) > 3 else "")


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
