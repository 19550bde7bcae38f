"""Benchmark the key-holder group (multiparty CKKS, T-of-K threshold decryption) against one
key holder.

Part 1, set-up in process (``fedhe.keyholder.group`` over ``LocalTransport``: real members,
real messages' payloads, one process): the job's keys made by K = 1 (one key holder:
``KeyHolder.declare_job``), 2-of-3 and 3-of-5 dedicated holders and ``parties`` (10 parties
each holding a share, 6-of-10), for three key requests: sums
only (``AGGREGATION_PARAMS``, no evaluation key), a relinearization key (MLP training and
batched inference, ``MODEL_PARAMS``) and the KNN encrypted-query keys for d = 30
(relinearization + baby-step/giant-step rotations + conjugation). Reported: wall time (the
members run one after another here), the slowest member's own time (what a deployment waits
for, members working in parallel), the bytes the aggregator relays (every set-up payload both
ways) and the public context's size.

Part 2, Flower (``fedhe.cli.simulate``, Ray, this machine's cores): the HE-FedAvg round of
``bench_aggregate.py`` (digits, hidden 512,128: 100,234 parameters, 10 parties, 3 rounds)
with one key holder and with 3 key holders (any 2 decrypt); median ``round_s`` of the HE job
against its plaintext twin in the same run. Bar: 3 key holders ≤ 2× the plaintext round.

Part 3, Flower: each job end to end with one key holder and with 2-of-3 (and, where the job
allows it, with the parties holding the key): ``timings_s.total`` of the HE job, the ratio to
one key holder, the results' agreement with the twin. Bar: exact linreg with 2-of-3 ≤ 2× the
one-key-holder run.

Run:  .venv/bin/python simulations/bench_threshold.py [--skip-flower]
(writes benchmarks/threshold.json; about 10 minutes on 2 cores: run it on a quiet machine.)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from machine import fmt_bytes, machine_info  # simulations/machine.py, beside this script
from rich.console import Console
from rich.table import Table

from fedhe.crypto import AGGREGATION_PARAMS, MODEL_PARAMS, CKKSParams, KeyRequest
from fedhe.keyholder import KeyHolder
from fedhe.keyholder.group import KeyHolderGroup, LocalTransport, handle
from fedhe.keyholder.member import GroupMember, GroupSpec
from fedhe.tasks import RELEASE_RULES, aggregate, keyholder_release, knn

KEY_REQUESTS: dict[str, tuple[CKKSParams, KeyRequest]] = {
    "sums": (AGGREGATION_PARAMS, KeyRequest()),
    "relin (mlp)": (MODEL_PARAMS, KeyRequest(relin=True)),
    "knn encrypted, d=30": (knn.PARAMS, knn.query_keys(30)),
}
GROUPS: dict[str, tuple[int, int]] = {
    "K=1": (1, 1),
    "2-of-3": (3, 2),
    "3-of-5": (5, 3),
    "parties 6-of-10": (10, 6),
}


class TimedTransport(LocalTransport):
    """LocalTransport that adds up each member's own time and every payload byte."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.member_s: dict[str, float] = {}
        self.bytes = 0

    def __call__(self, step: str, messages: Mapping[str, tuple[dict, dict[str, bytes]]]):
        replies, failures = {}, {}
        for name, (config, payload) in messages.items():
            self.bytes += sum(len(v) for v in payload.values())
            started = time.perf_counter()
            reply = handle(self.members[name], step, config, payload, release=self.release)
            self.member_s[name] = self.member_s.get(name, 0.0) + time.perf_counter() - started
            self.bytes += sum(len(v) for v in reply[1].values())
            replies[name] = reply
        return replies, failures


def setup_cost(params: CKKSParams, keys: KeyRequest, members: int, threshold: int) -> dict:
    job = aggregate.declare(
        f"bench-{members}", outputs={aggregate.OUTPUT: (1, 4)}, min_parties=2, params=params
    )
    with tempfile.TemporaryDirectory() as folder:
        if members == 1:
            started = time.perf_counter()
            public = KeyHolder(Path(folder)).declare_job(job, keys)
            wall = time.perf_counter() - started
            return {
                "wall_s": wall,
                "slowest_member_s": wall,
                "relayed_bytes": 0,
                "public_context_bytes": len(public),
            }
        holders = {
            f"keyholder-{i}": GroupMember(Path(folder) / str(i), rules=RELEASE_RULES)
            for i in range(members)
        }
        transport = TimedTransport(holders, keyholder_release)
        spec = GroupSpec(
            tuple(holders), threshold, {m: h.identity.public for m, h in holders.items()}
        )
        started = time.perf_counter()
        public = KeyHolderGroup(spec, transport).declare(job, keys)
        wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "slowest_member_s": max(transport.member_s.values()),
        "relayed_bytes": transport.bytes,
        "public_context_bytes": len(public),
    }


