"""In-memory datasets and the built-in datasets that ship with scikit-learn (no network)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
from sklearn import datasets as skd
from sklearn.model_selection import train_test_split

from fedhe.errors import DataError

TASKS = ("classification", "regression")

SYNTHETIC_SAMPLES = 2000
SYNTHETIC_FEATURES = 20
SYNTHETIC_NOISE = 0.1


@dataclass(frozen=True, eq=False)
class Dataset:
    """Feature matrix and targets of one party, one split or one whole dataset.

    Attributes
    ----------
    X : float64 array of shape (n, d).
    y : int64 labels in 0..n_classes-1 (classification) or float64 targets (regression).
    feature_names : one name per column of X.
    target_name : name of the target.
    task : "classification" or "regression".
    n_classes : number of classes of the whole problem (a subset keeps it); 0 for regression.
    """

    X: np.ndarray
    y: np.ndarray
    feature_names: tuple[str, ...]
    target_name: str
    task: str
    n_classes: int

    def __post_init__(self) -> None:
        X = np.asarray(self.X, dtype=np.float64)
        if X.ndim != 2:
            raise DataError(f"Dataset X must be 2-D (samples, features), got shape {X.shape}.")
        if self.task not in TASKS:
            raise DataError(f"Dataset task must be one of {TASKS}, got {self.task!r}.")
        y = _checked_targets(self.y, self.task, self.n_classes, X.shape[0])
        names = tuple(str(n) for n in self.feature_names)
        if len(names) != X.shape[1]:
            raise DataError(
                f"Dataset has {X.shape[1]} feature columns but {len(names)} feature names."
            )
        object.__setattr__(self, "X", X)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "feature_names", names)

    @property
    def n_samples(self) -> int:
        """Number of rows."""
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        """Number of feature columns."""
        return int(self.X.shape[1])

    def subset(self, indices: np.ndarray | list[int]) -> Dataset:
        """Return the rows at `indices` (integer positions or a boolean mask) as a new Dataset.

        n_classes stays that of the whole problem, even if the subset misses a class.
        """
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (self.n_samples,):
                raise DataError(
                    f"Boolean mask has shape {idx.shape}, dataset has {self.n_samples} rows."
                )
            idx = np.flatnonzero(idx)
        if idx.size == 0:
            idx = idx.astype(np.intp)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise DataError(
                f"Subset indices must be a 1-D integer array, got {idx.dtype} {idx.shape}."
            )
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_samples):
            raise DataError(
                f"Subset indices must lie in 0..{self.n_samples - 1}, "
                f"got range {idx.min()}..{idx.max()}."
            )
        return Dataset(
            X=self.X[idx],
            y=self.y[idx],
            feature_names=self.feature_names,
            target_name=self.target_name,
            task=self.task,
            n_classes=self.n_classes,
        )


def _checked_targets(y_in: np.ndarray, task: str, n_classes: int, n: int) -> np.ndarray:
    y = np.asarray(y_in)
    if y.shape != (n,):
        raise DataError(f"Dataset y must have shape ({n},) to match X, got {y.shape}.")
    if task == "regression":
        if n_classes != 0:
            raise DataError(f"A regression dataset must have n_classes=0, got {n_classes}.")
        return y.astype(np.float64)
    if n_classes < 1:
        raise DataError(f"A classification dataset needs n_classes >= 1, got {n_classes}.")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"Classification labels must be integers 0..{n_classes - 1}, got {y.dtype}."
        )
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise DataError(
            f"Classification labels must lie in 0..{n_classes - 1}, got {y.min()}..{y.max()}."
        )
    return y.astype(np.int64)


@dataclass(frozen=True)
class BuiltinSpec:
    """A built-in dataset: its task, a one-line description and a loader taking the seed."""

    task: str
    description: str
    load: Callable[[int], Dataset]


@cache
def _sklearn_arrays(name: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    loader = getattr(skd, f"load_{name}")
    bunch = loader()
    names = tuple(str(f) for f in bunch.feature_names)
    return bunch.data.astype(np.float64), np.asarray(bunch.target), names


def _sklearn_dataset(name: str, task: str, target_name: str) -> Callable[[int], Dataset]:
    def load(seed: int) -> Dataset:
        X, y, names = _sklearn_arrays(name)
        n_classes = int(np.unique(y).size) if task == "classification" else 0
        return Dataset(X.copy(), y.copy(), names, target_name, task, n_classes)

    return load


def synthetic_regression(
    seed: int, n_samples: int = SYNTHETIC_SAMPLES, n_features: int = SYNTHETIC_FEATURES
) -> tuple[Dataset, np.ndarray, float]:
    """Linear data y = X @ w + b + N(0, 0.1²) with X, w, b ~ N(0, 1) all drawn from `seed`.

    Returns
    -------
    (dataset, w, b) : the dataset and the true coefficients and intercept.
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(size=n_features)
    b = float(rng.normal())
    X = rng.normal(size=(n_samples, n_features))
    y = X @ w + b + SYNTHETIC_NOISE * rng.normal(size=n_samples)
    names = tuple(f"x{i}" for i in range(n_features))
    return Dataset(X, y, names, "y", "regression", 0), w, b


