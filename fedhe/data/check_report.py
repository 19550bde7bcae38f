"""What `fedhe.data.checks` finds: one `Problem` per finding, gathered in a `CheckReport`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

ERROR, WARNING = "error", "warning"
LISTED_LINES = 5  # lines listed for one problem that recurs down a column


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
        return f"{self.severity}: {self.text}"

    @property
    def text(self) -> str:
        """The problem without its severity: file, line, column, value, what and the fix."""
        place = [f"line {self.line}"] if self.line is not None else []
        if self.column is not None:
            place.append(f"column {self.column!r}")
        if self.raw_value is not None:
            place.append(f"value {_shorten(self.raw_value)!r}")
        where = f" {', '.join(place)}:" if place else ""
        return f"{self.file}:{where} {self.message}; {self.fix}."


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
    # Files whose problems `collapse` folded into another file's line: never "ok".
    folded: set[str] = field(default_factory=set)

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
            clean = not any(p.severity == ERROR for p in own) and file not in self.folded
            if summary is not None and clean:
                lines.append(f"ok: {file}: {summary.rows} rows, {summary.features} feature columns")
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
            else replace(same[0], message=f"{same[0].message} (also in {_others(same[1:])})")
            for same in merged.values()
        ]
        self.folded |= {p.file for same in merged.values() for p in same[1:] if p.severity == ERROR}
        return self


@dataclass
class Table:
    """One file's parsed cells: header, stripped fields per row, and each row's file line."""

    path: Path
    header: list[str]
    rows: list[list[str]]
    lines: list[int]
    numbers: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)  # schema's categoricals

    def numeric(self, target: str) -> list[str]:
        """The numeric feature columns."""
        return [c for c in self.header if c != target and c not in self.categories]

    def column(self, name: str) -> np.ndarray:
        return self.numbers[:, self.header.index(name)]

    def raw(self, row: int, name: str) -> str:
        return self.rows[row][self.header.index(name)]


def more_lines(lines: np.ndarray) -> str:
    if lines.size < 2:
        return ""
    listed = ", ".join(str(n) for n in lines[1 : 1 + LISTED_LINES])
    etc = ", …" if lines.size > 1 + LISTED_LINES else ""
    plural = "s" if lines.size > 2 else ""
    return f" (and {lines.size - 1} more in this column: line{plural} {listed}{etc})"


def _others(problems: list[Problem]) -> str:
    names = [Path(p.file).name for p in problems]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more files" if len(names) > 3 else "")


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
