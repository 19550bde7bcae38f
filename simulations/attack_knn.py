"""What a curious key holder rebuilds of the KNN store, old protocol vs new (issue 14): the
attacks of tests/knn_attacks.py on wine and diabetes, the reconstruction error of the stored
points (0 = every record exact, 1.0 = the trivial guess), and the new design's weak spots.
Methods: simulations/README.md. Run: python simulations/attack_knn.py [--quick] [--out FILE]"""

from __future__ import annotations

import importlib.util
import platform
import sys
import time
from typing import Any

import _bench as bench  # simulations/_bench.py, beside this script
import numpy as np
from rich.console import Console

from fedhe.tasks import knn


def _attacks_harness() -> Any:
    """tests/knn_attacks.py, the attack harness shared with tests/test_knn_leakage.py. tests/ is
    no installed package, so it is loaded from its file (nothing is put on sys.path)."""
    path = bench.REPO / "tests" / "knn_attacks.py"
    spec = importlib.util.spec_from_file_location("knn_attacks", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path} is missing: run from a checkout of the repository.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ka = _attacks_harness()
ATTACKS = ("linear", "shape", "ordinal", "cross_layout", "query_link")
PER_LAYOUT = {"linear": ka.linear_attack, "shape": ka.shape_attack, "ordinal": ka.ordinal_attack}
WEAK_COLUMNS = ("data", "case", "attack", "error")
COLUMNS = (
    *("data", "queries", "protocol", "layouts × B", "linear", "shape", "ordinal"),
    *("cross-layout", "query-link", "oracle rank-B", "time"),
)


def budget(d: int) -> int:
    return knn.queries_per_layout(d)


def seed_of(rng: np.random.Generator) -> int:
    return int(rng.integers(2**32))


def new_views(data: ka.Data, queries: np.ndarray, parties: int, rng: Any, *per_layout: int) -> list:
    """The new protocol's views of `queries` (fedhe's code, a seeded mask)."""
    seed = seed_of(rng)
    return ka.new_views(
        data.X, data.y, queries, parties, rng, *per_layout, n_classes=data.n_classes, mask_seed=seed
    )


def summary(errors: list[float]) -> dict[str, float]:
    return {"median": float(np.median(errors)), "worst": float(np.min(errors)), "n": len(errors)}


