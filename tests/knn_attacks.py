"""What a curious key holder can rebuild of the KNN store from the masked distances it decrypts.

The key holder decrypts, for each query j, one masked value v_pj per store position p. It
follows the protocol (it returns only an encrypted selection of the k smallest), but keeps
what it decrypted. Each attack below takes only what it sees, the P × Q value matrix of one
layout (rows: occupied positions, columns: queries), and public facts (d, and that the points
are standardized: mean 0, variance 1 per feature over the stored points), and returns an
estimate X̂ (P × d) of the stored points, position by position. The attacker cannot know the
rotation of the feature space, so `reconstruction_error` scores X̂ after the best rotation and
scale: 0 is every record exact, 1.0 is the trivial guess (every point at the mean).

Attacks:

* `linear_attack` (issue 14): under the *old* affine mask v_pj = α_j(‖x_p‖² − 2x_p·q_j) + β_j
  every column lies in span{1, ‖x‖², X}. An SVD of the columns gives that span (rank d + 2,
  from d + 1 queries on); ‖x_p‖² is a quadratic form of the span's coordinates,
  U_p·G·U_pᵀ = U_p·c, linear in the unknown symmetric G and vector c, so one null-space solve
  gives G = A·Aᵀ with X = U·A: every record up to a rotation (centering removes the
  translations and the trivial solution; mean ‖x‖² = d fixes the scale). A binary feature
  (diabetes' "sex") adds a null direction (x_s² is affine in x_s, so its scale drops out of
  the identity): that is why the prototype was unreliable on diabetes. The attack finds the
  extra direction (the solutions are A·D·Aᵀ, D diagonal; a generic member relative to a
  positive one shows the binary feature as an outlying eigenvalue) and fixes the binary
  feature's scale by the unit variance of a standardized feature.
* `shape_attack`: the *new* mask v = (u + b)² + β, u = ‖x − q‖²/s, is an affine image of u
  after one unknown per column: u = √(v − β) − b. `linearize` fits each column's vertex:
  Q ≥ d + 2 columns must share one centered (d + 1)-dim span (joint variable-projection fit
  from a few starts, leave-one-out search for a column stuck on the flat linear side); with
  Q = d + 1 the span fits anything, but the linear attack's quadratic identity does not
  (`_fit_identity`); with Q ≤ d nothing pins the vertices. Then the linear attack.
* `ordinal_attack`: any monotone mask keeps each query's ranking; ranks → normal scores →
  top principal components, whitened (standardized data: identity-like covariance). With
  more than d + 1 columns on one layout, first a non-metric fit (`nonmetric_fit`: monotone
  transforms of the columns that share a (d + 1)-dim span, isotonic regression), then the
  linear attack: the order alone gives the records to ~20-30 %.
* `cross_layout_attack`: per-layout estimates of the same points (positions shuffled afresh
  per layout) aligned to a reference (orthogonal Procrustes + Hungarian matching, iterated)
  and averaged.
* `repeat_link_attack`: a query asked in two layouts has the same distances, hence the same
  order, in both: `repeat_residuals` spots the column pair (its sorted values are one
  quadratic-mask change apart), its ranks match the positions of the two layouts, and the
  linked columns go to the shape attack.
* `distance_estimate_error`: what an empty position of the store for encrypted queries gives
  away (the mask at u = 0, b² + β): the true distances up to the vertex b, whose range is
  public.

Scoring: `reconstruction_error` (positions mapped back to rows with the ground truth first),
`oracle_projection_error` (the best rank-B linear projection: what B exact projections
would give at best).

Harness: `load` (sklearn wine / diabetes / iris, 80 % stored, standardized with the stored
points' moments as the parties do, 20 % as the query pool), `make_queries`, `old_view` (the
old affine mask on a fixed layout: the reference implementation of the old protocol, kept here
in numpy), `old_views` (the same with fresh shuffles: a control for the cross-layout attack),
`new_view_model` (a numpy model of the new protocol, also able to run it *without* the
per-layout budget, which the real code refuses) and `new_views` (the real `fedhe.tasks.knn`
code, context None: layouts, uploads, masked distances, the budget). Each view carries the
ground truth (row of each position, the queries) for scoring only.

Used by tests/test_knn_leakage.py and simulations/attack_knn.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from unittest import mock

import numpy as np
from scipy.linalg import orthogonal_procrustes
from scipy.optimize import (
    isotonic_regression,
    linear_sum_assignment,
    minimize,
    minimize_scalar,
)
from scipy.stats import norm, rankdata

DATASETS = ("wine", "diabetes")

# The old protocol (fedhe before issue 14): v = α(‖x‖² − 2q·x) + β, one (α, β) per query.
OLD_ALPHA_RANGE = (2.0**-2, 2.0**-1)
OLD_BETA_BOUND = 2.0**15


# -- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    name: str
    X: np.ndarray  # stored points (P, d), standardized with their own mean and std
    y: np.ndarray  # class labels, or the standardized target (n_classes = 0)
    n_classes: int
    pool: np.ndarray  # the held-out points, standardized alike: where queries come from

    @property
    def d(self) -> int:
        return self.X.shape[1]


def load(name: str, seed: int = 0, stored_fraction: float = 0.8) -> Data:
    """sklearn's wine or diabetes (or iris, d = 4), rows shuffled (`seed`), the first 80 %
    stored, the rest the query pool; features standardized with the stored points' mean and
    std (the parties do so with the globally summed moments of their points), so the stored
    points have mean 0 and variance 1 per feature exactly: facts the key holder knows."""
    from sklearn import datasets

    loaders = {
        "wine": datasets.load_wine,
        "diabetes": datasets.load_diabetes,
        "iris": datasets.load_iris,
    }
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}: one of {sorted(loaders)}")
    bunch = loaders[name]()
    order = np.random.default_rng(seed).permutation(len(bunch.data))
    n = int(stored_fraction * len(order))
    stored, held = order[:n], order[n:]
    X = bunch.data[stored]
    mean, std = X.mean(axis=0), X.std(axis=0)
    y = bunch.target[stored]
    n_classes = 0 if name == "diabetes" else 3
    if n_classes == 0:
        y = (y - y.mean()) / y.std()
    return Data(name, (X - mean) / std, y, n_classes, (bunch.data[held] - mean) / std)


def make_queries(
    pool: np.ndarray, n: int, rng: np.random.Generator, jitter: float = 0.1
) -> np.ndarray:
    """n queries: the pool's points in order, then cycled with Gaussian jitter (σ = `jitter`
    in standardized units) so that no query repeats exactly."""
    index = np.arange(n) % len(pool)
    noise = jitter * rng.standard_normal((n, pool.shape[1]))
    noise[: min(n, len(pool))] = 0.0
    return pool[index] + noise


def party_shares(n: int, parties: int) -> list[np.ndarray]:
    """Rows of each party: `parties` contiguous shares (the rows come shuffled from `load`)."""
    return np.array_split(np.arange(n), parties)


# -- what the key holder sees ----------------------------------------------------------------


@dataclass
class LayoutView:
    """One layout as the key holder sees it: `values` (P, B), one row per occupied position
    in position order, one column per query; `empty` (B,), per query, what the mask gives an
    empty position as the key holder estimates it (`empty_estimate`; None if the layout has
    no empty position; b² + β exactly in `new_view_model`).
    Ground truth, for scoring only: `rows[p]`, the stored row at position p, and `queries`."""

    values: np.ndarray
    rows: np.ndarray
    empty: np.ndarray | None = None
    queries: np.ndarray | None = None


def old_view(X: np.ndarray, queries: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The old protocol's masked distances, (P, Q): a fresh α ∈ [1/4, 1/2), |β| ≤ 2^15 per
    query, one fixed layout for all queries (rows = positions: the identity is as good as any
    fixed shuffle)."""
    Q = len(queries)
    alpha = rng.uniform(*OLD_ALPHA_RANGE, Q)
    beta = rng.uniform(-OLD_BETA_BOUND, OLD_BETA_BOUND, Q)
    core = np.sum(X**2, axis=1)[:, None] - 2.0 * X @ queries.T
    return alpha * core + beta


