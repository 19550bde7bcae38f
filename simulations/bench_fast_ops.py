"""Micro-benchmark of the lazily rescaled ciphertext operations KNN is built from, old vs new.

At KNN's parameters (``fedhe.tasks.knn.PARAMS`` = MODEL_PARAMS: N=8192, primes [60, 40, 40 |
60], scale 2^40; one block = one ciphertext of 4096 slots):

* weighted sum of 31 ciphertexts (d = 30 features + ‖x‖²), three primes and two: old = one
  ``mul_scalar`` per term (multiply + rescale each) and ``+``; new = ``weighted_sum`` (one
  rescale);
* sum of 32 ciphertext × ciphertext products, three primes: old = one ``*`` per term (relin
  + rescale each) and ``+``; new = ``sum_of_products`` (one relinearization, one rescale);
* one rotation at three and at two primes (``rotate``; TenSEAL has no rotation, so there is
  no old path: the raw SEAL rotation without the conversion back to a TenSEAL vector is shown
  beside it);
* one ciphertext square at two primes (old ``t * t``; new ``sum_of_products([t], [t])``,
  which hands a single product to TenSEAL);
* encrypt (``encrypt_for_compute``, three primes) and decrypt of one ciphertext, and the
  conversion of a SEAL ciphertext back into a TenSEAL vector (``_seal.vector_from``), the fixed
  cost every new operation pays once per output ciphertext.

Each figure is the median of ``--repeats`` (≥ 7) timed calls after one warm-up call (old and
new calls interleaved, so that both see the same background load; wall and CPU time), in two
modes: ``default`` (all CPUs, TenSEAL's default thread count) and ``single`` (the process pinned
to one CPU, the context loaded with ``n_threads=1``). Then whether a
``ThreadPoolExecutor(2)`` over three independent blocks beats running them one after another
(it can only if TenSEAL/SEAL release the GIL in these calls). Every new result is decrypted
and compared with the old one and with numpy.

Run:  .venv/bin/python simulations/bench_fast_ops.py [--repeats 9] [--out benchmarks/fast_ops.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
from machine import machine_info  # simulations/machine.py, beside this script
from rich.console import Console
from rich.table import Table

from fedhe.crypto import (
    MODEL_PARAMS,
    KeyRequest,
    PublicContext,
    SecretContext,
    _seal,
    decrypt,
    encrypt_for_compute,
    generate_keys,
    rotate,
    sum_of_products,
    weighted_sum,
)
from fedhe.crypto.circuit import Circuit

PARAMS = MODEL_PARAMS  # = fedhe.tasks.knn.PARAMS
SLOTS = PARAMS.slots
N_WEIGHTED = 31
N_PRODUCTS = 32
N_BLOCKS = 3


def timed(fns: list[Callable[[], Any]], repeats: int) -> list[dict[str, float]]:
    """Median wall and CPU milliseconds of each of `fns`, their calls interleaved (order
    alternating) so that all of them see the same background load."""
    for fn in fns:
        fn()  # warm-up
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for repeat in range(repeats):
        order = range(len(fns)) if repeat % 2 == 0 else reversed(range(len(fns)))
        for index in order:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fns[index]()
            wall[index].append(time.perf_counter() - start_wall)
            cpu[index].append(time.process_time() - start_cpu)
    return [
        {"wall_ms": statistics.median(w) * 1e3, "cpu_ms": statistics.median(c) * 1e3}
        for w, c in zip(wall, cpu, strict=True)
    ]


def slow_weighted_sum(tensors, weights):
    total = tensors[0].mul_scalar(weights[0])
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        total = total + tensor.mul_scalar(weight)
    return total


def slow_sum_of_products(left, right):
    total = left[0] * right[0]
    for a, b in zip(left[1:], right[1:], strict=True):
        total = total + a * b
    return total


def single_thread_context(secret: SecretContext) -> PublicContext:
    """The job's public context loaded with TenSEAL's thread pool of one."""
    public = secret.public()
    body = public.raw.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=True
    )
    raw = ts.context_from(body, n_threads=1)
    raw.global_scale = PARAMS.scale
    return PublicContext(raw, PARAMS, public.keys, public.rotation_key_bytes)


def measure(secret: SecretContext, public: PublicContext, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    X = rng.uniform(-3, 3, (N_PRODUCTS, SLOTS))
    Q = rng.uniform(-3, 3, (N_PRODUCTS, SLOTS))
    w = rng.uniform(-2, 2, N_WEIGHTED)
    top = [encrypt_for_compute(public, x, multiplications=2) for x in X]
    mid = [t.mod_switch_to(2) for t in top[:N_WEIGHTED]]
    queries = [encrypt_for_compute(public, q, multiplications=2) for q in Q]
    circuit = Circuit(public)
    (raw3,) = circuit.ciphers(top[0])
    (raw2,) = circuit.ciphers(mid[0])
    rows: dict[str, dict[str, Any]] = {}

    def row(name: str, old: Callable[[], Any] | None, new: Callable[[], Any]) -> None:
        if old is None:
            rows[name] = {"old": None, "new": timed([new], repeats)[0]}
        else:
            old_t, new_t = timed([old, new], repeats)
            rows[name] = {"old": old_t, "new": new_t}

    row(
        f"weighted sum, {N_WEIGHTED} terms, 3 primes",
        lambda: slow_weighted_sum(top[:N_WEIGHTED], w),
        lambda: weighted_sum(top[:N_WEIGHTED], w),
    )
    row(
        f"weighted sum, {N_WEIGHTED} terms, 2 primes",
        lambda: slow_weighted_sum(mid, w),
        lambda: weighted_sum(mid, w),
    )
    row(
        f"sum of products, {N_PRODUCTS} terms, 3 primes",
        lambda: slow_sum_of_products(queries, top),
        lambda: sum_of_products(queries, top),
    )
    row("rotation, 3 primes", None, lambda: rotate(top[0], 1))
    row("  SEAL rotation alone, 3 primes", None, lambda: circuit.rotate(raw3, 1))
    row("rotation, 2 primes", None, lambda: rotate(mid[0], 1))
    row("  SEAL rotation alone, 2 primes", None, lambda: circuit.rotate(raw2, 1))
    row(
        "square (ct × ct), 2 primes",
        lambda: mid[0] * mid[0],
        lambda: sum_of_products([mid[0]], [mid[0]]),
    )
    row(
        "encrypt one ciphertext, 3 primes",
        None,
        lambda: encrypt_for_compute(public, X[0], multiplications=2),
    )
    row("decrypt one ciphertext", None, lambda: decrypt(secret, top[0]))
    row(
        "SEAL ciphertext → TenSEAL vector",
        None,
        lambda: _seal.vector_from(public.raw, raw3.raw, SLOTS),
    )

    def err(a, b) -> float:
        return float(np.abs(decrypt(secret, a) - b).max())

    fast_ws, slow_ws = weighted_sum(top[:N_WEIGHTED], w), slow_weighted_sum(top[:N_WEIGHTED], w)
    fast_sp, slow_sp = sum_of_products(queries, top), slow_sum_of_products(queries, top)
    accuracy = {
        "weighted_sum_vs_numpy": err(fast_ws, w @ X[:N_WEIGHTED]),
        "slow_weighted_sum_vs_numpy": err(slow_ws, w @ X[:N_WEIGHTED]),
        "sum_of_products_vs_numpy": err(fast_sp, np.sum(Q * X, axis=0)),
        "slow_sum_of_products_vs_numpy": err(slow_sp, np.sum(Q * X, axis=0)),
        "rotation_vs_numpy": err(rotate(top[0], 1), np.roll(X[0], -1)),
    }
    return {"rows": rows, "accuracy": accuracy}


def measure_threads(public: PublicContext, repeats: int) -> dict[str, Any]:
    """Three independent blocks one after another vs in a ThreadPoolExecutor(2)."""
    rng = np.random.default_rng(1)
    blocks = [
        [
            encrypt_for_compute(public, rng.uniform(-3, 3, SLOTS), multiplications=2)
            for _ in range(N_WEIGHTED)
        ]
        for _ in range(N_BLOCKS)
    ]
    w = rng.uniform(-2, 2, N_WEIGHTED)
    workloads: dict[str, Callable[[list], Any]] = {
        f"weighted_sum ({N_WEIGHTED} terms)": lambda block: weighted_sum(block, w),
        f"Σ mul_scalar ({N_WEIGHTED} terms)": lambda block: slow_weighted_sum(block, w),
        f"sum_of_products ({N_WEIGHTED} terms)": lambda block: sum_of_products(block, block[::-1]),
        "rotate": lambda block: rotate(block[0], 1),
    }
    results = {}
    with ThreadPoolExecutor(2) as pool:
        for name, work in workloads.items():
            sequential, threaded = timed(
                [
                    lambda work=work: [work(b) for b in blocks],
                    lambda work=work: list(pool.map(work, blocks)),
                ],
                repeats,
            )
            results[name] = {
                "sequential_ms": sequential["wall_ms"],
                "threads_ms": threaded["wall_ms"],
                "speedup": sequential["wall_ms"] / threaded["wall_ms"],
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/fast_ops.json"))
    args = parser.parse_args()
    if args.repeats < 7:
        parser.error("--repeats must be at least 7 (medians of fewer are too noisy here)")

    secret = generate_keys(PARAMS, KeyRequest(relin=True, rotations=(1,)))
    report: dict[str, Any] = {
        "machine": machine_info(),
        "params": PARAMS.to_dict(),
        "repeats": args.repeats,
        "load_average_before": os.getloadavg(),  # a shared machine: wall times suffer
        "modes": {},
    }
    report["modes"]["default"] = measure(secret, secret.public(), args.repeats)
    report["threads"] = measure_threads(secret.public(), args.repeats)
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        report["modes"]["single"] = measure(secret, single_thread_context(secret), args.repeats)
    finally:
        os.sched_setaffinity(0, cpus)

    report["load_average_after"] = os.getloadavg()
    console = Console(width=150)
    table = Table(
        title=f"fast ops at N={PARAMS.poly_modulus_degree}, medians of {args.repeats} (ms; "
        "wall, and CPU time of this process in brackets)"
    )
    for column in ("operation", "old", "new", "old/new", "old, 1 CPU", "new, 1 CPU"):
        table.add_column(column, justify="left" if column == "operation" else "right")
    default, single = report["modes"]["default"]["rows"], report["modes"]["single"]["rows"]

    def cell(t: dict[str, float] | None) -> str:
        return "—" if t is None else f"{t['wall_ms']:.1f} ({t['cpu_ms']:.1f})"

    for name, times in default.items():
        old, new = times["old"], times["new"]
        ratio = f"{old['wall_ms'] / new['wall_ms']:.1f}×" if old else "—"
        table.add_row(
            name, cell(old), cell(new), ratio, cell(single[name]["old"]), cell(single[name]["new"])
        )
    console.print(table)
    threads = Table(
        title=f"{N_BLOCKS} independent blocks: sequential vs ThreadPoolExecutor(2) (ms)"
    )
    for column in ("work per block", "sequential", "2 threads", "speedup"):
        threads.add_column(column, justify="left" if column == "work per block" else "right")
    for name, r in report["threads"].items():
        threads.add_row(
            name, f"{r['sequential_ms']:.1f}", f"{r['threads_ms']:.1f}", f"{r['speedup']:.2f}×"
        )
    console.print(threads)
    console.print(
        "max |error|:", {k: f"{v:.2e}" for k, v in report["modes"]["default"]["accuracy"].items()}
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