def part_setup(console: Console) -> dict[str, dict[str, dict]]:
    results: dict[str, dict[str, dict]] = {}
    for request, (params, keys) in KEY_REQUESTS.items():
        results[request] = {}
        for group, (members, threshold) in GROUPS.items():
            results[request][group] = setup_cost(params, keys, members, threshold)
            console.log(f"set-up {request}, {group}: {results[request][group]}")
    return results


def _simulate(out: Path, **settings: Any) -> dict:
    from fedhe.cli import simulate
    from fedhe.config import JobConfig

    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").unlink(missing_ok=True)
    config = JobConfig(out=str(out), plaintext_twin=True, **settings)
    started = time.perf_counter()
    result = json.loads(simulate(config).read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


FEDAVG = {
    "task": "aggregate",
    "parties": 10,
    "min_parties": 5,
    "rounds": 3,
    "dataset": "digits",
    "hidden": "512,128",
    "local_epochs": 1,
}


def part_fedavg(console: Console, root: Path) -> dict[str, dict]:
    out = {}
    for name, group in {"K=1": {}, "2-of-3": {"keyholders": "3", "threshold": 2}}.items():
        result = _simulate(root / f"fedavg-{name}", **FEDAVG, **group)
        he = statistics.median(r["round_s"] for r in result["encrypted"]["history"])
        plain = statistics.median(r["round_s"] for r in result["plaintext"]["history"])
        out[name] = {
            "he_round_s": he,
            "plain_round_s": plain,
            "ratio": he / plain,
            "accuracy": result["encrypted"]["accuracy"],
            "twin_accuracy": result["plaintext"]["accuracy"],
            "max_abs_weight_diff": result.get("agreement", {}).get("max_abs_weight_diff"),
        }
        console.log(f"FedAvg {name}: {out[name]}")
    return out


JOBS: dict[str, dict[str, Any]] = {
    "linreg exact": {"task": "linreg", "parties": 5, "min_parties": 3},
    "logreg gradient": {"task": "logreg", "parties": 5, "min_parties": 3, "rounds": 3},
    "knn plain": {
        "task": "knn",
        "dataset": "iris",
        "parties": 3,
        "min_parties": 2,
        "query_batch": 16,
    },
    "knn encrypted": {
        "task": "knn",
        "dataset": "iris",
        "parties": 3,
        "min_parties": 2,
        "query": "encrypted",
        "query_batch": 16,
    },
    "mlp": {"task": "mlp", "parties": 3, "min_parties": 2, "rounds": 2, "single_queries": 1},
}


def part_jobs(console: Console, root: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for job, settings in JOBS.items():
        out[job] = {}
        variants: dict[str, dict[str, Any]] = {
            "K=1": {},
            "2-of-3": {"keyholders": "3", "threshold": 2},
        }
        if settings["task"] != "linreg":  # exact linreg: the parties know the masks
            variants["parties"] = {"keyholders": "parties", "threshold": 2}
        for name, group in variants.items():
            result = _simulate(root / f"{job.replace(' ', '-')}-{name}", **settings, **group)
            metric = "r2" if "r2" in result["encrypted"] else "accuracy"
            out[job][name] = {
                "total_s": result["timings_s"].get("total"),
                "wall_s": result["wall_s"],
                metric: result["encrypted"].get(metric),
                f"twin_{metric}": result["plaintext"].get(metric),
                "keygen_s": result["timings_s"].get("keygen"),
                "decrypt_s": result["timings_s"].get("decrypt"),
                "bytes_keyholders": sum(v for k, v in result["bytes"].items() if "keyholder" in k),
            }
            console.log(f"{job} {name}: {out[job][name]}")
        base = out[job]["K=1"]["total_s"]
        for name in out[job]:
            total = out[job][name]["total_s"]
            out[job][name]["ratio_to_k1"] = total / base if base and total else None
    return out


def print_report(console: Console, report: dict) -> None:
    table = Table(title="Key-holder set-up per job (in process)")
    for column in ("keys", "holders", "wall", "slowest member", "relayed", "public context"):
        table.add_column(column)
    for request, groups in report["setup"].items():
        for group, cost in groups.items():
            table.add_row(
                request,
                group,
                f"{cost['wall_s']:.2f} s",
                f"{cost['slowest_member_s']:.2f} s",
                fmt_bytes(cost["relayed_bytes"]),
                fmt_bytes(cost["public_context_bytes"]),
            )
    console.print(table)
    if "fedavg" in report:
        table = Table(title="HE-FedAvg round, 100k parameters, 10 parties (Flower, median of 3)")
        for column in (
            "key holders",
            "HE round",
            "plaintext",
            "HE / plain",
            "bar ≤ 2×",
            "accuracy",
        ):
            table.add_column(column)
        for name, row in report["fedavg"].items():
            table.add_row(
                name,
                f"{row['he_round_s']:.3f} s",
                f"{row['plain_round_s']:.3f} s",
                f"{row['ratio']:.2f}×",
                "met" if row["ratio"] <= 2 else "missed",
                f"{row['accuracy']:.4f} (twin {row['twin_accuracy']:.4f})",
            )
        console.print(table)
    if "jobs" in report:
        table = Table(title="Jobs end to end (Flower): HE job total time vs one key holder")
        for column in (
            "job",
            "key holders",
            "total",
            "× K=1",
            "keygen",
            "decrypt",
            "metric (twin)",
        ):
            table.add_column(column)
        for job, variants in report["jobs"].items():
            for name, row in variants.items():
                metric = "r2" if "r2" in row else "accuracy"
                table.add_row(
                    job,
                    name,
                    _secs(row["total_s"]),
                    f"{row['ratio_to_k1']:.2f}×" if row.get("ratio_to_k1") else "—",
                    _secs(row["keygen_s"]),
                    _secs(row["decrypt_s"]),
                    f"{row[metric]:.4f} ({row['twin_' + metric]:.4f})"
                    if row[metric] is not None
                    else "—",
                )
        console.print(table)


def markdown(figures: dict) -> str:
    """The benchmarks/README.md section (`simulations/benchmark.py` renders it)."""
    report, command = figures["report"], figures["command"]
    rows = [
        [request, group, f"{c['wall_s']:.2f} s", f"{c['slowest_member_s']:.2f} s",
         fmt_bytes(c["relayed_bytes"]), fmt_bytes(c["public_context_bytes"])]
        for request, groups in report["setup"].items()
        for group, c in groups.items()
    ]  # fmt: skip
    parts = [
        "## Key-holder group: set-up and overhead\n",
        f"`{command}` (run apart from the jobs above). Set-up in process: the members one after "
        "another in one process (wall) and the slowest member's own time (what a deployment "
        "waits for); every set-up payload the aggregator relays, both ways.\n",
        _md(("keys", "holders", "wall", "slowest member", "relayed", "public context"), rows),
    ]
    if "fedavg" in report:
        rows = [
            [name, f"{r['he_round_s']:.3f} s", f"{r['plain_round_s']:.3f} s",
             f"{r['ratio']:.2f}×", "met" if r["ratio"] <= 2 else "**missed**",
             f"{r['accuracy']:.4f} ({r['twin_accuracy']:.4f})"]
            for name, r in report["fedavg"].items()
        ]  # fmt: skip
        parts += [
            "\nHE-FedAvg round, 100,234 parameters, 10 parties, Flower simulation, median of 3 "
            "rounds (HE job and its twin in one run; bar: 3 key holders ≤ 2× plaintext):\n",
            _md(("key holders", "HE round", "plaintext", "HE / plain", "bar", "accuracy (twin)"),
                rows),
        ]  # fmt: skip
    if "jobs" in report:
        rows = []
        for job, variants in report["jobs"].items():
            for name, r in variants.items():
                metric = "r2" if "r2" in r else "accuracy"
                rows.append([
                    job, name, _secs(r["total_s"]),
                    f"{r['ratio_to_k1']:.2f}×" if r.get("ratio_to_k1") else "—",
                    _secs(r["keygen_s"]), _secs(r["decrypt_s"]),
                    f"{r[metric]:.4f} ({r['twin_' + metric]:.4f})",
                ])  # fmt: skip
        parts += [
            "\nEach job end to end (Flower simulation): the HE job's total time against one key "
            "holder (bar: exact linreg with 2-of-3 ≤ 2×); its metric against its twin's:\n",
            _md(("job", "key holders", "total", "× K=1", "keygen", "decrypt", "metric (twin)"),
                rows),
        ]  # fmt: skip
    return "\n".join(parts) + "\n"


def _md(headers: tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _secs(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-flower", action="store_true", help="set-up costs only")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "benchmarks/threshold.json",
    )
    parser.add_argument("--from-json", type=Path, help="print the report of an earlier run")
    args = parser.parse_args(argv)
    console = Console(width=140)
    if args.from_json:
        print_report(console, json.loads(args.from_json.read_text()))
        return 0
    logging.getLogger("flwr").setLevel(logging.WARNING)
    report: dict[str, Any] = {"machine": machine_info(), "setup": part_setup(console)}
    if not args.skip_flower:
        with tempfile.TemporaryDirectory() as root:
            report["fedavg"] = part_fedavg(console, Path(root))
            report["jobs"] = part_jobs(console, Path(root))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_report(console, report)
    console.print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
