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

With a schema.json (`fedhe.data.schema`), its categorical columns hold text from their
vocabularies and the files must name its columns. The checks live in `check_cells` (one file on
its own) and `check_values` (across files: labels, and the values the job can encrypt, with the
tasks' own bounds, `encryption_limits`); `check_report` holds what they find.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedhe.data.check_cells import (
    check_cells,
    check_header,
    check_same_columns,
    check_schema_columns,
    read_table,
)
from fedhe.data.check_report import ERROR, WARNING, CheckReport, FileSummary, Problem, Table
from fedhe.data.check_values import (
    SMALL_FILE_ROWS,
    Standardized,
    check_labels,
    check_rows,
    check_sum_bounds,
    is_classification,
)
from fedhe.data.csvdata import PARTY_GLOB, TEST_FILE, find_party_files
from fedhe.data.schema import Schema, load_schema
from fedhe.errors import DataError

if TYPE_CHECKING:
    from fedhe.config import JobConfig

__all__ = [
    "ERROR",
    "SMALL_FILE_ROWS",
    "WARNING",
    "CheckReport",
    "FileSummary",
    "Problem",
    "check_data_command",
    "check_files",
    "check_job_data",
    "encryption_limits",
]

log = logging.getLogger("fedhe.data")


def check_files(
    paths_or_dir: str | Path | Sequence[str | Path],
    target: str,
    task: str | None = None,
    schema: str | Path | None = None,
    *,
    parties: int | None = None,
    impute: str = "none",
    standardize: bool = True,
) -> CheckReport:
    """Check a data folder (party-*.csv and test.csv), one file, or a list of files.

    `task` is a fedhe task (aggregate, linreg, logreg, knn, mlp) or None (labels: classes when
    the target holds few whole numbers); `parties` the job's party count (default: the party
    files checked); `impute` "mean" accepts missing feature cells; `standardize` False: KNN
    bounds apply to raw features."""
    report = CheckReport()
    party_paths, test_path = _resolve(paths_or_dir, report)
    loaded = _load_schema(schema, target, report)
    tables: dict[str, Table] = {}
    for path in [*party_paths, *([test_path] if test_path else [])]:
        report.files.append(str(path))
        table = read_table(path, report)
        if table is not None and check_header(table, target, report):
            if loaded is not None:
                check_schema_columns(table, loaded, target, report)
                table.categories = {c.name: c.categories for c in loaded.columns if c.categories}
            check_cells(table, target, impute, report)
            tables[str(path)] = table
    check_same_columns(list(tables.values()), report)
    party_tables = [tables[str(p)] for p in party_paths if str(p) in tables]
    test = tables.get(str(test_path)) if test_path else None
    check_rows(party_tables, test, report)
    if not tables or any(target not in t.header for t in tables.values()):
        return report.collapse()
    all_tables = [*party_tables, *([test] if test else [])]
    labels = np.concatenate([t.column(target) for t in all_tables])
    categorical_target = target in all_tables[0].categories  # labels: its categories
    regression = not categorical_target and not is_classification(task, labels[np.isfinite(labels)])
    if not regression and not categorical_target:
        check_labels(party_tables, test, target, task, report)
    limits = encryption_limits()
    n_parties = parties or max(len(party_paths), 1)
    check_sum_bounds(party_tables, target, regression, n_parties, limits, report)
    if task in ("knn", "mlp") and report.ok:
        bounds = Standardized(target, regression, standardize, limits)
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
        config.schema or None,
        parties=config.parties,
        impute=config.impute,
        standardize=config.knn.standardize,
    )
    report.problems.extend(_party_count(folder, config.parties))
    for warning in report.warnings:
        log.warning("%s", warning.text)
    if report.ok:
        return
    bad = _parties_with_errors(report, folder)
    if bad is None or config.parties - len(bad) < config.min_parties:
        errors = "\n".join(str(p) for p in report.errors)
        raise DataError(f"the data in {config.data_dir} cannot run this job:\n{errors}")
    # As in a real federation, a party whose data cannot take part is left out while
    # min-parties hold: said now, and again in the summary (--strict makes it fail the run).
    for problem in report.errors:
        log.warning(
            "%s (the job goes on without %s while min-parties %d hold)",
            problem.text,
            Path(problem.file).name,
            config.min_parties,
        )


def _parties_with_errors(report: CheckReport, folder: Path) -> set[str] | None:
    """The party files the report's errors concern, or None when leaving them out would not
    help: an error of anything else (test.csv, the folder, the schema), or one that is not a
    data row's (a header, a label set: the other files are read against them)."""
    parties = {str(path.resolve()) for path in folder.glob(PARTY_GLOB)}
    concerned = {str(Path(p.file).resolve()) for p in report.errors} | {
        str(Path(file).resolve()) for file in report.folded
    }
    rows_only = all(p.line is not None and p.line > 1 for p in report.errors)
    return concerned if rows_only and concerned <= parties else None


def _party_count(folder: Path, parties: int) -> list[Problem]:
    """A simulation runs one party per party file: `--parties` must count them."""
    found = len(list(folder.glob(PARTY_GLOB)))
    if not found:
        return [
            Problem(
                str(folder),
                "holds no party files, so the simulation has no parties to run",
                "add one file per party named party-1.csv, party-2.csv, …",
            )
        ]
    if found != parties:
        return [
            Problem(
                str(folder),
                f"holds {found} party files but --parties is {parties}",
                f"pass --parties {found}, or add or remove party files",
            )
        ]
    return []


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
        strays = sorted(p.name for p in path.glob("*.csv") if p.name != TEST_FILE)
        if strays and not has_parties:  # e.g. hospital-a.csv: a job would find no party
            report.problems.append(
                Problem(
                    str(path),
                    f"holds no party-<N>.csv but {', '.join(strays[:3])}",
                    "name the party files party-1.csv, party-2.csv, … (or check one file alone)",
                )
            )
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


def _load_schema(schema: str | Path | None, target: str, report: CheckReport) -> Schema | None:
    if not schema:
        return None
    try:
        loaded = load_schema(schema)
        loaded.check_target(target)
    except DataError as err:
        fix = "fix schema.json (the same file at every site)"
        message = str(err).rstrip(".").removeprefix(f"{schema}: ")  # the Problem names the file
        report.problems.append(Problem(str(schema), message, fix))
        return None
    return loaded


def check_data_command(args: argparse.Namespace) -> int:
    """Print the report of `fedhe check-data`; 0 when the job can run, 1 on errors."""
    report = check_files(
        args.path, args.target, args.task, args.schema, parties=args.parties, impute=args.impute
    )
    print(report.render())
    if report.ok:
        return 0
    count = len(report.errors)
    print(f"{count} error{'s' if count > 1 else ''}: fix them and run fedhe check-data again.")
    return 1
