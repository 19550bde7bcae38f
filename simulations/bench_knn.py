"""Benchmark KNN over an encrypted store (`fedhe.tasks.knn`) against plaintext KNN.

In process: no Flower, no network, no Ray; the parties, the aggregator, the key holder and the
querier run one after another in this process, through the steps of `fedhe.tasks.knn` that
`aggregator/knn.py` and `clients/party.py` string together over Flower.

* Data: synthetic, ``sklearn.datasets.make_classification`` (``--points`` + ``--test`` rows,
  ``--features`` features, 10 informative, ``--classes`` classes, ``--seed``), standardized
  with the stored points' mean and std (computed in the clear), stored points split over
  ``--parties`` parties (``np.array_split``); the ``--test`` rows are the queries.
* One key holder, one job per mode (keys generated at declaration, outside every timing):
  HE (CKKS, `knn.PARAMS`, relinearization key) and its plaintext twin (context None). The job
  declares its querier (``party-000``, also a party that stores points); the HE job's parties
  register with the key holder (`fedhe.keyholder.inprocess.TaggedParties`: sealed seeds, once
  per job, outside every timing, reported apart), so that the key holder can seal the votes to
  the querier. Every request (rank or vote) is the release of the next round label of its
  output (each (output, round) is released once).
* Phases, each the median over ``--repeats`` (``time.perf_counter``):
  1. Upload: per-party encryption (median over parties), bytes per party and per stored
     point (all payload bytes / points), the store build (``store.add`` of every upload).
  2. One plaintext query end to end: aggregator compute (masked distances + votes), aggregator
     I/O (loading and serializing tensors), key holder (rank + vote release, the votes sealed
     to the querier), querier (masks, opening the sealed votes, answer). Bars (issue 14):
     aggregator compute ≤ 60 ms, end to end ≤ 150 ms.
  3. One encrypted query (one packed ciphertext, ≤ 1 MB): the same, plus the querier's
     encryption and the query's bytes. Bar: end to end ≤ 300 ms.
  A store layout answers `knn.queries_per_layout(d)` queries; then every party uploads again
  under a fresh layout, outside the query timings: its cost (all parties' encryption + the
  store build) divided by the queries of one layout is reported as "re-upload per query".
  4. Throughput: one batch of ``--batch`` plaintext queries and one of ``--enc-batch``
     encrypted queries end to end → queries per second.
  5. Plaintext references: brute-force KNN in numpy (one query at a time) and scikit-learn's
     ``KNeighborsClassifier(algorithm="brute")`` (one query per predict, and all at once);
     ratios HE/plaintext.
  6. Agreement: every test query through the HE protocol (plaintext and encrypted queries) and
     the twin, against ``KNeighborsClassifier`` fitted on all stored points pooled (same k).
  Each query repeat takes the next test queries (cyclically); one unmeasured warm-up query
  per mode runs first (TenSEAL and numpy first-call costs).

Run:  python simulations/bench_knn.py [--quick]   (from the repository root, with the venv:
      .venv/bin/python simulations/bench_knn.py --quick for a smoke run of a few seconds)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from machine import (  # simulations/machine.py, beside this script
    Timings,
    fmt_bytes,
    fmt_time,
    machine_info,
    print_phase_table,
    row,
    summarize,
    timed,
)
from rich.console import Console
from sklearn.datasets import make_classification
from sklearn.neighbors import KNeighborsClassifier

from fedhe.crypto import PublicContext
from fedhe.keyholder import DecryptionRequest, KeyHolder
from fedhe.keyholder.inprocess import TaggedParties
from fedhe.tasks import aggregate, check_declaration, knn

DEFAULTS = {"points": 10_000, "repeats": 5, "batch": 32, "enc_batch": 8, "test": 64}
QUICK = {"points": 2_000, "repeats": 2, "batch": 8, "enc_batch": 2, "test": 16}
DEFAULT_OUT = {False: Path("benchmarks/knn.json"), True: Path("benchmarks/knn-quick.json")}
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
    store: knn.KNNStore | None = None
    rounds: Counter[str] = field(default_factory=Counter)  # next round label per output
    data: Data | None = None
    relayouts: list[Timings] = field(default_factory=list)  # fresh layouts during queries

    def ready_for(self, n: int) -> None:
        """A fresh layout (all parties upload again) when the store's budget cannot take `n`
        more queries: timed apart, reported as the re-upload cost per query."""
        assert self.store is not None and self.data is not None
        if self.store.queries_left >= n:
            return
        seed = [len(self.relayouts), 99]
        self.store, timing, _ = build_store(self, self.data, seed, self.store.encrypted_queries)
        self.relayouts.append(timing)

    def request(self, output: str, tensor: bytes) -> DecryptionRequest:
        """The next release of `output` (ranks and votes are no sums: no tags)."""
        assert self.store is not None
        round_ = self.rounds[output]
        self.rounds[output] += 1
        contributors = tuple(self.store.contributors)
        return DecryptionRequest(self.job_id, output, contributors, tensor, round_)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, help="stored points (10000; --quick 2000)")
    parser.add_argument("--features", type=int, default=30, help="features d (30)")
    parser.add_argument("--parties", type=int, default=10, help="parties (10)")
    parser.add_argument("--classes", type=int, default=2, help="classes (2)")
    parser.add_argument("--k", type=int, default=5, help="neighbours (5)")
    parser.add_argument("--repeats", type=int, help="repeats per measure (5; --quick 2)")
    parser.add_argument("--batch", type=int, help="plaintext queries per batch (32; --quick 8)")
    parser.add_argument("--enc-batch", type=int, help="encrypted queries per batch (8; quick 2)")
    parser.add_argument("--test", type=int, help="test queries (64; --quick 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--out", type=Path, help="JSON report (benchmarks/knn.json)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or DEFAULT_OUT[args.quick]
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
    reference, sklearn_predictions = run_reference(data, args)
    results["reference"] = reference
    results["accuracy"] = agreement(results, sklearn_predictions, data)
    results["ratios"] = ratios(results)
    results["bars"] = bars(results["he"])
    report = {
        "benchmark": "KNN over an encrypted store vs plaintext KNN, in process (no Flower)",
        "config": config(args),
        "machine": machine_info(),
        "results": results,
        "wall_s": time.perf_counter() - started,
    }
    print_report(console, report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out} (wall time {report['wall_s']:.1f} s)")


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
        name: {"measured": value, "limit": BARS[name], "pass": value <= BARS[name]}
        for name, value in measured.items()
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
    protocol, declared = declare(keyholder, encrypted, args, list(data.shares))
    protocol.data = data
    out: dict[str, Any] = {**declared, "queries_per_layout": knn.queries_per_layout(args.features)}
    for query in ("plaintext", "encrypted") if encrypted else ("plaintext",):
        enc = query == "encrypted"
        console.print(f"{mode}: upload for {query} queries ×{args.repeats} …")
        out[f"{query}_upload"] = run_upload(protocol, data, args, encrypted_queries=enc)
        assert protocol.store is not None
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
    assert protocol.store is not None
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
    keyholder: KeyHolder, encrypted: bool, args: argparse.Namespace, names: list[str]
) -> tuple[Protocol, dict[str, Any]]:
    k, n_classes = args.k, args.classes
    job_id = f"bench-knn-{'he' if encrypted else 'twin'}"
    declaration = aggregate.declare(
        job_id,
        outputs={knn.RANK_OUTPUT: (BUDGET, None), knn.VOTE_OUTPUT: (BUDGET, None)},
        min_parties=2,
        params=knn.PARAMS,
        encrypted=encrypted,
        task=knn.TASK,
        meta={"k": k, "querier": QUERIER},
    )
    started = time.perf_counter()
    public = keyholder.declare_job(declaration, knn.query_keys(args.features))
    keygen_s = time.perf_counter() - started
    context = PublicContext.from_bytes(public) if public else None
    # Registration, once per job (the twin registers nothing): the votes are sealed to QUERIER.
    started = time.perf_counter()
    parties = TaggedParties(keyholder, job_id, names)
    register_s = time.perf_counter() - started
    if parties.refused:
        raise RuntimeError(f"the key holder refused parties at registration: {parties.refused}")
    protocol = Protocol(keyholder, job_id, context, k, n_classes, parties)
    declared = {"keygen_s": keygen_s, "register_s": register_s, "public_context_bytes": len(public)}
    return protocol, declared


def store_info(store: knn.KNNStore) -> dict[str, int]:
    n_blocks = store.layout.n_blocks
    per_block = store.point_rows + store.n_labels  # points (columns or diagonals), labels
    return {"points": store.n_points, "blocks": n_blocks, "ciphertexts": n_blocks * per_block}


# -- upload ----------------------------------------------------------------------------------


def run_upload(
    protocol: Protocol, data: Data, args: argparse.Namespace, *, encrypted_queries: bool
) -> dict[str, Any]:
    """`--repeats` fresh stores; the last one stays for the queries."""
    runs, per_party = [], []
    for repeat in range(args.repeats):
        seed = [args.seed, repeat]
        protocol.store, timing, encrypt_s = build_store(protocol, data, seed, encrypted_queries)
        runs.append(timing)
        per_party.append(encrypt_s)
    return {**summarize(runs), "party_encrypt_s_per_repeat": per_party}


def build_store(
    protocol: Protocol, data: Data, seed: list[int], encrypted_queries: bool
) -> tuple[knn.KNNStore, Timings, list[float]]:
    counts = {name: len(rows) for name, rows in data.shares.items()}
    layout = knn.StoreLayout.plan(counts, SLOTS, np.random.default_rng(seed))
    store = knn.KNNStore(
        protocol.context,
        data.Z.shape[1],
        protocol.n_classes,
        layout,
        encrypted_queries=encrypted_queries,
    )
    uploads, encrypt_s, sizes = [], [], []
    for i, segment in enumerate(layout.segments):
        rows = data.shares[segment.party]
        labels = knn.label_rows(data.y[rows], protocol.n_classes)
        rng = np.random.default_rng([*seed, i])
        started = time.perf_counter()
        payload = knn.party_upload(
            protocol.context,
            data.Z[rows],
            labels,
            segment,
            SLOTS,
            rng=rng,
            encrypted_queries=encrypted_queries,
        )
        encrypt_s.append(time.perf_counter() - started)
        sizes.append(sum(len(blob) for blob in payload.values()))
        uploads.append((segment, payload))
    started = time.perf_counter()
    for segment, payload in uploads:
        store.add(segment, payload)
    timing = {
        "party_encrypt_s": statistics.median(encrypt_s),
        "parties_encrypt_total_s": sum(encrypt_s),
        "party_bytes": statistics.median(sizes),
        "upload_bytes_total": sum(sizes),
        "bytes_per_point": sum(sizes) / len(data.Z),
        "build_s": time.perf_counter() - started,
    }
    return store, timing, encrypt_s


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
    assert store is not None
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
    assert store is not None
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
    out = {}
    for name, seconds in per_query.items():
        out[f"{name}_vs_numpy"] = seconds / ref["numpy_s"]
        out[f"{name}_vs_sklearn_single"] = seconds / ref["sklearn_single_s"]
    return out


# -- helpers ---------------------------------------------------------------------------------


# -- report ----------------------------------------------------------------------------------


def print_report(console: Console, report: dict[str, Any]) -> None:
    cfg, results = report["config"], report["results"]
    he = results["he"]
    title = (
        f"KNN benchmark: {cfg['points']} points, d={cfg['features']}, {cfg['parties']} parties, "
        f"{cfg['classes']} classes, k={cfg['k']}; median of {cfg['repeats']} repeats"
    )
    print_phase_table(console, title, caption(he, cfg), "seconds", rows(results, cfg))
    console.print(summary_lines(report))


def caption(he: dict[str, Any], cfg: dict[str, Any]) -> str:
    params = cfg["ckks_params"]
    stores = "; ".join(
        f"{query} queries {he[f'{query}_store']['blocks']} blocks, "
        f"{he[f'{query}_store']['ciphertexts']} ciphertexts"
        for query in ("plaintext", "encrypted")
    )
    return (
        f"HE stores ({cfg['slots']} slots per block): {stores}; CKKS "
        f"N={params['poly_modulus_degree']}, primes {params['coeff_mod_bit_sizes']}; keygen "
        f"{fmt_time(he['keygen_s'])}; party registration {fmt_time(he['register_s'])}; public "
        f"context {fmt_bytes(he['public_context_bytes'])}. A layout answers "
        f"{he['queries_per_layout']} queries, then every party uploads again (re-upload rows). "
        "Aggregator compute = masked distances + votes; aggregator I/O = loading and "
        "serializing tensors; key holder: the votes sealed to the querier; querier = "
        "encryption + masks + opening the votes + answer."
    )


def rows(results: dict[str, Any], cfg: dict[str, Any]) -> list[list[str]]:
    he, twin = results["he"], results["twin"]
    out = []
    for query in ("plaintext", "encrypted"):
        up = he[f"{query}_upload"]["median"]
        again = he[f"{query}_relayout"]
        out += [
            row(
                f"{query} store: party encryption (median)",
                up["party_encrypt_s"],
                up["party_bytes"],
            ),
            row(f"{query} store: build (store.add, all)", up["build_s"], up["upload_bytes_total"]),
            row(
                f"{query} store: re-upload per query",
                again["per_query_compute_s"],
                again["per_query_bytes"],
                f"all parties + build, / {he['queries_per_layout']} queries",
            ),
        ]
    for query in ("plaintext", "encrypted"):
        out += query_rows(f"HE, 1 {query} query", he[f"{query}_query"]["median"], query)
    out += batch_rows(he, cfg)
    twin_query = twin["plaintext_query"]["median"]
    out += [
        row("twin (no HE), 1 plaintext query: aggregator", twin_query["aggregator_compute_s"]),
        row("twin (no HE), 1 plaintext query: end to end", twin_query["end_to_end_s"]),
    ]
    out += reference_rows(results)
    return out


def _bar_note(name: str, value: float) -> str:
    limit = BARS[name]
    shown = fmt_bytes(limit) if name.endswith("bytes") else f"{limit * 1000:.0f} ms"
    return f"bar ≤ {shown}: {'PASS' if value <= limit else 'FAIL'}"


def query_rows(label: str, m: Timings, query: str) -> list[list[str]]:
    compute = m["aggregator_compute_s"]
    out = []
    if query == "encrypted":
        note = _bar_note("encrypted_query_bytes", m["query_bytes"])
        out.append(
            row(f"{label}: querier encryption", m["querier_encrypt_s"], m["query_bytes"], note)
        )
    compute_note = (
        _bar_note("plaintext_aggregator_compute_s", compute) if query == "plaintext" else ""
    )
    return [
        *out,
        row(f"{label}: aggregator compute", compute, None, compute_note),
        row("   masked distances", m["distances_s"], m["distances_bytes"], "→ key holder"),
        row("   votes", m["votes_s"], m["votes_bytes"], "→ key holder"),
        row("   aggregator I/O", m["aggregator_io_s"]),
        row(
            f"{label}: key holder (rank + vote)",
            m["keyholder_s"],
            m["selection_bytes"],
            "selection →",
        ),
        row(f"{label}: querier (all)", m["querier_s"], m["masks_bytes"], "masks →"),
        row(
            f"{label}: end to end",
            m["end_to_end_s"],
            None,
            _bar_note(f"{query}_end_to_end_s", m["end_to_end_s"]),
        ),
    ]


def batch_rows(he: dict[str, Any], cfg: dict[str, Any]) -> list[list[str]]:
    out = []
    for query in ("plaintext", "encrypted"):
        m = he[f"{query}_batch"]["median"]
        n = he[f"{query}_batch"]["queries_per_request"]
        per_query = fmt_time(m["aggregator_compute_s"] / n)
        note = f"{m['queries_per_s']:.2f} queries/s; aggregator {per_query}/query"
        out.append(
            row(f"HE, batch of {n} {query} queries: end to end", m["end_to_end_s"], None, note)
        )
    return out


def reference_rows(results: dict[str, Any]) -> list[list[str]]:
    ref, r = results["reference"]["median"], results["ratios"]
    return [
        row(
            "numpy brute force, per query",
            ref["numpy_s"],
            None,
            f"HE agg. {r['he_plaintext_query_aggregator_vs_numpy']:.0f}×, "
            f"HE e2e {r['he_plaintext_query_end_to_end_vs_numpy']:.0f}× / "
            f"enc. {r['he_encrypted_query_end_to_end_vs_numpy']:.0f}×",
        ),
        row(
            "sklearn KNN (brute), 1 query per predict",
            ref["sklearn_single_s"],
            None,
            f"HE e2e {r['he_plaintext_query_end_to_end_vs_sklearn_single']:.0f}× / "
            f"enc. {r['he_encrypted_query_end_to_end_vs_sklearn_single']:.0f}×",
        ),
        row("sklearn KNN (brute), batched, per query", ref["sklearn_batch_s"]),
    ]


def summary_lines(report: dict[str, Any]) -> str:
    results, m = report["results"], report["machine"]
    acc = results["accuracy"]
    agree = ", ".join(
        f"{name.removesuffix('_vs_sklearn')} {value:.1%}"
        for name, value in acc.items()
        if name.endswith("_vs_sklearn")
    )
    accuracy = ", ".join(f"{name} {value:.1%}" for name, value in acc["accuracy"].items())
    verdicts = ", ".join(
        f"{name} {'PASS' if bar['pass'] else 'FAIL'}" for name, bar in results["bars"].items()
    )
    return (
        f"Agreement with sklearn KNeighborsClassifier on {acc['test_queries']} test queries: "
        f"{agree}.\nAccuracy vs true labels: {accuracy}.\nBars: {verdicts}.\n"
        f"Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, Python "
        f"{m['python']}, numpy {m['numpy']}, tenseal {m['tenseal']}."
    )


if __name__ == "__main__":
    main()