def run_old(data: ka.Data, queries: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    V = ka.old_view(data.X, queries, rng)
    result: dict[str, Any] = {"layouts": 1, "per_layout": len(queries)}
    for name, attack in PER_LAYOUT.items():
        estimate, result[f"{name}_s"] = bench.timed_call(attack, V, data.d)
        result[name] = ka.reconstruction_error(estimate, data.X)
    result["cross_layout"] = None  # one layout: nothing to link
    result["query_link"] = None
    result["oracle"] = ka.oracle_projection_error(data.X, min(len(queries), data.d))
    return result


def run_new(
    data: ka.Data, queries: np.ndarray, rng: np.random.Generator, parties: int
) -> dict[str, Any]:
    d = data.d
    views, views_s = bench.timed_call(new_views, data, queries, parties, rng)
    result: dict[str, Any] = {"layouts": len(views), "per_layout": budget(d), "views_s": views_s}
    for name, attack in PER_LAYOUT.items():
        start = time.perf_counter()
        errors = [ka.reconstruction_error(attack(v.values, d), data.X[v.rows]) for v in views]
        result[name], result[f"{name}_s"] = summary(errors), time.perf_counter() - start
    values, first = [v.values for v in views], data.X[views[0].rows]
    for name, per_layout in (
        ("cross_layout", ka.linear_attack),
        ("cross_layout_ordinal", ka.ordinal_attack),
    ):
        link = ka.cross_layout_attack
        estimate, result[f"{name}_s"] = bench.timed_call(
            link, values, d, per_layout=per_layout, rounds=2, iters=5
        )
        result[name] = ka.reconstruction_error(estimate, first) if len(views) > 1 else None
    estimate, result["query_link_s"] = bench.timed_call(ka.similar_query_link_attack, values, d)
    result["query_link"] = ka.reconstruction_error(estimate, first)
    result["oracle"] = ka.oracle_projection_error(data.X, budget(d))
    return result


def weaknesses(rng: np.random.Generator, parties: int, quick: bool) -> list[dict[str, Any]]:
    """The new design's weak spots, one measurement each (real fedhe code unless noted)."""
    rows = []

    def add(data: str, case: str, attack: str, error: float, seconds: float = 0.0) -> None:
        row = {"data": data, "case": case, "attack": attack, "error": error}
        rows.append({**row, "seconds": seconds})

    def linked(name: str, data: ka.Data, asked: np.ndarray, attack, case: str, label: str) -> None:
        """Run the new protocol on `asked`, then a layout-linking attack on its views."""
        views = new_views(data, asked, parties, rng)
        estimate, seconds = bench.timed_call(attack, [v.values for v in views], data.d)
        error = ka.reconstruction_error(estimate, data.X[views[0].rows])
        add(name, case.format(layouts=len(views)), label, error, seconds)

    def shape(name: str, data: ka.Data, view: ka.LayoutView, case: str, label: str) -> None:
        """The shape attack on one layout's view."""
        estimate, seconds = bench.timed_call(ka.shape_attack, view.values, data.d)
        add(name, case, label, ka.reconstruction_error(estimate, data.X[view.rows]), seconds)

    distances = "true distances ‖x − q‖²: median relative error"
    for name in ka.DATASETS:
        data = ka.load(name)
        B = budget(data.d)
        # 1. A query asked again in a later layout: rank-link the layouts, then the shape attack.
        base = ka.make_queries(data.pool, 2 * B - 1, rng)
        asked = np.vstack([base[:B], base[3:4], base[B:]])
        case = f"one query asked twice, {{layouts}} layouts of {B}"
        linked(name, data, asked, ka.repeat_link_attack, case, "repeat link + shape")
        # 1b. A stream that revisits its queries with a larger jitter (σ = 0.3).
        stream = ka.make_queries(data.pool, 2 * len(data.pool) + 2 * B, rng, jitter=0.3)
        case = f"{len(stream)} queries revisiting the pool with jitter σ = 0.3"
        linked(
            name, data, stream, ka.similar_query_link_attack, case, "query-link (similar queries)"
        )
        # 2. The quadratic mask on one layout (no budget, numpy model): what the budget prevents.
        n = 24 if quick else 100
        view = ka.new_view_model(data.X, ka.make_queries(data.pool, n, rng), rng, budget=n)[0]
        case = f"quadratic mask, one layout, {n} queries (no budget: numpy model)"
        shape(name, data, view, case, "shape")
        # 3. What empty positions say of the mask at u = 0 (and so of the true distances).
        cases = {
            "empty positions: estimate of the mask at u = 0 (their lowest value)": new_views(
                data, ka.make_queries(data.pool, 2 * B, rng), parties, rng
            ),
            "the same if they showed b² + β exactly (first version; numpy model)": (
                ka.new_view_model(data.X, ka.make_queries(data.pool, 2 * B, rng), rng)
            ),
        }
        for case, views in cases.items():
            error = np.median([ka.distance_estimate_error(v, data.X) for v in views])
            add(name, case, distances, float(error))
    # 4. Few features: B = queries_per_layout(d) ≤ d, and what d + 1 would give (the
    # quadratic identity fits the vertices). Queries 0-4 of iris' pool (well spread).
    data = ka.load("iris")
    d = data.d
    for per_layout in sorted({budget(d), d + 1}):
        views = new_views(data, data.pool[: 2 * per_layout], parties, rng, per_layout)
        which = "(the budget)" if per_layout == budget(d) else "(one more than the budget)"
        case = f"d = {d}: layouts of B = {per_layout} queries {which}"
        shape("iris", data, views[0], case, "shape (quadratic identity at B = d + 1)")
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
    out = ("benchmarks/knn_attacks.json", "benchmarks/quick/knn_attacks.json")
    parser = bench.command_line(__doc__, out, quick=True)
    parser.add_argument("--seed", type=int, default=0, help="data split and harness seed (0)")
    parser.add_argument("--parties", type=int, default=3, help="parties sharing the store (3)")
    parser.add_argument(
        "--queries", help="comma-separated query counts (10,100,1000; quick: 10,50)"
    )
    args = bench.parse(parser, argv, {"queries": ("10,100,1000", "10,50")})
    counts = bench.int_list(args.queries)
    console = Console(width=max(Console().width, 150))
    results = []
    for name in ka.DATASETS:
        data = ka.load(name, seed=args.seed)
        for n in counts:
            queries = ka.make_queries(data.pool, n, np.random.default_rng([args.seed, n]))
            for protocol in ("old", "new"):
                rng = np.random.default_rng([args.seed, n, len(protocol)])
                if protocol == "old":
                    result = run_old(data, queries, rng)
                else:
                    result = run_new(data, queries, rng, args.parties)
                result.update(data=name, d=data.d, points=len(data.X), queries=n, protocol=protocol)
                results.append(result)
                found = ", ".join(f"{a} {fmt(result[a])}" for a in ATTACKS)
                console.print(f"{name} {n} queries {protocol}: {found}")
    weak = weaknesses(np.random.default_rng([args.seed, 99]), args.parties, args.quick)
    rows = table_rows(results)
    weak_rows = [[w["data"], w["case"], w["attack"], f"{w['error']:.3g}"] for w in weak]
    bench.show(
        console, "Reconstruction error of the stored points (1.0 = trivial guess)", COLUMNS, rows
    )
    bench.show(console, "New protocol: weak spots", WEAK_COLUMNS, weak_rows)
    config = {"seed": args.seed, "parties": args.parties, "queries": counts, "quick": args.quick}
    config["queries_per_layout"] = {name: budget(ka.load(name).d) for name in ka.DATASETS}
    report = {
        "config": {**config, "python": platform.python_version()},
        "metric": "‖s·R·X̂ − X‖_F/‖X‖_F after the best rotation R and scale s ≥ 0, centered; "
        "1.0 = every point at the mean. New protocol, per-layout attacks: median over layouts "
        "(worst = the smallest error).",
        "table_columns": list(COLUMNS),
        "table_rows": rows,
        "results": results,
        "weaknesses": weak,
        "weakness_columns": list(WEAK_COLUMNS),
        "weakness_rows": weak_rows,
    }
    bench.write_json(args.out, report, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
