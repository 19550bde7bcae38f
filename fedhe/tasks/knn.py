"""K nearest neighbours over encrypted points: party, aggregator, key-holder and querier steps.

The aggregator keeps every party's points encrypted in one *store*, feature-major: store
position p lives in slot p mod `slots` of block p div `slots`, and a block holds one ciphertext
per feature (Enc(x_j)), one for ‖x‖² and one per label row (one-hot classes, or the target).

1. Layout (aggregator): parties report how many points they hold; the aggregator gives each a
   contiguous segment of store positions, parties in random order. Only the aggregator knows
   which positions belong to whom.
2. Upload (party): points standardized with the globally summed moments, shuffled locally,
   encrypted at their positions (zeros elsewhere) for every block the segment touches. The
   aggregator adds uploads into the store: segments are disjoint, so the sum is the union.
3. Distances (aggregator): for each query a fresh *positive affine mask* α > 0, β:
   ``Enc(α·(‖x‖² − 2q·x) + β)`` per block, which orders points as the true squared distance
   ‖x − q‖² does (‖q‖² is the same for every point). A plaintext query costs d ciphertext ×
   scalar products per block; an encrypted one (the querier sends Enc(q_j) in every slot) d
   ciphertext × ciphertext products. Empty positions get +EMPTY_OFFSET so they never rank.
4. Rank (key holder, output `knn_rank`): decrypts the masked distances of a batch, takes the k
   smallest of each query and returns Enc(selection), 1 at the chosen positions, 0 elsewhere.
   It learns the masked values: the order of one query's distances and their ratios of
   differences (an affine map keeps both), over positions it cannot tie to a party.
5. Vote (aggregator): ``Σ_blocks Enc(label_c) ⊙ Enc(selection) + Z + Enc(ρ)``, one ciphertext
   per query and label row: Z is a uniform mask whose slots sum to 0 (it hides which slots
   hold the votes), ρ the querier's own mask (it hides the answer from everyone else).
6. Release (key holder, output `knn_vote`): decrypts and sums each ciphertext's slots, giving
   vote + ρ; the querier subtracts ρ: class counts (majority vote) or the sum of targets.

Ties: exact distance ties are broken by the encryption noise (in effect at random); a tied
vote goes to the smallest class label, as scikit-learn's KNeighborsClassifier does.
With `context=None` every step runs in the clear: the plaintext twin.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedhe.crypto import (
    MODEL_PARAMS,
    PublicContext,
    Tensor,
    encrypt_for_compute,
    load_tensor,
    stack,
    unstack,
)
from fedhe.crypto.randomness import SecureRandom, secure_random
from fedhe.errors import PolicyError, ProtocolError, ShapeError, ValueRangeError
from fedhe.keyholder import DecryptionRequest, KeyHolder

TASK = "knn"
RANK_OUTPUT = "knn_rank"
VOTE_OUTPUT = "knn_vote"

# N=8192, primes [60, 40, 40 | 60] at 2^40: features keep three primes when queries come
# encrypted (two products: q·x, then the mask α) and two when they come in the clear (one
# product: (−2α·q)·x), ‖x‖² and labels two, results land on the 60-bit prime, which holds
# |value| < 2^18. A store for plaintext queries has ~30% smaller features and refuses encrypted
# queries.
PARAMS = MODEL_PARAMS
FEATURE_MULTIPLICATIONS = 2
PLAIN_QUERY_FEATURE_MULTIPLICATIONS = 1
EXTRA_MULTIPLICATIONS = 1


def feature_multiplications(encrypted_queries: bool) -> int:
    return FEATURE_MULTIPLICATIONS if encrypted_queries else PLAIN_QUERY_FEATURE_MULTIPLICATIONS


# Standardized points (and queries) must keep ‖x‖² ≤ NORM_SQ_BOUND, so |‖x‖² − 2q·x| < 3·2^14
# and, with α ∈ [2^-2, 2^-1) and |β| ≤ 2^15, every masked distance lies within ±2^16; empty
# positions sit near EMPTY_OFFSET = 2^17, still inside the last level's 2^18.
NORM_SQ_BOUND = 2.0**14
ALPHA_RANGE = (2.0**-2, 2.0**-1)
BETA_BOUND = 2.0**15
EMPTY_OFFSET = 2.0**17
VALID_BELOW = 2.0**16
# Vote masks: Z per slot and the querier's ρ, uniform within ±2^16 (statistical distance of a
# vote of at most k from its mask's own spread: k·2^-17). Targets (regression) are standardized
# and must stay within LABEL_BOUND.
VOTE_MASK_BOUND = 2.0**16
LABEL_BOUND = 2.0**8

STORE_VERSION = 1

Random = np.random.Generator | SecureRandom  # a seeded numpy generator in tests


# -- layout ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Store positions ``offset … offset + count − 1`` hold `party`'s points."""

    party: str
    offset: int
    count: int

    @property
    def end(self) -> int:
        return self.offset + self.count


