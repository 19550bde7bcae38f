"""One command, one report: every fedhe job through ``fedhe simulate``, HE vs its plaintext twin,
each run the command a user types (a subprocess with its own ``--out``, the twin on), plus the
in-process benchmark scripts beside this one; writes benchmarks/README.md (prose:
report_template.md), the plots and benchmarks/benchmark.json. ``--from-json FILE`` runs nothing
and renders the report again into ``--out-dir``. Methods: simulations/README.md. Needs psutil:
pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import _bench as bench  # simulations/_bench.py, beside this script
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend
import numpy as np
from _bench import GB, fmt, fmt_bytes, md_table
from rich.console import Console

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
METRIC_LABEL = {"r2": "R²", "accuracy": "accuracy"}
UPLOAD = "party->aggregator"
RSS_BAR_GB = 6.0
FEDAVG_PARTIES = 10  # the bar: HE-FedAvg round ≤ 1.5× plaintext, 100k params, 10 parties
SIZES = {"small": "Small size", "large": "Large size", "sweep": "Sweep", "cores": "Cores"}
COLUMNS = (
    *("task", "parties", "dataset", "HE total s", "plain total s", "HE/plain"),
    *("bytes party→agg HE", "plain", "per party HE / plain", "metric", "HE", "plain"),
    *("gap (HE − plain)", "peak RSS GB", "round trips", "wall s", "runs"),
)
DEFAULTS = {  # full run, --quick
    "sweep": ("10,100,1000", "10,20"),
    "repeats": (3, 1),
    "fedavg_rounds": (12, 4),
    "verify_parties": ("10,100,1000", "10,100"),
    "verify_sizes": ("8192,100000", "8192"),
}
TEMPLATE = Path(__file__).with_name("report_template.md")
Record = dict[str, Any]


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
        name = self.dataset or DEFAULT_DATASET[self.task]
        w = self.workers
        return name if w is None else f"{name}, {w} worker{'s' * (w > 1)}"

    def argv(self, out: str) -> list[str]:
        args = ["simulate", self.task, "--parties", str(self.parties), *TASK_ARGS[self.task]]
        args += ["--dataset", self.dataset] if self.dataset else []
        args += ["--workers", str(self.workers)] if self.workers is not None else []
        return [*args, "--out", out]

    def display(self) -> str:
        return shlex.join(["fedhe", *self.argv("OUT")])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench.command_line(__doc__, quick=True)
    add = parser.add_argument
    add("--tasks", default=",".join(TASKS), help="comma-separated subset")
    add("--small", type=int, default=5, help="parties, small size (5; 0: off)")
    add("--large", type=int, default=100, help="parties, large size (100; 0: off)")
    add("--sweep", help="linreg parties sweep (10,100,1000; --quick 10,20)")
    add("--sweep-dataset", default="", help="data set of the whole sweep (diabetes, or synthetic)")
    add("--repeats", type=int, help="runs per small job (3; --quick 1)")
    add("--cores", default="1,2", help="Ray workers to compare on CORES_JOBS (1,2; '': off)")
    add("--large-repeats", type=int, default=1, help="runs per large job (1)")
    add("--timeout", type=float, default=1800.0, help="seconds per run (1800)")
    add("--fedavg-rounds", type=int, help="bench_aggregate.py's rounds (12; --quick 4; 0: off)")
    add("--verify-parties", help="parties of bench_verify.py (10,100,1000; --quick 10,100)")
    add("--verify-sizes", help="values per update of bench_verify.py (8192,100000; quick 8192)")
    add("--knn", default="true", choices=("true", "false"), help="bench_knn.py, attack_knn.py")
    add("--threshold", default="true", choices=("true", "false"), help="bench_threshold.py")
    add("--out-dir", type=Path, help="report folder (benchmarks/)")
    add("--keep-runs", type=Path, help="keep run folders here (default: temp)")
    add("--from-json", type=Path, help="run nothing: render README.md and plots from this JSON")
    args = bench.parse(parser, argv, DEFAULTS)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks or set(args.tasks) - set(TASKS):
        parser.error(f"unknown tasks in {args.tasks}; choose from {list(TASKS)}.")
    args.sweep, args.cores = sorted(bench.int_list(args.sweep)), sorted(bench.int_list(args.cores))
    args.verify_parties = bench.int_list(args.verify_parties)
    args.verify_sizes = bench.int_list(args.verify_sizes)
    if args.quick:
        args.large, args.cores = 0, []
    args.out_dir = args.out_dir or bench.REPO / "benchmarks" / ("quick" if args.quick else "")
    few = min([*args.sweep, *args.verify_parties], default=2) < 2 or 1 in (args.small, args.large)
    if few or min(args.repeats, args.large_repeats, *args.verify_sizes) < 1:
        parser.error("parties must be ≥ 2 (the key holder's floor), repeats and sizes ≥ 1.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console(width=230)
    if args.from_json:
        write_report(json.loads(args.from_json.read_text()), args.out_dir, console, save=False)
        return
    started, jobs = time.perf_counter(), plan(args)
    console.print(f"{len(jobs)} jobs, {sum(j.repeats for j in jobs)} runs at most")
    with tempfile.TemporaryDirectory(prefix="fedhe-benchmark-") as tmp:
        records = [run_job(job, args.keep_runs or Path(tmp), args.timeout, console) for job in jobs]

    def sub(script: str, flags: list[str], out: str) -> dict[str, Any]:
        return run_sub(script, flags, args.out_dir / out, args.timeout, console)

    report = {
        "benchmark": "every fedhe job through `fedhe simulate`: HE vs plaintext twin",
        "command": shlex.join(["python", "simulations/benchmark.py", *(argv or sys.argv[1:])]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": bench.machine_info(full=True),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "jobs": records,
        "sweep_fit": sweep_fit(records),
        **dict.fromkeys(("fedavg", "verify", "knn", "threshold")),
    }
    if args.fedavg_rounds > 0:
        flags = ["--parties", str(FEDAVG_PARTIES), "--rounds", "3", "--flower", "--flower-rounds"]
        ran = sub("bench_aggregate.py", [*flags, str(args.fedavg_rounds)], "aggregate.json")
        report["fedavg"] = fedavg_figures(ran["report"]) if "report" in ran else ran
    if args.verify_parties and args.verify_sizes:
        sizes = ["--sizes", ",".join(map(str, args.verify_sizes))]
        flags = ["--parties", ",".join(map(str, args.verify_parties)), *sizes]
        ran = sub("bench_verify.py", flags, "verify.json")
        if "report" in ran:
            ran = {"command": ran["command"], "rows": ran["report"]["rows"]}
        report["verify"] = ran
    if args.knn == "true":
        flags = ["--quick"] if args.quick else []
        report["knn"] = {
            "speed": sub("bench_knn.py", flags, "knn.json"),
            "attacks": sub("attack_knn.py", flags, "knn_attacks.json"),
        }
    if args.threshold == "true":
        report["threshold"] = sub("bench_threshold.py", [], "threshold.json")
    report["wall_s"] = time.perf_counter() - started
    write_report(report, args.out_dir, console)


# -- planning and running --------------------------------------------------------------------


@cache
def choose_dataset(task: str, parties: int) -> str:
    """The task's default data set, or synthetic for a regression with fewer rows than parties."""
    default = DEFAULT_DATASET[task]
    if BUILTIN_DATASETS[default].task != "regression":
        return ""
    return "" if parties <= load_builtin(default)[0].n_samples else "synthetic"


