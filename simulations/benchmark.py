"""One command, one report: every fedhe job through ``fedhe simulate``, HE vs its plaintext twin.

Each run is the real command line a user types (``fedhe simulate TASK …``), started as a
subprocess in its own ``--out`` folder under a temporary directory, with the plaintext twin on
(no ``--encrypted-only``), so one run gives both the HE job and the same job in the clear.

* Jobs (``--tasks``, default all five), at a small (``--small``, 5) and a large (``--large``,
  100) number of parties, with the settings of ``TASK_ARGS`` below:
  aggregate (3 rounds), linreg (exact mode), logreg (20 rounds, lr 4, full batch), knn, mlp
  (5 rounds); min-parties 2 everywhere. Each job keeps its task's default data set unless the
  data set has fewer training rows than parties: then a regression job moves to ``synthetic``
  (2000 rows, 20 features, regression only) and a classification job runs anyway (its failure,
  if any, is recorded with its error message).
* Sweep (``--sweep``, default 10,100,1000): linreg in exact mode at each number of parties, one
  data set for the whole sweep (``--sweep-dataset``; by default ``synthetic`` when diabetes has
  fewer rows than its largest point); fits time = a + b·parties and bytes = a + b·parties, and
  reports the marginal cost per added party on each segment (constant if and only if linear).
* Per run, read back from result.json: ``timings_s.total`` (HE job) and
  ``plaintext_timings_s.total`` (twin), bytes party→aggregator of both, the final test metric of
  both (accuracy; R² and MSE for linreg), ``round_trips``. Measured here: the wall time of the
  command and its peak RSS (max over time of the summed RSS of the ``fedhe`` process and all its
  descendants, Ray's processes included, sampled every 0.2 s with psutil).
* The small size runs ``--repeats`` times (3), the large size and the sweep points
  ``--large-repeats`` times (1); tables show medians (peak RSS: the max over repeats).
  A run that fails or passes ``--timeout`` (1800 s) is recorded with its error and not repeated.

* Two in-process benchmarks, each its own section: the HE-FedAvg round
  (``simulations/bench_aggregate.py``, in process and through Flower; ``--fedavg-rounds``) and
  what verifying a sum costs, "Verifying sums (MAC)" (``simulations/bench_verify.py``: parties
  tagging, registration, the key holder's tag check next to its decryption;
  ``--verify-parties`` × ``--verify-sizes``).
* KNN in process, "KNN: speed and what the key holder learns": ``simulations/bench_knn.py``
  (10,000 points, d = 30; the issue's bars) and ``simulations/attack_knn.py`` (the key holder's
  reconstruction attacks, old vs new protocol); ``--knn`` (on; ``--knn false``: off).

Writes ``benchmarks/README.md`` (machine, command, tables, memory at the peak and its growth
with parties, failures, how measured), ``benchmarks/*.png`` (sweep time and bytes, accuracy HE
vs plaintext per task) and ``benchmarks/benchmark.json`` (every raw run). ``--from-json FILE``
renders the report again from a saved benchmark.json without running anything.

Run:  .venv/bin/python simulations/benchmark.py [--quick] [--tasks linreg,knn] [--repeats 3]
      (``--quick``: small size only, 1 repeat, sweep 10,20, verification at 10,100 parties and
      8,192 values; writes to benchmarks/quick/)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend
import numpy as np
from machine import fmt_time, machine_info
from rich.console import Console
from rich.table import Table

from fedhe.config import DEFAULT_DATASET, TASKS
from fedhe.data.datasets import BUILTIN_DATASETS, load_builtin

# Both cores: the same job on 1 Ray actor and on 2 (every node's work, parties' encryption
# included, runs on these actors; the aggregator and Ray's own processes share the machine).
CORES_JOBS = (("aggregate", 10), ("linreg", 100))
TASK_ARGS: dict[str, list[str]] = {
    "aggregate": ["--min-parties", "2", "--rounds", "3"],
    "linreg": ["--min-parties", "2"],
    "logreg": ["--min-parties", "2", "--rounds", "20", "--lr", "4", "--batch-size", "0"],
    "knn": ["--min-parties", "2"],
    "mlp": ["--min-parties", "2", "--rounds", "5"],
}
METRIC = {"linreg": "r2"}  # every other task: accuracy
METRIC_LABEL = {"r2": "R²", "accuracy": "accuracy"}
UPLOAD = "party->aggregator"
SAMPLE_S = 0.2
TOP_PROCESSES = 6
RSS_BAR_GB = 6.0
GB = 1e9
REPO = Path(__file__).resolve().parent.parent
FEDAVG_BENCH = Path(__file__).resolve().with_name("bench_aggregate.py")
FEDAVG_PARTIES = 10  # the bar: HE-FedAvg round ≤ 1.5× plaintext, 100k params, 10 parties
VERIFY_BENCH = Path(__file__).resolve().with_name("bench_verify.py")
KNN_BENCH = Path(__file__).resolve().with_name("bench_knn.py")
KNN_ATTACKS = Path(__file__).resolve().with_name("attack_knn.py")
THRESHOLD_BENCH = Path(__file__).resolve().with_name("bench_threshold.py")
VERIFY_DEFAULTS = {False: ("10,100,1000", "8192,100000"), True: ("10,100", "8192")}  # by --quick
DEFAULT_OUT = {False: REPO / "benchmarks", True: REPO / "benchmarks" / "quick"}


def _load_psutil() -> ModuleType:
    """psutil itself, or the copy Ray vendors under ray/thirdparty_files."""
    try:
        import psutil
    except ImportError:
        spec = importlib.util.find_spec("ray")
        if spec is None or spec.origin is None:
            raise SystemExit("benchmark.py needs psutil (pip install psutil, or ray).") from None
        sys.path.append(str(Path(spec.origin).parent / "thirdparty_files"))
        import psutil
    return psutil


psutil = _load_psutil()


@dataclass(frozen=True)
class Job:
    """One configuration to run: a task at a number of parties on a data set."""

    task: str
    parties: int
    size: str  # "small", "large", "sweep" or "cores"
    repeats: int
    dataset: str  # "" = the task's default
    workers: int | None = None  # Ray actors (`--workers`); None: one per core

    @property
    def label(self) -> str:
        """The data set, and the workers when they are set."""
        if self.workers is None:
            return self.dataset_name
        return f"{self.dataset_name}, {self.workers} worker{'s' * (self.workers > 1)}"

    @property
    def dataset_name(self) -> str:
        return self.dataset or DEFAULT_DATASET[self.task]

    def argv(self, out: str) -> list[str]:
        args = ["simulate", self.task, "--parties", str(self.parties), *TASK_ARGS[self.task]]
        if self.dataset:
            args += ["--dataset", self.dataset]
        if self.workers is not None:
            args += ["--workers", str(self.workers)]
        return [*args, "--out", out]

    def display(self) -> str:
        return shlex.join(["fedhe", *self.argv("OUT")])


@dataclass
class Sampler:
    """Peak summed RSS of a process tree; remembers every process it saw (to clean up)."""

    root: int
    seen: dict[int, float] = field(default_factory=dict)  # pid → create time
    peak_rss: int = 0
    peak_processes: int = 0
    samples: int = 0
    peak_top: list[tuple[str, int]] = field(default_factory=list)  # largest processes at peak

    def sample(self) -> None:
        try:
            root = psutil.Process(self.root)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        sizes = []
        for proc in procs:
            try:
                sizes.append((process_label(proc), proc.memory_info().rss))
                self.seen.setdefault(proc.pid, proc.create_time())
            except psutil.Error:
                continue
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
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    proc.kill()
                    alive.append(proc)
            except psutil.Error:
                continue
        psutil.wait_procs(alive, timeout=10)
        return len(alive)


def process_label(proc: Any) -> str:
    """`fedhe`, `ray::ClientAppActor`, `raylet`, … (the program, not its arguments)."""
    try:
        args = proc.cmdline()
    except psutil.Error:
        args = []
    if not args:
        return proc.name()
    if Path(args[0]).name.startswith("python"):
        args = [a for a in args[1:] if not a.startswith("-")] or args
    return Path(args[0].split()[0]).name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset")
    parser.add_argument("--small", type=int, default=5, help="parties, small size (5; 0: off)")
    parser.add_argument("--large", type=int, default=100, help="parties, large size (100; 0: off)")
    parser.add_argument("--sweep", help="linreg parties sweep (10,100,1000; --quick 10,20)")
    parser.add_argument(
        "--sweep-dataset",
        default="",
        help="data set of the whole sweep (default: diabetes, or "
        "synthetic when diabetes has fewer training rows than the largest sweep point)",
    )
    parser.add_argument("--repeats", type=int, help="runs per small job (3; --quick 1)")
    parser.add_argument(
        "--cores",
        default="1,2",
        help="Ray worker counts to compare on CORES_JOBS (1,2; empty or --quick: off)",
    )
    parser.add_argument("--large-repeats", type=int, default=1, help="runs per large job (1)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run (1800)")
    parser.add_argument(
        "--fedavg-rounds",
        type=int,
        help="rounds of the HE-FedAvg round-time benchmark (bench_aggregate.py, 100k params, "
        "10 parties; 12, --quick 4; 0: off)",
    )
    parser.add_argument(
        "--verify-parties",
        help="parties of the sum-verification benchmark (bench_verify.py; 10,100,1000, --quick "
        "10,100; empty: off)",
    )
    parser.add_argument(
        "--verify-sizes",
        help="values per update of the sum-verification benchmark (8192,100000; --quick 8192)",
    )
    parser.add_argument(
        "--knn",
        default="true",
        choices=("true", "false"),
        help="run bench_knn.py and attack_knn.py (true)",
    )
    parser.add_argument(
        "--threshold",
        default="true",
        choices=("true", "false"),
        help="run bench_threshold.py: key-holder group set-up and overhead (true)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: small size, 1 repeat")
    parser.add_argument("--out-dir", type=Path, help="report folder (benchmarks/)")
    parser.add_argument("--keep-runs", type=Path, help="keep run folders here (default: temp)")
    parser.add_argument(
        "--from-json", type=Path, help="run nothing: render the report again from this JSON"
    )
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown or not args.tasks:
        parser.error(f"unknown tasks {unknown}; choose from {list(TASKS)}.")
    if args.sweep is None:
        args.sweep = "10,20" if args.quick else "10,100,1000"
    args.sweep = sorted({int(p) for p in args.sweep.split(",") if p.strip()})
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.cores = sorted({int(w) for w in args.cores.split(",") if w.strip()})
    if args.fedavg_rounds is None:
        args.fedavg_rounds = 4 if args.quick else 12
    verify_parties, verify_sizes = VERIFY_DEFAULTS[args.quick]
    args.verify_parties = _int_list(
        verify_parties if args.verify_parties is None else args.verify_parties
    )
    args.verify_sizes = _int_list(verify_sizes if args.verify_sizes is None else args.verify_sizes)
    if args.quick:
        args.large = 0
        args.cores = []
    args.out_dir = args.out_dir or DEFAULT_OUT[args.quick]
    if (
        args.small == 1
        or args.large == 1
        or min(args.repeats, args.large_repeats) < 1
        or min(args.sweep, default=2) < 2
        or min(args.verify_parties, default=2) < 2
    ):
        parser.error("parties must be ≥ 2 (the key holder's floor) and repeats ≥ 1.")
    if min(args.verify_sizes, default=1) < 1:
        parser.error("--verify-sizes must be ≥ 1 values.")
    return args


def _int_list(text: str) -> list[int]:
    """Comma-separated integers, in the order given, without repeats: "10,100" → [10, 100]."""
    return list(dict.fromkeys(int(p) for p in text.split(",") if p.strip()))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console(width=230)
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        report["sweep_fit"] = sweep_fit(report["jobs"])
        write_report(report, args.out_dir, console)
        return
    started = time.perf_counter()
    jobs = plan(args)
    console.print(f"{len(jobs)} jobs, {sum(j.repeats for j in jobs)} runs at most")
    with tempfile.TemporaryDirectory(prefix="fedhe-benchmark-") as tmp:
        runs_dir = args.keep_runs or Path(tmp)
        records = [run_job(job, runs_dir, args.timeout, console) for job in jobs]
    fedavg = run_fedavg(args.fedavg_rounds, args.out_dir, args.timeout, console)
    verify = run_verify(args.verify_parties, args.verify_sizes, args.out_dir, args.timeout, console)
    knn = run_knn(args.quick, args.out_dir, args.timeout, console) if args.knn == "true" else None
    threshold = (
        run_threshold(args.out_dir, args.timeout, console) if args.threshold == "true" else None
    )
    report = {
        "benchmark": "every fedhe job through `fedhe simulate`: HE vs plaintext twin",
        "command": shlex.join(["python", "simulations/benchmark.py", *(argv or sys.argv[1:])]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "jobs": records,
        "sweep_fit": sweep_fit(records),
        "fedavg": fedavg,
        "verify": verify,
        "knn": knn,
        "threshold": threshold,
        "wall_s": time.perf_counter() - started,
    }
    write_report(report, args.out_dir, console)


def cores_section(records: list[dict[str, Any]]) -> str:
    """What the second core buys: the same job on 1 and on 2 Ray workers."""
    by_job: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for record in records:
        if record["size"] == "cores" and record["median"] is not None:
            by_job.setdefault((record["task"], record["parties"]), {})[record["workers"]] = record
    lines = []
    for (task, parties), runs in sorted(by_job.items()):
        if len(runs) < 2:
            continue
        fewest, most = min(runs), max(runs)
        one, many = runs[fewest]["median"], runs[most]["median"]
        lines.append(
            f"| {task} | {parties} | {one['he_total_s']:.1f} → {many['he_total_s']:.1f} s "
            f"(**{one['he_total_s'] / many['he_total_s']:.2f}×**) | "
            f"{one['plain_total_s']:.1f} → {many['plain_total_s']:.1f} s "
            f"({one['plain_total_s'] / many['plain_total_s']:.2f}×) |"
        )
    if not lines:
        return ""
    header = (
        "Speed-up from the second core (the same job on 1 → 2 Ray workers; HE and plaintext "
        "job totals, medians):\n\n| task | parties | HE | plaintext twin |\n|---|---|---|---|\n"
    )
    return header + "\n".join(lines) + "\n"


# -- the HE-FedAvg round ---------------------------------------------------------------------


def run_fedavg(
    rounds: int, out_dir: Path, timeout: float, console: Console
) -> dict[str, Any] | None:
    """bench_aggregate.py in process and through Flower; its figures for the report."""
    if rounds < 1:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "aggregate.json"
    out.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(FEDAVG_BENCH),
        "--parties",
        str(FEDAVG_PARTIES),
        "--rounds",
        "3",
        "--flower",
        "--flower-rounds",
        str(rounds),
        "--out",
        str(out),
    ]
    console.print(f"HE-FedAvg round: {shlex.join(command)}")
    error = _run_script(command, timeout)
    return {"error": error} if error else fedavg_figures(json.loads(out.read_text()))


def _run_script(command: list[str], timeout: float) -> str | None:
    """Run one benchmark script; None when it succeeded, else why (with its stderr's tail)."""
    try:
        subprocess.run(command, cwd=REPO, timeout=timeout, check=True, capture_output=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        tail = getattr(err, "stderr", b"") or b""
        return f"{err}: {tail.decode(errors='replace')[-2000:]}"
    return None


def fedavg_figures(raw: dict[str, Any]) -> dict[str, Any]:
    flower, inproc = raw["flower"], raw["modes"]
    he, plain = inproc["he"]["summary"], inproc["plaintext"]["summary"]
    both = (flower["he"], flower["plaintext"])
    return {
        "n_params": raw["n_params"],
        "parties": raw["config"]["parties"],
        "encoding": raw["config"]["encoding"],
        "flower_rounds": len(flower["he"]["round_s"]),
        "round_s": dict(zip(("he", "plain"), (f["round_s_median"] for f in both), strict=True)),
        "round_ratio": flower["ratios_he_over_plaintext"]["round_s_median"],
        "bytes_per_param": flower["he"]["bytes_per_param_update_upload"],
        "accuracy": dict(zip(("he", "plain"), (f["final"]["accuracy"] for f in both), strict=True)),
        "max_abs_weight_diff": flower["agreement"].get("max_abs_weight_diff"),
        "quantization_bound": flower["agreement"].get("quantization_bound"),
        "in_process_ms": {
            key: {"he": he[key] * 1e3, "plain": plain[key] * 1e3}
            for key in (
                "train_s_median",
                "encrypt_s_median",
                "tag_s_median",
                "precompute_s_per_party",
                "aggregate_s",
                "decrypt_s",
                "round_critical_path_s",
            )
        },
    }


FEDAVG_LABELS = {
    "train_s_median": "local training / party",
    "encrypt_s_median": "encrypt + tag in the round / party",
    "tag_s_median": "of which tag + seal / party",
    "precompute_s_per_party": "Enc(0)s made while idle / party",
    "aggregate_s": "aggregator: sum of 10",
    "decrypt_s": "key holder: verify tags + decrypt",
    "round_critical_path_s": "round, critical path (parties in parallel)",
}


def fedavg_section(report: dict[str, Any]) -> str:
    figures = report.get("fedavg")
    if not figures:
        return ""
    if "error" in figures:
        return f"## HE-FedAvg round\n\nFailed: `{figures['error'][:500]}`\n"
    ratio = figures["round_ratio"]
    flower_rows = [
        [
            f"{figures['round_s']['he']:.3f} s",
            f"{figures['round_s']['plain']:.3f} s",
            f"**{ratio:.2f}×** ({'meets' if ratio <= 1.5 else 'misses'} ≤ 1.5×)",
            f"{figures['bytes_per_param']:.2f}",
            f"{figures['accuracy']['he']:.4f} / {figures['accuracy']['plain']:.4f}",
            f"{figures['max_abs_weight_diff']:.2e} "
            f"(rounding bound {figures['quantization_bound'] or 0:.2e})",
        ]
    ]
    phase_rows = [
        [FEDAVG_LABELS[k], f"{v['he']:.1f} ms", f"{v['plain']:.1f} ms"]
        for k, v in figures["in_process_ms"].items()
    ]
    return "\n".join(
        [
            f"## HE-FedAvg round: {figures['n_params']:,} parameters, "
            f"{figures['parties']} parties\n",
            "`simulations/bench_aggregate.py` (run by this script): a torch MLP on digits, one "
            "local epoch per round, updates "
            f"{figures['encoding']}. Flower: `fedhe simulate aggregate` end to end, the "
            f"aggregator's `round_s`, median over {figures['flower_rounds']} rounds (the HE job's "
            "first round pays the nodes' warm-up), the same nodes for both jobs.\n",
            md_table(
                (
                    "Flower round HE",
                    "plaintext",
                    "HE / plain",
                    "B/param (upload)",
                    "accuracy HE / plain",
                    "max abs Δw, HE − plain",
                ),
                flower_rows,
            )
            + "\n",
            "In process (no Flower, the protocol alone; medians over 3 rounds):\n",
            md_table(("phase", "HE", "plaintext"), phase_rows) + "\n",
        ]
    )


# -- verifying sums (MAC) --------------------------------------------------------------------


def run_verify(
    parties: list[int], sizes: list[int], out_dir: Path, timeout: float, console: Console
) -> dict[str, Any] | None:
    """bench_verify.py: what the parties' tags and the key holder's check cost, per release."""
    if not parties or not sizes:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "verify.json"
    out.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(VERIFY_BENCH),
        "--parties",
        ",".join(map(str, parties)),
        "--sizes",
        ",".join(map(str, sizes)),
        "--out",
        str(out),
    ]
    console.print(f"Verifying sums (MAC): {shlex.join(command)}")
    display = shlex.join(["python", "simulations/bench_verify.py", *command[2:-2]])
    error = _run_script(command, timeout)
    if error:
        return {"command": display, "error": error}
    return {"command": display, "rows": json.loads(out.read_text())["rows"]}


VERIFY_COLUMNS = (
    "parties",
    "values (ciphertexts)",
    "party: tag + seal",
    "tag bytes",
    "registration (once)",
    "key holder: verify, cold",
    "verify, warm",
    "decrypt",
    "tags → key holder",
    "sum → key holder",
)


def verify_rows(figures: dict[str, Any]) -> list[list[str]]:
    def seconds(value: float | None) -> str:
        return "-" if value is None else fmt_time(value)

    return [
        [
            f"{r['parties']:,}",
            f"{r['values']:,} ({r['ciphertexts']})",
            seconds(r.get("party_tag_s_median")),
            fmt_bytes(r.get("tag_bytes_per_party")),
            seconds(r.get("registration_s")),
            seconds(r.get("keyholder_verify_s")),
            seconds(r.get("keyholder_verify_warm_s")),
            seconds(r.get("keyholder_decrypt_only_s")),
            fmt_bytes(r.get("tag_bytes_to_keyholder")),
            fmt_bytes(r.get("sum_bytes_to_keyholder")),
        ]
        for r in figures["rows"]
    ]


def verify_section(report: dict[str, Any]) -> str:
    figures = report.get("verify")
    if not figures:
        return ""
    if "error" in figures:
        return f"## Verifying sums (MAC)\n\nFailed: `{figures['error'][:500]}`\n"
    return "\n".join(
        [
            "## Verifying sums (MAC)\n",
            f"`{figures['command']}` (run by this script), in one process on the HE-FedAvg "
            "update sums' parameters (N=8192, complex packing). Before it releases a sum in the "
            "clear, the key holder checks with a linearly homomorphic MAC that the ciphertext is "
            "the sum of what the parties tagged. *party: tag + seal*: one party tagging its "
            "contribution and sealing the tag to the key holder (median); *registration*: once "
            "per job, the key holder opening every party's sealed seed and sealing back its "
            "envelope; *verify* (cold: no pairwise key cached, as a deployed key holder's fresh "
            "process per message; warm: one process, as in simulation) next to *decrypt* "
            "(decryption with flooding), each timed on its own, per release; bytes: the sealed "
            "tags the key holder receives next to the sum's own bytes.\n",
            md_table(VERIFY_COLUMNS, verify_rows(figures)) + "\n",
        ]
    )


# -- KNN: speed and leakage ------------------------------------------------------------------


def run_knn(quick: bool, out_dir: Path, timeout: float, console: Console) -> dict[str, Any]:
    """bench_knn.py (the bars) and attack_knn.py (what the key holder can reconstruct)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    for name, script in (("speed", KNN_BENCH), ("attacks", KNN_ATTACKS)):
        out = out_dir / f"knn{'_attacks' if name == 'attacks' else ''}.json"
        command = [sys.executable, str(script), *(["--quick"] if quick else []), "--out", str(out)]
        console.print(f"KNN {name}: {shlex.join(command)}")
        error = _run_script(command, timeout)
        display = shlex.join(["python", f"simulations/{script.name}", *command[2:-2]])
        figures[name] = (
            {"command": display, "error": error}
            if error
            else {"command": display, "report": json.loads(out.read_text())}
        )
    return figures


def run_threshold(out_dir: Path, timeout: float, console: Console) -> dict[str, Any]:
    """bench_threshold.py: the key-holder group's set-up and its overhead per job."""
    out = out_dir / "threshold.json"
    command = [sys.executable, str(THRESHOLD_BENCH), "--out", str(out)]
    console.print(f"key-holder group: {shlex.join(command)}")
    error = _run_script(command, timeout)
    display = f"python simulations/{THRESHOLD_BENCH.name}"
    if error:
        return {"command": display, "error": error}
    return {"command": display, "report": json.loads(out.read_text())}


def threshold_section(report: dict[str, Any]) -> str:
    figures = report.get("threshold")
    if not figures:
        return ""
    if "error" in figures:
        return f"## Key-holder group\n\nbench_threshold.py failed: `{figures['error'][:500]}`\n"
    from bench_threshold import markdown  # simulations/, beside this script

    return markdown(figures)


def knn_section(report: dict[str, Any]) -> str:
    figures = report.get("knn")
    if not figures:
        return ""
    parts = ["## KNN: speed and what the key holder learns\n"]
    speed = figures.get("speed", {})
    if "report" in speed:
        results = speed["report"]["results"]
        cfg = speed["report"]["config"]
        parts.append(
            f"`{speed['command']}` (run apart from the jobs above, on "
            f"{speed['report'].get('machine', {}).get('cpu_count', '?')} CPUs): "
            f"{cfg['points']:,} stored points, d = {cfg['features']}, "
            f"{cfg['parties']} parties, k = {cfg['k']}, in process (no Flower), median of "
            f"{cfg['repeats']}. A layout answers {results['he']['queries_per_layout']} queries, "
            "then every party uploads again (re-upload: all parties' encryption and the store "
            "build, per query of one layout).\n"
        )
        parts.append(md_table(("measure", "measured", "bar", "verdict"), knn_bar_rows(results)))
        parts.append("")
    elif speed:
        parts.append(f"bench_knn.py failed: `{speed['error'][:500]}`\n")
    attacks = figures.get("attacks", {})
    if "report" in attacks:
        parts.append(
            f"`{attacks['command']}`: reconstruction error of the stored points (after the best "
            "rotation and scale; 1.0 = the trivial guess, all points at the mean), for the old "
            "protocol (affine mask, one layout) and the new one.\n"
        )
        parts.append(knn_attack_table(attacks["report"]))
        weak = attacks["report"]
        if weak.get("weakness_rows") and weak.get("weakness_columns"):
            parts.append("The new protocol's weak spots (the same script):\n")
            parts.append(md_table(tuple(weak["weakness_columns"]), weak["weakness_rows"]) + "\n")
    elif attacks:
        parts.append(f"attack_knn.py failed: `{attacks['error'][:500]}`\n")
    return "\n".join(parts)


def knn_bar_rows(results: dict[str, Any]) -> list[list[str]]:
    he = results["he"]
    rows = []
    for name, bar in results["bars"].items():
        shown = fmt_bytes if name.endswith("bytes") else fmt_time
        rows.append(
            [
                name.removesuffix("_s").replace("_", " "),
                shown(bar["measured"]),
                shown(bar["limit"]),
                "PASS" if bar["pass"] else "FAIL",
            ]
        )
    for query in ("plaintext", "encrypted"):
        again = he[f"{query}_relayout"]
        rows.append(
            [
                f"{query} store: re-upload per query",
                fmt_time(again["per_query_compute_s"]),
                fmt_bytes(again["per_query_bytes"]),
                "(cost of fresh layouts)",
            ]
        )
    agreement = results["accuracy"]
    for name, value in agreement.items():
        if name.endswith("_vs_sklearn"):
            rows.append(
                [
                    f"agreement with sklearn: {name[:-11]}",
                    f"{value:.1%}",
                    "≥ 99%",
                    "PASS" if value >= 0.99 else "FAIL",
                ]
            )
    return rows


def knn_attack_table(report: dict[str, Any]) -> str:
    rows = report.get("table_rows")
    columns = report.get("table_columns")
    if not rows or not columns:
        return "```\n" + json.dumps(report, indent=1)[:3000] + "\n```\n"
    return md_table(tuple(columns), rows) + "\n"


# -- planning --------------------------------------------------------------------------------


@cache
def train_rows(dataset: str) -> int:
    return load_builtin(dataset)[0].n_samples


def choose_dataset(task: str, parties: int) -> str:
    """The task's default data set, or synthetic for a regression with fewer rows than parties."""
    default = DEFAULT_DATASET[task]
    if parties <= train_rows(default) or BUILTIN_DATASETS[default].task != "regression":
        return ""
    return "synthetic"


def plan(args: argparse.Namespace) -> list[Job]:
    jobs: list[Job] = []
    if args.small:
        jobs += [
            Job(t, args.small, "small", args.repeats, choose_dataset(t, args.small))
            for t in args.tasks
        ]
    if args.large:
        jobs += [
            Job(t, args.large, "large", args.large_repeats, choose_dataset(t, args.large))
            for t in args.tasks
        ]
    if "linreg" in args.tasks and args.sweep:
        dataset = args.sweep_dataset or choose_dataset("linreg", max(args.sweep))
        repeats = 1 if args.quick else args.large_repeats
        jobs += [Job("linreg", p, "sweep", repeats, dataset) for p in args.sweep]
    for task, parties in CORES_JOBS:
        if task in args.tasks and args.cores:
            dataset = choose_dataset(task, parties)
            jobs += [Job(task, parties, "cores", args.repeats, dataset, w) for w in args.cores]
    return jobs


# -- running ---------------------------------------------------------------------------------


def fedhe_executable() -> str:
    beside = Path(sys.executable).with_name("fedhe")
    found = str(beside) if beside.exists() else shutil.which("fedhe")
    if not found:
        raise SystemExit("the `fedhe` command is not installed (pip install -e .).")
    return found


def run_job(job: Job, runs_dir: Path, timeout: float, console: Console) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for repeat in range(job.repeats):
        workers = "" if job.workers is None else f"-w{job.workers}"
        out = runs_dir / f"{job.size}-{job.task}-{job.parties}-{job.dataset_name}{workers}-{repeat}"
        console.print(f"[bold]{job.display()}[/] ({job.size}, run {repeat + 1}/{job.repeats}) …")
        run = run_once(job, out, timeout)
        runs.append(run)
        console.print(status_line(run))
        if run["error"]:
            break
    return {
        "task": job.task,
        "parties": job.parties,
        "size": job.size,
        "dataset": job.label,
        "workers": job.workers,
        "command": job.display(),
        "repeats_planned": job.repeats,
        "runs": runs,
        "median": summarize(job, runs),
    }


def run_once(job: Job, out: Path, timeout: float) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "stdout.log"
    cmd = [fedhe_executable(), *job.argv(str(out))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        sampler = Sampler(proc.pid)
        timed_out = watch(proc, sampler, timeout)
    wall_s = time.perf_counter() - started
    leftovers = sampler.kill_leftovers()
    run: dict[str, Any] = {
        "returncode": proc.returncode,
        "wall_s": round(wall_s, 3),
        "peak_rss_bytes": sampler.peak_rss,
        "peak_processes": sampler.peak_processes,
        "peak_top_processes": [[name, rss] for name, rss in sampler.peak_top],
        "rss_samples": sampler.samples,
        "leftover_processes_killed": leftovers,
        "timed_out": timed_out,
        "result": None,
        "error": None,
    }
    result_path = out / "result.json"
    if proc.returncode == 0 and not timed_out and result_path.exists():
        run["result"] = extract(json.loads(result_path.read_text()))
    else:
        run["error"] = failure(log_path, proc.returncode, timed_out, timeout)
    return run


def watch(proc: subprocess.Popen[bytes], sampler: Sampler, timeout: float) -> bool:
    """Sample RSS every SAMPLE_S until the process ends; kill its tree past `timeout`."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        sampler.sample()
        if time.monotonic() > deadline:
            kill_tree(proc, sampler)
            return True
        try:
            proc.wait(timeout=SAMPLE_S)
        except subprocess.TimeoutExpired:
            continue
    return False


def kill_tree(proc: subprocess.Popen[bytes], sampler: Sampler) -> None:
    sampler.sample()  # registers the newest descendants
    sampler.kill_leftovers()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def failure(log_path: Path, returncode: int | None, timed_out: bool, timeout: float) -> str:
    lines = [line.rstrip() for line in log_path.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line.strip()]
    if timed_out:
        head = f"timed out after {timeout:.0f} s"
    else:
        errors = [line for line in lines if "error" in line.lower()]
        head = errors[-1] if errors else f"exit code {returncode}, no result.json"
    return head + "\n--- last lines of the log ---\n" + "\n".join(lines[-25:])


def extract(result: dict[str, Any]) -> dict[str, Any]:
    """What the report needs from a result.json (the full file can hold every prediction)."""

    def metrics(block: dict[str, Any] | None) -> dict[str, Any]:
        return {k: v for k, v in (block or {}).items() if k != "history"}

    out = {
        "encrypted": metrics(result.get("encrypted")),
        "plaintext": metrics(result.get("plaintext")),
        "timings_s": result.get("timings_s", {}),
        "plaintext_timings_s": result.get("plaintext_timings_s", {}),
        "bytes": result.get("bytes", {}),
        "plaintext_bytes": result.get("plaintext_bytes", {}),
        "agreement": result.get("agreement", {}),
        "round_trips": result.get("round_trips"),
        "parties": {k: v for k, v in result.get("parties", {}).items() if k != "contributors"},
        "ckks": result.get("ckks"),
    }
    if "knn" in result:
        out["knn"] = result["knn"]
    if "inference" in result:
        inference = result["inference"]
        keys = ("encrypted_accuracy", "plaintext_accuracy", "prediction_agreement")
        out["inference"] = {k: inference.get(k) for k in keys}
    return out


def status_line(run: dict[str, Any]) -> str:
    rss = f"peak RSS {run['peak_rss_bytes'] / GB:.2f} GB"
    if run["error"]:
        return (
            f"  [red]FAILED[/] after {run['wall_s']:.1f} s, {rss}: {run['error'].splitlines()[0]}"
        )
    r = run["result"]
    he, plain = r["timings_s"].get("total"), r["plaintext_timings_s"].get("total")
    return f"  ok: wall {run['wall_s']:.1f} s, HE {he} s, plaintext {plain} s, {rss}"


# -- summaries -------------------------------------------------------------------------------


def summarize(job: Job, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    good = [r["result"] for r in runs if r["result"]]
    if not good:
        return None
    metric = METRIC.get(job.task, "accuracy")

    def med(values: list[Any]) -> float | None:
        values = [v for v in values if v is not None]
        return float(statistics.median(values)) if values else None

    he_s = med([r["timings_s"].get("total") for r in good])
    plain_s = med([r["plaintext_timings_s"].get("total") for r in good])
    up_he = med([r["bytes"].get(UPLOAD) for r in good])
    up_plain = med([r["plaintext_bytes"].get(UPLOAD) for r in good])
    metric_he = med([r["encrypted"].get(metric) for r in good])
    metric_plain = med([r["plaintext"].get(metric) for r in good])
    return {
        "runs_ok": len(good),
        "he_total_s": he_s,
        "plain_total_s": plain_s,
        "ratio": he_s / plain_s if he_s and plain_s else None,
        "wall_s": med([r["wall_s"] for r in runs if r["result"]]),
        "upload_he_bytes": up_he,
        "upload_plain_bytes": up_plain,
        "upload_he_per_party": up_he / job.parties if up_he is not None else None,
        "upload_plain_per_party": up_plain / job.parties if up_plain is not None else None,
        "metric": metric,
        "metric_he": metric_he,
        "metric_plain": metric_plain,
        "metric_gap": metric_he - metric_plain
        if metric_he is not None and metric_plain is not None
        else None,
        "mse_he": med([r["encrypted"].get("mse") for r in good]),
        "mse_plain": med([r["plaintext"].get("mse") for r in good]),
        "peak_rss_gb": max(r["peak_rss_bytes"] for r in runs) / GB,
        "round_trips": med([r["round_trips"] for r in good]),
    }


def fit_line(x: list[float], y: list[float]) -> dict[str, Any] | None:
    """Least-squares y = intercept + slope·x, its R², the log-log exponent, and the marginal
    cost per party between consecutive points (constant when y is linear in x)."""
    if len(x) < 2:
        return None
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    slope, intercept = np.polyfit(xa, ya, 1)
    residual = ya - (intercept + slope * xa)
    total = float(np.sum((ya - ya.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / total if total > 0 else 1.0
    exponent = float(np.polyfit(np.log(xa), np.log(ya), 1)[0]) if np.all(ya > 0) else float("nan")
    return {
        "intercept": float(intercept),
        "slope": float(slope),
        "r2": r2,
        "loglog_exponent": exponent,
        "marginal": [
            [x[i], x[i + 1], (y[i + 1] - y[i]) / (x[i + 1] - x[i])] for i in range(len(x) - 1)
        ],
    }


def sweep_points(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(
        (r for r in records if r["size"] == "sweep" and r["median"]), key=lambda r: r["parties"]
    )


def sweep_fit(records: list[dict[str, Any]]) -> dict[str, Any]:
    points = sweep_points(records)
    x = [p["parties"] for p in points]
    keys = {
        "he_time_s": "he_total_s",
        "plain_time_s": "plain_total_s",
        "he_upload_bytes": "upload_he_bytes",
        "plain_upload_bytes": "upload_plain_bytes",
    }
    return {
        "parties": x,
        **{name: fit_line(x, [p["median"][k] for p in points]) for name, k in keys.items()},
    }


# -- report ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info = machine_info()
    info["cpu_model"] = cpu_model()
    info["ram_gb"] = round(psutil.virtual_memory().total / GB, 1)
    info["psutil"] = psutil.__version__
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


COLUMNS = (
    "task",
    "parties",
    "dataset",
    "HE total s",
    "plain total s",
    "HE/plain",
    "bytes party→agg HE",
    "plain",
    "per party HE / plain",
    "metric",
    "HE",
    "plain",
    "gap (HE − plain)",
    "peak RSS GB",
    "round trips",
    "wall s",
    "runs",
)


def table_rows(records: list[dict[str, Any]], size: str) -> list[list[str]]:
    return [row(r) for r in records if r["size"] == size]


def row(record: dict[str, Any]) -> list[str]:
    m = record["median"]
    head = [record["task"], str(record["parties"]), record["dataset"]]
    if m is None:
        run = record["runs"][-1]
        error = run["error"].splitlines()[0]
        rss = f"{run['peak_rss_bytes'] / GB:.2f}"
        return [
            *head,
            "FAILED",
            "",
            "",
            "",
            "",
            "",
            error,
            "",
            "",
            "",
            rss,
            "",
            f"{run['wall_s']:.0f}",
            "0",
        ]
    label = METRIC_LABEL[m["metric"]]
    return [
        *head,
        fmt_s(m["he_total_s"]),
        fmt_s(m["plain_total_s"]),
        f"{m['ratio']:.2f}×" if m["ratio"] else "-",
        fmt_bytes(m["upload_he_bytes"]),
        fmt_bytes(m["upload_plain_bytes"]),
        f"{fmt_bytes(m['upload_he_per_party'])} / {fmt_bytes(m['upload_plain_per_party'])}",
        label,
        fmt_metric(m["metric_he"]),
        fmt_metric(m["metric_plain"]),
        f"{m['metric_gap']:+.4f}" if m["metric_gap"] is not None else "-",
        f"{m['peak_rss_gb']:.2f}",
        f"{m['round_trips']:.0f}" if m["round_trips"] is not None else "-",
        f"{m['wall_s']:.1f}",
        f"{m['runs_ok']}/{record['repeats_planned']}",
    ]


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def fmt_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def write_report(report: dict[str, Any], out_dir: Path, console: Console) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    records = report["jobs"]
    for size in ("small", "large", "sweep", "cores"):
        rows = table_rows(records, size)
        if rows:
            print_table(console, f"{size} size" if size != "sweep" else "linreg sweep", rows)
    console.print(fit_lines(report["sweep_fit"]))
    verify = report.get("verify")
    if verify and "rows" in verify:
        print_verify_table(console, verify)
    elif verify:
        console.print(f"Verifying sums (MAC) failed: {verify['error'][:500]}", markup=False)
    plots = make_plots(records, out_dir)
    (out_dir / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "README.md").write_text(markdown(report, plots))
    console.print(f"wrote {out_dir}/README.md, benchmark.json, {', '.join(plots)}")
    console.print(f"total wall time {report['wall_s']:.0f} s")


def print_table(console: Console, title: str, rows: list[list[str]]) -> None:
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in {"task", "dataset"} else "right")
    for cells in rows:
        table.add_row(*cells)
    console.print(table)


def print_verify_table(console: Console, figures: dict[str, Any]) -> None:
    table = Table(title=f"Verifying sums (MAC): {figures['command']}")
    for column in VERIFY_COLUMNS:
        table.add_column(column, justify="right")
    for cells in verify_rows(figures):
        table.add_row(*cells)
    console.print(table)


def fit_lines(fits: dict[str, Any]) -> str:
    names = {
        "he_time_s": ("HE time", "s"),
        "plain_time_s": ("plaintext time", "s"),
        "he_upload_bytes": ("HE bytes party→aggregator", "B"),
        "plain_upload_bytes": ("plaintext bytes party→aggregator", "B"),
    }
    lines = []
    for key, (label, unit) in names.items():
        fit = fits.get(key)
        if fit:
            lines.append(
                f"linreg sweep {fits['parties']}: {label} ≈ {fit['intercept']:.4g} "
                f"+ {fit['slope']:.4g}·parties {unit} (R² {fit['r2']:.4f}; log-log exponent "
                f"{fit['loglog_exponent']:.2f})"
            )
            lines.append("    " + marginal_text(fit["marginal"], unit))
    return "\n".join(lines) or "no sweep fit (fewer than 2 sweep points completed)"


def marginal_text(marginal: list[list[float]], unit: str) -> str:
    """Marginal cost per added party on each segment, and whether it stays constant."""
    parts = [f"{a:g}→{b:g}: {slope:.4g} {unit}" for a, b, slope in marginal]
    slopes = [slope for _, _, slope in marginal]
    text = "marginal cost per added party " + ", ".join(parts)
    if len(slopes) < 2 or min(slopes) <= 0:
        return text
    growth = slopes[-1] / slopes[0]
    verdict = (
        "linear (within ±25%)"
        if 0.8 <= growth <= 1.25
        else f"NOT linear: the marginal cost changes ×{growth:.2f} from the first to the last "
        "segment"
    )
    return f"{text}; {verdict}"


# -- plots -----------------------------------------------------------------------------------


def make_plots(records: list[dict[str, Any]], out_dir: Path) -> list[str]:
    written = []
    points = sweep_points(records)
    if len(points) >= 2:
        written.append(plot_sweep(points, out_dir, "time"))
        written.append(plot_sweep(points, out_dir, "bytes"))
    bars = accuracy_records(records)
    if bars:
        written.append(plot_accuracy(bars, out_dir))
    return written


SWEEP_KEYS = {
    "time": (("he_total_s", "HE (CKKS)"), ("plain_total_s", "plaintext twin")),
    "bytes": (("upload_he_bytes", "HE (CKKS)"), ("upload_plain_bytes", "plaintext twin")),
}
COLORS = ("tab:red", "tab:blue")


def plot_sweep(points: list[dict[str, Any]], out_dir: Path, what: str) -> str:
    """Left: the measured points on linear axes with the least-squares line. Right: the
    marginal cost per added party on each segment between sweep points (flat = linear)."""
    x = [float(p["parties"]) for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.4))
    for (key, label), color in zip(SWEEP_KEYS[what], COLORS, strict=True):
        y = [p["median"][key] for p in points]
        fit = fit_line(x, y)
        left.plot(x, y, "o", color=color, label=label)
        if fit:
            grid = np.linspace(min(x), max(x), 50)
            line = fit["intercept"] + fit["slope"] * grid
            left.plot(grid, line, "-", color=color, alpha=0.6, label=fit_label(fit, what))
            plot_marginal(right, fit["marginal"], color, label)
    unit = "s" if what == "time" else "B"
    left.set_xlabel("parties")
    left.set_ylabel("job total time (s)" if what == "time" else "bytes party → aggregator")
    left.set_title(f"linreg exact mode ({points[0]['dataset']}): {what} vs parties")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    right.set_xscale("log")
    right.set_xticks(x, [f"{p:g}" for p in x])
    right.set_xlabel("parties (segment between sweep points)")
    right.set_ylabel(f"marginal cost per added party ({unit})")
    right.set_title("flat = linear; rising = worse than linear")
    right.set_ylim(bottom=0)
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    name = f"sweep_{what}.png"
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=120)
    plt.close(fig)
    return name


def plot_marginal(ax: Any, marginal: list[list[float]], color: str, label: str) -> None:
    for i, (a, b, slope) in enumerate(marginal):
        ax.hlines(slope, a, b, color=color, linewidth=2.5, label=label if i == 0 else None)
        ax.annotate(
            f"{slope:.3g}",
            (float(np.sqrt(a * b)), slope),
            color=color,
            fontsize=8,
            ha="center",
            va="bottom",
        )


def fit_label(fit: dict[str, float], what: str) -> str:
    unit = "s" if what == "time" else "B"
    return (
        f"fit {fit['intercept']:.3g} + {fit['slope']:.3g}·P {unit} "
        f"(R² {fit['r2']:.3f}, exponent {fit['loglog_exponent']:.2f})"
    )


def accuracy_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The largest size that has results (large, else small), one record per task."""
    for size in ("large", "small"):
        chosen = [r for r in records if r["size"] == size and r["median"]]
        if chosen:
            return chosen
    return []


def plot_accuracy(records: list[dict[str, Any]], out_dir: Path) -> str:
    labels = [f"{r['task']}\n({METRIC_LABEL[r['median']['metric']]})" for r in records]
    he = [r["median"]["metric_he"] for r in records]
    plain = [r["median"]["metric_plain"] for r in records]
    x = np.arange(len(records))
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    ax.bar(x - 0.2, he, 0.4, label="HE (CKKS)", color="tab:red")
    ax.bar(x + 0.2, plain, 0.4, label="plaintext twin", color="tab:blue")
    for i, (a, b) in enumerate(zip(he, plain, strict=True)):
        ax.text(i, max(a, b) + 0.01, f"{a:.3f} / {b:.3f}", ha="center", fontsize=7)
    ax.set_xticks(x, labels)
    ax.set_ylim(min(0.0, *he, *plain) - 0.05, 1.15)
    ax.set_ylabel("test accuracy (linreg: R²)")
    parties = sorted({r["parties"] for r in records})
    ax.set_title(f"HE vs plaintext twin, {', '.join(map(str, parties))} parties")
    ax.legend(loc="upper right", fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=120)
    plt.close(fig)
    return "accuracy.png"


# -- README ----------------------------------------------------------------------------------


def md_table(headers: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(report: dict[str, Any], plots: list[str]) -> str:
    parts = [
        "# fedhe benchmark: every job through `fedhe simulate`, HE vs plaintext twin\n",
        "Generated by `simulations/benchmark.py`; do not edit by hand (rerun it).\n",
        machine_section(report),
        f"Command: `{report['command']}` (total wall time {report['wall_s'] / 60:.1f} min).\n",
        jobs_section(report),
    ]
    records = report["jobs"]
    titles = {"small": "Small size", "large": "Large size", "sweep": "Sweep", "cores": "Cores"}
    for size, title in titles.items():
        rows = table_rows(records, size)
        if rows:
            parties = sorted({r["parties"] for r in records if r["size"] == size})
            heading = f"## {title}: {', '.join(map(str, parties))} parties\n"
            parts += [heading, md_table(COLUMNS, rows) + "\n", bar_line(records, size)]
    parts += ["```\n" + fit_lines(report["sweep_fit"]) + "\n```\n"]
    parts += [cores_section(records), fedavg_section(report), verify_section(report)]
    parts += [knn_section(report), threshold_section(report)]
    parts += [f"![{p}]({p})\n" for p in plots]
    parts += [
        memory_section(records),
        growth_section(records),
        failures_section(records),
        HOW_MEASURED,
    ]
    return "\n".join(p for p in parts if p)


def machine_section(report: dict[str, Any]) -> str:
    m = report["machine"]
    return (
        f"Date: {report['date']}. Machine: {m['cpu_count']} cores ({m['cpu_model']}), "
        f"{m['ram_gb']} GB RAM, {m['platform']}; Python {m['python']}, torch {m['torch']}, "
        f"tenseal {m['tenseal']}, flwr {m['flwr']}, numpy {m['numpy']}, psutil {m['psutil']}.\n"
    )


def jobs_section(report: dict[str, Any]) -> str:
    seen: dict[str, str] = {}
    for record in report["jobs"]:
        key = f"{record['task']} ({record['size']}, {record['dataset']})"
        seen.setdefault(
            key, record["command"].replace("--parties " + str(record["parties"]), "--parties P")
        )
    lines = [f"- {key}: `{command}`" for key, command in seen.items()]
    cfg = report["config"]
    return (
        "Runs (each in its own `--out` folder; P = the table's parties; small size "
        f"{cfg['repeats']} repeat(s), large size and sweep {cfg['large_repeats']} repeat(s), "
        f"timeout {cfg['timeout']:.0f} s per run):\n\n" + "\n".join(lines) + "\n"
    )


def bar_line(records: list[dict[str, Any]], size: str) -> str:
    chosen = [r for r in records if r["size"] == size]
    over = [r for r in chosen if max(run["peak_rss_bytes"] for run in r["runs"]) > RSS_BAR_GB * GB]
    failed = [r for r in chosen if r["median"] is None]
    verdict = "PASS" if not over else "FAIL (" + ", ".join(r["task"] for r in over) + ")"
    done = f"{len(chosen) - len(failed)}/{len(chosen)} completed"
    return f"Peak RSS bar ≤ {RSS_BAR_GB:.0f} GB (all processes): {verdict}; {done}.\n"


def memory_section(records: list[dict[str, Any]]) -> str:
    """The largest processes at the moment of each job's peak (its worst run)."""
    lines = []
    for record in records:
        run = max(record["runs"], key=lambda r: r["peak_rss_bytes"])
        top = ", ".join(f"{name} {rss / GB:.2f}" for name, rss in run["peak_top_processes"])
        lines.append(
            f"| {record['task']} | {record['parties']} | {run['peak_rss_bytes'] / GB:.2f} | "
            f"{run['peak_processes']} | {top} |"
        )
    header = (
        "## Memory at the peak\n\nThe largest processes (GB of RSS) at each job's peak "
        "sample (its worst run).\n\n| task | parties | peak RSS GB (sum) | processes | "
        "largest processes at the peak |\n|---|---|---|---|---|\n"
    )
    return header + "\n".join(lines) + "\n"


def growth_section(records: list[dict[str, Any]]) -> str:
    """Peak RSS per added party between the smallest and largest run of each task, and where
    a straight line through them would cross the RSS bar."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in records):
        done = sorted(
            (r for r in records if r["task"] == task and r["median"]), key=lambda r: r["parties"]
        )
        if len(done) < 2 or done[0]["parties"] == done[-1]["parties"]:
            continue
        a, b = done[0], done[-1]
        ga, gb = a["median"]["peak_rss_gb"], b["median"]["peak_rss_gb"]
        per_party = (gb - ga) / (b["parties"] - a["parties"])
        crossing = (
            f"~{b['parties'] + (RSS_BAR_GB - gb) / per_party:,.0f} parties"
            if per_party > 0
            else "never (no growth)"
        )
        data = a["dataset"] if a["dataset"] == b["dataset"] else f"{a['dataset']} → {b['dataset']}"
        lines.append(
            f"| {task} | {a['parties']} → {b['parties']} ({data}) | {ga:.2f} → {gb:.2f} | "
            f"{per_party * 1000:.1f} | {crossing} |"
        )
    if not lines:
        return ""
    return (
        "## Memory growth with parties\n\nPeak RSS between the fewest and the most parties run "
        f"per task, and where a straight line through both would reach {RSS_BAR_GB:.0f} GB "
        "(an extrapolation, not a measurement).\n\n| task | parties | peak RSS GB | MB per "
        f"added party | reaches {RSS_BAR_GB:.0f} GB at |\n|---|---|---|---|---|\n"
        + "\n".join(lines)
        + "\n"
    )


def failures_section(records: list[dict[str, Any]]) -> str:
    failed = [(r, run) for r in records for run in r["runs"] if run["error"]]
    if not failed:
        return "## Failures\n\nNone: every run completed.\n"
    blocks = [
        f"### {r['task']}, {r['parties']} parties ({r['dataset']})\n\n`{r['command']}`\n\n"
        f"```\n{run['error']}\n```\n"
        for r, run in failed
    ]
    return "## Failures\n\n" + "\n".join(blocks)


HOW_MEASURED = """## How measured

Every run is the real `fedhe simulate` command (Flower's simulation engine on Ray, P party
SuperNodes plus one key-holder SuperNode, as many Ray actors as the machine has cores), started
by `simulations/benchmark.py` as a subprocess with its own `--out` folder in a temporary
directory, with the plaintext twin on: the HE job runs first, then the same job in the clear on
the same nodes (already warm). *HE total* and *plaintext twin total* are result.json's
`timings_s.total` and `plaintext_timings_s.total` (the aggregator's wall time of each job);
*wall s* is the whole command (Ray start, both jobs, shutdown). Times are medians over the runs
of this one invocation (the `runs` column: completed/planned). *Bytes party→agg* is
result.json's `bytes["party->aggregator"]` (fedhe payloads as the aggregator counts them, not
Flower's framing), total over all parties and the whole job, and per party (total / P).
*Metric* is the final test accuracy (linreg: R² on the test split), HE and twin, and their
difference. *Peak RSS* is the maximum over time of the summed resident set size of the `fedhe`
process and all its descendants (Ray's GCS, raylet and workers included), sampled every 0.2 s
with psutil; the max over repeats. Summed RSS counts a shared page (libraries, Ray's shared
object store) once in every process that maps it, so it overstates the physical memory used.
*Round trips* is result.json's `round_trips` (the HE job's send-and-wait exchanges). The
sweep's lines are least-squares fits of y = a + b·P over its points; the log-log exponent is
the slope of log y against log P (1 = linear).
"""


if __name__ == "__main__":
    main()