@dataclass
class StoreLayout:
    """Which positions of the store belong to which party; known to the aggregator only."""

    slots: int
    segments: list[Segment] = field(default_factory=list)

    @classmethod
    def plan(cls, counts: Mapping[str, int], slots: int, rng: Random | None = None) -> StoreLayout:
        """Contiguous segments, parties in random order (the OS's CSPRNG by default)."""
        layout = cls(slots)
        names = sorted(counts)
        for index in (rng or secure_random()).permutation(len(names)):
            layout.append(names[index], counts[names[index]])
        return layout

    def append(self, party: str, count: int) -> Segment:
        """A new segment after the last one: how the store grows when a party adds points."""
        if count < 1:
            raise ValueRangeError(f"party {party!r} has no points to store.")
        segment = Segment(party, self.size, int(count))
        self.segments.append(segment)
        return segment

    @property
    def size(self) -> int:
        return self.segments[-1].end if self.segments else 0

    @property
    def n_blocks(self) -> int:
        return max(1, math.ceil(self.size / self.slots))

    def blocks_of(self, segment: Segment) -> range:
        return range(segment.offset // self.slots, (segment.end - 1) // self.slots + 1)

    def occupied(self, stored: Iterable[tuple[str, int]]) -> np.ndarray:
        """(n_blocks, slots) booleans: the positions of the `stored` (party, offset) segments."""
        keep = set(stored)
        mask = np.zeros(self.n_blocks * self.slots, dtype=bool)
        for segment in self.segments:
            if (segment.party, segment.offset) in keep:
                mask[segment.offset : segment.end] = True
        return mask.reshape(self.n_blocks, self.slots)

    def to_dict(self) -> dict:
        return {"slots": self.slots, "segments": [asdict(s) for s in self.segments]}

    @classmethod
    def from_dict(cls, data: Mapping) -> StoreLayout:
        return cls(int(data["slots"]), [Segment(**s) for s in data["segments"]])


# -- party -----------------------------------------------------------------------------------


def label_rows(y: np.ndarray, n_classes: int) -> np.ndarray:
    """One-hot class rows (n_classes, n), or the (standardized) target as one row (regression)."""
    y = np.asarray(y)
    if n_classes == 0:
        targets = np.asarray(y, dtype=float)[None, :]
        _check_bound(targets, LABEL_BOUND, "standardized target")
        return targets
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueRangeError(f"class labels must lie in 0..{n_classes - 1}.")
    return (np.arange(n_classes)[:, None] == y[None, :]).astype(float)


def party_upload(
    context: PublicContext | None,
    X: np.ndarray,
    labels: np.ndarray,
    segment: Segment,
    slots: int,
    *,
    rng: Random | None = None,
    encrypted_queries: bool = True,
) -> dict[str, bytes]:
    """Encrypt standardized points `X` (n, d) with their label rows (L, n) at the segment's
    positions: ``features-<b>`` (d, slots) and ``extras-<b>`` (1 + L, slots) for each block b
    the segment touches. Points are shuffled first, so a position says nothing about a row."""
    X = np.asarray(X, dtype=float)
    if X.ndim != 2 or X.shape[0] != segment.count or labels.shape[1] != segment.count:
        raise ShapeError(
            f"segment holds {segment.count} points, got X {X.shape} and labels {labels.shape}."
        )
    norms = np.sum(X**2, axis=1)
    _check_bound(norms, NORM_SQ_BOUND, "squared norm of a standardized point")
    order = (rng or secure_random()).permutation(segment.count)
    rows = np.vstack([X[order].T, norms[order][None, :], labels[:, order]])
    first_block = segment.offset // slots
    n_blocks = (segment.end - 1) // slots + 1 - first_block
    placed = np.zeros((rows.shape[0], n_blocks * slots))
    start = segment.offset - first_block * slots
    placed[:, start : start + segment.count] = rows
    d = X.shape[1]
    payload = {}
    for i in range(n_blocks):
        block = placed[:, i * slots : (i + 1) * slots]
        payload[f"features-{first_block + i}"] = encrypt_for_compute(
            context, block[:d], multiplications=feature_multiplications(encrypted_queries)
        ).to_bytes()
        payload[f"extras-{first_block + i}"] = encrypt_for_compute(
            context, block[d:], multiplications=EXTRA_MULTIPLICATIONS
        ).to_bytes()
    return payload


# -- querier ---------------------------------------------------------------------------------


def check_queries(queries: np.ndarray, n_features: int) -> np.ndarray:
    queries = np.asarray(queries, dtype=float)
    if queries.ndim != 2 or queries.shape[1] != n_features:
        raise ShapeError(
            f"queries must have shape (n, {n_features}) like the stored points, "
            f"got {queries.shape}."
        )
    if not np.all(np.isfinite(queries)):
        raise ValueRangeError("a query holds NaN or infinity: fill or drop it before asking.")
    _check_bound(np.sum(queries**2, axis=1), NORM_SQ_BOUND, "squared norm of a query")
    return queries


def querier_encrypt(context: PublicContext | None, queries: np.ndarray, slots: int) -> Tensor:
    """Enc(q_j) in every slot: (n_queries, d, slots), one ciphertext per query and feature."""
    replicated = np.repeat(queries[:, :, None], slots, axis=2)
    return encrypt_for_compute(context, replicated, multiplications=FEATURE_MULTIPLICATIONS)


def querier_masks(
    context: PublicContext | None, n_queries: int, n_labels: int, slots: int
) -> tuple[Tensor, np.ndarray]:
    """Enc(ρ) (n_queries, n_labels, slots) with ρ in the first slot, and ρ to keep."""
    rho = secure_random().uniform(-VOTE_MASK_BOUND, VOTE_MASK_BOUND, (n_queries, n_labels))
    placed = np.zeros((n_queries, n_labels, slots))
    placed[:, :, 0] = rho
    return encrypt_for_compute(context, placed, multiplications=0), rho


def querier_answer(released: np.ndarray, rho: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    """Unmask the vote: the majority class (ties: smallest label), or the mean target of k."""
    votes = np.asarray(released, dtype=float) - rho
    if votes.shape != rho.shape:
        raise ShapeError(f"released votes have shape {votes.shape}, expected {rho.shape}.")
    if n_classes == 0:
        return votes[:, 0] / k
    counts = np.rint(votes)
    return np.argmax(counts, axis=1)  # argmax takes the first maximum: the smallest label


# -- aggregator ------------------------------------------------------------------------------


@dataclass
class Block:
    features: list[Tensor]
    norms: Tensor
    labels: list[Tensor]


class KNNStore:
    """The aggregator's encrypted points: blocks of `slots` positions, grown by uploads."""

    def __init__(
        self,
        context: PublicContext | None,
        n_features: int,
        n_classes: int,
        layout: StoreLayout,
        *,
        encrypted_queries: bool = True,
    ) -> None:
        self.context = context
        self.n_features = n_features
        self.n_classes = n_classes
        self.layout = layout
        self.encrypted_queries = encrypted_queries  # features keep room for a second product
        self.blocks: dict[int, Block] = {}
        self.contributors: list[str] = []
        self.stored: set[tuple[str, int]] = set()  # (party, offset) of each stored segment

    @property
    def n_labels(self) -> int:
        return self.n_classes or 1

    @property
    def slots(self) -> int:
        return self.layout.slots

    @property
    def n_points(self) -> int:
        return int(self.occupied().sum())

    def occupied(self) -> np.ndarray:
        return self.layout.occupied(self.stored)

    # -- upload --------------------------------------------------------------------------------

    def add(self, segment: Segment, payload: Mapping[str, bytes]) -> None:
        """Validate every block of one party's upload, then add them all (or none)."""
        if segment not in self.layout.segments:
            raise ProtocolError(f"{segment} is not part of this store's layout.")
        if (segment.party, segment.offset) in self.stored:
            raise ProtocolError(f"segment of {segment.party!r} is already stored.")
        expected = {
            f"{kind}-{b}" for b in self.layout.blocks_of(segment) for kind in ("features", "extras")
        }
        if set(payload) != expected:
            raise ProtocolError(
                f"upload of {segment.party!r} must hold exactly {sorted(expected)}, "
                f"got {sorted(payload)}."
            )
        loaded = {b: self._load_block(payload, b) for b in self.layout.blocks_of(segment)}
        for b, block in loaded.items():
            current = self.blocks.get(b)
            self.blocks[b] = block if current is None else _add_blocks(current, block)
        if segment.party not in self.contributors:
            self.contributors.append(segment.party)
        self.stored.add((segment.party, segment.offset))

    def _load_block(self, payload: Mapping[str, bytes], b: int) -> Block:
        d, slots = self.n_features, self.slots
        features = load_tensor(
            payload[f"features-{b}"],
            self.context,
            shape=(d, slots),
            level=feature_multiplications(self.encrypted_queries) + 1 if self.context else None,
        )
        extras = load_tensor(
            payload[f"extras-{b}"],
            self.context,
            shape=(1 + self.n_labels, slots),
            level=EXTRA_MULTIPLICATIONS + 1 if self.context else None,
        )
        extra_rows = unstack(extras)
        return Block(unstack(features), extra_rows[0], extra_rows[1:])

    # -- queries -------------------------------------------------------------------------------

    def check_ready(self, k: int, min_parties: int) -> None:
        if not self.blocks:
            raise ProtocolError("the KNN store is empty: no party has uploaded points yet.")
        if len(self.contributors) < min_parties:
            raise ProtocolError(
                f"the store holds points of {len(self.contributors)} parties, fewer than "
                f"min_parties={min_parties}."
            )
        if not 1 <= k <= self.n_points:
            raise ValueRangeError(
                f"k={k} must lie between 1 and the {self.n_points} stored points."
            )

    def masked_distances(self, queries: np.ndarray | Tensor) -> Tensor:
        """Enc(α·(‖x‖² − 2q·x) + β) of every stored position, (n_queries, n_blocks, slots);
        a fresh (α, β) per query, drawn from the OS's CSPRNG and then forgotten."""
        rng = secure_random()
        empty = EMPTY_OFFSET * (~self.occupied())
        plain = isinstance(queries, np.ndarray)
        if not plain and not self.encrypted_queries:
            raise ProtocolError(
                "this KNN store was uploaded for plaintext queries (features one level deep): "
                "run the job with --query encrypted to store points that take encrypted ones."
            )
        rows = queries if plain else unstack(queries)
        if plain:
            check_queries(queries, self.n_features)
        per_query = []
        for query in rows:
            alpha = rng.uniform(*ALPHA_RANGE)
            beta = rng.uniform(-BETA_BOUND, BETA_BOUND)
            columns = None if plain else unstack(query)
            blocks = []
            for b in range(self.layout.n_blocks):
                block = self.blocks.get(b)
                if block is None:  # planned, nothing uploaded yet: every position is empty
                    blocks.append(self._empty_distances(beta))
                    continue
                if plain:
                    total = _plain_products(block.features, -2.0 * alpha * query)
                else:
                    total = _cipher_products(block.features, columns).mul_scalar(-2.0 * alpha)
                total = total + block.norms.mul_scalar(alpha)
                blocks.append(total.add_plain(beta + empty[b]))
            per_query.append(stack(blocks))
        return stack(per_query)

    def _empty_distances(self, beta: float) -> Tensor:
        """What a block without points yields: β + EMPTY_OFFSET everywhere, at the level of
        the computed distances."""
        return encrypt_for_compute(
            self.context, np.full(self.slots, beta + EMPTY_OFFSET), multiplications=0
        )

    def votes(self, selection: Tensor, rho: Tensor) -> Tensor:
        """Σ_blocks Enc(label) ⊙ Enc(selection) + Z + Enc(ρ): (n_queries, n_labels, slots)."""
        rng = secure_random()
        queries = unstack(selection)
        masks = unstack(rho)
        if len(masks) != len(queries):
            raise ShapeError(f"{len(masks)} querier masks for {len(queries)} queries.")
        out = []
        for chosen, mask in zip(queries, masks, strict=True):
            chosen_blocks = unstack(chosen)
            label_masks = unstack(mask)
            rows = []
            for c in range(self.n_labels):
                total = None
                for b, sel in enumerate(chosen_blocks):
                    if b not in self.blocks:
                        continue  # empty positions are never selected
                    term = self.blocks[b].labels[c] * sel
                    total = term if total is None else total + term
                rows.append(total.add_plain(_zero_sum_mask(rng, self.slots)) + label_masks[c])
            out.append(stack(rows))
        return stack(out)

    def load_selection(self, data: bytes, n_queries: int) -> Tensor:
        return load_tensor(
            data,
            self.context,
            shape=(n_queries, self.layout.n_blocks, self.slots),
            level=EXTRA_MULTIPLICATIONS + 1 if self.context else None,
        )

    def load_masks(self, data: bytes, n_queries: int) -> Tensor:
        return load_tensor(
            data,
            self.context,
            shape=(n_queries, self.n_labels, self.slots),
            level=1 if self.context else None,
        )

    def load_queries(self, data: bytes, n_queries: int) -> Tensor:
        return load_tensor(
            data,
            self.context,
            shape=(n_queries, self.n_features, self.slots),
            level=FEATURE_MULTIPLICATIONS + 1 if self.context else None,
        )

    # -- persistence ---------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write the store (manifest + one file per block and kind); replaces an older save."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for b, block in self.blocks.items():
            (folder / f"features-{b}.fhet").write_bytes(stack(block.features).to_bytes())
            extras = stack([block.norms, *block.labels])
            (folder / f"extras-{b}.fhet").write_bytes(extras.to_bytes())
        manifest = {
            "version": STORE_VERSION,
            "fingerprint": self.context.fingerprint if self.context else None,
            "n_features": self.n_features,
            "n_classes": self.n_classes,
            "encrypted_queries": self.encrypted_queries,
            "layout": self.layout.to_dict(),
            "contributors": self.contributors,
            "stored": sorted(self.stored),
            "blocks": sorted(self.blocks),
        }
        path = folder / "manifest.json"
        path.with_suffix(".tmp").write_text(json.dumps(manifest))
        path.with_suffix(".tmp").replace(path)  # atomic: a crash leaves the previous manifest
        return path

    @classmethod
    def load(cls, folder: str | Path, context: PublicContext | None) -> KNNStore:
        folder = Path(folder)
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError) as err:
            raise ProtocolError(f"no readable KNN store in {folder}: {err}") from err
        if manifest.get("version") != STORE_VERSION:
            raise ProtocolError(
                f"KNN store in {folder} has version {manifest.get('version')!r}; this fedhe "
                f"reads version {STORE_VERSION}."
            )
        fingerprint = context.fingerprint if context else None
        if manifest["fingerprint"] != fingerprint:
            raise ProtocolError(
                f"KNN store in {folder} was encrypted under another key pair "
                f"({manifest['fingerprint']}); it cannot be queried with this job's keys."
            )
        store = cls(
            context,
            int(manifest["n_features"]),
            int(manifest["n_classes"]),
            StoreLayout.from_dict(manifest["layout"]),
            encrypted_queries=bool(manifest.get("encrypted_queries", True)),
        )
        store.contributors = list(manifest["contributors"])
        store.stored.update((p, int(o)) for p, o in manifest["stored"])
        for b in manifest["blocks"]:
            payload = {
                f"{kind}-{b}": (folder / f"{kind}-{b}.fhet").read_bytes()
                for kind in ("features", "extras")
            }
            store.blocks[int(b)] = store._load_block(payload, int(b))
        return store


def _plain_products(features: list[Tensor], factors: np.ndarray) -> Tensor:
    total = None
    for column, factor in zip(features, factors, strict=True):
        term = column.mul_scalar(float(factor))
        total = term if total is None else total + term
    assert total is not None
    return total


def _cipher_products(features: list[Tensor], query: list[Tensor]) -> Tensor:
    total = None
    for column, q in zip(features, query, strict=True):
        term = column * q
        total = term if total is None else total + term
    assert total is not None
    return total


def _add_blocks(a: Block, b: Block) -> Block:
    return Block(
        [x + y for x, y in zip(a.features, b.features, strict=True)],
        a.norms + b.norms,
        [x + y for x, y in zip(a.labels, b.labels, strict=True)],
    )


def _zero_sum_mask(rng: SecureRandom, size: int) -> np.ndarray:
    mask = rng.uniform(-VOTE_MASK_BOUND / 2, VOTE_MASK_BOUND / 2, size)
    return mask - mask.mean()


# -- key holder ------------------------------------------------------------------------------


def keyholder_rank(keyholder: KeyHolder, request: DecryptionRequest) -> dict[str, bytes]:
    """Decrypt masked distances (n_queries, n_blocks, slots) under policy; return Enc(selection)
    of the k smallest valid positions of each query, never the distances themselves."""
    k = declared_k(keyholder, request.job_id)
    # Unverified (the distances are no sum of contributions): only a fresh encryption of the
    # selection leaves, never a decrypted value.
    values = keyholder.decrypt_unverified(request).values
    if values.ndim != 3:
        raise PolicyError(f"masked distances must be 3-D, got shape {values.shape}.")
    flat = values.reshape(values.shape[0], -1)
    selection = np.zeros_like(flat)
    for q, distances in enumerate(flat):
        valid = np.flatnonzero(distances < VALID_BELOW)
        if len(valid) < k:
            raise PolicyError(f"a query has fewer valid stored points than k={k}.")
        nearest = valid[np.argsort(distances[valid], kind="stable")[:k]]
        selection[q, nearest] = 1.0
    public = keyholder.public_context(request.job_id)
    tensor = encrypt_for_compute(
        public, selection.reshape(values.shape), multiplications=EXTRA_MULTIPLICATIONS
    )
    return {"selection": tensor.to_bytes()}


def keyholder_vote(keyholder: KeyHolder, request: DecryptionRequest) -> dict[str, bytes]:
    """Decrypt masked votes (n_queries, n_labels, slots) under policy; release the slot sums
    (vote + the querier's mask), never a slot, sealed end to end to the querier: the
    aggregator relays bytes it cannot read."""
    values = keyholder.decrypt_unverified(request).values
    if values.ndim != 3:
        raise PolicyError(f"masked votes must be 3-D, got shape {values.shape}.")
    return keyholder.release_to_querier(request, values.sum(axis=2))


def declared_k(keyholder: KeyHolder, job_id: str) -> int:
    k = keyholder.declaration(job_id).meta.get("k")
    if not isinstance(k, int) or k < 1:
        raise PolicyError(f"job {job_id!r} declares no valid k for its KNN ranking: {k!r}.")
    return k


def _check_bound(values: np.ndarray, bound: float, what: str) -> None:
    values = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(values)):
        raise ValueRangeError(f"a {what} is NaN or infinite.")
    if values.size and np.max(np.abs(values)) > bound:
        raise ValueRangeError(
            f"a {what} reaches {np.max(np.abs(values)):.4g}, beyond {bound:g} that the KNN "
            "parameters keep exact: remove extreme outliers or rescale the features."
        )
