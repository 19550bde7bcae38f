"""K nearest neighbours over encrypted points: party, aggregator, key-holder and querier steps.

The aggregator keeps every party's points encrypted in one *store*: store position p lives in
slot p mod `slots` of block p div `slots`. A block holds one ciphertext per label row (classes
but the last, or the target) and, for the points themselves, either (plaintext queries) one
ciphertext per feature plus one for ‖x‖², or (encrypted queries) the *diagonals* of the
augmented points x' = (x, 1, ‖x‖², 0…) of width m = `diagonal_width(d)`, folded into h = m/2
complex numbers x''_j = x'_j + i·x'_{j+h}: diagonal k holds x''_p[(p + k) mod h] in slot p. The
querier then sends one packed ciphertext q''_j = q'_j − i·q'_{j+h} repeated across the slots,
q' = (−2q, ‖q‖², 1, 0…)/(2s), and z = Σ_k diag_k ⊙ rot(q'', k) has real part ‖x − q‖²/(2s), so
z + z̄ = u in every slot (the Halevi–Shoup diagonal method: h − 1 rotations of the query, shared
by all blocks, and one conjugation per block).

1. Layout (aggregator): parties report how many points they hold; the aggregator gives each a
   contiguous segment of store positions, parties in random order. Only the aggregator knows
   which positions belong to whom.
2. Upload (party): points standardized with the globally summed moments, shuffled locally,
   encrypted at their positions (zeros elsewhere) for every block the segment touches. The
   aggregator adds uploads into the store: segments are disjoint, so the sum is the union.
3. Distances (aggregator): for each query u = ‖x − q‖²/s (s = `distance_scale(d)`) and a
   fresh random *monotone quadratic* mask: ``Enc((u + b)² + β)`` per block, b ≥ 0 and β drawn
   per query. Empty positions get +EMPTY_OFFSET so they never rank.
4. Rank (key holder, output `knn_rank`): decrypts the masked distances of a batch, takes the k
   smallest of each query and returns Enc(selection), 1 at the chosen positions, 0 elsewhere.
5. Vote (aggregator): ``Σ_blocks Enc(label_c) ⊙ Enc(selection) + Z + Enc(ρ)``, one ciphertext
   per query and label row: Z is a uniform mask whose slots sum to 0 (it hides which slots
   hold the votes), ρ the querier's own mask (it hides the answer from everyone else).
6. Release (key holder, output `knn_vote`): decrypts and sums each ciphertext's slots, giving
   vote + ρ; the querier subtracts ρ: class counts (majority vote) or the sum of targets.

What the key holder learns, and why a layout answers few queries. With an affine mask and a
fixed layout the values of query j lie in span{1, ‖x‖², X}: a few dozen queries gave the key
holder every stored record (SVD + one null-space solve; tests/test_knn_leakage.py keeps that
attack against a reference of the old protocol). The quadratic mask takes the values out of
that span, but a mask with few random parameters can be fitted back (one unknown vertex per
query) once a layout has answered d + 1 queries, and any mask that keeps the order reveals each
query's *ranking* of all positions, i.e. roughly one projection of the points per query. So a
layout answers at most `queries_per_layout(d)` = min(8, d) queries; then the parties upload
again under a fresh layout (new segment order, points shuffled afresh) and the key holder
cannot link positions across layouts, unless one query (or two very close ones) is asked in
both: equal rankings link them (a known weakness, tests/test_knn_leakage.py). Empty positions
hold fresh noise, not the mask of u = 0. What remains is what B rankings of unlinked positions
reveal: measured in simulations/attack_knn.py and docs/threat-model.md.

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
    KeyRequest,
    PlainTensor,
    PublicContext,
    Tensor,
    encrypt_for_compute,
    load_tensor,
    stack,
    unstack,
)
from fedhe.crypto.circuit import Circuit
from fedhe.crypto.randomness import SecureRandom, secure_random
from fedhe.crypto.tensor import COMPLEX, REAL
from fedhe.crypto.validation import check_range
from fedhe.errors import PolicyError, ProtocolError, ShapeError, ValueRangeError
from fedhe.keyholder import DecryptionRequest, KeyHolder

TASK = "knn"
RANK_OUTPUT = "knn_rank"
VOTE_OUTPUT = "knn_vote"

# N=8192, primes [60, 40, 40 | 60] at 2^40: the points keep three primes (two products: the
# distance, then the mask's square), labels two (label × selection); results land on the
# 60-bit prime, which holds |value| < 2^19.
PARAMS = MODEL_PARAMS
POINT_MULTIPLICATIONS = 2
EXTRA_MULTIPLICATIONS = 1

# Standardized points (and queries) must keep ‖x‖² ≤ norm_sq_bound(d) = 64·d (a root mean
# square of 8 standard deviations per feature), so ‖x − q‖² ≤ 256·d and u = ‖x − q‖²/s with
# s = distance_scale(d) stays ≤ 2^8 − MAX_VERTEX: with b ≤ MAX_VERTEX and β ∈ [−2^15, 0), every
# masked distance (u + b)² + β lies in [−2^15, 2^16); empty positions get EMPTY_OFFSET plus
# fresh uniform offsets (`_empty_filler`, < 1.5·EMPTY_SPREAD), so they sit at least 3·2^15
# above zero and say nothing of b² + β (what an empty position would otherwise show: with b's
# public range, every valid value then gave the true distance within ~10 %), all inside the
# last level's 2^19. The bound is
# relative to d so that typical distances (2d for standardized points) land at u ≈ 2, where
# the square bends the values and near neighbours stay far apart next to the noise.
NORM_SQ_PER_FEATURE = 64.0
MAX_VERTEX = 4.0
BETA_RANGE = (-(2.0**15), 0.0)
EMPTY_OFFSET = 2.0**17
EMPTY_SPREAD = 2.0**16
VALID_BELOW = 2.0**16 + 2.0**14
# Vote masks: Z per slot and the querier's ρ, uniform within ±2^16 (statistical distance of a
# vote of at most k from its mask's own spread: k·2^-17). Targets (regression) are standardized
# and must stay within LABEL_BOUND.
VOTE_MASK_BOUND = 2.0**16
LABEL_BOUND = 2.0**8
_KNN_FIX = (
    "the KNN parameters keep values exact only within it; remove extreme outliers or rescale "
    "the features"
)
_ASK_FIX = "fill or drop it before asking"
# A layout answers at most this many queries (see the module docstring).
MAX_QUERIES_PER_LAYOUT = 8

STORE_VERSION = 2


def norm_sq_bound(n_features: int) -> float:
    return NORM_SQ_PER_FEATURE * n_features


def distance_scale(n_features: int) -> float:
    """s: the largest squared distance, 4·norm_sq_bound(d), maps to u = 2^8 − MAX_VERTEX."""
    return 4 * norm_sq_bound(n_features) / (2.0**8 - MAX_VERTEX)


def queries_per_layout(n_features: int) -> int:
    """Queries one layout may answer: ≤ d, so that the values and the constant never span
    {1, ‖x‖², X} (d + 1 of them would, whatever the vertices, and the quadratic identity
    ‖x‖² = U·G·Uᵀ would then fit the vertices), and ≤ MAX_QUERIES_PER_LAYOUT, so that few
    rankings of the same positions accumulate."""
    return max(1, min(MAX_QUERIES_PER_LAYOUT, n_features))


def query_plan(n_queries: int, batch_size: int, budget: int) -> list[list[tuple[int, int]]]:
    """Query batches (start, stop) grouped by layout: each layout answers ≤ `budget` queries,
    each batch ≤ `batch_size`, no batch spans two layouts."""
    plan = []
    for first in range(0, n_queries, budget):
        last = min(first + budget, n_queries)
        plan.append([(s, min(s + batch_size, last)) for s in range(first, last, batch_size)])
    return plan


def diagonal_width(n_features: int) -> int:
    """m: the augmented point (x, 1, ‖x‖²) padded to a power of two (it must divide the slots)."""
    return 1 << (n_features + 1).bit_length()


def complex_width(n_features: int) -> int:
    """h = m/2: the augmented point folded into complex numbers x'_j + i·x'_{j+h}, so one
    complex product carries two real ones: the diagonal store has h rows, a query h − 1
    rotations."""
    return diagonal_width(n_features) // 2


def rotation_steps(n_features: int) -> tuple[int, ...]:
    """Rotation keys an encrypted query needs: baby steps 1 … g − 1 and giant steps g, 2g, …
    (g ≈ √h), so h − 1 rotations need ~2√h keys instead of h − 1."""
    h = complex_width(n_features)
    g = _giant_step(h)
    return tuple(range(1, g)) + tuple(range(g, h, g))


def query_keys(n_features: int) -> KeyRequest:
    """Relinearization (the mask's square, label × selection), and for encrypted queries the
    query's rotations and conjugation (the real part of the complex products). One request
    whatever the query mode, so that a job's keys do not depend on it (a resumed job may
    switch modes under the same keys)."""
    return KeyRequest(relin=True, rotations=rotation_steps(n_features), conjugate=True)


def _giant_step(m: int) -> int:
    return 1 << ((m.bit_length() - 1) // 2)


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


def n_label_rows(n_classes: int) -> int:
    """Label rows in the store: one per class but the last (its count is k minus the others'),
    or the target (regression, n_classes = 0)."""
    return max(1, n_classes - 1)


def label_rows(y: np.ndarray, n_classes: int) -> np.ndarray:
    """One-hot rows of the classes but the last (`n_label_rows`), or the (standardized) target
    as one row (regression)."""
    y = np.asarray(y)
    if n_classes == 0:
        targets = np.asarray(y, dtype=float)[None, :]
        check_range(targets, LABEL_BOUND, what="standardized target", fix=_KNN_FIX)
        return targets
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueRangeError(f"class labels must lie in 0..{n_classes - 1}.")
    return (np.arange(n_label_rows(n_classes))[:, None] == y[None, :]).astype(float)


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
    positions: ``points-<b>`` and ``labels-<b>`` (L, slots) for each block b the segment
    touches. The points go feature-major with ‖x‖² last (d + 1, slots) for plaintext queries,
    as diagonals of the augmented points (m, slots) for encrypted ones. Points are shuffled
    first, so a position says nothing about a row."""
    X = np.asarray(X, dtype=float)
    if X.ndim != 2 or X.shape[0] != segment.count or labels.shape[1] != segment.count:
        raise ShapeError(
            f"segment holds {segment.count} points, got X {X.shape} and labels {labels.shape}."
        )
    norms = np.sum(X**2, axis=1)
    check_range(
        norms, norm_sq_bound(X.shape[1]), what="squared norm of a standardized point", fix=_KNN_FIX
    )
    order = (rng or secure_random()).permutation(segment.count)
    points, labels = X[order], labels[:, order]
    first_block = segment.offset // slots
    n_blocks = (segment.end - 1) // slots + 1 - first_block
    start = segment.offset - first_block * slots
    placed = np.zeros((n_blocks * slots, X.shape[1]))
    placed[start : start + segment.count] = points
    placed_labels = np.zeros((labels.shape[0], n_blocks * slots))
    placed_labels[:, start : start + segment.count] = labels
    occupied = np.zeros(n_blocks * slots, dtype=bool)
    occupied[start : start + segment.count] = True
    payload = {}
    for i in range(n_blocks):
        block = slice(i * slots, (i + 1) * slots)
        if encrypted_queries:
            rows = interleaved(point_diagonals(placed[block], occupied[block]))
            packing = COMPLEX
        else:
            rows, packing = point_columns(placed[block]), REAL
        payload[f"points-{first_block + i}"] = encrypt_for_compute(
            context, rows, multiplications=POINT_MULTIPLICATIONS, packing=packing
        ).to_bytes()
        payload[f"labels-{first_block + i}"] = encrypt_for_compute(
            context, placed_labels[:, block], multiplications=EXTRA_MULTIPLICATIONS
        ).to_bytes()
    return payload


def point_columns(points: np.ndarray) -> np.ndarray:
    """(d + 1, slots): one row per feature, then ‖x‖² (zero rows at empty positions)."""
    return np.vstack([points.T, np.sum(points**2, axis=1)[None, :]])


def point_diagonals(points: np.ndarray, occupied: np.ndarray) -> np.ndarray:
    """(h, slots) complex: row k holds x''_p[(p + k) mod h] at slot p, with x''_j = x'_j +
    i·x'_{j+h} and x' = (x, 1, ‖x‖², 0…) at occupied positions, 0 elsewhere."""
    slots, d = points.shape
    h = complex_width(d)
    augmented = np.zeros((slots, 2 * h))
    augmented[:, :d] = points
    augmented[:, d] = occupied
    augmented[:, d + 1] = np.sum(points**2, axis=1)
    folded = augmented[:, :h] + 1j * augmented[:, h:]
    p = np.arange(slots)
    return np.stack([folded[p, (p + k) % h] for k in range(h)])


def interleaved(values: np.ndarray) -> np.ndarray:
    """Complex values as the real array that COMPLEX packing puts back into them (real and
    imaginary part of each value side by side)."""
    out = np.empty((*values.shape[:-1], 2 * values.shape[-1]))
    out[..., 0::2], out[..., 1::2] = values.real, values.imag
    return out


def _complex_of(values: np.ndarray) -> np.ndarray:
    return values[..., 0::2] + 1j * values[..., 1::2]


# -- querier ---------------------------------------------------------------------------------


def check_queries(queries: np.ndarray, n_features: int) -> np.ndarray:
    queries = np.asarray(queries, dtype=float)
    if queries.ndim != 2 or queries.shape[1] != n_features:
        raise ShapeError(
            f"queries must have shape (n, {n_features}) like the stored points, "
            f"got {queries.shape}."
        )
    check_range(queries, np.inf, what="query value", nonfinite_fix=_ASK_FIX)
    bound = norm_sq_bound(n_features)
    check_range(np.sum(queries**2, axis=1), bound, what="squared norm of a query", fix=_KNN_FIX)
    return queries


def query_vector(query: np.ndarray, slots: int) -> np.ndarray:
    """What one packed query holds (complex, `slots`): q''_j = q'_j − i·q'_{j+h} repeated, with
    q' = (−2q, ‖q‖², 1, 0…)/(2s). The real part of x''·q'' is x'·q'/2 = u/2, and z + z̄ = u."""
    h = complex_width(len(query))
    augmented = np.zeros(2 * h)
    augmented[: len(query)] = -2.0 * query
    augmented[len(query)] = query @ query
    augmented[len(query) + 1] = 1.0
    augmented /= 2 * distance_scale(len(query))
    return np.tile(augmented[:h] - 1j * augmented[h:], slots // h)


def querier_encrypt(context: PublicContext | None, queries: np.ndarray, slots: int) -> Tensor:
    """One packed ciphertext per query, (n_queries, 2·slots) as COMPLEX packing sees them."""
    packed = interleaved(np.stack([query_vector(q, slots) for q in queries]))
    return encrypt_for_compute(
        context, packed, multiplications=POINT_MULTIPLICATIONS, packing=COMPLEX
    )


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
    if counts.shape[1] == n_classes - 1:  # the last class has what the others leave of k
        counts = np.column_stack([counts, k - counts.sum(axis=1)])
    return np.argmax(counts, axis=1)  # argmax takes the first maximum: the smallest label


# -- aggregator ------------------------------------------------------------------------------


@dataclass
class Block:
    points: list[Tensor]  # feature rows and ‖x‖² (plaintext queries), or diagonals (encrypted)
    labels: list[Tensor]
    _rows: dict = field(default_factory=dict, repr=False)  # the rows as `_Arithmetic` takes them

    def rows(self, ops: _Arithmetic, *, labels: bool = False) -> list:
        """The points' (or labels') rows for `ops`, taken out of their tensors once."""
        key = (type(ops), labels)
        if key not in self._rows:
            self._rows[key] = ops.rows(self.labels if labels else self.points)
        return self._rows[key]


@dataclass(frozen=True)
class Mask:
    """One query's mask: (u + vertex)² + shift, monotone in u ≥ 0."""

    vertex: float
    shift: float

    @classmethod
    def draw(cls, rng: Random, n_features: int) -> Mask:
        # The vertex is drawn on the scale of a typical u (2d/s for standardized points), so
        # the square bends the values where the points are; at least a quarter of it keeps
        # the slope 2(u + b) of near neighbours well above the encryption noise.
        typical = min(MAX_VERTEX, 2.0 * n_features / distance_scale(n_features))
        return cls(typical * rng.uniform(0.25, 1.0), rng.uniform(*BETA_RANGE))


class KNNStore:
    """The aggregator's encrypted points: blocks of `slots` positions, grown by uploads.

    One store is one layout: it answers at most `query_budget` queries, then refuses."""

    def __init__(
        self,
        context: PublicContext | None,
        n_features: int,
        n_classes: int,
        layout: StoreLayout,
        *,
        encrypted_queries: bool = True,
        query_budget: int | None = None,
    ) -> None:
        if layout.slots % complex_width(n_features):
            raise ShapeError(
                f"{n_features} features need diagonals of width {complex_width(n_features)}, "
                f"which must divide the {layout.slots} slots: reduce the features."
            )
        self.context = context
        self.n_features = n_features
        self.n_classes = n_classes
        self.layout = layout
        self.encrypted_queries = encrypted_queries  # points stored as diagonals
        self.query_budget = query_budget or queries_per_layout(n_features)
        self.queries_answered = 0
        self.blocks: dict[int, Block] = {}
        self.contributors: list[str] = []
        self.stored: set[tuple[str, int]] = set()  # (party, offset) of each stored segment

    @property
    def n_labels(self) -> int:
        return n_label_rows(self.n_classes)

    @property
    def slots(self) -> int:
        return self.layout.slots

    @property
    def n_points(self) -> int:
        return int(self.occupied().sum())

    @property
    def queries_left(self) -> int:
        return self.query_budget - self.queries_answered

    @property
    def point_rows(self) -> int:
        return complex_width(self.n_features) if self.encrypted_queries else self.n_features + 1

    @property
    def point_packing(self) -> str:
        return COMPLEX if self.encrypted_queries else REAL

    @property
    def point_width(self) -> int:
        """Logical values per stored row: 2·slots when complex (COMPLEX packing's count)."""
        return 2 * self.slots if self.encrypted_queries else self.slots

    def occupied(self) -> np.ndarray:
        return self.layout.occupied(self.stored)

    # -- upload --------------------------------------------------------------------------------

    def add(self, segment: Segment, payload: Mapping[str, bytes]) -> None:
        """Validate every block of one party's upload, then add them all (or none)."""
        if segment not in self.layout.segments:
            raise ProtocolError(f"{segment} is not part of this store's layout.")
        if (segment.party, segment.offset) in self.stored:
            raise ProtocolError(f"segment of {segment.party!r} is already stored.")
        if self.queries_answered:
            raise ProtocolError(
                "this layout has answered queries: points go into a fresh layout only."
            )
        expected = {
            f"{kind}-{b}" for b in self.layout.blocks_of(segment) for kind in ("points", "labels")
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
        points = load_tensor(
            payload[f"points-{b}"],
            self.context,
            shape=(self.point_rows, self.point_width),
            level=POINT_MULTIPLICATIONS + 1 if self.context else None,
        )
        _check_packing(points, self.point_packing, "stored points")
        labels = load_tensor(
            payload[f"labels-{b}"],
            self.context,
            shape=(self.n_labels, self.slots),
            level=EXTRA_MULTIPLICATIONS + 1 if self.context else None,
        )
        return Block(unstack(points), unstack(labels))

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
        """Enc((u + b)² + β) of every stored position, u = ‖x − q‖²/distance_scale(d),
        (n_queries, n_blocks, slots); a fresh `Mask` per query, drawn from the OS's CSPRNG and
        then forgotten. Counts against the layout's query budget."""
        plain = isinstance(queries, np.ndarray)
        if plain:
            check_queries(queries, self.n_features)
        elif not self.encrypted_queries:
            raise ProtocolError(
                "this KNN store was uploaded for plaintext queries (feature columns): run the "
                "job with --query encrypted to store points that take encrypted ones."
            )
        n = queries.shape[0]
        if n > self.queries_left:
            raise PolicyError(
                f"this store layout has answered {self.queries_answered} of its "
                f"{self.query_budget} queries and cannot take {n} more: plan a fresh layout and "
                "have the parties upload again (positions must not be reused across more "
                "queries, see fedhe.tasks.knn)."
            )
        self.queries_answered += n
        rng = secure_random()
        empty = ~self.occupied()
        ops = _arithmetic(self.context, self.slots)
        stored = {b: block.rows(ops) for b, block in self.blocks.items()}
        per_query = []
        for query in queries if plain else unstack(queries):
            mask = Mask.draw(rng, self.n_features)
            scaled = self._scaled_distances(ops, stored, query)
            blocks = []
            for b in range(self.layout.n_blocks):
                filler = _empty_filler(rng, empty[b])
                if b not in stored:  # planned, nothing uploaded yet: every position is empty
                    blocks += ops.rows(
                        [encrypt_for_compute(self.context, filler, multiplications=0)]
                    )
                    continue
                u = ops.add(scaled(b), mask.vertex)
                blocks.append(ops.add(ops.square(u), mask.shift + filler))
            per_query.append(ops.tensor(blocks))
        return stack(per_query)

    def _scaled_distances(self, ops: _Arithmetic, stored: dict, query: np.ndarray | Tensor):
        """A function of the block index: Enc(‖x − q‖²/s) of that block's positions."""
        if isinstance(query, np.ndarray) and not self.encrypted_queries:
            scale = distance_scale(self.n_features)
            weights = np.append(-2.0 * query, 1.0) / scale
            offset = (query @ query) / scale
            return lambda b: ops.add(ops.linear(stored[b], weights), offset)
        if isinstance(query, np.ndarray):  # plaintext query, diagonal store
            packed = query_vector(query, self.slots)
            rotated = [np.roll(packed, -k) for k in range(self.point_rows)]
            return lambda b: ops.real_part(ops.plain_products(stored[b], rotated))
        rotated_query = ops.rotated_queries(query, self.n_features)
        return lambda b: ops.real_part(ops.products(stored[b], rotated_query))

    def votes(self, selection: Tensor, rho: Tensor) -> Tensor:
        """Σ_blocks Enc(label) ⊙ Enc(selection) + Z + Enc(ρ): (n_queries, n_labels, slots)."""
        rng = secure_random()
        queries = unstack(selection)
        masks = unstack(rho)
        if len(masks) != len(queries):
            raise ShapeError(f"{len(masks)} querier masks for {len(queries)} queries.")
        ops = _arithmetic(self.context, self.slots)
        present = sorted(self.blocks)  # empty positions are never selected
        labels = {b: self.blocks[b].rows(ops, labels=True) for b in present}
        out = []
        for chosen, mask in zip(queries, masks, strict=True):
            chosen_blocks = ops.rows(unstack(chosen))
            label_masks = ops.rows(unstack(mask))
            rows = []
            for c in range(self.n_labels):
                total = ops.products(
                    [labels[b][c] for b in present], [chosen_blocks[b] for b in present]
                )
                total = ops.add(total, _zero_sum_mask(rng, self.slots))
                rows.append(ops.add_rows(total, label_masks[c]))
            out.append(ops.tensor(rows))
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
        queries = load_tensor(
            data,
            self.context,
            shape=(n_queries, 2 * self.slots),
            level=POINT_MULTIPLICATIONS + 1 if self.context else None,
        )
        _check_packing(queries, COMPLEX, "encrypted queries")
        return queries

    # -- persistence ---------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write the store (manifest + one file per block and kind); replaces an older save."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for b, block in self.blocks.items():
            (folder / f"points-{b}.fhet").write_bytes(stack(block.points).to_bytes())
            (folder / f"labels-{b}.fhet").write_bytes(stack(block.labels).to_bytes())
        manifest = {
            "version": STORE_VERSION,
            "fingerprint": self.context.fingerprint if self.context else None,
            "n_features": self.n_features,
            "n_classes": self.n_classes,
            "encrypted_queries": self.encrypted_queries,
            "query_budget": self.query_budget,
            "queries_answered": self.queries_answered,
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
                f"reads version {STORE_VERSION}: have the parties upload again."
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
            encrypted_queries=bool(manifest["encrypted_queries"]),
            query_budget=int(manifest["query_budget"]),
        )
        store.contributors = list(manifest["contributors"])
        store.stored.update((p, int(o)) for p, o in manifest["stored"])
        for b in manifest["blocks"]:
            payload = {
                f"{kind}-{b}": (folder / f"{kind}-{b}.fhet").read_bytes()
                for kind in ("points", "labels")
            }
            store.blocks[int(b)] = store._load_block(payload, int(b))
        store.queries_answered = int(manifest["queries_answered"])
        return store


class _Arithmetic:
    """The few operations a masked distance needs, on one block row at a time: numpy arrays
    for the plaintext twin, SEAL ciphertexts (`Circuit`) when encrypted. The encrypted side
    stays in SEAL from the store's rows to the masked block: converting a ciphertext back to
    TenSEAL costs ~3 ms, more than most steps here."""

    def rows(self, tensors: list[Tensor]) -> list: ...
    def linear(self, rows: list, weights: np.ndarray): ...
    def products(self, rows: list, others: list): ...
    def plain_products(self, rows: list, vectors: list[np.ndarray]): ...
    def rotated_queries(self, query: Tensor, n_features: int) -> list: ...
    def real_part(self, row): ...
    def add(self, row, value: float | np.ndarray): ...
    def add_rows(self, row, other): ...
    def square(self, row): ...
    def tensor(self, rows: list) -> Tensor: ...


class _NumpyArithmetic(_Arithmetic):
    def __init__(self, slots: int) -> None:
        self.slots = slots

    def rows(self, tensors):
        """Each row's values; rows of 2·slots values are COMPLEX-packed: complex slots."""
        return [
            _complex_of(t.values) if t.values.size == 2 * self.slots else t.values for t in tensors
        ]

    def real_part(self, row):
        return 2 * row.real  # z + z̄

    def linear(self, rows, weights):
        return np.tensordot(weights, np.stack(rows), axes=1)

    def products(self, rows, others):
        return sum(a * b for a, b in zip(rows, others, strict=True))

    plain_products = products

    def rotated_queries(self, query, n_features):
        (packed,) = self.rows([query])
        return [np.roll(packed, -k) for k in range(complex_width(n_features))]

    def add(self, row, value):
        return row + value

    add_rows = add

    def square(self, row):
        return row * row

    def tensor(self, rows):
        return PlainTensor(np.stack(rows))


class _CircuitArithmetic(_Arithmetic):
    def __init__(self, context: PublicContext) -> None:
        self.circuit = Circuit(context)

    def rows(self, tensors):
        return [cipher for t in tensors for cipher in self.circuit.ciphers(t)]

    def linear(self, rows, weights):
        terms = list(zip(rows, weights, strict=True))
        return self.circuit.multiply_sum(terms, rows[0].scale)

    def products(self, rows, others):
        total = self.circuit.product_sum(list(zip(rows, others, strict=True)))
        total.raw.scale = rows[0].scale  # recorded as TenSEAL records a product (×s/prime)
        return total

    def plain_products(self, rows, vectors):
        return self.circuit.multiply_sum(list(zip(rows, vectors, strict=True)), rows[0].scale)

    def real_part(self, row):
        return self.circuit.add(row, self.circuit.conjugate(row))  # z + z̄

    def rotated_queries(self, query, n_features):
        """rot(q'', k) for k = 0 … h − 1 with the keys of `rotation_steps`: giant steps of the
        query first, then the baby steps of each (h − 1 rotations in all)."""
        (cipher,) = self.circuit.ciphers(query)
        h = complex_width(n_features)
        g = _giant_step(h)
        giants = [cipher, *(self.circuit.rotate(cipher, step) for step in range(g, h, g))]
        return [
            self.circuit.rotate(giant, step) if step else giant
            for giant in giants
            for step in range(g)
        ]

    def add(self, row, value):
        return self.circuit.add_plain(row, value)

    def add_rows(self, row, other):
        return self.circuit.add(row, other)

    def square(self, row):
        out = self.circuit.square(row)
        out.raw.scale = row.scale
        return out

    def tensor(self, rows):
        return self.circuit.tensor(rows, (len(rows), rows[0].size))


def _arithmetic(context: PublicContext | None, slots: int) -> _Arithmetic:
    return _NumpyArithmetic(slots) if context is None else _CircuitArithmetic(context)


def _add_blocks(a: Block, b: Block) -> Block:
    return Block(
        [x + y for x, y in zip(a.points, b.points, strict=True)],
        [x + y for x, y in zip(a.labels, b.labels, strict=True)],
    )


def _empty_filler(rng: Random, empty: np.ndarray) -> np.ndarray:
    """What empty positions get on top of the mask: EMPTY_OFFSET, one fresh uniform offset in
    [0, EMPTY_SPREAD) for the whole block and a fresh uniform [0, EMPTY_SPREAD/2) per position;
    0 elsewhere. Empty positions never rank; their values all carry the mask at one known u
    (0, or ‖q‖²/s), so the block's offset hides it: with noise per position alone, the midrange
    of ~4,000 empty positions gave b² + β within ~16, and with it every true distance."""
    block_offset = rng.uniform(0.0, EMPTY_SPREAD)
    per_position = rng.uniform(0.0, EMPTY_SPREAD / 2, empty.shape)
    return empty * (EMPTY_OFFSET + block_offset + per_position)


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


def _check_packing(tensor: Tensor, packing: str, what: str) -> None:
    if getattr(tensor, "packing", packing) != packing:
        raise ProtocolError(
            f"{what} must come {packing}-packed, got {tensor.packing}: upload them with this "  # type: ignore[union-attr]
            "version's fedhe.tasks.knn."
        )
