"""What every benchmark script shares: command line, machine, timing and medians, key-holder
set-up, JSON, number formats, tables, and sampling the memory of a command's process tree."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console
from rich.table import Table

from fedhe.crypto import PublicContext
from fedhe.errors import FedHEError
from fedhe.keyholder import KeyHolder
from fedhe.keyholder.inprocess import TaggedParties

REPO = Path(__file__).resolve().parent.parent
GB = 1e9
PACKAGES = ("numpy", "torch", "tenseal", "flwr")
SAMPLE_S = 0.2  # RSS sampling period
TOP_PROCESSES = 6  # the largest processes kept at the peak
Timings = dict[str, float]
Rows = list[list[str]]


class MissingExtraError(FedHEError, ImportError):
    """A benchmark needs a package of an optional extra that is not installed."""


class BenchError(FedHEError, RuntimeError):
    """A benchmark cannot go on (parties refused, no twin to compare with, training diverged)."""


# -- command line, machine, output -----------------------------------------------------------


def command_line(
    doc: str, out: str | tuple[str, str] | None = None, quick: bool = False
) -> argparse.ArgumentParser:
    """A parser: the docstring's first paragraph, ``--out`` (default `out`, or the pair
    (full, ``--quick``)) and, with `quick`, ``--quick``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if out is not None:
        shown = out if isinstance(out, str) else out[0]
        parser.add_argument("--out", type=Path, help=f"JSON report ({shown})")
    if quick:
        parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.set_defaults(default_out=out)
    return parser


def parse(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    defaults: dict[str, tuple[Any, Any]] | None = None,
) -> argparse.Namespace:
    """Parse `argv`; an option left unset takes its (full, ``--quick``) default."""
    args = parser.parse_args(argv)
    quick = bool(getattr(args, "quick", False))
    for key, (full, small) in (defaults or {}).items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    out = args.__dict__.pop("default_out")
    if out is not None:
        args.out = args.out or REPO / (out if isinstance(out, str) else out[quick])
    return args


def int_list(text: str) -> list[int]:
    """Comma-separated integers, in the order given, without repeats: "10,100" → [10, 100]."""
    return list(dict.fromkeys(int(p) for p in text.split(",") if p.strip()))


def write_json(path: Path, report: dict[str, Any], console: Console) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {path}")


def machine_info(full: bool = False) -> dict[str, Any]:
    """Platform, cores, Python and package versions; `full` adds the CPU model, RAM, psutil."""
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
    if full:
        psutil = require_psutil()
        info["cpu_model"] = cpu_model() or info["processor"]
        info["ram_gb"] = round(psutil.virtual_memory().total / GB, 1)
        info["psutil"] = psutil.__version__
    return info


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


# -- timing, medians, key holder -------------------------------------------------------------


@contextlib.contextmanager
def timed(into: dict[str, Any], key: str) -> Iterator[None]:
    """The block's wall time: appended to `into[key]` when that is a list, else added to it."""
    started = time.perf_counter()
    yield
    elapsed = time.perf_counter() - started
    if isinstance(into.get(key), list):
        into[key].append(elapsed)
    else:
        into[key] = into.get(key, 0.0) + elapsed


