"""What verifying a sum costs (parties tagging, the key holder checking cold and warm, next to
decrypting) at 10/100/1,000 parties, on updates of 8,192 and 100,000 values, in one process.
Methods: simulations/README.md. Run: python simulations/bench_verify.py [--parties 10,100]
[--sizes 8192] (~2 minutes on 2 cores)."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

import _bench as bench  # simulations/_bench.py, beside this script
import numpy as np
from _bench import fmt_bytes, fmt_time, seconds
from rich.console import Console

from fedhe.crypto import AGGREGATION_PARAMS, channel, encrypt, load_tensor
from fedhe.keyholder import JobDeclaration, KeyHolder, OutputSpec
from fedhe.keyholder.keyholder import _SecretKeyOpener

OUTPUT = "update_sum"
DISTINCT = 10
COLUMNS = (
    *("parties", "values (ciphertexts)", "party: tag + seal", "tag bytes", "registration (once)"),
    *("key holder: verify, cold", "verify, warm", "decrypt", "tags → key holder"),
    "sum → key holder",
)
TIMED = ("registration_s", "keyholder_verify_s", "keyholder_verify_warm_s")
TIMED += ("keyholder_decrypt_only_s",)


def measure(n_parties: int, size: int, repeat: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as state:
        keyholder = KeyHolder(Path(state) / "kh")
        job = JobDeclaration("bench", "aggregate", {OUTPUT: OutputSpec(3)}, 2, AGGREGATION_PARAMS)
        keyholder.declare_job(job)
        names = [f"party-{i}" for i in range(n_parties)]
        parties, registration_s = bench.register(keyholder, "bench", names)
        rng, bound = np.random.default_rng(0), 10.0 * n_parties
        distinct = [
            encrypt(parties.public, rng.uniform(-1, 1, size), sum_bound=bound, packing="complex")
            for _ in range(DISTINCT)
        ]
        contributions = {name: distinct[i % DISTINCT] for i, name in enumerate(names)}
        parties.tag(names[0], "warm-up", contributions[names[0]])  # first-call costs
        tags, tag_times = {}, []
        for name in names:
            with bench.timed({"s": tag_times}, "s"):
                tags[name] = parties.tag(name, OUTPUT, contributions[name])
        total = parties.sum(contributions)
        request = parties.request(OUTPUT, contributions, 0, total=total, tags=tags)
        tensor = load_tensor(request.tensor, keyholder.public_context("bench"))
        opener = _SecretKeyOpener(keyholder)  # decryption with flooding, as a release does
        cold, warm, decrypt = [], [], []
        for _ in range(repeat):
            channel._pairwise_key.cache_clear()  # deployed: a fresh process per message
            cold.append(seconds(keyholder._verify_tags, request, tensor))
            warm.append(seconds(keyholder._verify_tags, request, tensor))  # one process
            decrypt.append(seconds(opener.open, tensor, request))
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


def table_rows(rows: list[dict[str, Any]]) -> bench.Rows:
    """The table of `COLUMNS` (also `benchmark.py`'s section of benchmarks/README.md)."""
    return [
        [f"{r['parties']:,}", f"{r['values']:,} ({r['ciphertexts']})"]
        + [fmt_time(r["party_tag_s_median"]), fmt_bytes(r["tag_bytes_per_party"])]
        + [fmt_time(r[key]) for key in TIMED]
        + [fmt_bytes(r["tag_bytes_to_keyholder"]), fmt_bytes(r["sum_bytes_to_keyholder"])]
        for r in rows
    ]


def main(argv: list[str] | None = None) -> int:
    parser = bench.command_line(__doc__, "runs/bench_verify.json")
    parser.add_argument("--parties", default="10,100,1000", help="party counts (10,100,1000)")
    parser.add_argument("--sizes", default="8192,100000", help="values per update (8192,100000)")
    parser.add_argument("--repeat", type=int, default=5, help="timings per median (5)")
    args = bench.parse(parser, argv)
    parties, sizes = bench.int_list(args.parties), bench.int_list(args.sizes)
    rows = [measure(n, size, args.repeat) for size in sizes for n in parties]
    console = Console(width=180)
    bench.show(console, "Verifying sums (MAC)", COLUMNS, table_rows(rows))
    bench.write_json(args.out, {"machine": bench.machine_info(), "rows": rows}, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
