"""Split sample indices across federated parties: IID or label-skewed (Dirichlet)."""

from __future__ import annotations

import numpy as np

from fedhe.errors import DataError

MAX_DIRICHLET_TRIES = 1000


def _check_parties(n_samples: int, n_parties: int) -> None:
    if n_parties < 1 or n_parties > n_samples:
        raise DataError(
            f"Cannot split {n_samples} samples among {n_parties} parties: "
            f"n_parties must lie in 1..{n_samples} (one sample per party at least)."
        )


def partition_iid(n_samples: int, n_parties: int, *, seed: int) -> list[np.ndarray]:
    """Shuffle 0..n_samples-1 with `seed` and cut it into `n_parties` near-equal parts.

    Returns
    -------
    One sorted int64 index array per party; disjoint, covering all samples, sizes differ by ≤ 1.
    """
    _check_parties(n_samples, n_parties)
    order = np.random.default_rng(seed).permutation(n_samples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, n_parties)]


def partition_dirichlet(
    labels: np.ndarray, n_parties: int, *, alpha: float, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Label-skewed split: each class is shared among parties by proportions ~ Dirichlet(alpha).

    Small alpha (e.g. 0.1) gives each party few classes; large alpha (e.g. 100) approaches IID.
    The draw is repeated (at most 1000 times, all from `seed`) until every party holds at
    least `min_size` samples; otherwise DataError.

    Returns
    -------
    One sorted int64 index array per party; disjoint and covering all samples.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise DataError(f"labels must be a 1-D array, got shape {y.shape}.")
    n = int(y.size)
    _check_parties(n, n_parties)
    if not np.isfinite(alpha) or alpha <= 0:
        raise DataError(f"alpha must be a positive finite number, got {alpha}.")
    if min_size < 0 or min_size * n_parties > n:
        raise DataError(
            f"min_size={min_size} for {n_parties} parties needs {min_size * n_parties} samples, "
            f"only {n} exist. Lower min_size or use fewer parties."
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(MAX_DIRICHLET_TRIES):
        parts = _dirichlet_draw(by_class, n_parties, alpha, rng)
        if min(p.size for p in parts) >= min_size:
            return parts
    raise DataError(
        f"No Dirichlet(alpha={alpha}) split of {n} samples into {n_parties} parties gave every "
        f"party at least {min_size} samples in {MAX_DIRICHLET_TRIES} tries. "
        "Raise alpha, lower min_size or use fewer parties."
    )


def _dirichlet_draw(
    by_class: list[np.ndarray], n_parties: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    chunks: list[list[np.ndarray]] = [[] for _ in range(n_parties)]
    for idx in by_class:
        shuffled = rng.permutation(idx)
        shares = rng.dirichlet(np.full(n_parties, alpha))
        cuts = (np.cumsum(shares)[:-1] * shuffled.size).astype(int)
        for party, piece in enumerate(np.split(shuffled, cuts)):
            chunks[party].append(piece)
    return [np.sort(np.concatenate(c)).astype(np.int64) for c in chunks]
