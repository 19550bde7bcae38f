"""Micro-benchmark of the lazily rescaled ciphertext operations KNN is built from (weighted
sums, sums of products, rotation, square, encrypt/decrypt), old TenSEAL paths vs new, at KNN's
parameters, on all CPUs and pinned to one, and whether two threads help. Methods:
simulations/README.md. Run: python simulations/bench_fast_ops.py [--repeats 9]."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import _bench as bench  # simulations/_bench.py, beside this script
import numpy as np
import tenseal as ts
from rich.console import Console

from fedhe import crypto
from fedhe.crypto import MODEL_PARAMS as PARAMS  # = fedhe.tasks.knn.PARAMS
from fedhe.crypto import PublicContext, SecretContext
from fedhe.crypto.circuit import Circuit

SLOTS = PARAMS.slots
N_WEIGHTED = 31
N_PRODUCTS = 32
N_BLOCKS = 3


def interleaved(fns: list[Callable[[], Any]], repeats: int) -> list[dict[str, float]]:
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
    top = [crypto.encrypt_for_compute(public, x, multiplications=2) for x in X]
    mid = [t.mod_switch_to(2) for t in top[:N_WEIGHTED]]
    queries = [crypto.encrypt_for_compute(public, q, multiplications=2) for q in Q]
    circuit = Circuit(public)
    (raw3,) = circuit.ciphers(top[0])
    (raw2,) = circuit.ciphers(mid[0])
    rows: dict[str, dict[str, Any]] = {}

    def row(name: str, old: Callable[[], Any] | None, new: Callable[[], Any]) -> None:
        times = interleaved([f for f in (old, new) if f], repeats)
        rows[name] = {"old": times[0] if old else None, "new": times[-1]}

    ws = (slow_weighted_sum, crypto.weighted_sum)
    sp = (slow_sum_of_products, crypto.sum_of_products)
    for primes, terms in ((3, top[:N_WEIGHTED]), (2, mid)):
        row(
            f"weighted sum, {N_WEIGHTED} terms, {primes} primes",
            *[partial(f, terms, w) for f in ws],
        )
    row(f"sum of products, {N_PRODUCTS} terms, 3 primes", *[partial(f, queries, top) for f in sp])
    for primes, tensor, raw in ((3, top[0], raw3), (2, mid[0], raw2)):
        row(f"rotation, {primes} primes", None, partial(crypto.rotate, tensor, 1))
        row(f"  SEAL rotation alone, {primes} primes", None, partial(circuit.rotate, raw, 1))
    square = partial(crypto.sum_of_products, [mid[0]], [mid[0]])
    row("square (ct × ct), 2 primes", lambda: mid[0] * mid[0], square)
    encrypt = partial(crypto.encrypt_for_compute, public, X[0], multiplications=2)
    row("encrypt one ciphertext, 3 primes", None, encrypt)
    row("decrypt one ciphertext", None, partial(crypto.decrypt, secret, top[0]))
    to_vector = partial(crypto._seal.vector_from, public.raw, raw3.raw, SLOTS)
    row("SEAL ciphertext → TenSEAL vector", None, to_vector)

    def err(a, b) -> float:
        return float(np.abs(crypto.decrypt(secret, a) - b).max())

    slow_ws, fast_ws = (f(top[:N_WEIGHTED], w) for f in ws)
    slow_sp, fast_sp = (f(queries, top) for f in sp)
    accuracy = {
        "weighted_sum_vs_numpy": err(fast_ws, w @ X[:N_WEIGHTED]),
        "slow_weighted_sum_vs_numpy": err(slow_ws, w @ X[:N_WEIGHTED]),
        "sum_of_products_vs_numpy": err(fast_sp, np.sum(Q * X, axis=0)),
        "slow_sum_of_products_vs_numpy": err(slow_sp, np.sum(Q * X, axis=0)),
        "rotation_vs_numpy": err(crypto.rotate(top[0], 1), np.roll(X[0], -1)),
    }
    return {"rows": rows, "accuracy": accuracy}


def measure_threads(public: PublicContext, repeats: int) -> dict[str, Any]:
    """Three independent blocks one after another vs in a ThreadPoolExecutor(2)."""
    rng = np.random.default_rng(1)
    draw = partial(crypto.encrypt_for_compute, public, multiplications=2)
    blocks = [[draw(rng.uniform(-3, 3, SLOTS)) for _ in range(N_WEIGHTED)] for _ in range(N_BLOCKS)]
    w = rng.uniform(-2, 2, N_WEIGHTED)
    workloads: dict[str, Callable[[list], Any]] = {
        f"weighted_sum ({N_WEIGHTED} terms)": lambda block: crypto.weighted_sum(block, w),
        f"Σ mul_scalar ({N_WEIGHTED} terms)": lambda block: slow_weighted_sum(block, w),
        f"sum_of_products ({N_WEIGHTED} terms)": lambda block: crypto.sum_of_products(
            block, block[::-1]
        ),
        "rotate": lambda block: crypto.rotate(block[0], 1),
    }
    results = {}
    with ThreadPoolExecutor(2) as pool:
        for name, work in workloads.items():
            one_by_one = lambda work=work: [work(b) for b in blocks]  # noqa: E731
            threads = lambda work=work: list(pool.map(work, blocks))  # noqa: E731
            ms = [t["wall_ms"] for t in interleaved([one_by_one, threads], repeats)]
            results[name] = {"sequential_ms": ms[0], "threads_ms": ms[1], "speedup": ms[0] / ms[1]}
    return results


def main(argv: list[str] | None = None) -> None:
    parser = bench.command_line(__doc__, "benchmarks/fast_ops.json")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per median (9)")
    args = bench.parse(parser, argv)
    if args.repeats < 7:
        parser.error("--repeats must be at least 7 (medians of fewer are too noisy here)")
    secret = crypto.generate_keys(PARAMS, crypto.KeyRequest(relin=True, rotations=(1,)))
    report: dict[str, Any] = {
        "machine": bench.machine_info(),
        "params": PARAMS.to_dict(),
        "repeats": args.repeats,
        "load_average_before": os.getloadavg(),  # a shared machine: wall times suffer
        "modes": {"default": measure(secret, secret.public(), args.repeats)},
        "threads": measure_threads(secret.public(), args.repeats),
    }
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        report["modes"]["single"] = measure(secret, single_thread_context(secret), args.repeats)
    finally:
        os.sched_setaffinity(0, cpus)
    report["load_average_after"] = os.getloadavg()
    console = Console(width=150)
    default, single = report["modes"]["default"]["rows"], report["modes"]["single"]["rows"]
    rows = []
    for name, t in default.items():
        ratio = f"{t['old']['wall_ms'] / t['new']['wall_ms']:.2f}×" if t["old"] else "—"
        rows.append([name, *map(cell, t.values()), ratio, *map(cell, single[name].values())])
    title = f"fast ops, medians of {args.repeats}: ms, wall (CPU of this process)"
    columns = ("operation", "old", "new", "old/new", "old, 1 CPU", "new, 1 CPU")
    bench.show(console, title, columns, rows)
    rows = [[name, *(f"{v:.2f}" for v in r.values())] for name, r in report["threads"].items()]
    columns = ("operation", "sequential ms", "2 threads ms", "speedup")
    bench.show(console, f"{N_BLOCKS} blocks: sequential vs 2 threads", columns, rows)
    console.print("max |error|:", report["modes"]["default"]["accuracy"])
    bench.write_json(args.out, report, console)


def cell(t: dict[str, float] | None) -> str:
    return "—" if t is None else f"{t['wall_ms']:.1f} ({t['cpu_ms']:.1f})"


if __name__ == "__main__":
    main()