BUILTIN_DATASETS: dict[str, BuiltinSpec] = {
    "breast_cancer": BuiltinSpec(
        "classification",
        "Wisconsin breast cancer: 569 samples, 30 features, 2 classes",
        _sklearn_dataset("breast_cancer", "classification", "malignant_or_benign"),
    ),
    "iris": BuiltinSpec(
        "classification",
        "Iris flowers: 150 samples, 4 features, 3 classes",
        _sklearn_dataset("iris", "classification", "species"),
    ),
    "digits": BuiltinSpec(
        "classification",
        "8x8 handwritten digits: 1797 samples, 64 features, 10 classes",
        _sklearn_dataset("digits", "classification", "digit"),
    ),
    "wine": BuiltinSpec(
        "classification",
        "Wine cultivars: 178 samples, 13 features, 3 classes",
        _sklearn_dataset("wine", "classification", "cultivar"),
    ),
    "diabetes": BuiltinSpec(
        "regression",
        "Diabetes progression: 442 samples, 10 features, regression",
        _sklearn_dataset("diabetes", "regression", "progression"),
    ),
    "synthetic": BuiltinSpec(
        "regression",
        "Linear y = X@w + b + noise: 2000 samples, 20 features, w and b drawn from the seed",
        lambda seed: synthetic_regression(seed)[0],
    ),
}


def load_builtin(
    name: str, *, seed: int = 0, test_fraction: float = 0.2
) -> tuple[Dataset, Dataset]:
    """Return (train, test) of a built-in dataset, split reproducibly from `seed`.

    Classification splits are stratified (every class lands in both parts where possible);
    regression splits are plain shuffled splits. Rows come shuffled; features are unscaled.
    """
    spec = BUILTIN_DATASETS.get(name)
    if spec is None:
        known = ", ".join(sorted(BUILTIN_DATASETS))
        raise DataError(f"Unknown built-in dataset {name!r}. Choose one of: {known}.")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise DataError(f"seed must be an integer in 0..2**32-1, got {seed!r}.")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}.")
    data = spec.load(seed)
    stratify = data.y if data.task == "classification" else None
    try:
        train_idx, test_idx = train_test_split(
            np.arange(data.n_samples),
            test_size=test_fraction,
            random_state=seed,
            shuffle=True,
            stratify=stratify,
        )
    except ValueError as exc:
        raise DataError(
            f"Cannot split {name!r} with test_fraction={test_fraction}: {exc}. "
            "Choose a test_fraction that leaves every class in both parts."
        ) from exc
    return data.subset(train_idx), data.subset(test_idx)