def old_views(
    X: np.ndarray, queries: np.ndarray, rng: np.random.Generator, budget: int
) -> list[LayoutView]:
    """The old affine mask, but a fresh shuffle of the positions every `budget` queries: a
    control for `cross_layout_attack` (each layout's linear attack is exact once
    budget ≥ d + 1, so what remains is linking the layouts)."""
    views = []
    for first in range(0, len(queries), budget):
        rows = rng.permutation(len(X))
        chunk = queries[first : first + budget]
        views.append(LayoutView(old_view(X[rows], chunk, rng), rows, None, chunk))
    return views


# The new protocol's mask (issue 14): u = ‖x − q‖²/s, v = (u + b)² + β, b = typical·U[1/4, 1]
# with typical = 2d/s (the u of a typical pair of standardized points), β ∈ U[−2^15, 0).
# `new_view_model` takes s and the mask's draw from fedhe.tasks.knn where they exist
# (`distance_scale(d)`, `Mask.draw`), else these (the design as first written: s fixed).
MODEL_DISTANCE_SCALE = 4 * 2.0**14 / (2.0**8 - 1.0)
MODEL_MAX_VERTEX = 1.0
MODEL_BETA_RANGE = (-(2.0**15), 0.0)
MODEL_BUDGET_CAP = 8


def model_budget(d: int) -> int:
    """Queries per layout: fedhe's `queries_per_layout(d)` where it exists, else min(8, d)
    (d + 1 would let the quadratic identity fit the vertices: see `linearize`)."""
    from fedhe.tasks import knn

    per_layout = getattr(knn, "queries_per_layout", None)
    return per_layout(d) if per_layout else max(1, min(MODEL_BUDGET_CAP, d))


def distance_scale(d: int) -> float:
    """s of the new protocol: fedhe's `distance_scale(d)` (or `DISTANCE_SCALE`), else the
    model's."""
    from fedhe.tasks import knn

    if hasattr(knn, "distance_scale"):
        return float(knn.distance_scale(d))
    return float(getattr(knn, "DISTANCE_SCALE", MODEL_DISTANCE_SCALE))


def draw_mask(rng: np.random.Generator, d: int) -> tuple[float, float]:
    """(b, β) of one query: fedhe's `Mask.draw` with a seeded generator where it exists."""
    from fedhe.tasks import knn

    if hasattr(knn, "Mask"):
        mask = knn.Mask.draw(rng, d)
        return float(mask.vertex), float(mask.shift)
    typical = min(MODEL_MAX_VERTEX, 2.0 * d / distance_scale(d))
    return typical * rng.uniform(0.25, 1.0), rng.uniform(*MODEL_BETA_RANGE)


def vertex_range(d: int) -> tuple[float, float]:
    """The public range of the mask's vertex b: typical·[1/4, 1], typical = min(MAX_VERTEX,
    2d/s)."""
    from fedhe.tasks import knn

    typical = min(getattr(knn, "MAX_VERTEX", MODEL_MAX_VERTEX), 2.0 * d / distance_scale(d))
    return 0.25 * typical, typical


