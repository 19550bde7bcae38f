"""Later KNN queries against a kept encrypted store: `predict(run_dir, X)`.

A knn job's model is its store: every party's points, encrypted under the job's public key
and held by the aggregator, plus the key holder, which releases only the declared outputs
(rankings, votes sealed to the querier) under its policy. With `--keep-store true` the job
keeps both after it ends (`fedhe.aggregator.knn`):

    <out>/knn-kept/manifest.json    job id, k, classes, standardizer, rounds, file digests
    <out>/knn-kept/public.ctx       the job's public context, as the aggregator held it
    <out>/knn-kept/layout-<i>/      fresh store layouts, uploaded after the job's own queries
                                    and never queried there (`KNNStore.save`)
    <out>/knn-kept/keyholder/       the key holder's state: its secret key (sealed at rest
                                    when it has a passphrase), declaration, ledger, audit log
    <out>/knn-kept/identities/      the querier's end-to-end identity (the votes are sealed
                                    to it)

Nothing of the kind is kept without the flag: the simulation's key-holder state lives in a
temporary folder deleted after the run. `predict` plays each role on this machine, with the
task's own steps: the querier standardizes its rows and draws its vote masks ρ, the
aggregator computes masked distances on the kept store (plaintext queries), the key holder
(loaded from its kept state, through its real policy and ledger) ranks and releases the
masked votes sealed to the querier, and the querier opens and unmasks them.

What bounds the leakage stays as in the job: the job declared the later rankings with its
own (one release per query at most, `KNNJob.outputs`), so the key holder refuses any beyond
them; each layout answers at most `knn.queries_per_layout(d)` queries, so the kept layouts
answer as many queries as the job asked, then `predict` refuses (run the job again).

Privacy: whoever holds `knn-kept/keyholder/` can decrypt the store. In a deployment it stays
at the key holder's site and the identity at the querier's; in a simulation every role is
this machine, so the run folder holds them all (folders 0700, files 0600).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedhe.aggregator.knn import (
    KEPT_CONTEXT,
    KEPT_FOLDER,
    KEPT_MANIFEST,
    KEPT_VERSION,
    store_digests,
)
from fedhe.crypto import PublicContext
from fedhe.crypto.channel import Identity
from fedhe.errors import DataError, FedHEError, PolicyError, ProtocolError
from fedhe.keyholder import DecryptionRequest, KeyHolder, registry
from fedhe.keyholder.member import GroupMember
from fedhe.tasks import RELEASE_RULES, check_declaration, keyholder_release, knn
from fedhe.tasks.moments import Standardizer

if TYPE_CHECKING:
    from fedhe.config import JobConfig

__all__ = ["KeptStore", "describe", "predict"]

KEYHOLDER_FOLDER = "keyholder"
IDENTITIES_FOLDER = "identities"
_STATE = "predict-state.json"  # the later queries answered, the next release round


# -- where a simulation keeps things (fedhe.simulation) ----------------------------------------


def kept_folder(out: str | Path) -> Path:
    return Path(out) / KEPT_FOLDER


def keeps_state(config: JobConfig) -> bool:
    return config.task == "knn" and config.knn.keep_store


def keyholder_root(out: str | Path) -> Path:
    """The simulated key holder's state root under the run folder (made 0700)."""
    return _private_folder(_private_folder(kept_folder(out)) / KEYHOLDER_FOLDER)


class WithKeptIdentities(ClientApp):
    """`app` on simulated nodes that keep their end-to-end identity in a file under the run
    folder (`identity-path`, one per node), so that the querier can open later answers."""

    def __init__(self, app: ClientApp, out: str | Path) -> None:
        super().__init__()
        self.app = app
        self.out = str(out)

    def __call__(self, message: Message, context: Context) -> Message:
        node = int(context.node_config.get("partition-id", context.node_id))
        path = identity_path(self.out, node)
        context.node_config = {**context.node_config, "identity-path": str(path)}
        return self.app(message, context)


def identity_path(out: str | Path, node: int) -> Path:
    """Node `node`'s identity file under the run folder (what `WithKeptIdentities` sets)."""
    return (
        _private_folder(_private_folder(kept_folder(out)) / IDENTITIES_FOLDER) / f"node-{node}.key"
    )


def keep_only_the_querier(out: str | Path) -> None:
    """After the run: remove every kept identity but the querier's (the others open nothing
    a later query needs), and a kept folder whose job kept no store (an interrupted job)."""
    try:
        kept = KeptStore.open(out)
    except FedHEError:  # no store kept (the job failed or stopped): keep no key either
        shutil.rmtree(kept_folder(out), ignore_errors=True)
        return
    querier = kept.querier_identity_path()
    for path in (kept.folder / IDENTITIES_FOLDER).glob("*.key"):
        if path != querier:
            path.unlink()


def _private_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


# -- the kept store ------------------------------------------------------------------------------


