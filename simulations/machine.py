"""What every benchmark shares: the machine it ran on (so figures can be compared) and how
times and sizes are printed."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

Timings = dict[str, float]

PACKAGES = ("numpy", "torch", "tenseal", "flwr")


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    for package in PACKAGES:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    return info


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-4 else f"{seconds * 1e6:.0f} µs"


def fmt_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


@contextmanager
def timed(into: Timings, key: str) -> Iterator[None]:
    """Add the block's wall time to `into[key]`."""
    started = time.perf_counter()
    yield
    into[key] = into.get(key, 0.0) + time.perf_counter() - started


def summarize(runs: list[Timings]) -> dict[str, Any]:
    """Median of every measure over the repeats, and the raw lists."""
    raw = {key: [run[key] for run in runs] for key in runs[0]}
    return {"median": {key: statistics.median(values) for key, values in raw.items()}, "raw": raw}


def row(phase: str, seconds: float | None, size: float | None = None, note: str = "") -> list[str]:
    """One line of a phase table: time and bytes formatted, blank where unknown."""
    return [
        phase,
        "" if seconds is None else fmt_time(seconds),
        "" if size is None else fmt_bytes(size),
        note,
    ]


def print_phase_table(
    console: Any, title: str, caption: str, value_column: str, rows: list[list[str]]
) -> None:
    """The benchmarks' phase table: phase, a time column, bytes, note."""
    from rich.table import Table

    table = Table(title=title, caption=caption)
    for column, justify in (("phase", "left"), (value_column, "right"), ("bytes", "right")):
        table.add_column(column, justify=justify)
    table.add_column("note", justify="left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