def distance_estimate_error(view: LayoutView, X: np.ndarray) -> float:
    """The key holder's estimate of the true scaled distances u = ‖x − q‖²/s from one layout,
    from its estimate e of the mask at u = 0 (`LayoutView.empty`; b² + β exactly where empty
    positions of the store for encrypted queries showed it): with the middle b̂ of the public
    vertex range, û = √(b̂² + v − e) − b̂. Returns the median relative error |û − u|/u over
    positions and queries (u from the ground truth, for scoring)."""
    if view.empty is None or view.queries is None:
        raise ValueError("the view has no empty position or no ground-truth queries")
    d = X.shape[1]
    b = float(np.mean(vertex_range(d)))
    u_hat = np.sqrt(np.maximum(b**2 + view.values - view.empty, 0.0)) - b
    u = np.sum((X[view.rows][:, None, :] - view.queries[None, :, :]) ** 2, axis=2)
    u /= distance_scale(d)
    return float(np.median(np.abs(u_hat - u) / u))


def new_view_model(
    X: np.ndarray,
    queries: np.ndarray,
    rng: np.random.Generator,
    budget: int | None = None,
    parties: int = 3,
) -> list[LayoutView]:
    """A numpy model of the new protocol: the quadratic mask, and a fresh layout (segments in
    random party order, each party's points shuffled afresh) every `budget` queries
    (default `model_budget(d)`). `budget=len(queries)` models the quadratic mask on one fixed
    layout, which the real code refuses: what the budget protects against. `empty` holds
    b² + β, what an empty position showed (minus EMPTY_OFFSET) in the first version of the new
    protocol, before its empty positions got noise of their own."""
    P, d = X.shape
    budget = budget or model_budget(d)
    shares = party_shares(P, parties)
    scale = distance_scale(d)
    views = []
    for first in range(0, len(queries), budget):
        chunk = queries[first : first + budget]
        rows = np.concatenate(
            [shares[i][rng.permutation(len(shares[i]))] for i in rng.permutation(parties)]
        )
        u = np.sum((X[rows][:, None, :] - chunk[None, :, :]) ** 2, axis=2) / scale
        b, beta = np.array([draw_mask(rng, d) for _ in chunk]).T
        views.append(LayoutView((u + b) ** 2 + beta, rows, b**2 + beta, chunk))
    return views


def new_views(
    X: np.ndarray,
    y: np.ndarray | None,
    queries: np.ndarray,
    parties: int,
    rng: np.random.Generator,
    budget: int | None = None,
    *,
    n_classes: int = 0,
    encrypted_queries: bool = True,
    mask_seed: int | None = None,
) -> list[LayoutView]:
    """The new protocol through the real `fedhe.tasks.knn` code, in the clear (context None):
    every `budget` queries (default `knn.queries_per_layout(d)`) the aggregator plans a fresh
    layout (`StoreLayout.plan`, parties in random order), each party uploads its points
    shuffled afresh (`party_upload`), the store answers the chunk (`masked_distances`).
    `rng` (seeded) drives layouts and shuffles, so the harness knows which row sits where.
    The masks come from the OS's CSPRNG inside fedhe, as in production, unless `mask_seed`
    is given: then from a numpy generator seeded with it (reproducible runs), patched in for
    the call as `fedhe.tasks.knn.secure_random`."""
    from fedhe.tasks import knn

    if mask_seed is not None and hasattr(knn, "secure_random"):
        masks = np.random.default_rng(mask_seed)
        with mock.patch.object(knn, "secure_random", lambda: masks):
            return new_views(
                X,
                y,
                queries,
                parties,
                rng,
                budget,
                n_classes=n_classes,
                encrypted_queries=encrypted_queries,
            )

    P, d = X.shape
    if budget is None:
        per_layout = getattr(knn, "queries_per_layout", None)
        if per_layout is None:
            raise RuntimeError("fedhe.tasks.knn has no queries_per_layout: pass the budget.")
        budget = per_layout(d)
    slots = knn.PARAMS.slots
    shares = party_shares(P, parties)
    labels = knn.label_rows(np.zeros(P) if y is None else y, n_classes)
    views = []
    for first in range(0, len(queries), budget):
        chunk = queries[first : first + budget]
        counts = {f"party-{i}": len(share) for i, share in enumerate(shares)}
        layout = knn.StoreLayout.plan(counts, slots, rng)
        store = knn.KNNStore(
            None, d, n_classes, layout, encrypted_queries=encrypted_queries, query_budget=budget
        )
        position_rows = np.full(layout.size, -1)
        for i, share in enumerate(shares):
            segment = next(s for s in layout.segments if s.party == f"party-{i}")
            seed = int(rng.integers(2**63))
            # party_upload draws its shuffle first: position offset + i holds X[share][order[i]].
            order = np.random.default_rng(seed).permutation(len(share))
            payload = knn.party_upload(
                None,
                X[share],
                labels[:, share],
                segment,
                slots,
                rng=np.random.default_rng(seed),
                encrypted_queries=encrypted_queries,
            )
            store.add(segment, payload)
            position_rows[segment.offset : segment.end] = share[order]
        values = store.masked_distances(chunk).values.reshape(len(chunk), -1)
        valid = np.all(values < knn.VALID_BELOW, axis=0)  # what the key holder can tell
        occupied = store.occupied().ravel()
        if not np.array_equal(valid, occupied):
            raise AssertionError("the valid positions are not the occupied ones")
        empty = empty_estimate(values[:, ~occupied]) if (~occupied).any() else None
        views.append(LayoutView(values[:, occupied].T, position_rows, empty, chunk))
    return views


def empty_estimate(empty_values: np.ndarray) -> np.ndarray:
    """Per query (rows), the key holder's estimate of what the mask gives an empty position,
    from the values of all empty positions: their lowest minus EMPTY_OFFSET. Exact when an
    empty position holds the mask at u = 0 plus EMPTY_OFFSET (fedhe before the fix of issue
    14); off by ~spread/(number of empty positions) under fresh per-position noise; useless
    once a fresh offset as wide as the mask's shift is added (fedhe now)."""
    from fedhe.tasks import knn

    return empty_values.min(axis=1) - knn.EMPTY_OFFSET