@dataclass
class KeptStore:
    """What `--keep-store true` left in a run folder, checked on opening."""

    folder: Path
    manifest: dict

    @classmethod
    def open(cls, run_dir: str | Path) -> KeptStore:
        folder = kept_folder(run_dir)
        path = folder / KEPT_MANIFEST
        if not path.exists():
            raise FedHEError(
                f"{run_dir} holds no kept KNN store ({path} is missing): run the knn job with "
                "--keep-store true to answer later queries (without it the store's keys are "
                "deleted with the run)."
            )
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ProtocolError(f"{path} does not read as a kept-store manifest: {err}") from err
        if manifest.get("version") != KEPT_VERSION:
            raise ProtocolError(
                f"{path} has version {manifest.get('version')!r}; this fedhe reads version "
                f"{KEPT_VERSION}: run the job again with --keep-store true."
            )
        return cls(folder, manifest)

    @property
    def job_id(self) -> str:
        return str(self.manifest["job_id"])

    @property
    def n_features(self) -> int:
        return int(self.manifest["n_features"])

    @property
    def n_classes(self) -> int:
        return int(self.manifest["n_classes"])

    @property
    def standardizer(self) -> Standardizer:
        return Standardizer.from_dict(self.manifest["standardizer"])

    @property
    def feature_names(self) -> list[str]:
        return list(self.manifest.get("feature_names", []))

    @property
    def last_round(self) -> int:
        """The first round past the declared later queries."""
        return int(self.manifest["first_round"]) + int(self.manifest["reserved_queries"])

    def state(self) -> dict[str, int]:
        path = self.folder / _STATE
        if not path.exists():
            return {"answered": 0, "next_round": int(self.manifest["first_round"])}
        return {k: int(v) for k, v in json.loads(path.read_text()).items()}

    def next_round(self) -> int:
        return self.state()["next_round"]

    def queries_left(self) -> int:
        """What the kept layouts still answer (each at most its budget), within the queries
        and the rounds the job declared."""
        layouts = sum(self._layout_manifest(name)["queries_left"] for name in self.layouts)
        declared = int(self.manifest["reserved_queries"]) - self.state()["answered"]
        return min(layouts, declared, self.last_round - self.next_round())

    @property
    def layouts(self) -> list[str]:
        return list(self.manifest["layouts"])

    def _layout_manifest(self, name: str) -> dict:
        data = json.loads((self.folder / name / "manifest.json").read_text())
        return {"queries_left": int(data["query_budget"]) - int(data["queries_answered"])}

    # -- integrity ---------------------------------------------------------------------------------

    def check_files(self) -> None:
        """Every kept file as the job (or the last prediction) wrote it: a changed ciphertext
        would have the key holder decrypt what the job never computed."""
        expected = self.manifest.get("digests", {})
        found = {name: store_digests(self.folder / name) for name in self.layouts}
        found[KEPT_CONTEXT] = store_digests(self.folder, (KEPT_CONTEXT,))
        for name, files in found.items():
            if files != expected.get(name):
                changed = sorted(
                    set(files.items()).symmetric_difference(expected.get(name, {}).items())
                )
                raise ProtocolError(
                    f"the kept store in {self.folder} was changed since it was written "
                    f"({name}: {', '.join(sorted({f for f, _ in changed}))} differ from the "
                    "digests in its manifest): nothing was asked. Restore the run folder from "
                    "a backup or run the job again with --keep-store true."
                )

    def _record_digests(self, name: str) -> None:
        self.manifest.setdefault("digests", {})[name] = store_digests(self.folder / name)
        _write_json(self.folder / KEPT_MANIFEST, self.manifest)

    # -- the roles -------------------------------------------------------------------------------

    def context(self, keyholder: KeyHolder) -> PublicContext:
        """The kept public context, which must be the key holder's for this job."""
        context = PublicContext.from_bytes((self.folder / KEPT_CONTEXT).read_bytes())
        held = keyholder.public_context(self.job_id)
        if held is None or held.fingerprint != context.fingerprint:
            raise ProtocolError(
                f"the kept public context ({context.fingerprint}) is not the key holder's for "
                f"job {self.job_id!r}: the kept folder mixes two runs; run the job again."
            )
        return context

    def keyholder(self) -> KeyHolder:
        """The job's key holder, from its kept state, with the policy it ran under."""
        root = self.folder / KEYHOLDER_FOLDER
        for state in sorted(root.glob("*")):
            if (state / "jobs" / self.job_id / "job.json").exists():
                return GroupMember(state, rules=RELEASE_RULES, declaration_check=check_declaration)
        raise FedHEError(
            f"no key-holder state of job {self.job_id!r} under {root}: the keys were not kept "
            "(only `fedhe simulate knn --keep-store true` keeps them); run the job again."
        )

    def querier_identity_path(self) -> Path:
        """The identity file whose public key the key holder registered as the querier's."""
        registered = self.keyholder().registration(self.job_id).parties.get(self.querier)
        for path in sorted((self.folder / IDENTITIES_FOLDER).glob("*.key")):
            if registry.load_identity(path).public == registered:
                return path
        raise FedHEError(
            f"the identity of the querier {self.querier} is not kept under "
            f"{self.folder / IDENTITIES_FOLDER}: its answers cannot be opened; run the job again "
            "with --keep-store true."
        )

    @property
    def querier(self) -> str:
        return str(self.manifest["querier"])

    def batches(self, n: int) -> Iterator[tuple[str, int, int]]:
        """(layout, start, stop) of n queries: layouts in order, each up to its queries left,
        batches of at most the job's query batch."""
        size, start = int(self.manifest["query_batch"]), 0
        for name in self.layouts:
            room = self._layout_manifest(name)["queries_left"]
            while room and start < n:
                stop = min(start + size, start + room, n)
                yield name, start, stop
                room -= stop - start
                start = stop


