"""The key-holder group (multiparty CKKS, T-of-K threshold decryption) against one key holder:
key set-up in process, the HE-FedAvg round and each job end to end through Flower (about 10
minutes on 2 cores: a quiet machine). Methods: simulations/README.md.
Run: python simulations/bench_threshold.py [--skip-flower]"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import _bench as bench  # simulations/_bench.py, beside this script
from _bench import fmt_bytes
from rich.console import Console

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
            public, wall = bench.timed_call(KeyHolder(Path(folder)).declare_job, job, keys)
            return {"wall_s": wall, "slowest_member_s": wall, "relayed_bytes": 0} | {
                "public_context_bytes": len(public)
            }
        holders = {
            f"keyholder-{i}": GroupMember(Path(folder) / str(i), rules=RELEASE_RULES)
            for i in range(members)
        }
        transport = TimedTransport(holders, keyholder_release)
        spec = GroupSpec(
            tuple(holders), threshold, {m: h.identity.public for m, h in holders.items()}
        )
        public, wall = bench.timed_call(KeyHolderGroup(spec, transport).declare, job, keys)
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
    config = JobConfig.of(out=str(out), plaintext_twin=True, **settings)
    started = time.perf_counter()
    result = json.loads(simulate(config).read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


K3 = {"keyholders": "3", "threshold": 2}  # 2-of-3 key holders
FEDAVG = {"task": "aggregate", "parties": 10, "min_parties": 5, "rounds": 3, "dataset": "digits"}
FEDAVG |= {"hidden": "512,128", "local_epochs": 1}


def part_fedavg(console: Console, root: Path) -> dict[str, dict]:
    out = {}
    for name, group in {"K=1": {}, "2-of-3": K3}.items():
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


KNN = {"task": "knn", "dataset": "iris", "parties": 3, "min_parties": 2, "query_batch": 16}
JOBS: dict[str, dict[str, Any]] = {
    "linreg exact": {"task": "linreg", "parties": 5, "min_parties": 3},
    "logreg gradient": {"task": "logreg", "parties": 5, "min_parties": 3, "rounds": 3},
    "knn plain": KNN,
    "knn encrypted": {**KNN, "query": "encrypted"},
    "mlp": {"task": "mlp", "parties": 3, "min_parties": 2, "rounds": 2, "single_queries": 1},
}


def part_jobs(console: Console, root: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for job, settings in JOBS.items():
        out[job] = {}
        variants: dict[str, dict[str, Any]] = {"K=1": {}, "2-of-3": K3}
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


def tables(report: dict) -> list[tuple[str, tuple[str, ...], bench.Rows]]:
    """(name, columns, rows) of each part that ran: the console's tables and, through
    benchmark.py, the report's (its prose: report_template.md's blocks of these names)."""
    rows = []
    for request, groups in report["setup"].items():
        for group, c in groups.items():
            sizes = [fmt_bytes(c["relayed_bytes"]), fmt_bytes(c["public_context_bytes"])]
            rows.append([request, group, secs(c["wall_s"]), secs(c["slowest_member_s"]), *sizes])
    columns = ("keys", "holders", "wall", "slowest member", "relayed", "public context")
    out = [("threshold", columns, rows)]
    if "fedavg" in report:
        rows = []
        for name, r in report["fedavg"].items():
            times = [f"{r['he_round_s']:.3f} s", f"{r['plain_round_s']:.3f} s"]
            bar = "met" if r["ratio"] <= 2 else "**missed**"
            accuracy = twin(r["accuracy"], r["twin_accuracy"])
            rows.append([name, *times, f"{r['ratio']:.2f}×", bar, accuracy])
        columns = ("key holders", "HE round", "plaintext", "HE / plain", "bar", "accuracy (twin)")
        out.append(("threshold_fedavg", columns, rows))
    if "jobs" in report:
        rows = []
        for job, variants in report["jobs"].items():
            for name, r in variants.items():
                metric = "r2" if "r2" in r else "accuracy"
                ratio = bench.fmt(r.get("ratio_to_k1"), ".2f", "×", "—")
                times = [secs(r["total_s"]), ratio, secs(r["keygen_s"]), secs(r["decrypt_s"])]
                rows.append([job, name, *times, twin(r[metric], r["twin_" + metric])])
        columns = ("job", "key holders", "total", "× K=1", "keygen", "decrypt", "metric (twin)")
        out.append(("threshold_jobs", columns, rows))
    return out


def secs(value: float | None) -> str:
    return bench.fmt(value, ".2f", " s", "—")


def twin(value: float | None, twin_value: float | None) -> str:
    """A metric and its plaintext twin's: "0.9667 (0.9667)"."""
    return "—" if value is None else f"{value:.4f} ({twin_value:.4f})"


def main(argv: list[str] | None = None) -> int:
    parser = bench.command_line(__doc__, "benchmarks/threshold.json")
    parser.add_argument("--skip-flower", action="store_true", help="set-up costs only")
    args = bench.parse(parser, argv)
    console = Console(width=140)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    report = {"machine": bench.machine_info(), "setup": part_setup(console)}
    if not args.skip_flower:
        with tempfile.TemporaryDirectory() as root:
            report["fedavg"] = part_fedavg(console, Path(root))
            report["jobs"] = part_jobs(console, Path(root))
    bench.write_json(args.out, report, console)
    for title, columns, rows in tables(report):
        bench.show(console, title.rstrip(":\n"), columns, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
