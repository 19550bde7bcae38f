"""Checks across a job's files: row counts, class labels, and the values the job can encrypt.

Value bounds are the tasks' own (`fedhe.data.checks.encryption_limits`): each party's Σx² per
column must fit `fedhe.tasks.moments.SUM_BOUND` shared by the parties; KNN's standardized points
‖z‖² ≤ 64·d and targets |z| ≤ 2^8; the MLP querier's standardized inputs |z| ≤ 2^8. A folder's
standardization is computed here from all its party files, as the job's secure moments will
compute it; from one file alone it is that file's own, so a finding is only a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedhe.data.check_report import (
    ERROR,
    LISTED_LINES,
    WARNING,
    CheckReport,
    FileSummary,
    Problem,
    Table,
    more_lines,
)
from fedhe.data.csvdata import MAX_INFERRED_CLASSES, TEST_FILE

SMALL_FILE_ROWS = 10
_REGRESSION_TASKS = {"linreg"}
_CLASSIFIER_TASKS = {"aggregate", "logreg", "mlp"}
_UNIT_FIX = (
    "change the column's unit (e.g. grams to kilograms) or rescale it (divide it by a power of "
    "ten) in every site's file"
)


def check_rows(parties: list[Table], test: Table | None, report: CheckReport) -> None:
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


def check_labels(
    parties: list[Table],
    test: Table | None,
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


def _labels(table: Table, target: str) -> np.ndarray:
    y = table.column(target)
    return y[np.isfinite(y)]


def _check_whole_labels(table: Table, target: str, report: CheckReport) -> None:
    y = table.column(target)
    fraction = np.flatnonzero(np.isfinite(y) & (y != np.round(y)))
    if fraction.size:
        i = int(fraction[0])
        report.problems.append(
            Problem(
                str(table.path),
                "a class label must be a whole number"
                + more_lines(np.asarray(table.lines)[fraction]),
                "use labels such as 0, 1, 2, or a regression task (linreg) for numeric targets",
                table.lines[i],
                target,
                table.raw(i, target),
            )
        )


def is_classification(task: str | None, labels: np.ndarray) -> bool:
    if task in _REGRESSION_TASKS:
        return False
    if task in _CLASSIFIER_TASKS:
        return True
    whole = bool(np.all(labels == np.round(labels)))
    return whole and np.unique(labels).size <= MAX_INFERRED_CLASSES


def _check_known_labels(
    table: Table, target: str, classes: tuple[float, ...], report: CheckReport
) -> None:
    y = table.column(target)
    whole = np.isfinite(y) & (y == np.round(y))  # a fraction is reported as such
    unknown = np.flatnonzero(whole & ~np.isin(y, classes))
    if unknown.size:
        i = int(unknown[0])
        report.problems.append(
            Problem(
                str(table.path),
                f"label not in {TEST_FILE}, whose labels {list(classes)} are the job's classes"
                f"{more_lines(np.asarray(table.lines)[unknown])}",
                f"fix the label, or add {TEST_FILE} rows of that class",
                table.lines[i],
                target,
                table.raw(i, target),
            )
        )


def check_sum_bounds(
    parties: list[Table],
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
            values = np.where(np.isfinite(values), values, np.nan)  # reported as such
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
class Standardized:
    """KNN points and queries, KNN regression targets and MLP queries, standardized with the
    statistics of all party files as the job's secure moments compute them (from one file
    alone: its own statistics, so a finding is only a warning)."""

    target: str
    regression: bool
    standardize: bool
    limits: dict[str, float]

    def check(
        self, parties: list[Table], test: Table | None, task: str, report: CheckReport
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
        encoded = len(features) + sum(
            len(categories) - 1
            for name, categories in pooled[0].categories.items()
            if name != self.target
        )  # one indicator per category but the first (fedhe.data.schema)
        bound = self.limits["knn_norm_sq_per_feature"] * encoded
        for table in [*parties, *([test] if test else [])]:
            _rows_within(table, features, (mean, std), bound, severity, report)
        if self.regression:
            target_moments = _moments(pooled, [self.target], True)
            for table in parties:
                bound = self.limits["knn_target"]
                _cells_within(table, [self.target], target_moments, bound, severity, report)


def _moments(
    tables: list[Table], columns: list[str], standardize: bool
) -> tuple[np.ndarray, np.ndarray]:
    if not standardize:
        return np.zeros(len(columns)), np.ones(len(columns))
    values = np.vstack([np.column_stack([t.column(c) for c in columns]) for t in tables])
    mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
    return mean, np.where(std > 0, std, 1.0)


def _standardized(
    table: Table, columns: list[str], moments: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """Standardized cells; a missing cell (imputed later to the mean) counts as 0."""
    z = (np.column_stack([table.column(c) for c in columns]) - moments[0]) / moments[1]
    return np.nan_to_num(z, nan=0.0)


def _rows_within(
    table: Table,
    features: list[str],
    moments: tuple[np.ndarray, np.ndarray],
    bound: float,
    severity: str,
    report: CheckReport,
) -> None:
    z = _standardized(table, features, moments)
    for i in np.flatnonzero(np.sum(z**2, axis=1) > bound)[:LISTED_LINES]:
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
    table: Table,
    columns: list[str],
    moments: tuple[np.ndarray, np.ndarray],
    bound: float,
    severity: str,
    report: CheckReport,
) -> None:
    z = _standardized(table, columns, moments)
    for i, j in np.argwhere(np.abs(z) > bound)[:LISTED_LINES]:
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
