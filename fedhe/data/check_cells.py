"""Checks of one CSV file on its own: the file, its header, its rows and every cell.

Cells are parsed as `fedhe.data.csvdata` parses them (stripped text, `pandas.to_numeric`, the same
missing-value tokens), so a file that passes here loads there.
"""

from __future__ import annotations

import csv
import difflib
import io
from pathlib import Path

import numpy as np

from fedhe.data.check_report import LISTED_LINES, CheckReport, Problem, Table, more_lines
from fedhe.data.csvdata import MISSING_TOKENS
from fedhe.data.schema import Schema

_SEPARATORS = {";": "semicolon", "\t": "tab", "|": "pipe"}
_IMPUTE_FIX = (
    "--impute mean fills missing values from the secure global means; or fill in the cell or "
    "remove the row"
)


def read_table(path: Path, report: CheckReport) -> Table | None:
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


def _parse(path: Path, text: str, report: CheckReport) -> Table | None:
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
    return Table(path, rows[0], rows[1:], lines[1:])


def check_header(table: Table, target: str, report: CheckReport) -> bool:
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


def _check_field_counts(table: Table, report: CheckReport) -> None:
    width = len(table.header)
    bad = [i for i, row in enumerate(table.rows) if len(row) != width]
    for i in bad[:LISTED_LINES]:
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


def check_cells(table: Table, target: str, impute: str, report: CheckReport) -> None:
    """Parse every cell to float64 (NaN where it is no number) and report bad cells per column."""
    import pandas as pd

    frame = pd.DataFrame(table.rows, columns=table.header, dtype=str)
    table.numbers = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    for j, column in enumerate(table.header):
        raw = frame.iloc[:, j].to_numpy(dtype=object)
        if column in table.categories:
            _check_categories(table, column, raw, report, target, impute)
        else:
            _check_column(table, column, raw, table.numbers[:, j], report, target, impute)


def _check_column(
    table: Table,
    column: str,
    raw: np.ndarray,
    numbers: np.ndarray,
    report: CheckReport,
    target: str,
    impute: str,
) -> None:
    missing = _missing(raw)
    infinite = np.isinf(numbers)
    text = np.isnan(numbers) & ~missing
    name, lines = str(table.path), np.asarray(table.lines)
    if text.any():
        report.problems.append(_text_problem(name, column, raw, lines, text, missing))
    _check_missing(table, column, raw, missing, report, target, impute)
    if infinite.any():
        first = int(np.flatnonzero(infinite)[0])
        report.problems.append(
            Problem(
                name,
                f"infinite value{more_lines(lines[infinite])}: it cannot be encrypted",
                "replace it with a finite number or remove the row",
                int(lines[first]),
                column,
                str(raw[first]),
            )
        )


def _check_categories(
    table: Table, column: str, raw: np.ndarray, report: CheckReport, target: str, impute: str
) -> None:
    """A schema's categorical column: every cell one of its categories (as text), or missing."""
    categories = table.categories[column]
    missing = _missing(raw)
    unknown = ~missing & ~np.isin(raw.astype(str), list(categories))
    if unknown.any():
        lines = np.asarray(table.lines)
        first = int(np.flatnonzero(unknown)[0])
        report.problems.append(
            Problem(
                str(table.path),
                f"not one of the schema's categories {list(categories)} (compared as text, "
                f"case-sensitive){more_lines(lines[unknown])}",
                f"add it to the categories of {column!r} in schema.json (the same file at every "
                "site), or fix the cell",
                int(lines[first]),
                column,
                str(raw[first]),
            )
        )
    _check_missing(table, column, raw, missing, report, target, impute)


def _missing(raw: np.ndarray) -> np.ndarray:
    lowered = np.array([text.lower() for text in raw], dtype=object)
    return np.asarray((raw == "") | np.isin(lowered, list(MISSING_TOKENS)), dtype=bool)


def _check_missing(
    table: Table,
    column: str,
    raw: np.ndarray,
    missing: np.ndarray,
    report: CheckReport,
    target: str,
    impute: str,
) -> None:
    """Missing cells are errors, but for features of a job that imputes (`--impute mean`)."""
    name, lines = str(table.path), np.asarray(table.lines)
    if missing.any() and (column == target or impute != "mean"):
        fix = "fill in the label or remove the row" if column == target else _IMPUTE_FIX
        first = int(np.flatnonzero(missing)[0])
        report.problems.append(
            Problem(
                name,
                f"missing value{more_lines(lines[missing])}",
                fix,
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
        name, f"not a number{more_lines(lines[text])}", fix, int(lines[first]), column, example
    )


def check_schema_columns(table: Table, schema: Schema, target: str, report: CheckReport) -> None:
    """The file and schema.json name the same columns (the target may be left out of it)."""
    expected = [c.name for c in schema.columns] + ([] if schema.column(target) else [target])
    extra = [name for name in table.header if name not in expected]
    missing = [name for name in expected if name not in table.header]
    if extra or missing:
        report.problems.append(
            Problem(
                str(table.path),
                f"columns not in {schema.origin}: {extra or 'none'}; columns of "
                f"{schema.origin} missing here: {missing or 'none'}",
                f"make the file and {schema.origin} name the same columns (in any order)",
                1,
            )
        )


def check_same_columns(tables: list[Table], report: CheckReport) -> None:
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
