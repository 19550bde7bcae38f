"""What verifying a sum costs: parties tagging, the key holder checking, at 10/100/1,000 parties.

Before the key holder releases a sum in the clear it checks, with a linearly homomorphic MAC,
that the ciphertext is the sum of what the parties contributed (`fedhe.crypto.mac`). This
benchmark measures, in one process on the job's real parameters (the HE-FedAvg update sums:
N=8192, `AGGREGATION_PARAMS`, complex packing):

* per party: tagging its contribution (its residues' inner product with r, per prime) and
  sealing the tag to the key holder; the sealed tag's bytes;
* registration (once per job): the key holder opening every party's sealed seed and sealing
  back each envelope;
* key holder, per release: the verification (open n sealed tags, check them against the sum)
  next to the decryption with flooding, each timed on its own: cold (no pairwise key cached:
  a deployed key holder runs each message in a fresh process) and warm (a simulation's key
  holder serves every round from one process); and the tag bytes it receives next to the
  sum's own bytes.

Two update sizes: one ciphertext (8,192 values: the 64-32-10 digits MLP has 2,410 parameters)
and 13 ciphertexts (~100k parameters, the HE-FedAvg benchmark's model). Contributions reuse
ten distinct encryptions (the sum is what it is whichever ciphertexts make it; encrypting
1,000 updates would only time encryption). Medians of `--repeat` runs where a step is cheap.

    python simulations/bench_verify.py              # ~2 minutes on 2 cores
    python simulations/bench_verify.py --parties 10,100 --sizes 8192
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedhe.crypto import AGGREGATION_PARAMS, channel, encrypt, load_tensor
from fedhe.keyholder import JobDeclaration, KeyHolder, OutputSpec
from fedhe.keyholder.inprocess import TaggedParties
from simulations.machine import fmt_bytes, fmt_time, machine_info

OUTPUT = "update_sum"
DISTINCT = 10


def measure(n_parties: int, size: int, repeat: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as state:
        keyholder = KeyHolder(Path(state) / "kh")
        job = JobDeclaration("bench", "aggregate", {OUTPUT: OutputSpec(3)}, 2, AGGREGATION_PARAMS)
        keyholder.declare_job(job)
        names = [f"party-{i}" for i in range(n_parties)]
        started = time.perf_counter()
        parties = TaggedParties(keyholder, "bench", names)
        registration_s = time.perf_counter() - started
        public = parties.public
        rng = np.random.default_rng(0)
        distinct = [
            encrypt(public, rng.uniform(-1, 1, size), sum_bound=10.0 * n_parties, packing="complex")
            for _ in range(DISTINCT)
        ]
        contributions = {name: distinct[i % DISTINCT] for i, name in enumerate(names)}
        parties.tag(names[0], "warm-up", contributions[names[0]])  # first-call costs
        tag_times = []
        tags = {}
        for name in names:
            began = time.perf_counter()
            tags[name] = parties.tag(name, OUTPUT, contributions[name])
            tag_times.append(time.perf_counter() - began)
        total = parties.sum(contributions)
        request = parties.request(OUTPUT, contributions, 0, total=total, tags=tags)
        tensor = load_tensor(request.tensor, keyholder.public_context("bench"))
        secret = keyholder._secret_context("bench")
        cold, warm, decrypt = [], [], []
        for _ in range(repeat):
            channel._pairwise_key.cache_clear()  # deployed: a fresh process per message
            cold.append(_timed(keyholder._verify_tags, request, tensor))
            warm.append(_timed(keyholder._verify_tags, request, tensor))  # one process (simulation)
            decrypt.append(_timed(keyholder._open, secret, tensor, n_parties))
        keyholder.decrypt_sum(request)  # the whole release goes through
    tag_bytes = float(np.mean([len(t) for t in tags.values()]))
    return {
        "parties": n_parties,
        "values": size,
        "ciphertexts": len(total.chunks),
        "party_tag_s_median": statistics.median(tag_times[: max(repeat, 10)]),
        "tag_bytes_per_party": tag_bytes,
        "registration_s": registration_s,
        "keyholder_verify_s": statistics.median(cold),
        "keyholder_verify_warm_s": statistics.median(warm),
        "keyholder_decrypt_only_s": statistics.median(decrypt),
        "tag_bytes_to_keyholder": tag_bytes * n_parties,
        "sum_bytes_to_keyholder": len(total.to_bytes()),
    }


def _timed(function, *args) -> float:
    began = time.perf_counter()
    function(*args)
    return time.perf_counter() - began


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| parties | values (ciphertexts) | party: tag + seal | tag bytes | registration | "
        "key holder: verify, cold | verify, warm | decrypt | tags → key holder | "
        "sum → key holder |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['parties']:,} | {r['values']:,} ({r['ciphertexts']}) | "
            f"{fmt_time(r['party_tag_s_median'])} | {fmt_bytes(r['tag_bytes_per_party'])} | "
            f"{fmt_time(r['registration_s'])} | {fmt_time(r['keyholder_verify_s'])} | "
            f"{fmt_time(r['keyholder_verify_warm_s'])} | "
            f"{fmt_time(r['keyholder_decrypt_only_s'])} | "
            f"{fmt_bytes(r['tag_bytes_to_keyholder'])} | {fmt_bytes(r['sum_bytes_to_keyholder'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parties", default="10,100,1000", help="party counts (10,100,1000)")
    parser.add_argument("--sizes", default="8192,100000", help="values per update (8192,100000)")
    parser.add_argument("--repeat", type=int, default=5, help="timings per median (5)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_verify.json"))
    args = parser.parse_args(argv)
    rows = [
        measure(int(n), int(size), args.repeat)
        for size in args.sizes.split(",")
        for n in args.parties.split(",")
    ]
    print(_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