# -- scoring ---------------------------------------------------------------------------------


def reconstruction_error(X_hat: np.ndarray, X: np.ndarray) -> float:
    """‖s·R·X̂_c − X_c‖_F / ‖X_c‖_F after the best rotation R (orthogonal Procrustes) and scale
    s ≥ 0, both centered: 0 is exact, 1.0 the trivial guess (every point at the mean).
    Rows of X̂ and X must be the same records (map positions to rows first)."""
    Xc = X - X.mean(axis=0)
    H = np.asarray(X_hat, dtype=float)
    H = H - H.mean(axis=0)
    width = max(H.shape[1], Xc.shape[1])
    H = np.pad(H, ((0, 0), (0, width - H.shape[1])))
    T = np.pad(Xc, ((0, 0), (0, width - Xc.shape[1])))
    if not np.any(H):
        return 1.0
    R, _ = orthogonal_procrustes(H, T)
    A = H @ R
    s = max(0.0, float(np.sum(A * T) / np.sum(A * A)))
    return float(np.linalg.norm(s * A - T) / np.linalg.norm(T))


def oracle_projection_error(X: np.ndarray, rank: int) -> float:
    """The error of the best rank-`rank` linear projection of X (its top principal
    components): what `rank` exact linear projections of the points would give at best."""
    s = np.linalg.svd(X - X.mean(axis=0), compute_uv=False)
    return float(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2)))


# -- attacks ---------------------------------------------------------------------------------


def _centered_basis(V: np.ndarray, dims: int) -> np.ndarray:
    """(P, ≤ dims): orthogonal centered columns with mean square 1 spanning the top of the
    centered columns of V (each column scaled to unit norm first: α or the mask's scale
    differ per query)."""
    P = len(V)
    C = V - V.mean(axis=0)
    norms = np.linalg.norm(C, axis=0)
    C = C[:, norms > 0] / norms[norms > 0]
    if C.shape[1] == 0:
        return np.zeros((P, 0))
    U, s, _ = np.linalg.svd(C, full_matrices=False)
    keep = min(dims, int(np.sum(s > s[0] * 1e-12)))
    return U[:, :keep] * np.sqrt(P)


