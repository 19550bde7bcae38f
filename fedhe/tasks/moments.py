"""Global feature moments by one secure sum: the standardization every job starts from.

Each party contributes ``Enc(nᵢ·E_i[x] ‖ nᵢ·E_i[x²] ‖ nᵢ ‖ 1)`` through `fedhe.tasks.aggregate`;
only the sum is decrypted, so every party standardizes with the same global mean and std
while no party's own statistics leak.

Imputing jobs (`--impute mean`) add a third field, the fraction of rows where each column is
observed: party i sends Sᵢ/nᵢ, Qᵢ/nᵢ, Cᵢ/nᵢ (sums of x and x² over its observed cells, and
their count). From the one sum, m = ΣS/ΣC is the pooled mean of the observed cells, scikit-learn's
``SimpleImputer(strategy="mean")`` fitted on all parties' data together, and the moments of the
filled-in data follow without a second round trip: mean m, E[x²] = ΣQ/N + (1 − ΣC/N)·m².
Every party fills its missing cells with m (`Standardizer.fill_missing`): nothing is imputed from
another site's data, and no party's own counts leave it outside the secure sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedhe.errors import DataError
from fedhe.tasks.aggregate import Layout

OUTPUT = "feature_moments"
FIELDS = ("mean", "meansq")
OBSERVED = "observed"  # imputing jobs: fraction of rows observed, per column
# Bound on Σ nᵢ·x and Σ nᵢ·x² over all parties (~1e15): two primes at scale 2^53 hold it.
SUM_BOUND = 2.0**50
# Relative variance below which a column counts as constant: decrypted moments carry ~1e-13 of
# encryption and flooding noise where the true variance is 0.
CONSTANT_TOLERANCE = 1e-9


def layout(n_columns: int, *, observed: bool = False) -> Layout:
    names = (*FIELDS, OBSERVED) if observed else FIELDS
    return Layout(names, ((n_columns,),) * len(names))


def party_moments(columns: np.ndarray, *, observed: bool = False) -> dict[str, np.ndarray]:
    """Per-sample means E[x] and E[x²] of one party's columns (the secure sum multiplies by n).

    `observed` (imputing jobs): NaN cells count as missing; the means are Σ over the observed
    cells divided by all n rows, and the fraction of observed rows per column is added."""
    if not observed:
        return {"mean": columns.mean(axis=0), "meansq": (columns**2).mean(axis=0)}
    seen = ~np.isnan(columns)
    values = np.where(seen, columns, 0.0)
    n = max(columns.shape[0], 1)
    return {
        "mean": values.sum(axis=0) / n,
        "meansq": (values**2).sum(axis=0) / n,
        OBSERVED: seen.sum(axis=0) / n,
    }


def imputed_moments(
    mean: np.ndarray,
    meansq: np.ndarray,
    observed: np.ndarray,
    total_samples: int,
    names: Sequence[str] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """(m, E[x²]) of the columns once every missing cell holds m, the mean of the observed
    cells, from the summed per-sample fields (see the module docstring)."""
    # ΣC is a count: rounding it removes the encryption noise of the decrypted fraction.
    observed = np.round(np.asarray(observed) * total_samples) / max(total_samples, 1)
    never = np.flatnonzero(observed <= 0)
    if never.size:
        column = names[never[0]] if never[0] < len(names) else f"#{never[0]}"
        raise DataError(
            f"column {column!r} has no observed value at any party: nothing to impute it from. "
            "Drop the column from every file (and schema.json) or fill it in."
        )
    m = np.asarray(mean) / observed
    return m, np.asarray(meansq) + (1.0 - observed) * m**2


def std_from_moments(mean: np.ndarray, meansq: np.ndarray) -> np.ndarray:
    """Standard deviations; 1 for columns constant up to the moments' noise (only centred)."""
    variance = meansq - mean**2
    constant = variance <= CONSTANT_TOLERANCE * np.maximum(1.0, meansq)
    return np.where(constant, 1.0, np.sqrt(np.maximum(variance, 0.0)))


@dataclass(frozen=True)
class Standardizer:
    """Global mean and std of the features (and optionally the target, the last column)."""

    mean: np.ndarray
    std: np.ndarray
    y_mean: float = 0.0
    y_std: float = 1.0
    fill: np.ndarray | None = None  # imputing jobs: what a missing (NaN) feature cell becomes

    @classmethod
    def from_moments(
        cls,
        mean: np.ndarray,
        meansq: np.ndarray,
        *,
        with_target: bool = False,
        observed: np.ndarray | None = None,
        total_samples: int = 0,
        names: Sequence[str] = (),
    ) -> Standardizer:
        """From the summed moments; with `observed` (an imputing job's third field), of the data
        whose missing cells hold the pooled observed means, which become `fill`."""
        mean, meansq = np.asarray(mean, dtype=float), np.asarray(meansq, dtype=float)
        fill = None
        if observed is not None:
            mean, meansq = imputed_moments(mean, meansq, observed, total_samples, names)
            fill = mean[:-1] if with_target else mean
        std = std_from_moments(mean, meansq)
        if with_target:
            return cls(mean[:-1], std[:-1], float(mean[-1]), float(std[-1]), fill)
        return cls(mean, std, fill=fill)

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "y_mean": self.y_mean,
            "y_std": self.y_std,
        }
        if self.fill is not None:
            data["fill"] = self.fill.tolist()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Standardizer:
        fill = data.get("fill")
        return cls(
            np.asarray(data["mean"], dtype=float),
            np.asarray(data["std"], dtype=float),
            float(data.get("y_mean", 0.0)),
            float(data.get("y_std", 1.0)),
            None if fill is None else np.asarray(fill, dtype=float),
        )  # type: ignore[arg-type]

    def fill_missing(self, X: np.ndarray) -> np.ndarray:
        """Missing (NaN) cells → the job's global means; X as it is when the job imputes not."""
        if self.fill is None:
            return X
        return np.where(np.isnan(X), self.fill, X)

    def features(self, X: np.ndarray) -> np.ndarray:
        return (self.fill_missing(X) - self.mean) / self.std

    def target(self, y: np.ndarray) -> np.ndarray:
        return (y - self.y_mean) / self.y_std

    def target_to_original(self, y: np.ndarray) -> np.ndarray:
        return self.y_mean + self.y_std * np.asarray(y)

    def to_original(self, w: np.ndarray) -> np.ndarray:
        """Linear coefficients on standardized data → original units, intercept first."""
        coef = w[1:] * self.y_std / self.std
        intercept = self.y_mean + self.y_std * w[0] - float(coef @ self.mean)
        return np.concatenate([[intercept], coef])