def plan(args: argparse.Namespace) -> list[Job]:
    jobs: list[Job] = []
    for size, parties in (("small", args.small), ("large", args.large)):
        repeats = args.repeats if size == "small" else args.large_repeats
        jobs += [Job(t, parties, size, repeats, choose_dataset(t, parties)) for t in args.tasks]
    jobs = [job for job in jobs if job.parties]
    if "linreg" in args.tasks and args.sweep:
        dataset = args.sweep_dataset or choose_dataset("linreg", max(args.sweep))
        repeats = 1 if args.quick else args.large_repeats
        jobs += [Job("linreg", p, "sweep", repeats, dataset) for p in args.sweep]
    for task, parties in CORES_JOBS:
        if task in args.tasks and args.cores:
            dataset = choose_dataset(task, parties)
            jobs += [Job(task, parties, "cores", args.repeats, dataset, w) for w in args.cores]
    return jobs


def fedhe_executable() -> str:
    beside = Path(sys.executable).with_name("fedhe")
    found = str(beside) if beside.exists() else shutil.which("fedhe")
    if not found:
        raise SystemExit("the `fedhe` command is not installed (pip install -e .).")
    return found


def run_job(job: Job, runs_dir: Path, timeout: float, console: Console) -> Record:
    runs: list[dict[str, Any]] = []
    name = f"{job.size}-{job.task}-{job.parties}-{job.label.replace(', ', '-')}"
    for repeat in range(job.repeats):
        console.print(f"[bold]{job.display()}[/] ({job.size}, run {repeat + 1}/{job.repeats}) …")
        runs.append(run := run_once(job, runs_dir / f"{name}-{repeat}", timeout))
        outcome = run["error"].splitlines()[0] if run["error"] else "ok"
        console.print(f"  {outcome} ({run['wall_s']:.1f} s, {run['peak_rss_bytes'] / GB:.2f} GB)")
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
    log_path, result_path = out / "stdout.log", out / "result.json"
    run = bench.run_sampled([fedhe_executable(), *job.argv(str(out))], log_path, timeout)
    run |= {"result": None, "error": None}
    if run["returncode"] == 0 and not run["timed_out"] and result_path.exists():
        run["result"] = extract(json.loads(result_path.read_text()))
        return run
    lines = [ln.rstrip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    head = errors[-1] if errors else f"exit code {run['returncode']}, no result.json"
    if run["timed_out"]:
        head = f"timed out after {timeout:.0f} s"
    run["error"] = head + "\n--- last lines of the log ---\n" + "\n".join(lines[-25:])
    return run


KEPT = ("timings_s", "plaintext_timings_s", "bytes", "plaintext_bytes", "agreement")
INFERENCE = ("encrypted_accuracy", "plaintext_accuracy", "prediction_agreement")


def extract(result: dict[str, Any]) -> dict[str, Any]:
    """What the report needs from a result.json (the full file can hold every prediction)."""
    out = {key: result.get(key, {}) for key in KEPT}
    for key, dropped in (
        ("encrypted", "history"),
        ("plaintext", "history"),
        ("parties", "contributors"),
    ):
        out[key] = {k: v for k, v in (result.get(key) or {}).items() if k != dropped}
    out |= {"round_trips": result.get("round_trips"), "ckks": result.get("ckks")}
    out |= {"knn": result["knn"]} if "knn" in result else {}
    if "inference" in result:
        out["inference"] = {k: result["inference"].get(k) for k in INFERENCE}
    return out


def summarize(job: Job, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    good = [r["result"] for r in runs if r["result"]]
    if not good:
        return None
    metric = "r2" if job.task == "linreg" else "accuracy"

    def med(block: str, key: str) -> float | None:
        """The median of result[block][key] over the good runs (None where it is missing)."""
        values = [v for r in good if (v := (r[block] if block else r).get(key)) is not None]
        return float(statistics.median(values)) if values else None

    he_s, plain_s = med("timings_s", "total"), med("plaintext_timings_s", "total")
    up_he, up_plain = med("bytes", UPLOAD), med("plaintext_bytes", UPLOAD)
    metric_he, metric_plain = med("encrypted", metric), med("plaintext", metric)
    return {
        "runs_ok": len(good),
        "he_total_s": he_s,
        "plain_total_s": plain_s,
        "ratio": he_s / plain_s if he_s and plain_s else None,
        "wall_s": float(statistics.median(r["wall_s"] for r in runs if r["result"])),
        "upload_he_bytes": up_he,
        "upload_plain_bytes": up_plain,
        "upload_he_per_party": up_he / job.parties if up_he is not None else None,
        "upload_plain_per_party": up_plain / job.parties if up_plain is not None else None,
        "metric": metric,
        "metric_he": metric_he,
        "metric_plain": metric_plain,
        "metric_gap": None if None in (metric_he, metric_plain) else metric_he - metric_plain,
        "mse_he": med("encrypted", "mse"),
        "mse_plain": med("plaintext", "mse"),
        "peak_rss_gb": max(r["peak_rss_bytes"] for r in runs) / GB,
        "round_trips": med("", "round_trips"),
    }


def fit_line(x: list[float], y: list[float]) -> dict[str, Any] | None:
    """Least-squares y = intercept + slope·x, its R², the log-log exponent, and the marginal
    cost per party between consecutive points (constant when y is linear in x)."""
    if len(x) < 2:
        return None
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    slope, intercept = np.polyfit(xa, ya, 1)
    total = float(np.sum((ya - ya.mean()) ** 2))
    r2 = 1.0 - float(np.sum((ya - intercept - slope * xa) ** 2)) / total if total > 0 else 1.0
    exponent = float(np.polyfit(np.log(xa), np.log(ya), 1)[0]) if np.all(ya > 0) else float("nan")
    marginal = [[x[i], x[i + 1], (y[i + 1] - y[i]) / (x[i + 1] - x[i])] for i in range(len(x) - 1)]
    return {"intercept": float(intercept), "slope": float(slope), "r2": r2} | {
        "loglog_exponent": exponent,
        "marginal": marginal,
    }


def sweep_points(records: list[Record]) -> list[Record]:
    points = (r for r in records if r["size"] == "sweep" and r["median"])
    return sorted(points, key=lambda r: r["parties"])


FITS = {  # sweep fit → (median key, label, unit)
    "he_time_s": ("he_total_s", "HE time", "s"),
    "plain_time_s": ("plain_total_s", "plaintext time", "s"),
    "he_upload_bytes": ("upload_he_bytes", "HE bytes party→aggregator", "B"),
    "plain_upload_bytes": ("upload_plain_bytes", "plaintext bytes party→aggregator", "B"),
}


def sweep_fit(records: list[Record]) -> dict[str, Any]:
    points = sweep_points(records)
    x = [p["parties"] for p in points]
    fits = {
        name: fit_line(x, [p["median"][key] for p in points]) for name, (key, *_) in FITS.items()
    }
    return {"parties": x, **fits}


def run_sub(script: str, flags: list[str], out: Path, timeout: float, console: Console) -> dict:
    """Run the benchmark script `script` (beside this one) into `out`: the command as a user
    types it, and the report it wrote or why it failed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).with_name(script)), *flags, "--out", str(out)]
    console.print(shlex.join(command))
    display = shlex.join(["python", f"simulations/{script}", *flags])
    if error := bench.run_script(command, timeout):
        return {"command": display, "error": error}
    return {"command": display, "report": json.loads(out.read_text())}


FEDAVG_LABELS = {
    "train_s_median": "local training / party",
    "encrypt_s_median": "encrypt + tag in the round / party",
    "tag_s_median": "of which tag + seal / party",
    "precompute_s_per_party": "Enc(0)s made while idle / party",
    "aggregate_s": "aggregator: sum of 10",
    "decrypt_s": "key holder: verify tags + decrypt",
    "round_critical_path_s": "round, critical path (parties in parallel)",
}
FEDAVG_COLUMNS = (
    *("Flower round HE", "plaintext", "HE / plain", "B/param (upload)", "accuracy HE / plain"),
    "max abs Δw, HE − plain",
)


def fedavg_figures(raw: dict[str, Any]) -> dict[str, Any]:
    """What the report shows of bench_aggregate.py's JSON."""
    flower, inproc = raw["flower"], raw["modes"]
    he, plain = inproc["he"]["summary"], inproc["plaintext"]["summary"]

    def both(get: Any) -> dict[str, Any]:
        return {"he": get(flower["he"]), "plain": get(flower["plaintext"])}

    return {
        "n_params": raw["n_params"],
        "parties": raw["config"]["parties"],
        "encoding": raw["config"]["encoding"],
        "flower_rounds": len(flower["he"]["round_s"]),
        "round_s": both(lambda f: f["round_s_median"]),
        "round_ratio": flower["ratios_he_over_plaintext"]["round_s_median"],
        "bytes_per_param": flower["he"]["bytes_per_param_update_upload"],
        "accuracy": both(lambda f: f["final"]["accuracy"]),
        "max_abs_weight_diff": flower["agreement"].get("max_abs_weight_diff"),
        "quantization_bound": flower["agreement"].get("quantization_bound"),
        "in_process_ms": {k: {"he": he[k] * 1e3, "plain": plain[k] * 1e3} for k in FEDAVG_LABELS},
    }


# -- the report ------------------------------------------------------------------------------


@cache
def blocks() -> dict[str, str]:
    """report_template.md's blocks by name, each ending in one newline."""
    parts = TEMPLATE.read_text().split("\n@@ ")[1:]
    return {p.split("\n", 1)[0]: p.split("\n", 1)[1].strip("\n") + "\n" for p in parts}


def block(name: str, **fields: Any) -> str:
    return blocks()[name].format(**fields)


def write_report(
    report: dict[str, Any], out_dir: Path, console: Console, save: bool = True
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = make_plots(report["jobs"], out_dir)
    if save:
        (out_dir / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "README.md").write_text(markdown(report, plots))
    console.print(f"wrote {out_dir}/README.md, {', '.join(plots)}")


def row(record: Record) -> list[str]:
    m, run = record["median"], record["runs"][-1]
    head = [record["task"], str(record["parties"]), record["dataset"]]
    if m is None:
        failed = ["FAILED", *[""] * 5, run["error"].splitlines()[0], "", "", ""]
        rss, wall = f"{run['peak_rss_bytes'] / GB:.2f}", f"{run['wall_s']:.0f}"
        return [*head, *failed, rss, "", wall, "0"]
    times = [fmt(m["he_total_s"]), fmt(m["plain_total_s"]), fmt(m["ratio"], ".2f", "×")]
    per_party = f"{fmt_bytes(m['upload_he_per_party'])} / {fmt_bytes(m['upload_plain_per_party'])}"
    upload = [fmt_bytes(m["upload_he_bytes"]), fmt_bytes(m["upload_plain_bytes"]), per_party]
    metric = [METRIC_LABEL[m["metric"]], fmt(m["metric_he"], ".4f"), fmt(m["metric_plain"], ".4f")]
    tail = [fmt(m["metric_gap"], "+.4f"), f"{m['peak_rss_gb']:.2f}", fmt(m["round_trips"], ".0f")]
    runs = f"{m['runs_ok']}/{record['repeats_planned']}"
    return [*head, *times, *upload, *metric, *tail, f"{m['wall_s']:.1f}", runs]


def fit_lines(fits: dict[str, Any]) -> str:
    lines = []
    for key, (_, label, unit) in FITS.items():
        if fit := fits.get(key):
            lines.append(
                f"linreg sweep {fits['parties']}: {label} ≈ {fit['intercept']:.4g} "
                f"+ {fit['slope']:.4g}·parties {unit} (R² {fit['r2']:.4f}; log-log exponent "
                f"{fit['loglog_exponent']:.2f})"
            )
            lines.append("    " + marginal_text(fit["marginal"], unit))
    return "\n".join(lines) or "no sweep fit (fewer than 2 sweep points completed)"


def marginal_text(marginal: list[list[float]], unit: str) -> str:
    """Marginal cost per added party on each segment, and whether it stays constant."""
    slopes = [slope for _, _, slope in marginal]
    text = "marginal cost per added party " + ", ".join(
        f"{a:g}→{b:g}: {slope:.4g} {unit}" for a, b, slope in marginal
    )
    if len(slopes) < 2 or min(slopes) <= 0:
        return text
    growth = slopes[-1] / slopes[0]
    if 0.8 <= growth <= 1.25:
        return f"{text}; linear (within ±25%)"
    change = f"the marginal cost changes ×{growth:.2f} from the first to the last segment"
    return f"{text}; NOT linear: {change}"


def markdown(report: dict[str, Any], plots: list[str]) -> str:
    m, records, cfg = report["machine"], report["jobs"], report["config"]
    parts = [block("header", **m, **report, minutes=report["wall_s"] / 60)]
    seen: dict[str, str] = {}
    for r in records:
        command = r["command"].replace("--parties " + str(r["parties"]), "--parties P")
        seen.setdefault(f"{r['task']} ({r['size']}, {r['dataset']})", command)
    lines = "\n".join(f"- {key}: `{command}`" for key, command in seen.items())
    parts.append(block("jobs", **cfg, lines=lines))
    for size, title in SIZES.items():
        if rows := [row(r) for r in records if r["size"] == size]:
            parties = sorted({r["parties"] for r in records if r["size"] == size})
            parts += [f"## {title}: {', '.join(map(str, parties))} parties\n"]
            parts += [md_table(COLUMNS, rows) + "\n", bar_line(records, size)]
    parts += ["```\n" + fit_lines(report["sweep_fit"]) + "\n```\n", cores_section(records)]
    parts += [fedavg_section(report.get("fedavg")), verify_section(report.get("verify"))]
    parts += [knn_section(report.get("knn")), threshold_section(report.get("threshold"))]
    parts += [f"![{p}]({p})\n" for p in plots]
    parts += [memory_section(records), growth_section(records), failures_section(records)]
    parts += [deploy_section()]
    return "\n".join(p for p in [*parts, block("how")] if p)


DEPLOY_JSON = (
    bench.REPO / "benchmarks" / "deploy.json",
    bench.REPO / "benchmarks" / "deploy-linreg.json",
)


def deploy_section() -> str:
    """bench_deploy.py's figures (its JSON in benchmarks/; the later file's jobs win)."""
    jobs: dict[str, Any] = {}
    for path in DEPLOY_JSON:
        if path.exists():
            jobs |= json.loads(path.read_text())["jobs"]
    if not jobs:
        return ""
    columns = ["job", "deployed wall", "deployed job", "round trips", "simulated", "runs"]
    rows = [
        [
            name,
            f"{r['deployed']['wall_s']:.1f} s",
            f"{r['deployed']['job_s']:.1f} s",
            str(r["deployed"]["round_trips"]),
            f"{r['simulated']['wall_s']:.1f} s",
            str(len(r["deployed"]["runs"])),
        ]
        for name, r in jobs.items()
    ]
    linreg = jobs.get("linreg-exact", {}).get("deployed")
    runs = ", ".join(f"{run['wall_s']:.1f}" for run in linreg["runs"]) + " s" if linreg else "-"
    bar = "not measured"
    if linreg:
        verdict = "met" if linreg["wall_s"] <= 30 else "NOT met"
        bar = f"{linreg['wall_s']:.1f} s, {verdict}"
    return block("deploy", linreg_runs=runs, table=md_table(columns, rows), bar=bar)


def bar_line(records: list[Record], size: str) -> str:
    chosen = [r for r in records if r["size"] == size]
    over = [r for r in chosen if max(run["peak_rss_bytes"] for run in r["runs"]) > RSS_BAR_GB * GB]
    done = sum(r["median"] is not None for r in chosen)
    verdict = "PASS" if not over else "FAIL (" + ", ".join(r["task"] for r in over) + ")"
    bar = f"Peak RSS bar ≤ {RSS_BAR_GB:.0f} GB (all processes)"
    return f"{bar}: {verdict}; {done}/{len(chosen)} completed.\n"


def cores_section(records: list[Record]) -> str:
    """What the second core buys: the same job on 1 and on 2 Ray workers."""
    by_job: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for r in records:
        if r["size"] == "cores" and r["median"] is not None:
            by_job.setdefault((r["task"], r["parties"]), {})[r["workers"]] = r["median"]
    rows = []
    for (task, parties), runs in sorted(by_job.items()):
        if len(runs) >= 2:
            (h1, p1), (h2, p2) = (
                (runs[w]["he_total_s"], runs[w]["plain_total_s"]) for w in (min(runs), max(runs))
            )
            he, plain = f"{h1:.1f} → {h2:.1f} s (**{h1 / h2:.2f}×**)", f"{p1:.1f} → {p2:.1f} s"
            rows.append([task, str(parties), he, f"{plain} ({p1 / p2:.2f}×)"])
    columns = ("task", "parties", "HE", "plaintext twin")
    return block("cores", table=md_table(columns, rows)) if rows else ""


def failed(section: str, figures: dict[str, Any], what: str = "Failed") -> str:
    return f"{section}{what}: `{figures['error'][:500]}`\n"


def fedavg_section(f: dict[str, Any] | None) -> str:
    if not f or "error" in f:
        return failed("## HE-FedAvg round\n\n", f) if f else ""
    ratio, (he, plain) = f["round_ratio"], f["round_s"].values()
    verdict = "meets" if ratio <= 1.5 else "misses"
    flower = [f"{he:.3f} s", f"{plain:.3f} s", f"**{ratio:.2f}×** ({verdict} ≤ 1.5×)"]
    flower += [f"{f['bytes_per_param']:.2f}"]
    flower.append(f"{f['accuracy']['he']:.4f} / {f['accuracy']['plain']:.4f}")
    bound = f["quantization_bound"] or 0
    flower.append(f"{f['max_abs_weight_diff']:.2e} (rounding bound {bound:.2e})")
    phases = [
        [FEDAVG_LABELS[k], f"{v['he']:.1f} ms", f"{v['plain']:.1f} ms"]
        for k, v in f["in_process_ms"].items()
    ]
    tables = {"flower": md_table(FEDAVG_COLUMNS, [flower])}
    tables["phases"] = md_table(("phase", "HE", "plaintext"), phases)
    return block("fedavg", **f, **tables)


def verify_section(figures: dict[str, Any] | None) -> str:
    if not figures or "error" in figures:
        return failed("## Verifying sums (MAC)\n\n", figures) if figures else ""
    from bench_verify import COLUMNS as VERIFY_COLUMNS  # beside this script
    from bench_verify import table_rows as verify_rows

    table = md_table(VERIFY_COLUMNS, verify_rows(figures["rows"]))
    return block("verify", command=figures["command"], table=table)


def knn_section(figures: dict[str, Any] | None) -> str:
    if not figures:
        return ""
    parts, speed, attacks = [block("knn")], figures["speed"], figures["attacks"]
    if "report" in speed:
        from bench_knn import BAR_COLUMNS, bar_rows  # beside this script

        results, cfg = speed["report"]["results"], speed["report"]["config"]
        table = md_table(BAR_COLUMNS, bar_rows(results))
        cpus = speed["report"]["machine"]["cpu_count"]
        per_layout = results["he"]["queries_per_layout"]
        fields = {"command": speed["command"], "cpus": cpus, "per_layout": per_layout}
        parts.append(block("knn_speed", **cfg, **fields, table=table))
    else:
        parts.append(failed("bench_knn.py failed", speed, ""))
    if "report" in attacks:
        found = attacks["report"]
        table = md_table(found["table_columns"], found["table_rows"])
        weak = md_table(found["weakness_columns"], found["weakness_rows"])
        parts.append(block("knn_attacks", command=attacks["command"], table=table, weak=weak))
    else:
        parts.append(failed("attack_knn.py failed", attacks, ""))
    return "\n".join(parts)


def threshold_section(figures: dict[str, Any] | None) -> str:
    if not figures or "error" in figures:
        heading = "## Key-holder group\n\nbench_threshold.py failed"
        return failed(heading, figures, "") if figures else ""
    from bench_threshold import tables  # beside this script

    parts = [
        block(name, command=figures["command"], table=md_table(columns, rows))
        for name, columns, rows in tables(figures["report"])
    ]
    return "\n".join(parts)


def memory_section(records: list[Record]) -> str:
    """The largest processes at the moment of each job's peak (its worst run)."""
    rows = []
    for r in records:
        run = max(r["runs"], key=lambda run: run["peak_rss_bytes"])
        top = ", ".join(f"{name} {rss / GB:.2f}" for name, rss in run["peak_top_processes"])
        peak = f"{run['peak_rss_bytes'] / GB:.2f}"
        rows.append([r["task"], str(r["parties"]), peak, str(run["peak_processes"]), top])
    columns = ("task", "parties", "peak RSS GB (sum)", "processes", "largest processes at the peak")
    return block("memory", table=md_table(columns, rows))


def growth_section(records: list[Record]) -> str:
    """Peak RSS per added party between the smallest and largest run of each task, and where
    a straight line through them would cross the RSS bar."""
    rows = []
    for task in dict.fromkeys(r["task"] for r in records):
        done = [r for r in records if r["task"] == task and r["median"]]
        done.sort(key=lambda r: r["parties"])
        if len(done) < 2 or done[0]["parties"] == done[-1]["parties"]:
            continue
        a, b = done[0], done[-1]
        ga, gb = a["median"]["peak_rss_gb"], b["median"]["peak_rss_gb"]
        per_party = (gb - ga) / (b["parties"] - a["parties"])
        crossing = "never (no growth)"
        if per_party > 0:
            crossing = f"~{b['parties'] + (RSS_BAR_GB - gb) / per_party:,.0f} parties"
        data = a["dataset"] if a["dataset"] == b["dataset"] else f"{a['dataset']} → {b['dataset']}"
        parties = f"{a['parties']} → {b['parties']} ({data})"
        rows.append([task, parties, f"{ga:.2f} → {gb:.2f}", f"{per_party * 1000:.1f}", crossing])
    bar = f"{RSS_BAR_GB:.0f} GB"
    columns = ("task", "parties", "peak RSS GB", "MB per added party", f"reaches {bar} at")
    return block("growth", bar=bar, table=md_table(columns, rows)) if rows else ""


def failures_section(records: list[Record]) -> str:
    failed = [(r, run) for r in records for run in r["runs"] if run["error"]]
    if not failed:
        return "## Failures\n\nNone: every run completed.\n"
    return "## Failures\n\n" + "\n".join(
        f"### {r['task']}, {r['parties']} parties ({r['dataset']})\n\n`{r['command']}`\n\n"
        f"```\n{run['error']}\n```\n"
        for r, run in failed
    )


# -- plots -----------------------------------------------------------------------------------

SWEEP_KEYS = {
    "time": (("he_total_s", "HE (CKKS)"), ("plain_total_s", "plaintext twin")),
    "bytes": (("upload_he_bytes", "HE (CKKS)"), ("upload_plain_bytes", "plaintext twin")),
}


def make_plots(records: list[Record], out_dir: Path) -> list[str]:
    points = sweep_points(records)
    written = [plot_sweep(points, out_dir, what) for what in SWEEP_KEYS] if len(points) > 1 else []
    for size in ("large", "small"):  # the accuracy bars of the largest size that has results
        if chosen := [r for r in records if r["size"] == size and r["median"]]:
            return [*written, plot_accuracy(chosen, out_dir)]
    return written


def plot_sweep(points: list[Record], out_dir: Path, what: str) -> str:
    """Left: the measured points on linear axes with the least-squares line. Right: the
    marginal cost per added party on each segment between sweep points (flat = linear)."""
    x, unit = [float(p["parties"]) for p in points], "s" if what == "time" else "B"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.4))
    for (key, label), color in zip(SWEEP_KEYS[what], ("tab:red", "tab:blue"), strict=True):
        y = [p["median"][key] for p in points]
        left.plot(x, y, "o", color=color, label=label)
        if fit := fit_line(x, y):
            grid = np.linspace(min(x), max(x), 50)
            fitted = (
                f"fit {fit['intercept']:.3g} + {fit['slope']:.3g}·P {unit} (R² "
                f"{fit['r2']:.3f}, exponent {fit['loglog_exponent']:.2f})"
            )
            line = fit["intercept"] + fit["slope"] * grid
            left.plot(grid, line, "-", color=color, alpha=0.6, label=fitted)
            for i, (a, b, slope) in enumerate(fit["marginal"]):
                right.hlines(slope, a, b, color=color, linewidth=2.5, label=None if i else label)
                at = (float(np.sqrt(a * b)), slope)
                right.annotate(
                    f"{slope:.3g}", at, color=color, fontsize=8, ha="center", va="bottom"
                )
    ylabel = "job total time (s)" if what == "time" else "bytes party → aggregator"
    title = f"linreg exact mode ({points[0]['dataset']}): {what} vs parties"
    left.set(xlabel="parties", ylabel=ylabel, title=title)
    right.set(xscale="log", xlabel="parties (segment between sweep points)", ylim=(0, None))
    right.set(
        ylabel=f"marginal cost per added party ({unit})",
        xticks=x,
        xticklabels=[f"{p:g}" for p in x],
    )
    right.set(title="flat = linear; rising = worse than linear")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out_dir, f"sweep_{what}.png")


def plot_accuracy(records: list[Record], out_dir: Path) -> str:
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
    parties = ", ".join(map(str, sorted({r["parties"] for r in records})))
    ax.set(ylim=(min(0.0, *he, *plain) - 0.05, 1.15), ylabel="test accuracy (linreg: R²)")
    ax.set(title=f"HE vs plaintext twin, {parties} parties")
    ax.legend(loc="upper right", fontsize=8, ncols=2)
    return save_figure(fig, out_dir, "accuracy.png")


def save_figure(fig: Any, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=120)
    plt.close(fig)
    return name


if __name__ == "__main__":
    main()