def _sym_index(m: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(m)


def _quadratic_system(W: np.ndarray) -> np.ndarray:
    """Rows p: [W_p G W_pᵀ (upper triangle of G, off-diagonals doubled), −1, −W_p]: times
    (G, c0, c) gives W_p·G·W_pᵀ − c0 − W_p·c, zero for every p when ‖x_p‖² = W_p G W_pᵀ is
    the span's norm column c0 + W_p c (the constant is its own column: W is centered)."""
    P, m = W.shape
    i, j = _sym_index(m)
    quad = W[:, i] * W[:, j] * np.where(i == j, 1.0, 2.0)
    return np.hstack([quad, -np.ones((P, 1)), -W])


def _unpack(vector: np.ndarray, m: int) -> np.ndarray:
    i, j = _sym_index(m)
    G = np.zeros((m, m))
    G[i, j] = vector[: len(i)]
    return G + G.T - np.diag(np.diag(G))


def _null_space(M: np.ndarray, max_extra: int = 5) -> np.ndarray:
    """The near-null right singular vectors of M (columns scaled to unit norm first): the
    smallest one, plus those before the largest relative gap among the smallest few."""
    scale = np.linalg.norm(M, axis=0)
    scale[scale == 0] = 1.0
    _, s, vt = np.linalg.svd(M / scale, full_matrices=False)
    s = s[::-1]
    vt = vt[::-1]
    tail = s[: max_extra + 2]
    gaps = tail[1:] / np.maximum(tail[:-1], 1e-300)
    k = int(np.argmax(gaps)) + 1
    if gaps[k - 1] < 1e3:  # no clear gap: one solution (noisy input)
        k = 1
    return (vt[:k] / scale).T


def linear_attack(V: np.ndarray, d: int, mean_sq: float | None = None) -> np.ndarray:
    """The issue's attack on values affine in (‖x‖², X) per column: X̂ (P, d), exact up to a
    rotation once the columns span {1, ‖x‖², X} (Q ≥ d + 1 in general position).
    `mean_sq`: the points' mean squared norm (d for standardized points), fixes the scale."""
    mean_sq = float(d) if mean_sq is None else mean_sq
    W = _centered_basis(np.asarray(V, dtype=float), d + 1)
    P, m = W.shape
    if m == 0:
        return np.zeros((P, d))
    N = _null_space(_quadratic_system(W))
    Gs = [_unpack(N[:, i], m) for i in range(N.shape[1])]
    if len(Gs) == 1 or m < d + 1:  # binary features: only on the full span
        G = Gs[0]
        if np.trace(G) < 0:
            G = -G
        w, E = np.linalg.eigh(G)
        w, E = w[::-1][:d], E[:, ::-1][:, :d]
        X_hat = W @ E * np.sqrt(np.clip(w, 0.0, None))
    else:
        X_hat = _with_binary_features(W, Gs, d, np.random.default_rng(0))
    return _rescale(X_hat, d, mean_sq)


def _rescale(X_hat: np.ndarray, d: int, mean_sq: float) -> np.ndarray:
    """Centered, padded to d columns, scaled to the points' mean squared norm."""
    X_hat = np.pad(X_hat, ((0, 0), (0, max(0, d - X_hat.shape[1]))))
    X_hat = X_hat - X_hat.mean(axis=0)
    current = np.mean(np.sum(X_hat**2, axis=1))
    return X_hat * np.sqrt(mean_sq / current) if current > 0 else X_hat


def _with_binary_features(
    W: np.ndarray, Gs: list[np.ndarray], d: int, rng: np.random.Generator
) -> np.ndarray:
    """k > 1 null directions: the solutions are G = A·D·Aᵀ, x_p = W_p·A, D diagonal with one
    common value on the ordinary features and a free one on each of the k − 1 binary features
    (x_s² is affine in x_s). Take a member H with D > 0 (d positive eigenvalues), then a
    generic member relative to H: its eigenvectors are the features (the ordinary ones up to a
    rotation among themselves), its k − 1 outlying eigenvalues mark the binary ones. A binary
    feature gets variance 1 (standardized); the ordinary ones share one scale (`_rescale`
    sets it: mean ‖x‖² = d counts the binary features' variance 1 each)."""
    k = len(Gs)
    stack = np.stack(Gs)
    thetas = rng.standard_normal((4000, k))
    thetas /= np.linalg.norm(thetas, axis=1, keepdims=True)
    members = np.einsum("nk,kij->nij", thetas, stack)
    eig = np.linalg.eigvalsh(members)[:, ::-1]  # descending
    score = eig[:, d - 1] / np.max(np.abs(eig), axis=1)
    H = members[int(np.argmax(score))]
    w, E = np.linalg.eigh(H)
    w, E = w[::-1][:d], E[:, ::-1][:, :d]
    w = np.clip(w, 1e-300, None)
    K = E / np.sqrt(w)
    generic = np.einsum("k,kij->ij", rng.standard_normal(k), stack)
    mu, S = np.linalg.eigh(K.T @ generic @ K)
    F = W @ E @ (np.sqrt(w)[:, None] * S)  # (P, d): the features, up to scale
    binary = np.argsort(np.abs(mu - np.median(mu)))[::-1][: k - 1]
    ordinary = np.setdiff1d(np.arange(d), binary)
    F = F - F.mean(axis=0)
    F[:, binary] /= F[:, binary].std(axis=0)
    rest = np.mean(np.sum(F[:, ordinary] ** 2, axis=1))
    F[:, ordinary] *= np.sqrt(max(d - (k - 1), 0.0) / rest) if rest > 0 else 1.0
    return F


# The vertex c of a column's mask lies below its smallest value: with the column normalized to
# Vn ∈ [0, 1], c = min − δ·range, δ > 0, searched as θ = log δ in THETA_RANGE. δ → ∞ is the
# linear limit (an affine mask, the old protocol); at θ = 30 the curvature left is ~e^-30.
THETA_RANGE = (-14.0, 30.0)


def _linearized(Vn: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """√(Vn + δ) − √δ, δ = e^θ per column: √(v − c) up to an affine map (stable form)."""
    delta = np.exp(np.clip(theta, *THETA_RANGE))
    return Vn / (np.sqrt(Vn + delta) + np.sqrt(delta))


def _unit_centered(T: np.ndarray) -> np.ndarray:
    T = T - T.mean(axis=0)
    norms = np.linalg.norm(T, axis=0)
    return T / np.where(norms > 0, norms, 1.0)


def _residuals(Vn: np.ndarray, theta: np.ndarray, U: np.ndarray) -> np.ndarray:
    """Per column, the part of the unit linearized column outside span U (orthonormal)."""
    T = _unit_centered(_linearized(Vn, theta))
    return np.linalg.norm(T - U @ (U.T @ T), axis=0)


def _fit_vertices(Vn: np.ndarray, theta: np.ndarray, span: int) -> tuple[np.ndarray, float]:
    """Minimize the energy of the unit linearized columns outside their best `span`-dim
    subspace over every column's θ at once (variable projection: the subspace is re-fitted
    inside the objective; L-BFGS-B with a finite-difference derivative per column)."""
    step = 1e-6

    def energy(r: np.ndarray) -> tuple[float, np.ndarray]:
        T = _unit_centered(_linearized(Vn, r))
        U = np.linalg.svd(T, full_matrices=False)[0][:, :span]
        outside = T - U @ (U.T @ T)
        moved = _unit_centered(_linearized(Vn, r + step))
        return float(np.sum(outside**2)), 2.0 * np.sum(outside * (moved - T), axis=0) / step

    result = minimize(
        energy,
        theta,
        jac=True,
        method="L-BFGS-B",
        bounds=[THETA_RANGE] * len(theta),
        options={"maxiter": 1000, "ftol": 1e-30, "gtol": 1e-14},
    )
    return result.x, float(result.fun)


def _span(Vn: np.ndarray, theta: np.ndarray, span: int) -> np.ndarray:
    T = _unit_centered(_linearized(Vn, theta))
    return np.linalg.svd(T, full_matrices=False)[0][:, :span]


def _column_search(Vn: np.ndarray, U: np.ndarray, grid: int = 33) -> np.ndarray:
    """Per column, the θ whose linearized column lies closest to span U: a grid, then golden
    section around the best grid point (all columns at once)."""
    Q = Vn.shape[1]
    points = np.linspace(*THETA_RANGE, grid)
    width = points[1] - points[0]
    scores = np.stack([_residuals(Vn, np.full(Q, r), U) for r in points])
    best = points[np.argmin(scores, axis=0)]
    a = np.clip(best - width, *THETA_RANGE)
    b = np.clip(best + width, *THETA_RANGE)
    golden = (np.sqrt(5.0) - 1.0) / 2.0
    for _ in range(40):
        x1, x2 = b - golden * (b - a), a + golden * (b - a)
        left = _residuals(Vn, x1, U) < _residuals(Vn, x2, U)
        b = np.where(left, x2, b)
        a = np.where(left, a, x1)
    fitted = (a + b) / 2.0
    return np.where(_residuals(Vn, fitted, U) <= np.min(scores, axis=0), fitted, best)


def _leave_one_out_search(Vn: np.ndarray, theta: np.ndarray, span: int) -> np.ndarray:
    """Each column searched against the span of the *other* columns: a wrong column that the
    joint fit absorbed into the span (a local minimum) cannot vouch for itself."""
    T = _unit_centered(_linearized(Vn, theta))
    found = np.empty_like(theta)
    for j in range(Vn.shape[1]):
        others = np.delete(T, j, axis=1)
        U = np.linalg.svd(others, full_matrices=False)[0][:, :span]
        found[j] = _column_search(Vn[:, [j]], U)[0]
    return found


def _identity_energy(Vn: np.ndarray, theta: np.ndarray, d: int) -> float:
    """log(σ_min/σ_max)² of the linear attack's quadratic system on the linearized columns:
    −∞ when ‖x‖² is exactly a quadratic form of their span, i.e. for the right vertices."""
    W = _centered_basis(_linearized(Vn, theta), d + 1)
    M = _quadratic_system(W)
    scale = np.linalg.norm(M, axis=0)
    s = np.linalg.svd(M / np.where(scale > 0, scale, 1.0), compute_uv=False)
    return float(2.0 * np.log(max(s[-1], 1e-300) / s[0]))


def _fit_identity(Vn: np.ndarray, d: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Q = d + 1 columns span {1, ‖x‖², X} whatever the vertices, so the span cannot tell
    them; the quadratic identity can: the vertices that make ‖x‖² a quadratic form of the
    span (`_identity_energy`). A cyclic coordinate search on a grid (it steps over the local
    minima where a column sits at the linear limit), then Powell; again while not exact, and
    from a few starts."""
    Q = Vn.shape[1]
    grid = np.linspace(-14.0, 8.0, 45)

    def energy(t: np.ndarray) -> float:  # a slope keeps columns off the flat linear side
        return _identity_energy(Vn, t, d) + 0.1 * float(np.sum(np.clip(t - 10.0, 0.0, None)))

    best, best_energy = np.full(Q, THETA_RANGE[1]), _identity_energy(Vn, np.full(Q, 30.0), d)
    if best_energy < -40.0:  # already linear (an affine mask)
        return best, best_energy
    for start in range(8):
        theta = np.full(Q, -3.0) if start == 0 else rng.uniform(-7.0, 1.0, Q)
        for _ in range(3):
            for j in range(Q):  # a column stuck far from its vertex is searched afresh
                trial = np.repeat(theta[None, :], len(grid), axis=0)
                trial[:, j] = grid
                theta = trial[int(np.argmin([energy(t) for t in trial]))]
            result = minimize(
                energy,
                theta,
                method="Powell",
                options={"maxiter": 400 * Q, "xtol": 1e-10, "ftol": 1e-14},
            )
            theta = np.clip(result.x, *THETA_RANGE)
            if result.fun < best_energy:
                best, best_energy = theta, float(result.fun)
            if best_energy < -40.0:  # σ_min/σ_max < e^-20: an exact identity
                return best, best_energy
    return best, best_energy


def linearize(V: np.ndarray, d: int, core: int | None = None, seed: int = 0) -> np.ndarray:
    """Undo a monotone quadratic mask per column, up to an affine map, from the values alone.

    Q ≥ d + 2 columns: fit each column's vertex so that all linearized columns share one
    centered span of dimension d + 1 (the span of ‖x‖² and X). On the first `core` columns
    (default 3(d + 2)): a joint fit (`_fit_vertices`) from a few starts (the linear limit, a
    vertex near the minimum, random), the best kept; then every column on its own against
    the core's span (`_column_search`).
    Q = d + 1: the span fits any vertices; the quadratic identity of the linear attack does
    not (`_fit_identity`).
    Q ≤ d: nothing pins the vertices: the columns stay as they are (linear limit)."""
    V = np.asarray(V, dtype=float)
    n_q = V.shape[1]
    span = d + 1
    low, high = V.min(axis=0), V.max(axis=0)
    Vn = (V - low) / np.where(high > low, high - low, 1.0)
    rng = np.random.default_rng(seed)
    if n_q < span:
        return _linearized(Vn, np.full(n_q, THETA_RANGE[1]))
    if n_q == span:
        return _linearized(Vn, _fit_identity(Vn, d, rng)[0])
    core = min(n_q, core or 3 * (d + 2))
    starts = [
        np.full(core, THETA_RANGE[1]),
        np.full(core, -3.0),
        rng.uniform(-8.0, 4.0, core),
        rng.uniform(-8.0, 4.0, core),
    ]
    exact = 1e-16 * core  # an energy this small: the right vertices
    best, best_energy = starts[0], np.inf
    for start in starts:
        theta = start
        for _ in range(3):  # a column stuck on the flat linear side is searched afresh
            theta, energy = _fit_vertices(Vn[:, :core], theta, span)
            if energy < best_energy:
                best, best_energy = theta, energy
            if energy < exact:
                break
            theta = _leave_one_out_search(Vn[:, :core], theta, span)
        if best_energy < exact:
            break
    U = _span(Vn[:, :core], best, span)
    theta = np.concatenate([best, _column_search(Vn[:, core:], U)])
    return _linearized(Vn, theta)


def shape_attack(V: np.ndarray, d: int, mean_sq: float | None = None) -> np.ndarray:
    """Linearize the columns (`linearize`: one vertex per column), then the linear attack."""
    return linear_attack(linearize(V, d), d, mean_sq)


def normal_scores(V: np.ndarray) -> np.ndarray:
    """Per column: ranks → standard normal quantiles (only the order of V is used)."""
    V = np.asarray(V, dtype=float)
    return norm.ppf((rankdata(V, axis=0) - 0.5) / len(V))


def nonmetric_fit(V: np.ndarray, d: int, iters: int = 30) -> np.ndarray:
    """Monotone transforms of the columns that make them share one centered span of dimension
    d + 1, from their order alone (non-metric scaling): alternate the span (SVD) and, per
    column, the isotonic regression of its projection on the span in the column's order.
    Starts from the normal scores. Only meaningful for Q > d + 1 columns."""
    order = np.argsort(np.asarray(V, dtype=float), axis=0, kind="stable")
    Z = _unit_centered(normal_scores(V))
    for _ in range(iters):
        U = np.linalg.svd(Z, full_matrices=False)[0][:, : d + 1]
        projected = U @ (U.T @ Z)
        for j in range(Z.shape[1]):
            rows = order[:, j]
            Z[rows, j] = isotonic_regression(projected[rows, j]).x
        Z = _unit_centered(Z)
    return Z


def ordinal_attack(V: np.ndarray, d: int, iters: int = 30) -> np.ndarray:
    """Only the order of each column: ranks → normal scores → the top min(d, Q) principal
    components, whitened (each scaled to unit variance: standardized points). With more than
    d + 1 columns on one layout the order pins the span: `nonmetric_fit` first, then the
    linear attack on the fitted columns."""
    V = np.asarray(V, dtype=float)
    P, n_q = V.shape
    if n_q > d + 1:
        return linear_attack(nonmetric_fit(V, d, iters), d)
    Z = normal_scores(V)
    Z = Z - Z.mean(axis=0)
    U, s, _ = np.linalg.svd(Z, full_matrices=False)
    k = min(d, int(np.sum(s > s[0] * 1e-9)))
    return np.pad(U[:, :k] * np.sqrt(P), ((0, 0), (0, d - k)))


def _align(E: np.ndarray, ref: np.ndarray, iters: int) -> tuple[np.ndarray, float]:
    """E's rows matched to ref's rows and rotated onto them: returns E[match] @ R and the cost.
    Starts from the rows sorted by norm (a rotation-invariant signature), then alternates
    Procrustes and Hungarian assignment."""
    match = np.empty(len(E), dtype=int)
    match[np.argsort(np.linalg.norm(ref, axis=1))] = np.argsort(np.linalg.norm(E, axis=1))
    for _ in range(iters):
        R, _ = orthogonal_procrustes(E[match], ref)
        moved = E @ R
        cost = (
            np.sum(ref**2, axis=1)[:, None]
            + np.sum(moved**2, axis=1)[None, :]
            - 2.0 * ref @ moved.T
        )
        rows, cols = linear_sum_assignment(cost)
        new = cols[np.argsort(rows)]
        if np.array_equal(new, match):
            break
        match = new
    R, _ = orthogonal_procrustes(E[match], ref)
    aligned = E[match] @ R
    return aligned, float(np.sum((aligned - ref) ** 2))


def cross_layout_attack(
    views: list[np.ndarray],
    d: int,
    per_layout=ordinal_attack,
    rounds: int = 3,
    iters: int = 10,
) -> np.ndarray:
    """Estimates of the same points from several layouts (rows shuffled differently per
    layout), each aligned to a reference (matching + rotation), averaged; the reference is
    the average of the previous round. Returns X̂ in the first layout's position order."""
    estimates = []
    for V in views:
        E = per_layout(V, d)
        estimates.append(E - E.mean(axis=0))
    ref = estimates[0]
    for _ in range(rounds):
        ref = np.mean([_align(E, ref, iters)[0] for E in estimates], axis=0)
    return ref


# -- linking layouts through a repeated query ------------------------------------------------


def _repeat_fit(ga: np.ndarray, targets: np.ndarray, thetas: np.ndarray) -> np.ndarray:
    """Relative residuals (len(thetas), K) of targets (P, K) fitted by c0 + c1·g + c2·curve_θ(g)
    (g = sorted column a normalized to [0, 1], curve as `_linearized`): projections on the
    orthonormal basis of (1, g), then on each curve's remaining direction."""
    P = len(ga)
    span = ga[-1] - ga[0]
    g = (ga - ga[0]) / span if span > 0 else np.zeros(P)
    base, _ = np.linalg.qr(np.column_stack([np.ones(P), g]))
    T = targets - base @ (base.T @ targets)
    C = _linearized(g[:, None], thetas[None, :])
    C = C - base @ (base.T @ C)
    C = C / np.maximum(np.linalg.norm(C, axis=0), 1e-300)
    R = T[:, None, :] - C[:, :, None] * np.einsum("pg,pk->gk", C, T)[None, :, :]
    return np.linalg.norm(R, axis=0) / np.sqrt(P)


def repeat_residuals(a: np.ndarray, B: np.ndarray, grid: int = 61) -> np.ndarray:
    """For each column of B (P, K), how well it holds the same distances as column a under
    another mask. For one query asked twice the sorted values obey
    g_b = c0 + c1·g_a + c2·√(g_a − c), exactly for the quadratic mask (c1 = 1, c = a's vertex)
    and for an affine one (c2 = 0). c on a grid (θ as in `_linearized`), refined where the
    grid comes close; c0, c1, c2 by least squares; the residual relative to b's spread:
    ~1e-10 for a repeated query, ~0.05 for two different ones (wine, diabetes)."""
    ga = np.sort(a)
    targets = np.sort(B, axis=0)
    targets = (targets - targets.mean(axis=0)) / np.where(
        targets.std(axis=0) > 0, targets.std(axis=0), 1.0
    )
    thetas = np.linspace(-14.0, 16.0, grid)
    scores = _repeat_fit(ga, targets, thetas)
    best = scores.min(axis=0)
    step = thetas[1] - thetas[0]
    for k in np.flatnonzero(best < 1e-2):
        t0 = thetas[int(np.argmin(scores[:, k]))]
        refined = minimize_scalar(
            lambda t, k=k: float(_repeat_fit(ga, targets[:, [k]], np.array([t]))[0, 0]),
            bounds=(t0 - step, t0 + step),
            method="bounded",
            options={"xatol": 1e-10},
        )
        best[k] = min(best[k], float(refined.fun))
    return best


def link_by_repeated_query(
    a: np.ndarray, b: np.ndarray, threshold: float = 1e-6
) -> np.ndarray | None:
    """If some column of layout b repeats a query of layout a (`repeat_residuals` below
    `threshold`), the positions of b matched to a's (b's position of a's p-th point, by rank
    in the repeated column); None when no column pair repeats."""
    scores = np.stack([repeat_residuals(a[:, j], b) for j in range(a.shape[1])])
    j, k = np.unravel_index(int(np.argmin(scores)), scores.shape)
    if scores[j, k] > threshold:
        return None
    match = np.empty(len(a), dtype=int)
    match[np.argsort(a[:, j])] = np.argsort(b[:, k])
    return match


def repeat_link_attack(views: list[np.ndarray], d: int) -> np.ndarray:
    """Link every layout that repeats a query of an already linked one (starting from the
    first), stack the linked layouts' columns on the first layout's positions, and run the
    shape attack on them (exact once the linked columns exceed d + 1). Without any repeat
    this is the shape attack on the first layout alone. X̂ in the first layout's order."""
    linked = {0: np.arange(len(views[0]))}
    frontier = [0]
    while frontier:
        i = frontier.pop()
        for j in range(len(views)):
            if j in linked:
                continue
            match = link_by_repeated_query(views[i], views[j])
            if match is not None:
                linked[j] = match[linked[i]]
                frontier.append(j)
    columns = np.hstack([views[j][linked[j]] for j in sorted(linked)])
    return shape_attack(columns, d)


def _profile_match(za: np.ndarray, zb: np.ndarray) -> np.ndarray:
    """b's row for each row of a, minimizing the summed squared profile differences."""
    cost = np.sum(za**2, axis=1)[:, None] + np.sum(zb**2, axis=1)[None, :] - 2.0 * za @ zb.T
    r, c = linear_sum_assignment(cost)
    match = np.empty(len(za), dtype=int)
    match[r] = c
    return match


def link_by_similar_queries(
    a: np.ndarray, b: np.ndarray, min_pairs: int = 4, min_agreement: float = 0.9, rounds: int = 4
) -> tuple[np.ndarray, float] | None:
    """Like `link_by_repeated_query` for queries asked *approximately* again (a stream that
    revisits similar records). Pair a's and b's columns whose sorted values look alike
    (`repeat_residuals`, Hungarian; pairs under half the typical residual) and match the
    positions by their normal scores in those columns (Hungarian); then, in turn, re-pair the
    columns by their correlation under that match and re-match the positions on the pairs
    that agree (correlation ≥ `min_agreement`). Accepted when ≥ `min_pairs` pairs agree,
    checked on held-out pairs (a match made on half of them must agree on the other half: ~0
    for a wrong match). Returns (b's position of each of a's points, the mean agreement), or
    None."""
    za_all, zb_all = normal_scores(a), normal_scores(b)
    scores = np.stack([repeat_residuals(a[:, j], b) for j in range(a.shape[1])])
    rows, cols = linear_sum_assignment(scores)
    alike = scores[rows, cols] < 0.5 * np.median(scores)  # clearly better than a typical pair
    if alike.sum() < 2:
        return None
    match = _profile_match(za_all[:, rows[alike]], zb_all[:, cols[alike]])
    for _ in range(rounds):
        corr = _cross_correlation(za_all, zb_all[match])
        rows, cols = linear_sum_assignment(-corr)
        good = corr[rows, cols] >= min_agreement
        if good.sum() < 2:
            return None
        rows, cols = rows[good], cols[good]
        match = _profile_match(za_all[:, rows], zb_all[:, cols])
    if len(rows) < min_pairs:
        return None
    za, zb = za_all[:, rows], zb_all[:, cols]
    fit, check = np.arange(len(rows)) % 2 == 0, np.arange(len(rows)) % 2 == 1
    trial = _profile_match(za[:, fit], zb[:, fit])
    held_out = np.mean([_correlation(za[:, k], zb[trial, k]) for k in np.flatnonzero(check)])
    if held_out < min_agreement:
        return None
    agreement = float(np.mean([_correlation(za[:, k], zb[match, k]) for k in range(len(rows))]))
    return match, agreement


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1])


def _cross_correlation(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    A = (A - A.mean(axis=0)) / A.std(axis=0)
    B = (B - B.mean(axis=0)) / B.std(axis=0)
    return A.T @ B / len(A)


def span_misfit(T: np.ndarray, d: int) -> float:
    """How far linearized columns are from one centered (d + 1)-dim span: the energy of the
    unit columns beyond their top d + 1 singular values, per column (~1e-20 when exact)."""
    s = np.linalg.svd(_unit_centered(T), compute_uv=False)
    return float(np.sum(s[d + 1 :] ** 2) / T.shape[1])


def similar_query_link_attack(views: list[np.ndarray], d: int, tries: int = 4) -> np.ndarray:
    """Link the first layout to others through similar queries (`link_by_similar_queries`);
    for each of the `tries` best-agreeing links, stack the two layouts' columns and fit the
    vertices (`linearize`); keep the pair whose columns fit one span best (a wrong position
    here and there spoils the fit, so the attacker can tell) and run the linear attack on it.
    Without any link (or with ≤ d + 1 columns), the ordinal attack on the first layout."""
    links = []
    for j in range(1, len(views)):
        link = link_by_similar_queries(views[0], views[j])
        if link is not None:
            links.append((link[1], j, link[0]))
    best, best_misfit = None, np.inf
    for _, j, match in sorted(links, key=lambda item: -item[0])[:tries]:
        stacked = np.hstack([views[0], views[j][match]])
        if stacked.shape[1] <= d + 1:
            continue
        T = linearize(stacked, d)
        misfit = span_misfit(T, d)
        if misfit < best_misfit:
            best, best_misfit = T, misfit
    if best is None:
        return ordinal_attack(views[0], d)
    return linear_attack(best, d)
