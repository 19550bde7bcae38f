"""KNN over Flower: the aggregator's side of `fedhe.tasks.knn`.

Moments (global standardization) → for every `knn.queries_per_layout(d)` queries: a fresh
layout and an upload of encrypted points into the store (the first one saved under the output
folder) → query batches from the querier party: masked distances, ranking by the key holder,
encrypted vote, release of the masked vote, unmasking by the querier.

With `keep_store` (encrypted job) the job also declares rankings and votes for as many later
queries as it asks itself, and after its own queries the parties upload that many fresh layouts,
never queried, kept under `<out>/knn-kept/` with the public context and what a querier needs
(k, the standardizer): `fedhe.knn_predict` asks them later, through the key holder's policy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fedhe import protocol
from fedhe.aggregator.job import Job
from fedhe.config import ConfigError, querier_party
from fedhe.crypto import CKKSParams, KeyRequest, Tensor
from fedhe.errors import FedHEError
from fedhe.progress import progress
from fedhe.tasks import knn, moments, scores

log = logging.getLogger("fedhe.aggregator")

# Parties per upload message round: bounds the ciphertexts the aggregator holds at once (a
# party's upload is up to (d + 2 + classes) ciphertexts of ~330 KB per block it touches).
UPLOAD_WAVE = 32

# What `keep_store` leaves under the output folder (read by fedhe.knn_predict).
KEPT_FOLDER = "knn-kept"
KEPT_MANIFEST = "manifest.json"
KEPT_CONTEXT = "public.ctx"
KEPT_VERSION = 1


def store_digests(folder: Path, names: Iterable[str] | None = None) -> dict[str, str]:
    """SHA-256 of each kept file (`names` in `folder`, default all), so that a later query
    never runs on a changed ciphertext."""
    paths = [folder / n for n in names] if names is not None else sorted(folder.iterdir())
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in paths
        if p.is_file() and p.suffix != ".tmp"
    }


class KNNJob(Job):
    """`knn`: classification (majority vote) or regression (mean of the k nearest targets)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.n_classes = self.source_classes()
        # The releases are declared before the querier says how many rows it holds (a
        # deployed querier: its own query file): `queries`, else the test set's rows; it asks
        # no more than it holds (`_fit_to_querier`).
        self.n_queries = self.config.inference.queries or self.test.n_samples
        if not self.n_queries:
            raise ConfigError(
                "this aggregator holds no test set to size the KNN queries by: set queries=N, "
                "the most queries the querier's site may ask (its query-path file's rows)."
            )
        self._plan_queries()
        # by index, or by the name the user knows it by (a deployment: its site name)
        self.querier = querier_party(self.config.inference.querier, self.run.names)
        self.encrypted_queries = self.config.knn.query == "encrypted"  # else feature columns
        self.uploaded: set[str] = set()  # parties whose first upload was stored

    def _plan_queries(self) -> None:
        """Layouts and batches for `n_queries` queries (`knn.query_plan`)."""
        self.plan = knn.query_plan(
            self.n_queries,
            self.config.knn.query_batch,
            knn.queries_per_layout(self.test.n_features),
        )
        self.n_batches = sum(len(batches) for batches in self.plan)

    def _fit_to_querier(self) -> None:
        """The job declared its releases for the test set's rows before the parties said
        anything; a deployed querier holds its own query file, which may hold fewer rows: ask
        only those (more than declared are never asked)."""
        held = self.queries.get(self.querier, self.n_queries)
        if held < self.n_queries:
            log.info("the querier holds %d queries; the job asks those", held)
            self.n_queries = held
            self._plan_queries()

    def source_classes(self) -> int:
        return self.test.n_classes if self.test.task == "classification" else 0

    def params(self) -> CKKSParams:
        return knn.PARAMS

    def keys(self) -> KeyRequest:
        return knn.query_keys(self.test.n_features)

    def meta(self) -> dict[str, Any]:
        return {"k": self.config.knn.k, "querier": self.querier}

    @property
    def keeps_store(self) -> bool:
        return self.config.knn.keep_store and self.run.encrypted

    @property
    def reserved_queries(self) -> int:
        """Later queries the kept layouts answer: as many as the job asks itself."""
        return self.n_queries if self.keeps_store else 0

    def outputs(self) -> dict[str, tuple[int, Any]]:
        columns = self.test.n_features + (0 if self.n_classes else 1)
        # Later queries are declared now, with the job: one release per query at most (a
        # batch of them takes one), so the key holder's budget bounds every ranking it sees.
        releases = self.n_batches + self.reserved_queries
        return {
            moments.OUTPUT: (1, self.moments_layout(columns)),
            knn.RANK_OUTPUT: (releases, None),
            knn.VOTE_OUTPUT: (releases, None),
        }

    def phases(self) -> None:
        self._fit_to_querier()
        checkpoint = self.resumable()
        store = None
        if checkpoint is None:
            standardizer = self._standardizer()
        else:  # the moments' budget is spent: take them from the checkpoint, and the store
            standardizer = moments.Standardizer.from_dict(checkpoint.standardizer)
            store = self._saved_store()
        # model.json: the global moments (a declared output) and the fill of missing cells
        self.run.model["standardizer"] = standardizer.to_dict()
        if store is None:
            store = self._upload(standardizer, first=True)
            self._save_first(store, standardizer)
        before, started = dict(self.run.timings_s), time.perf_counter()
        reports = self._ask_all(store, standardizer)
        per_query = self._per_query(before, time.perf_counter() - started)
        kept = self._keep_for_predictions(standardizer) if self.keeps_store else None
        self.run.extras["knn"] = {
            "k": self.config.knn.k,
            "query": self.config.knn.query,
            "stored_points": store.n_points,
            "blocks": store.layout.n_blocks,
            "queries_per_layout": store.query_budget,
            "layouts": len(self.plan),
            "queries": self.n_queries,
            "querier": self.name_of(self.querier),
            "per_query_s": per_query,
        }
        if kept is not None:
            self.run.extras["knn"]["kept"] = kept
        # The predictions stay with the querier; its opt-in counts are all that comes back.
        self.run.metrics = scores.combine(reports, self.n_classes)

    def _ask_all(
        self, first_store: knn.KNNStore, standardizer: moments.Standardizer
    ) -> list[dict[str, float]]:
        """Every query batch; each layout of the plan after the first is a fresh upload."""
        reports, batch_index = [], 0
        kind = "encrypted" if self.run.encrypted else "plaintext twin"
        with progress(self.n_batches, f"{kind}: query batches") as advance:
            for number, batches in enumerate(self.plan):
                store = first_store if number == 0 else self._upload(standardizer, first=False)
                store.check_ready(self.config.knn.k, self.config.min_parties)
                for start, stop in batches:
                    reports.append(self._ask_batch(store, standardizer, start, stop, batch_index))
                    batch_index += 1
                    advance(f"{kind}: queries {stop}/{self.n_queries}")
        return reports

    def _save_first(self, store: knn.KNNStore, standardizer: moments.Standardizer) -> None:
        path = store.save(self.store_folder)
        self.save_checkpoint(standardizer=standardizer.to_dict())
        log.info(
            "KNN store: %d points of %d parties, saved to %s",
            store.n_points,
            len(store.contributors),
            path.parent,
        )

    def _keep_for_predictions(self, standardizer: moments.Standardizer) -> dict[str, Any]:
        """Fresh layouts for `reserved_queries` later queries, uploaded now and never queried
        here, saved with the public context and the manifest `fedhe.knn_predict` reads. A
        layout that cannot answer (too few parties) is left out, and said."""
        folder = Path(self.config.out) / KEPT_FOLDER
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        layouts, budget = [], knn.queries_per_layout(self.test.n_features)
        for number in range(-(-self.reserved_queries // budget)):
            store = self._upload(standardizer, first=False)
            try:
                store.check_ready(self.config.knn.k, self.config.min_parties)
            except FedHEError as err:
                log.warning("kept layout %d left out: %s", number, err)
                continue
            store.save(folder / f"layout-{number}")
            layouts.append(f"layout-{number}")
        if self.context is None:  # keeps_store holds for encrypted jobs only
            raise FedHEError("a kept KNN store needs the job's public context.")
        (folder / KEPT_CONTEXT).write_bytes(self.context.to_bytes())
        manifest = {
            "version": KEPT_VERSION,
            "job_id": self.run.job_id,
            "k": self.config.knn.k,
            "n_classes": self.n_classes,
            "n_features": self.test.n_features,
            "feature_names": list(self.test.feature_names),
            "querier": self.querier,
            "standardizer": standardizer.to_dict(),
            "first_round": self.n_batches,  # the job's own releases take rounds 0 … n − 1
            "reserved_queries": self.reserved_queries,
            "query_batch": self.config.knn.query_batch,
            "layouts": layouts,
            "digests": {
                **{name: store_digests(folder / name) for name in layouts},
                KEPT_CONTEXT: store_digests(folder, (KEPT_CONTEXT,)),
            },
        }
        (folder / KEPT_MANIFEST).write_text(json.dumps(manifest, indent=1))
        for path in folder.rglob("*"):  # the key holder's secret key lies beside: owner only
            path.chmod(0o700 if path.is_dir() else 0o600)
        log.info("KNN store kept for %d later queries in %s", self.reserved_queries, folder)
        return {"folder": str(folder), "layouts": len(layouts), "queries": self.reserved_queries}

    @property
    def store_folder(self) -> Path:
        return Path(self.config.out) / f"knn-store-{'he' if self.run.encrypted else 'plain'}"

    def _standardizer(self) -> moments.Standardizer:
        standardizer, _ = self.feature_moments(with_target=not self.n_classes)
        if self.config.knn.standardize:
            return standardizer
        # raw features; a regression target stays standardized
        return moments.Standardizer(
            np.zeros_like(standardizer.mean),
            np.ones_like(standardizer.std),
            standardizer.y_mean,
            standardizer.y_std,
            standardizer.fill,  # missing cells still get the global means
        )

    def _saved_store(self) -> knn.KNNStore | None:
        """The interrupted job's store, if it loads under this job's keys (else: upload again)."""
        try:
            store = knn.KNNStore.load(self.store_folder, self.context)
        except FedHEError as err:
            log.warning("saved KNN store not reused, parties upload again: %s", err)
            return None
        if self.encrypted_queries != store.encrypted_queries or store.queries_answered:
            log.warning("saved KNN store is of another kind or used, parties upload again")
            return None
        self.run.extras["store_reused"] = True
        self.uploaded = set(store.contributors)
        return store

    # -- upload ------------------------------------------------------------------------------------

    def _upload(self, standardizer: moments.Standardizer, *, first: bool) -> knn.KNNStore:
        """Parties upload in waves of UPLOAD_WAVE, each wave added to the store before the
        next: the aggregator never holds more than one wave of ciphertexts in memory. Each
        upload gets a fresh layout (segment order here, point order at every party)."""
        slots = knn.PARAMS.slots
        counts = {name: self.samples[name] for name in self.parties if self.samples[name]}
        for name in set(self.parties) - set(counts):  # it may still ask queries
            self.run.excluded[name] = "knn upload: no points to store"
        counts = {name: n for name, n in counts.items() if first or name in self.uploaded}
        layout = knn.StoreLayout.plan(counts, slots)
        segments = {s.party: s for s in layout.segments}
        store = knn.KNNStore(
            self.context,
            self.test.n_features,
            self.n_classes,
            layout,
            encrypted_queries=self.encrypted_queries,
        )
        names = list(counts)
        for start in range(0, len(names), UPLOAD_WAVE):
            wave = {name: self.parties[name] for name in names[start : start + UPLOAD_WAVE]}
            self._upload_wave(wave, standardizer, segments, store)
        if first:
            self.uploaded = set(store.contributors)
            self.run.contributors.append(
                {"output": "knn_store", "parties": sorted(store.contributors)}
            )
        return store

    def _upload_wave(
        self,
        wave: dict[str, int],
        standardizer: moments.Standardizer,
        segments: dict[str, knn.Segment],
        store: knn.KNNStore,
    ) -> None:
        exchange = self.session.ask(
            wave,
            protocol.KNN_UPLOAD,
            {
                name: protocol.content(
                    protocol.KNN_UPLOAD,
                    protocol.REQUEST,
                    config={
                        "job-id": self.run.job_id,
                        "standardizer": standardizer.to_dict(),
                        "n-classes": self.n_classes,
                        "segment": vars(segments[name]),
                        "slots": store.slots,
                        "encrypted-queries": store.encrypted_queries,
                        "fail-party": self.config.drop_party,
                    },
                )
                for name in wave
            },
            role="party",
        )
        self.account(exchange)
        started = time.perf_counter()
        for name in list(exchange.replies):
            reply = exchange.replies.pop(name)  # let each upload go once it is in the store
            try:
                store.add(segments[name], protocol.payload_of(reply))
            except FedHEError as err:  # one bad upload is excluded, the others are kept
                log.warning("upload of %s rejected: %s", name, err)
                self.run.excluded[name] = f"knn upload: {err}"
        self.run.timings_s["compute"] += time.perf_counter() - started
        for name, reason in exchange.failures.items():
            self.run.excluded[name] = f"knn upload: {reason}"

    # -- queries -----------------------------------------------------------------------------------

    def _ask_batch(
        self,
        store: knn.KNNStore,
        standardizer: moments.Standardizer,
        start: int,
        stop: int,
        batch: int,
    ) -> dict[str, float]:
        settings = {
            "standardizer": standardizer.to_dict(),
            "n-classes": self.n_classes,
            "slots": store.slots,
            "start": start,
            "stop": stop,
            "query": self.config.knn.query,
            "k": self.config.knn.k,
        }
        asked = self.ask_party(self.querier, protocol.KNN_QUERY, settings)
        payload = protocol.payload_of(asked)
        n = stop - start
        started = time.perf_counter()
        queries = self._load_queries(store, payload["queries"], n)
        distances = store.masked_distances(queries)
        self.run.timings_s["compute"] += time.perf_counter() - started
        contributors = store.contributors  # each batch is one release of each output
        ranked = self.release(knn.RANK_OUTPUT, distances.to_bytes(), contributors, round_=batch)
        started = time.perf_counter()
        selection = store.load_selection(ranked["selection"], n)
        votes = store.votes(selection, store.load_masks(payload["masks"], n))
        self.run.timings_s["compute"] += time.perf_counter() - started
        released = self.release(knn.VOTE_OUTPUT, votes.to_bytes(), contributors, round_=batch)
        answer = self.ask_party(
            self.querier,
            protocol.KNN_ANSWER,
            {**settings, "output": knn.VOTE_OUTPUT, "round": batch},
            payload=released,  # sealed to the querier (the twin's in the clear)
        )
        return protocol.metrics_of(answer)

    def _load_queries(self, store: knn.KNNStore, data: bytes, n: int) -> np.ndarray | Tensor:
        if self.config.knn.query == "encrypted":
            return store.load_queries(data, n)
        queries = protocol.array_from_bytes(data)
        return knn.check_queries(queries, store.n_features)

    # -- results -----------------------------------------------------------------------------------

    def _per_query(self, before: dict[str, float], wall_s: float) -> dict[str, float]:
        """Query phase per query: aggregator compute, key-holder work, querier work (encryption,
        masks), and the rest of the wall time (transfer, serialization, waiting)."""
        spent = {k: self.run.timings_s.get(k, 0.0) - before.get(k, 0.0) for k in self.run.timings_s}
        parts = {
            "aggregator_compute": spent.get("compute", 0.0),
            "keyholder": spent.get("decrypt", 0.0),
            "querier": spent.get("encrypt", 0.0),
        }
        parts["transfer"] = max(0.0, wall_s - sum(parts.values()))
        parts["total"] = wall_s
        return {k: round(v / self.n_queries, 6) for k, v in parts.items()}
