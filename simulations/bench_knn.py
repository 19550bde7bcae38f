"""KNN over an encrypted store (`fedhe.tasks.knn`) against plaintext KNN, in process (no
Flower): uploads, one plaintext and one encrypted query end to end against issue 14's bars,
fresh layouts, batches, numpy and scikit-learn references, agreement with scikit-learn.
Methods: simulations/README.md. Run: python simulations/bench_knn.py [--quick]"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import _bench as bench  # simulations/_bench.py, beside this script
import numpy as np
from _bench import Timings, fmt_bytes, fmt_time, summarize, timed
from rich.console import Console
from sklearn.datasets import make_classification
from sklearn.neighbors import KNeighborsClassifier

from fedhe.crypto import PublicContext
from fedhe.keyholder import DecryptionRequest, KeyHolder
from fedhe.keyholder.inprocess import TaggedParties
from fedhe.tasks import aggregate, check_declaration, knn

DEFAULTS = {"points": (10_000, 2_000), "repeats": (5, 2), "batch": (32, 8)}  # full, --quick
DEFAULTS |= {"enc_batch": (8, 2), "test": (64, 16)}
QUERIES = ("plaintext", "encrypted")
# Bars (issue 14): per plaintext query, aggregator compute and end to end; per encrypted query,
# end to end and the bytes of the query itself.
BARS = {
    "plaintext_aggregator_compute_s": 0.060,
    "plaintext_end_to_end_s": 0.150,
    "encrypted_end_to_end_s": 0.300,
    "encrypted_query_bytes": 1_000_000,
}
BUDGET = 100_000  # decryptions per output kind: every request of the benchmark is a new one
SLOTS = knn.PARAMS.slots
QUERIER = "party-000"  # the declared querier: the votes are sealed to it


@dataclass(frozen=True)
class Data:
    Z: np.ndarray  # standardized stored points (points, d)
    y: np.ndarray
    queries: np.ndarray  # standardized test queries (test, d)
    y_queries: np.ndarray
    shares: dict[str, np.ndarray]  # party → row indices into Z


@dataclass
class Protocol:
    """One job at the key holder, its registered parties and the aggregator's store."""

    keyholder: KeyHolder
    job_id: str
    context: PublicContext | None
    k: int
    n_classes: int
    parties: TaggedParties
    data: Data
    store: knn.KNNStore = field(init=False)  # the latest upload's (`build_store`)
    rounds: Counter[str] = field(default_factory=Counter)  # next round label per output
    relayouts: list[Timings] = field(default_factory=list)  # fresh layouts during queries

    def ready_for(self, n: int) -> None:
        """A fresh layout (all parties upload again) when the store's budget cannot take `n`
        more queries: timed apart, reported as the re-upload cost per query."""
        if self.store.queries_left < n:
            seed = [len(self.relayouts), 99]
            self.relayouts.append(build_store(self, seed, self.store.encrypted_queries)[0])

    def request(self, output: str, tensor: bytes) -> DecryptionRequest:
        """The next release of `output` (ranks and votes are no sums: no tags)."""
        round_ = self.rounds[output]
        self.rounds[output] += 1
        contributors = tuple(self.store.contributors)
        return DecryptionRequest(self.job_id, output, contributors, tensor, round_)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench.command_line(__doc__, ("benchmarks/knn.json", "benchmarks/knn-quick.json"), True)
    add = parser.add_argument
    add("--points", type=int, help="stored points (10000; --quick 2000)")
    add("--features", type=int, default=30, help="features d (30)")
    add("--parties", type=int, default=10, help="parties (10)")
    add("--classes", type=int, default=2, help="classes (2)")
    add("--k", type=int, default=5, help="neighbours (5)")
    add("--repeats", type=int, help="repeats per measure (5; --quick 2)")
    add("--batch", type=int, help="plaintext queries per batch (32; --quick 8)")
    add("--enc-batch", type=int, help="encrypted queries per batch (8; --quick 2)")
    add("--test", type=int, help="test queries (64; --quick 16)")
    add("--seed", type=int, default=0)
    args = bench.parse(parser, argv, DEFAULTS)
    if args.parties < 2 or args.points < 2 * args.parties:
        parser.error("--parties must be ≥ 2 (the key holder's floor), with ≥ 2 points each.")
    if args.classes < 2 or args.features < 1 or not 1 <= args.k <= args.points // args.parties:
        parser.error("--classes ≥ 2, --features ≥ 1 and 1 ≤ --k ≤ points per party.")
    if min(args.repeats, args.batch, args.enc_batch, args.test) < 1:
        parser.error("--repeats, --batch, --enc-batch and --test must be ≥ 1.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console(width=130)
    started = time.perf_counter()
    data = make_data(args)
    with tempfile.TemporaryDirectory(prefix="fedhe-bench-knn-") as state_dir:
        keyholder = KeyHolder(state_dir, declaration_check=check_declaration)
        results = {
            "he": run_mode(keyholder, data, args, encrypted=True, console=console),
            "twin": run_mode(keyholder, data, args, encrypted=False, console=console),
        }
    console.print("plaintext references (numpy, scikit-learn) …")
    results["reference"], sklearn_predictions = run_reference(data, args)
    results["accuracy"] = agreement(results, sklearn_predictions, data)
    results["ratios"] = ratios(results)
    results["bars"] = bars(results["he"])
    bench.show(console, "Bars and agreement", BAR_COLUMNS, bar_rows(results))
    report = {
        "benchmark": "KNN over an encrypted store vs plaintext KNN, in process (no Flower)",
        "config": config(args),
        "machine": bench.machine_info(),
        "results": results,
        "wall_s": time.perf_counter() - started,
    }
    bench.write_json(args.out, report, console)


def config(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("points", "features", "parties", "classes", "k", "repeats", "batch", "enc_batch")
    return {
        **{key: getattr(args, key) for key in (*keys, "test", "seed", "quick")},
        "ckks_params": knn.PARAMS.to_dict(),
        "slots": SLOTS,
        "bars": BARS,
    }


def bars(he: dict[str, Any]) -> dict[str, dict[str, Any]]:
    plain, enc = he["plaintext_query"]["median"], he["encrypted_query"]["median"]
    measured = {
        "plaintext_aggregator_compute_s": plain["aggregator_compute_s"],
        "plaintext_end_to_end_s": plain["end_to_end_s"],
        "encrypted_end_to_end_s": enc["end_to_end_s"],
        "encrypted_query_bytes": enc["query_bytes"],
    }
    return {
        name: {"measured": v, "limit": BARS[name], "pass": v <= BARS[name]}
        for name, v in measured.items()
    }


# -- data ------------------------------------------------------------------------------------


def make_data(args: argparse.Namespace) -> Data:
    informative = min(10, args.features)
    X, y = make_classification(
        n_samples=args.points + args.test,
        n_features=args.features,
        n_informative=informative,
        n_redundant=min(2, args.features - informative),
        n_classes=args.classes,
        random_state=args.seed,
    )
    stored = X[: args.points]
    Z = (X - stored.mean(axis=0)) / stored.std(axis=0)
    split = np.array_split(np.arange(args.points), args.parties)
    shares = {f"party-{i:03d}": rows for i, rows in enumerate(split)}  # party-000: the querier
    return Data(Z[: args.points], y[: args.points], Z[args.points :], y[args.points :], shares)


# -- one mode: HE or the plaintext twin ------------------------------------------------------


def run_mode(
    keyholder: KeyHolder,
    data: Data,
    args: argparse.Namespace,
    *,
    encrypted: bool,
    console: Console,
) -> dict[str, Any]:
    mode = "HE" if encrypted else "plaintext twin"
    protocol, declared = declare(keyholder, encrypted, args, data)
    out: dict[str, Any] = {**declared, "queries_per_layout": knn.queries_per_layout(args.features)}
    for query in QUERIES if encrypted else QUERIES[:1]:
        enc = query == "encrypted"
        console.print(f"{mode}: upload for {query} queries ×{args.repeats} …")
        uploads = [build_store(protocol, [args.seed, r], enc) for r in range(args.repeats)]
        out[f"{query}_upload"] = {  # the last store stays for the queries
            **summarize([timing for timing, _ in uploads]),
            "party_encrypt_s_per_repeat": [encrypt_s for _, encrypt_s in uploads],
        }
        protocol.store.check_ready(args.k, min_parties=2)
        out[f"{query}_store"] = store_info(protocol.store)
        batch = min(args.enc_batch if enc else args.batch, protocol.store.query_budget)
        console.print(f"{mode}: {query} queries: 1 and {batch} per request, ×{args.repeats} …")
        protocol.relayouts = []
        ask(protocol, data.queries[:1], encrypted_query=enc)  # warm-up, not measured
        out[f"{query}_query"] = repeat_queries(protocol, data.queries, 1, enc, args.repeats)
        out[f"{query}_batch"] = repeat_queries(protocol, data.queries, batch, enc, args.repeats)
        console.print(f"{mode}: {query} queries: all {args.test} test queries …")
        predictions = predict_all(protocol, data.queries, batch, enc)
        out[f"{query}_predictions"] = predictions.astype(int).tolist()
        out[f"{query}_relayout"] = relayout_cost(protocol)
    return out


def relayout_cost(protocol: Protocol) -> dict[str, Any]:
    """What a fresh layout costs (all parties encrypt again, the aggregator rebuilds the store),
    and that cost spread over the queries one layout answers."""
    runs = summarize(protocol.relayouts)
    budget = protocol.store.query_budget
    median = runs["median"]
    parties_s = median["parties_encrypt_total_s"] + median["build_s"]
    return {
        **runs,
        "layouts": len(protocol.relayouts),
        "per_query_compute_s": parties_s / budget,
        "per_query_bytes": median["upload_bytes_total"] / budget,
    }


def declare(
    keyholder: KeyHolder, encrypted: bool, args: argparse.Namespace, data: Data
) -> tuple[Protocol, dict[str, Any]]:
    job_id = f"bench-knn-{'he' if encrypted else 'twin'}"
    outputs = {knn.RANK_OUTPUT: (BUDGET, None), knn.VOTE_OUTPUT: (BUDGET, None)}
    job = {"params": knn.PARAMS, "task": knn.TASK, "meta": {"k": args.k, "querier": QUERIER}}
    job |= {"outputs": outputs, "min_parties": 2, "encrypted": encrypted}
    declaration = aggregate.declare(job_id, **job)
    public, keygen_s = bench.timed_call(
        keyholder.declare_job, declaration, knn.query_keys(args.features)
    )
    # Registration, once per job (the twin registers nothing): the votes are sealed to QUERIER.
    parties, register_s = bench.register(keyholder, job_id, list(data.shares))
    context = bench.context_of(public)
    protocol = Protocol(keyholder, job_id, context, args.k, args.classes, parties, data)
    declared = {"keygen_s": keygen_s, "register_s": register_s, "public_context_bytes": len(public)}
    return protocol, declared


def store_info(store: knn.KNNStore) -> dict[str, int]:
    n_blocks = store.layout.n_blocks
    per_block = store.point_rows + store.n_labels  # points (columns or diagonals), labels
    return {"points": store.n_points, "blocks": n_blocks, "ciphertexts": n_blocks * per_block}


# -- upload ----------------------------------------------------------------------------------


def build_store(
    protocol: Protocol, seed: list[int], encrypted_queries: bool
) -> tuple[Timings, list[float]]:
    """Every party uploads its share into a fresh layout: the new store (`protocol.store`), its
    timings and the parties' encryption seconds."""
    data, n_classes = protocol.data, protocol.n_classes
    counts = {name: len(rows) for name, rows in data.shares.items()}
    layout = knn.StoreLayout.plan(counts, SLOTS, np.random.default_rng(seed))
    options = {"encrypted_queries": encrypted_queries}
    store = knn.KNNStore(protocol.context, data.Z.shape[1], n_classes, layout, **options)
    uploads, encrypt_s, sizes = [], [], []
    for i, segment in enumerate(layout.segments):
        rows = data.shares[segment.party]
        labels = knn.label_rows(data.y[rows], n_classes)
        options["rng"] = np.random.default_rng([*seed, i])
        started = time.perf_counter()
        payload = knn.party_upload(
            protocol.context, data.Z[rows], labels, segment, SLOTS, **options
        )
        encrypt_s.append(time.perf_counter() - started)
        sizes.append(sum(len(blob) for blob in payload.values()))
        uploads.append((segment, payload))
    started = time.perf_counter()
    for segment, payload in uploads:
        store.add(segment, payload)
    protocol.store = store
    timing = {
        "party_encrypt_s": statistics.median(encrypt_s),
        "parties_encrypt_total_s": sum(encrypt_s),
        "party_bytes": statistics.median(sizes),
        "upload_bytes_total": sum(sizes),
        "bytes_per_point": sum(sizes) / len(data.Z),
        "build_s": time.perf_counter() - started,
    }
    return timing, encrypt_s


# -- queries ---------------------------------------------------------------------------------


def ask(
    protocol: Protocol, queries: np.ndarray, *, encrypted_query: bool
) -> tuple[np.ndarray, Timings]:
    """One request of `queries` through every step; times and bytes per step (whole request)."""
    timing: Timings = {}
    protocol.ready_for(len(queries))
    started = time.perf_counter()
    selection = rank(protocol, queries, encrypted_query, timing)
    predictions = vote(protocol, selection, len(queries), timing)
    timing["end_to_end_s"] = time.perf_counter() - started
    timing["aggregator_compute_s"] = timing["distances_s"] + timing["votes_s"]
    timing["keyholder_s"] = timing["keyholder_rank_s"] + timing["keyholder_vote_s"]
    timing["querier_s"] = sum(
        timing.get(key, 0.0) for key in ("querier_encrypt_s", "querier_masks_s", "querier_answer_s")
    )
    timing["queries_per_s"] = len(queries) / timing["end_to_end_s"]
    return predictions, timing


def rank(protocol: Protocol, queries: np.ndarray, encrypted_query: bool, timing: Timings) -> bytes:
    """Querier (query) → aggregator (masked distances) → key holder: Enc(selection) bytes."""
    store, n = protocol.store, len(queries)
    asked: Any = queries
    timing["query_bytes"] = queries.astype(float).nbytes  # a plaintext query travels as float64
    if encrypted_query:
        with timed(timing, "querier_encrypt_s"):
            blob = knn.querier_encrypt(protocol.context, queries, SLOTS).to_bytes()
        timing["query_bytes"] = len(blob)
        with timed(timing, "aggregator_io_s"):
            asked = store.load_queries(blob, n)
    with timed(timing, "distances_s"):
        distances = store.masked_distances(asked)
    with timed(timing, "aggregator_io_s"):
        blob = distances.to_bytes()
    timing["distances_bytes"] = len(blob)
    with timed(timing, "keyholder_rank_s"):
        ranked = knn.keyholder_rank(protocol.keyholder, protocol.request(knn.RANK_OUTPUT, blob))
    timing["selection_bytes"] = len(ranked["selection"])
    return ranked["selection"]


def vote(protocol: Protocol, selection: bytes, n: int, timing: Timings) -> np.ndarray:
    """Querier (Enc(ρ)) → aggregator (masked votes) → key holder (slot sums: vote + ρ, sealed
    to the querier) → querier (open, unmask, majority): the predictions."""
    store = protocol.store
    with timed(timing, "querier_masks_s"):
        masks, rho = knn.querier_masks(protocol.context, n, store.n_labels, SLOTS)
        mask_blob = masks.to_bytes()
    timing["masks_bytes"] = len(mask_blob)
    with timed(timing, "aggregator_io_s"):
        chosen = store.load_selection(selection, n)
        loaded = store.load_masks(mask_blob, n)
    with timed(timing, "votes_s"):
        votes = store.votes(chosen, loaded)
    with timed(timing, "aggregator_io_s"):
        blob = votes.to_bytes()
    timing["votes_bytes"] = len(blob)
    with timed(timing, "keyholder_vote_s"):
        request = protocol.request(knn.VOTE_OUTPUT, blob)
        released = knn.keyholder_vote(protocol.keyholder, request)
    # Sealed to the querier (HE); the twin's values come in the clear.
    timing["released_bytes"] = sum(len(data) for data in released.values())
    with timed(timing, "querier_answer_s"):
        opened = protocol.parties.released(released, knn.VOTE_OUTPUT, request.round, QUERIER)
        predictions = knn.querier_answer(opened, rho, protocol.k, protocol.n_classes)
    return predictions


def repeat_queries(
    protocol: Protocol, queries: np.ndarray, n: int, encrypted_query: bool, repeats: int
) -> dict[str, Any]:
    """`repeats` requests of `n` queries each, the next test queries every time (cyclic)."""
    runs = []
    for repeat in range(repeats):
        rows = (np.arange(n) + repeat * n) % len(queries)
        runs.append(ask(protocol, queries[rows], encrypted_query=encrypted_query)[1])
    return {"queries_per_request": n, **summarize(runs)}


def predict_all(
    protocol: Protocol, queries: np.ndarray, batch: int, encrypted_query: bool
) -> np.ndarray:
    chunks = [
        ask(protocol, queries[start : start + batch], encrypted_query=encrypted_query)[0]
        for start in range(0, len(queries), batch)
    ]
    return np.concatenate(chunks)


# -- plaintext references --------------------------------------------------------------------


def run_reference(data: Data, args: argparse.Namespace) -> tuple[dict[str, Any], np.ndarray]:
    """Seconds per query (median over repeats): numpy brute force, scikit-learn one query per
    predict and all test queries in one predict; and scikit-learn's predictions."""
    norms = np.sum(data.Z**2, axis=1)  # kept beside the points, as the store keeps ‖x‖²
    model = KNeighborsClassifier(n_neighbors=args.k, algorithm="brute").fit(data.Z, data.y)
    n, runs = len(data.queries), []
    numpy_predictions = sklearn_predictions = np.empty(0)
    for _ in range(args.repeats):
        timing: Timings = {}
        with timed(timing, "numpy_s"):
            numpy_predictions = np.array(
                [numpy_knn(data.Z, norms, data.y, q, args.k, args.classes) for q in data.queries]
            )
        with timed(timing, "sklearn_single_s"):
            for q in data.queries:
                model.predict(q[None])
        with timed(timing, "sklearn_batch_s"):
            sklearn_predictions = model.predict(data.queries)
        runs.append({key: value / n for key, value in timing.items()})
    out = summarize(runs)
    out["numpy_predictions"] = numpy_predictions.astype(int).tolist()
    out["sklearn_predictions"] = sklearn_predictions.astype(int).tolist()
    return out, sklearn_predictions


def numpy_knn(
    Z: np.ndarray, norms: np.ndarray, y: np.ndarray, q: np.ndarray, k: int, n_classes: int
) -> int:
    """Majority class of the k nearest (squared distance up to ‖q‖²; ties: smallest label)."""
    distances = norms - 2.0 * (Z @ q)
    nearest = np.argpartition(distances, k - 1)[:k]
    return int(np.argmax(np.bincount(y[nearest], minlength=n_classes)))


def agreement(results: dict[str, Any], sklearn: np.ndarray, data: Data) -> dict[str, Any]:
    """Share of test queries on which each run predicts what scikit-learn does; accuracies."""
    runs = {
        "he_plaintext_query": results["he"]["plaintext_predictions"],
        "he_encrypted_query": results["he"]["encrypted_predictions"],
        "twin_plaintext_query": results["twin"]["plaintext_predictions"],
        "numpy": results["reference"]["numpy_predictions"],
    }
    out: dict[str, Any] = {
        f"{name}_vs_sklearn": float(np.mean(np.asarray(pred) == sklearn))
        for name, pred in runs.items()
    }
    out["accuracy"] = {
        name: float(np.mean(np.asarray(pred) == data.y_queries))
        for name, pred in {**runs, "sklearn": sklearn}.items()
    }
    out["test_queries"] = len(sklearn)
    return out


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """HE seconds per query over plaintext seconds per query."""
    he, ref = results["he"], results["reference"]["median"]
    per_query = {
        "he_plaintext_query_aggregator": he["plaintext_query"]["median"]["aggregator_compute_s"],
        "he_plaintext_query_end_to_end": he["plaintext_query"]["median"]["end_to_end_s"],
        "he_encrypted_query_end_to_end": he["encrypted_query"]["median"]["end_to_end_s"],
        "he_plaintext_batch_per_query": 1 / he["plaintext_batch"]["median"]["queries_per_s"],
        "he_encrypted_batch_per_query": 1 / he["encrypted_batch"]["median"]["queries_per_s"],
        "twin_plaintext_query_end_to_end": results["twin"]["plaintext_query"]["median"][
            "end_to_end_s"
        ],
    }
    references = {"numpy": ref["numpy_s"], "sklearn_single": ref["sklearn_single_s"]}
    return {f"{n}_vs_{r}": s / v for n, s in per_query.items() for r, v in references.items()}


# -- report ----------------------------------------------------------------------------------


BAR_COLUMNS = ("measure", "measured", "bar", "verdict")


def bar_rows(results: dict[str, Any]) -> bench.Rows:
    """The bars, the re-upload cost and the agreement with scikit-learn (also `benchmark.py`'s
    KNN section of benchmarks/README.md)."""
    rows = []
    for name, bar in results["bars"].items():
        shown = fmt_bytes if name.endswith("bytes") else fmt_time
        verdict = "PASS" if bar["pass"] else "FAIL"
        label = name.removesuffix("_s").replace("_", " ")
        rows.append([label, shown(bar["measured"]), shown(bar["limit"]), verdict])
    for q in QUERIES:
        again = results["he"][f"{q}_relayout"]
        cost = [fmt_time(again["per_query_compute_s"]), fmt_bytes(again["per_query_bytes"])]
        rows.append([f"{q} store: re-upload per query", *cost, "(cost of fresh layouts)"])
    for name, value in results["accuracy"].items():
        if name.endswith("_vs_sklearn"):
            verdict = "PASS" if value >= 0.99 else "FAIL"
            rows.append([f"agreement with sklearn: {name[:-11]}", f"{value:.1%}", "≥ 99%", verdict])
    return rows


if __name__ == "__main__":
    main()