def timed_call(function: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """What one call returns, and its wall time."""
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def seconds(function: Any, *args: Any) -> float:
    """Wall time of one call."""
    return timed_call(function, *args)[1]


STATS = {"median": statistics.median, "max": max, "total": sum}


def stats(name: str, values: list[float], *which: str) -> dict[str, float]:
    """`name`_median, `name`_max, `name`_total (those in `which`) of per-party values."""
    return {f"{name}_{w}": STATS[w](values) for w in which or ("median", "total")}


def summarize(runs: list[Timings]) -> dict[str, Any]:
    """Median of every measure over the repeats, and the raw lists."""
    raw = {key: [run[key] for run in runs] for key in runs[0]}
    return {"median": {key: statistics.median(values) for key, values in raw.items()}, "raw": raw}


def target(value: float, limit: float, at_least: bool = False) -> dict[str, Any]:
    """A bar: the value, its limit (≤, or ≥ with `at_least`) and whether it passes."""
    passed = value >= limit if at_least else value <= limit
    return {"value": value, "limit": limit, "pass": bool(passed)}


def context_of(public: bytes) -> PublicContext | None:
    """The job's public context; None for a plaintext twin (no keys)."""
    return PublicContext.from_bytes(public) if public else None


def register(
    keyholder: KeyHolder, job_id: str, names: Sequence[str]
) -> tuple[TaggedParties, float]:
    """The job's parties registered with the key holder (a twin registers nothing), and the
    seconds that took."""
    started = time.perf_counter()
    parties = TaggedParties(keyholder, job_id, list(names))
    elapsed = time.perf_counter() - started
    if parties.refused:
        raise BenchError(f"the key holder refused parties {parties.refused} of {job_id}.")
    return parties, elapsed


# -- formats and tables ----------------------------------------------------------------------


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-4 else f"{seconds * 1e6:.0f} µs"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def fmt(value: float | None, spec: str = ".2f", unit: str = "", none: str = "-") -> str:
    """`value` as `spec` followed by `unit`, or `none` when it is missing."""
    return none if value is None else f"{value:{spec}}{unit}"


def md_table(headers: Sequence[str], rows: Rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def show(console: Console, title: str, headers: Sequence[str], rows: Rows) -> None:
    """A console table: the first column to the left, the others to the right."""
    table = Table(title=title)
    for index, header in enumerate(headers):
        table.add_column(header, justify="right" if index else "left")
    for cells in rows:
        table.add_row(*cells)
    console.print(table)


def show_targets(console: Console, targets: dict[str, dict[str, Any]]) -> None:
    """The bars of a run (`target`'s dicts): the JSON holds every other figure."""
    rows = [
        [name, f"{t['value']:.4g}", f"{t['limit']:g}", "PASS" if t["pass"] else "FAIL"]
        for name, t in targets.items()
    ]
    show(console, "Bars", ("measure", "measured", "limit", "verdict"), rows)


# -- running other scripts and commands ------------------------------------------------------


def run_script(command: list[str], timeout: float) -> str | None:
    """Run one benchmark script; None when it succeeded, else why (with its stderr's tail)."""
    try:
        subprocess.run(command, cwd=REPO, timeout=timeout, check=True, capture_output=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        tail = getattr(err, "stderr", b"") or b""
        return f"{err}: {tail.decode(errors='replace')[-2000:]}"
    return None


def require_psutil() -> ModuleType:
    try:
        import psutil
    except ImportError as err:
        raise MissingExtraError(
            "benchmark.py samples the memory of its runs with psutil, which is not installed: "
            "pip install -e '.[bench]'."
        ) from err
    return psutil


class Sampler:
    """Peak summed RSS of a process tree; remembers every process it saw (to clean up)."""

    def __init__(self, root: int) -> None:
        self.ps, self.root = require_psutil(), root
        self.seen: dict[int, float] = {}  # pid → create time
        self.peak_rss = self.peak_processes = self.samples = 0
        self.peak_top: list[tuple[str, int]] = []  # the largest processes at the peak

    def sample(self) -> None:
        try:
            root = self.ps.Process(self.root)
            procs = [root, *root.children(recursive=True)]
        except self.ps.Error:
            return
        sizes = []
        for proc in procs:
            with contextlib.suppress(self.ps.Error):
                sizes.append((program(proc), proc.memory_info().rss))
                self.seen.setdefault(proc.pid, proc.create_time())
        total = sum(rss for _, rss in sizes)
        self.samples += 1
        if total > self.peak_rss:
            self.peak_rss = total
            self.peak_top = sorted(sizes, key=lambda item: -item[1])[:TOP_PROCESSES]
        self.peak_processes = max(self.peak_processes, len(procs))

    def kill_leftovers(self) -> int:
        """End the processes of this run still alive (by pid and create time); how many."""
        alive = []
        for pid, created in self.seen.items():
            with contextlib.suppress(self.ps.Error):
                proc = self.ps.Process(pid)
                if proc.create_time() == created:
                    proc.kill()
                    alive.append(proc)
        self.ps.wait_procs(alive, timeout=10)
        return len(alive)


def program(proc: Any) -> str:
    """`fedhe`, `ray::ClientAppActor`, `raylet`, … (the program, not its arguments)."""
    args = proc.cmdline() or [proc.name()]
    if Path(args[0]).name.startswith("python"):
        args = [a for a in args[1:] if not a.startswith("-")] or args
    return Path(args[0].split()[0]).name


def run_sampled(command: list[str], log_path: Path, timeout: float) -> dict[str, Any]:
    """Run `command` (output to `log_path`), sampling its tree's RSS every `SAMPLE_S`; past
    `timeout` the tree is killed. Its exit, wall time, peak RSS and leftovers killed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started, timed_out = time.perf_counter(), False
    deadline = time.monotonic() + timeout
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        sampler = Sampler(proc.pid)
        while proc.poll() is None:
            sampler.sample()
            if time.monotonic() > deadline:
                timed_out = True
                sampler.sample()  # registers the newest descendants
                sampler.kill_leftovers()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=SAMPLE_S)
    return {
        "returncode": proc.returncode,
        "wall_s": round(time.perf_counter() - started, 3),
        "peak_rss_bytes": sampler.peak_rss,
        "peak_processes": sampler.peak_processes,
        "peak_top_processes": [[name, rss] for name, rss in sampler.peak_top],
        "rss_samples": sampler.samples,
        "leftover_processes_killed": sampler.kill_leftovers(),
        "timed_out": timed_out,
    }
