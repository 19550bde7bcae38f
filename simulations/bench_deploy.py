"""Every job in a real deployment on loopback (SuperLink with TLS and SuperNode authentication,
3 hospitals and a key holder as processes, each site started from its own kit through fedhe's
launcher) against the same job simulated in process: wall time, the job's own time, and
aggregator↔node round trips. About 10 minutes on 2 cores; run it on a quiet machine.

Run: python simulations/bench_deploy.py [--repeats 3] [--jobs linreg-exact,knn-plain]"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _bench as bench  # simulations/_bench.py, beside this script
from rich.console import Console

from fedhe import deploy
from fedhe.aggregator.app import run_job
from fedhe.config import JobConfig
from fedhe.deploy_cli import register

sys.path.insert(0, str(bench.REPO))  # the deployment harness of the tests
from tests.inprocess import InProcessGrid
from tests.test_deploy import Deployment, _free_port
from tests.test_deploy_jobs import _settings_line, write_queries
from tests.test_deploy_kit import site_start

QUERIER = "hospital-b"
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
# Each job's settings, the same on both sides (a deployed job takes pyproject's values for any
# setting it leaves out).
JOBS: dict[str, dict[str, Any]] = {
    "linreg-exact": {"task": "linreg"},
    "linreg-gradient": {"task": "linreg", "mode": "gradient", "rounds": 2},
    "linreg-encrypted-model": {"task": "linreg", "mode": "encrypted-model", "rounds": 2},
    "logreg": {"task": "logreg", "mode": "gradient", "rounds": 2},
    "aggregate": {"task": "aggregate", "rounds": 1},
    "knn-plain": {"task": "knn", "dataset": "iris", "queries": 6, "querier": QUERIER},
    "knn-encrypted": {
        "task": "knn",
        "dataset": "iris",
        "queries": 6,
        "query": "encrypted",
        "querier": QUERIER,
    },
    "mlp": {
        "task": "mlp",
        "dataset": "iris",
        "rounds": 1,
        "queries": 6,
        "single_queries": 1,
        "querier": QUERIER,
    },
}


def start_federation(folder: Path) -> Deployment:
    running = Deployment(folder / "fed")
    running.start("superlink", deploy.superlink_command(running.federation))
    if register(running.federation, running.env, timeout_s=90) != 0:
        raise bench.BenchError(f"sites not registered; logs in {running.logs}")
    running.start_site("keyholder", data_path=str(folder / "keyholder-data"))
    for name in HOSPITALS:
        options: dict[str, Any] = {"output_dir": str(folder / name / "out")}
        if name == QUERIER:
            queries = write_queries(folder / name / "queries.csv", "iris")
            options |= {"query_path": str(queries), "report_metrics": True}
        command, env = site_start(
            running.kits[name], port=_free_port(), approved=str(running.approved), **options
        )
        running.start(name, command, env)
    return running


def config_of(settings: dict[str, Any], out: Path, *, deployed: bool) -> JobConfig:
    querier = settings.get("querier")
    index = {"querier": HOSPITALS.index(querier)} if querier and not deployed else {}
    return JobConfig.of(
        parties=3, min_parties=2, plaintext_twin=False, out=str(out), **settings | index
    )


def run_line(config: JobConfig, querier: str | None) -> str:
    """The job's `--run-config`: every setting (the tests' line), the querier by its site name,
    and the run's folder and timeout."""
    items = config.to_run_config() | ({"querier": querier} if querier else {})
    return f"{_settings_line(items)} out='{config.out}' timeout-s={config.timeout_s}"


def deployed_once(running: Deployment, settings: dict[str, Any], out: Path) -> dict[str, Any]:
    config = config_of(settings, out, deployed=True)
    command = deploy.run_command(running.app, run_line(config, settings.get("querier")))
    started = time.monotonic()
    with (running.logs / f"run-{out.name}.log").open("wb") as log:
        subprocess.run(command, env=running.env, stdout=log, stderr=subprocess.STDOUT,
                       timeout=600, check=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (out / "result.json").exists():
        if time.monotonic() > deadline:
            raise bench.BenchError(f"no result.json; logs in {running.logs}")
        time.sleep(0.1)
    return figures(out, time.monotonic() - started)


def simulated_once(settings: dict[str, Any], out: Path) -> dict[str, Any]:
    config = config_of(settings, out, deployed=False)
    started = time.monotonic()
    run_job(InProcessGrid(config.num_nodes), config)
    return figures(out, time.monotonic() - started)


def figures(out: Path, wall_s: float) -> dict[str, Any]:
    """A run's wall time, its job's own time and its round trips (from result.json)."""
    result = json.loads((out / "result.json").read_text())
    return {
        "wall_s": wall_s,
        "job_s": result["timings_s"]["total"],
        "round_trips": result["round_trips"],
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]} | {"runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = bench.command_line(__doc__, "benchmarks/deploy.json")
    parser.add_argument("--repeats", type=int, default=3, help="runs per job (median)")
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated job names")
    args = bench.parse(parser, argv)
    console = Console()
    jobs = [j for j in args.jobs.split(",") if j]
    unknown = sorted(set(jobs) - set(JOBS))
    if unknown:
        parser.error(f"unknown jobs {unknown}; choose from {sorted(JOBS)}")
    report: dict[str, Any] = {"machine": bench.machine_info(), "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="fedhe-bench-deploy-") as tmp:
        folder = Path(tmp)
        started = time.monotonic()
        running = start_federation(folder)
        try:
            report["federation_start_s"] = time.monotonic() - started
            results = {}
            for job in jobs:
                deployed = [
                    deployed_once(running, JOBS[job], folder / "runs" / f"{job}-{i}")
                    for i in range(args.repeats)
                ]
                simulated = [
                    simulated_once(JOBS[job], folder / "sim" / f"{job}-{i}")
                    for i in range(args.repeats)
                ]
                results[job] = {"deployed": median_of(deployed), "simulated": median_of(simulated)}
                console.print(f"{job}: {results[job]['deployed']['wall_s']:.1f} s deployed")
        finally:
            running.stop_all()
    report["jobs"] = results
    rows = []
    for job, r in results.items():
        d, s = r["deployed"], r["simulated"]
        per_trip = (d["job_s"] - s["job_s"]) / max(d["round_trips"], 1)
        rows.append([
            job, f"{d['wall_s']:.1f}", f"{d['job_s']:.1f}", str(d["round_trips"]),
            f"{s['wall_s']:.1f}", str(s["round_trips"]), f"{per_trip:.2f}",
        ])  # fmt: skip
    headers = [
        "job", "deployed wall s", "deployed job s", "round trips", "simulated s",
        "sim round trips", "s per round trip",
    ]  # fmt: skip
    bench.show(console, f"deployment vs simulation (medians of {args.repeats})", headers, rows)
    report["table"] = bench.md_table(headers, rows)
    linreg = results.get("linreg-exact")
    if linreg:
        report["targets"] = {
            "exact linreg wall <= 30 s": bench.target(linreg["deployed"]["wall_s"], 30.0)
        }
        bench.show_targets(console, report["targets"])
    bench.write_json(args.out, report, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
