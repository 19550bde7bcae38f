"""What a curious key holder rebuilds of the KNN store: old protocol vs new (issue 14).

The key holder decrypts one masked value per stored position and query (then returns only an
encrypted selection of the k nearest). It follows the protocol but keeps what it decrypted.
This script runs the attacks of ``tests/knn_attacks.py`` against both protocols and reports
the reconstruction error of the stored points: ‖s·R·X̂ − X‖_F / ‖X‖_F after the best rotation R
and scale s ≥ 0 (both centered; the attacker cannot know the rotation), so 0 = every record
exact and 1.0 = the trivial guess (every point at the mean).

* Data: sklearn ``load_wine`` (d = 13) and ``load_diabetes`` (d = 10), rows shuffled
  (``--seed``), 80 % stored (split over ``--parties`` parties), standardized with the stored
  points' mean and std (as the parties do); queries: the other 20 %, cycled with Gaussian
  jitter (σ = 0.1) when more are needed; 10, 100 and 1,000 queries (``--queries``).
* Old protocol: the affine mask α(‖x‖² − 2x·q) + β per query on one fixed layout (a numpy
  reference of the code before issue 14, ``knn_attacks.old_view``).
* New protocol: the real ``fedhe.tasks.knn`` code in the clear (context None): a fresh layout
  every ``queries_per_layout(d)`` = B queries (segments in random party order, every party's
  points shuffled afresh), the quadratic mask (u + b)² + β per query (drawn by fedhe's
  ``Mask.draw`` from a seeded generator instead of the OS's CSPRNG: reproducible runs,
  ``knn_attacks.new_views``). Per-layout attacks are
  scored on each layout (median over layouts; "worst" = the smallest error), positions mapped
  back to rows with the harness's ground truth (the attacker does not need it).
* Attacks (``tests/knn_attacks.py``): linear (SVD + null space, the issue's), shape (one vertex
  per column fitted, then linear), ordinal (ranks only; non-metric fit when a layout has more
  than d + 1 columns), cross-layout (per-layout estimates matched and rotated onto each other,
  Procrustes + Hungarian, averaged; per-layout estimate: the linear attack, and the ordinal
  one in the JSON), query-link (layouts linked through queries that come back approximately:
  columns paired by the shape of their sorted values, positions matched by rank profiles,
  the two layouts' columns then fall to the shape attack; the query streams here revisit the
  pool with jitter σ = 0.1 beyond its size: 36 queries for wine, 89 for diabetes).
  Oracle: the error of the best rank-B linear projection of the points (what B exact
  projections would give at best), the floor that B rankings per layout approach.
* Weaknesses of the new design, one row each: a query asked twice in two layouts (rank
  linking of the two layouts, then the shape attack); a stream revisiting its queries with a
  larger jitter (σ = 0.3: the query-link attack's limit); the quadratic mask *without* the layout
  budget (one layout, 100 queries: what the budget prevents); a small d (iris, d = 4) at the
  budget B = d and at B = d + 1 (where the quadratic identity fits one layout's vertices);
  the empty positions (the key holder's estimate of the true distances from them, now and
  if they showed the mask at u = 0 as in the first version of the new protocol).

Writes JSON (``--out``, default benchmarks/knn_attacks.json; ``--quick``: 10 and 50 queries,
benchmarks/quick/knn_attacks.json) with ``table_columns``/``table_rows`` (the printed table)
and every raw number.

Run:  .venv/bin/python simulations/attack_knn.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from fedhe.tasks import knn  # noqa: E402
from tests import knn_attacks as ka  # noqa: E402

DEFAULT_OUT = {
    False: REPO / "benchmarks" / "knn_attacks.json",
    True: REPO / "benchmarks" / "quick" / "knn_attacks.json",
}
QUERIES = {False: (10, 100, 1000), True: (10, 50)}
ATTACKS = ("linear", "shape", "ordinal", "cross_layout", "query_link")
COLUMNS = (
    "data",
    "queries",
    "protocol",
    "layouts × B",
    "linear",
    "shape",
    "ordinal",
    "cross-layout",
    "query-link",
    "oracle rank-B",
    "time",
)


def budget(d: int) -> int:
    per_layout = getattr(knn, "queries_per_layout", None)
    return per_layout(d) if per_layout else ka.model_budget(d)


def seed_of(rng: np.random.Generator) -> int:
    return int(rng.integers(2**32))


def per_layout_errors(views: list[ka.LayoutView], X: np.ndarray, attack, d: int) -> list[float]:
    return [ka.reconstruction_error(attack(v.values, d), X[v.rows]) for v in views]


def summary(errors: list[float]) -> dict[str, float]:
    return {"median": float(np.median(errors)), "worst": float(np.min(errors)), "n": len(errors)}


def run_old(data: ka.Data, queries: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    d = data.d
    V = ka.old_view(data.X, queries, rng)
    result: dict[str, Any] = {"layouts": 1, "per_layout": len(queries)}
    for name, attack in (
        ("linear", ka.linear_attack),
        ("shape", ka.shape_attack),
        ("ordinal", ka.ordinal_attack),
    ):
        start = time.perf_counter()
        result[name] = ka.reconstruction_error(attack(V, d), data.X)
        result[f"{name}_s"] = time.perf_counter() - start
    result["cross_layout"] = None  # one layout: nothing to link
    result["query_link"] = None
    result["oracle"] = ka.oracle_projection_error(data.X, min(len(queries), d))
    return result


def run_new(
    data: ka.Data, queries: np.ndarray, rng: np.random.Generator, parties: int
) -> dict[str, Any]:
    d = data.d
    start = time.perf_counter()
    views = ka.new_views(
        data.X, data.y, queries, parties, rng, n_classes=data.n_classes, mask_seed=seed_of(rng)
    )
    result: dict[str, Any] = {
        "layouts": len(views),
        "per_layout": budget(d),
        "views_s": time.perf_counter() - start,
    }
    for name, attack in (
        ("linear", ka.linear_attack),
        ("shape", ka.shape_attack),
        ("ordinal", ka.ordinal_attack),
    ):
        start = time.perf_counter()
        result[name] = summary(per_layout_errors(views, data.X, attack, d))
        result[f"{name}_s"] = time.perf_counter() - start
    values = [v.values for v in views]
    first = data.X[views[0].rows]
    for name, per_layout in (
        ("cross_layout", ka.linear_attack),
        ("cross_layout_ordinal", ka.ordinal_attack),
    ):
        start = time.perf_counter()
        estimate = ka.cross_layout_attack(values, d, per_layout=per_layout, rounds=2, iters=5)
        result[name] = ka.reconstruction_error(estimate, first) if len(views) > 1 else None
        result[f"{name}_s"] = time.perf_counter() - start
    start = time.perf_counter()
    estimate = ka.similar_query_link_attack(values, d)
    result["query_link"] = ka.reconstruction_error(estimate, first)
    result["query_link_s"] = time.perf_counter() - start
    result["oracle"] = ka.oracle_projection_error(data.X, budget(d))
    return result


def weaknesses(rng: np.random.Generator, parties: int, quick: bool) -> list[dict[str, Any]]:
    """The new design's weak spots, one measurement each (real fedhe code unless noted)."""
    rows = []

    def add(data: str, case: str, attack: str, error: float, seconds: float) -> None:
        rows.append(
            {"data": data, "case": case, "attack": attack, "error": error, "seconds": seconds}
        )

    def linked(name: str, data, asked: np.ndarray, attack, case: str, label: str) -> None:
        """Run the new protocol on `asked`, then a layout-linking attack on its views."""
        views = ka.new_views(
            data.X, data.y, asked, parties, rng, n_classes=data.n_classes, mask_seed=seed_of(rng)
        )
        start = time.perf_counter()
        estimate = attack([v.values for v in views], data.d)
        error = ka.reconstruction_error(estimate, data.X[views[0].rows])
        add(name, case.format(layouts=len(views)), label, error, time.perf_counter() - start)

    for name in ka.DATASETS:
        data = ka.load(name)
        d, B = data.d, budget(data.d)

        # 1. A query asked again in a later layout: rank-link the layouts, then the shape attack.
        base = ka.make_queries(data.pool, 2 * B - 1, rng)
        asked = np.vstack([base[:B], base[3:4], base[B:]])
        linked(
            name,
            data,
            asked,
            ka.repeat_link_attack,
            f"one query asked twice, {{layouts}} layouts of {B}",
            "repeat link + shape",
        )
        # 1b. A stream that revisits its queries with a larger jitter (σ = 0.3).
        stream = ka.make_queries(data.pool, 2 * len(data.pool) + 2 * B, rng, jitter=0.3)
        linked(
            name,
            data,
            stream,
            ka.similar_query_link_attack,
            f"{len(stream)} queries revisiting the pool with jitter σ = 0.3",
            "query-link (similar queries)",
        )
        # 2. The quadratic mask on one layout (no budget, numpy model): what the budget prevents.
        n = 24 if quick else 100
        view = ka.new_view_model(data.X, ka.make_queries(data.pool, n, rng), rng, budget=n)[0]
        start = time.perf_counter()
        estimate = ka.shape_attack(view.values, d)
        add(
            name,
            f"quadratic mask, one layout, {n} queries (no budget: numpy model)",
            "shape",
            ka.reconstruction_error(estimate, data.X[view.rows]),
            time.perf_counter() - start,
        )
        # 3. What empty positions say of the mask at u = 0 (and so of the true distances).
        views = ka.new_views(
            data.X,
            data.y,
            ka.make_queries(data.pool, 2 * B, rng),
            parties,
            rng,
            n_classes=data.n_classes,
            mask_seed=seed_of(rng),
        )
        add(
            name,
            "empty positions: estimate of the mask at u = 0 (their lowest value)",
            "true distances ‖x − q‖²: median relative error",
            float(np.median([ka.distance_estimate_error(v, data.X) for v in views])),
            0.0,
        )
        views = ka.new_view_model(data.X, ka.make_queries(data.pool, 2 * B, rng), rng)
        add(
            name,
            "the same if they showed b² + β exactly (first version; numpy model)",
            "true distances ‖x − q‖²: median relative error",
            float(np.median([ka.distance_estimate_error(v, data.X) for v in views])),
            0.0,
        )
    # 4. Few features: B = queries_per_layout(d) ≤ d, and what d + 1 would give (the
    # quadratic identity fits the vertices). Queries 0-4 of iris' pool (well spread).
    data = ka.load("iris")
    d = data.d
    for per_layout in sorted({budget(d), d + 1}):
        views = ka.new_views(
            data.X,
            data.y,
            data.pool[: 2 * per_layout],
            parties,
            rng,
            per_layout,
            n_classes=data.n_classes,
            mask_seed=seed_of(rng),
        )
        start = time.perf_counter()
        add(
            "iris",
            f"d = {d}: layouts of B = {per_layout} queries"
            + (" (the budget)" if per_layout == budget(d) else " (one more than the budget)"),
            "shape (quadratic identity at B = d + 1)",
            ka.reconstruction_error(ka.shape_attack(views[0].values, d), data.X[views[0].rows]),
            time.perf_counter() - start,
        )
    return rows


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, dict):
        return f"{value['median']:.3g} (worst {value['worst']:.3g})"
    return f"{value:.3g}"


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in results:
        seconds = sum(v for k, v in r.items() if k.endswith("_s"))
        rows.append(
            [
                r["data"],
                f"{r['queries']:,}",
                r["protocol"],
                f"{r['layouts']} × {r['per_layout']}",
                *(fmt(r[a]) for a in ATTACKS),
                fmt(r["oracle"]),
                f"{seconds:.1f} s",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 and 50 queries")
    parser.add_argument("--out", type=Path, help="JSON report (benchmarks/knn_attacks.json)")
    parser.add_argument("--seed", type=int, default=0, help="data split and harness seed (0)")
    parser.add_argument("--parties", type=int, default=3, help="parties sharing the store (3)")
    parser.add_argument(
        "--queries", help="comma-separated query counts (10,100,1000; quick: 10,50)"
    )
    args = parser.parse_args(argv)
    counts = tuple(int(q) for q in args.queries.split(",")) if args.queries else QUERIES[args.quick]
    out = args.out or DEFAULT_OUT[args.quick]
    console = Console(width=max(Console().width, 150))
    results = []
    for name in ka.DATASETS:
        data = ka.load(name, seed=args.seed)
        for n in counts:
            queries = ka.make_queries(data.pool, n, np.random.default_rng([args.seed, n]))
            for protocol, run in (("old", run_old), ("new", run_new)):
                rng = np.random.default_rng([args.seed, n, len(protocol)])
                result = (
                    run(data, queries, rng)
                    if protocol == "old"
                    else run(data, queries, rng, args.parties)
                )
                result.update(data=name, d=data.d, points=len(data.X), queries=n, protocol=protocol)
                results.append(result)
                console.print(
                    f"{name} {n} queries {protocol}: "
                    + ", ".join(f"{a} {fmt(result[a])}" for a in ATTACKS)
                )
    weak = weaknesses(np.random.default_rng([args.seed, 99]), args.parties, args.quick)

    table = Table(title="Reconstruction error of the stored points (1.0 = trivial guess)")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("data", "protocol") else "right")
    rows = table_rows(results)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    weak_table = Table(title="New protocol: weak spots")
    for column in ("data", "case", "attack", "error", "time"):
        weak_table.add_column(column)
    for w in weak:
        weak_table.add_row(
            w["data"], w["case"], w["attack"], f"{w['error']:.3g}", f"{w['seconds']:.1f} s"
        )
    console.print(weak_table)

    report = {
        "config": {
            "seed": args.seed,
            "parties": args.parties,
            "queries": list(counts),
            "quick": args.quick,
            "queries_per_layout": {name: budget(ka.load(name).d) for name in ka.DATASETS},
            "python": platform.python_version(),
        },
        "metric": "‖s·R·X̂ − X‖_F/‖X‖_F after the best rotation R and scale s ≥ 0, centered; "
        "1.0 = every point at the mean. New protocol, per-layout attacks: median over layouts "
        "(worst = the smallest error).",
        "table_columns": list(COLUMNS),
        "table_rows": rows,
        "results": results,
        "weaknesses": weak,
        "weakness_columns": ["data", "case", "attack", "error"],
        "weakness_rows": [[w["data"], w["case"], w["attack"], f"{w['error']:.3g}"] for w in weak],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