def describe(run_dir: str | Path) -> dict[str, object]:
    """What `fedhe predict` prints about a kept store before it asks: the job, k, what it
    answers (classes or a mean target), the features it expects and the queries left."""
    kept = KeptStore.open(run_dir)
    return {
        "job_id": kept.job_id,
        "k": int(kept.manifest["k"]),
        "answers": f"{kept.n_classes} classes" if kept.n_classes else "mean target of the k",
        "features": kept.feature_names,
        "queries_left": kept.queries_left(),
        "queries_declared": int(kept.manifest["reserved_queries"]),
    }


def predict(run_dir: str | Path, X: np.ndarray) -> np.ndarray:
    """Answer new queries with the kept store of a `--keep-store true` knn run.

    X: raw feature rows (n, d) in the model's feature order, before standardization. Returns
    the class labels (classification, as the job's querier got them) or the mean target of the
    k nearest (regression, original units). Each query spends one of the queries the job
    declared for later; beyond them the key holder refuses."""
    kept = KeptStore.open(run_dir)
    X = _check_rows(X, kept.n_features)
    if len(X) > kept.queries_left():
        raise PolicyError(
            f"the kept store of {run_dir} answers {kept.queries_left()} more queries, not "
            f"{len(X)}: its key holder declared {kept.manifest['reserved_queries']} later "
            "queries with the job. Run the job again with --keep-store true for more."
        )
    kept.check_files()
    keyholder = kept.keyholder()
    context = kept.context(keyholder)
    querier = registry.load_identity(kept.querier_identity_path())
    queries = knn.check_queries(kept.standardizer.features(X), kept.n_features)
    answers = [
        _ask(kept, keyholder, context, querier, name, queries[start:stop])
        for name, start, stop in kept.batches(len(queries))
    ]
    return np.concatenate(answers) if answers else np.empty(0)


def _ask(
    kept: KeptStore,
    keyholder: KeyHolder,
    context: PublicContext,
    querier: Identity,
    layout: str,
    queries: np.ndarray,
) -> np.ndarray:
    """One batch, as the job asks one (`KNNJob._ask_batch`), every role on this machine."""
    n, state = len(queries), kept.state()
    round_ = state["next_round"]
    store = knn.KNNStore.load(kept.folder / layout, context)
    masks, rho = knn.querier_masks(context, n, store.n_labels, store.slots)  # the querier's
    distances = store.masked_distances(queries)  # counts against the layout's budget …
    store.save(kept.folder / layout)  # … spent on disk before anything is released
    kept._record_digests(layout)
    _write_json(kept.folder / _STATE, {"answered": state["answered"] + n, "next_round": round_ + 1})
    contributors = tuple(store.contributors)
    ranked = keyholder_release(
        keyholder,
        DecryptionRequest(kept.job_id, knn.RANK_OUTPUT, contributors, distances.to_bytes(), round_),
    )
    selection = store.load_selection(ranked["selection"], n)
    votes = store.votes(selection, store.load_masks(masks.to_bytes(), n))
    released = keyholder_release(
        keyholder,
        DecryptionRequest(kept.job_id, knn.VOTE_OUTPUT, contributors, votes.to_bytes(), round_),
    )
    channel = querier.channel(keyholder.identity.public, kept.job_id)
    opened = registry.open_release(
        channel, kept.job_id, knn.VOTE_OUTPUT, round_, kept.querier, released["sealed"]
    )
    answer = knn.querier_answer(opened, rho, int(kept.manifest["k"]), kept.n_classes)
    if kept.n_classes:
        return answer
    return kept.standardizer.target_to_original(answer)


def _check_rows(X: np.ndarray, n_features: int) -> np.ndarray:
    try:
        X = np.asarray(X, dtype=float)
    except (TypeError, ValueError) as err:
        raise DataError(f"rows to predict must be numbers: {err}") from err
    if X.ndim == 1 and X.size == n_features:
        X = X[None, :]
    if X.ndim != 2 or X.shape[1] != n_features:
        raise DataError(
            f"rows to predict must have the model's {n_features} features, got shape "
            f"{X.shape}: give one row per record, columns in the model's feature order."
        )
    bad = np.argwhere(~np.isfinite(X))
    if bad.size:
        row, column = bad[0]
        raise DataError(
            f"row {row}, column {column} to predict (from 0) holds {float(X[row, column])!r}: "
            "fill or drop it."
        )
    return X


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # atomic: a crash leaves the previous file
