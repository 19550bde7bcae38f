"""Global feature moments by one secure sum: the standardization every job starts from.

Each party contributes ``Enc(nᵢ·E_i[x] ‖ nᵢ·E_i[x²] ‖ nᵢ ‖ 1)`` through `fedhe.tasks.aggregate`;
only the sum is decrypted, so every party standardizes with the same global mean and std
while no party's own statistics leak.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedhe.tasks.aggregate import Layout

OUTPUT = "feature_moments"
# Bound on Σ nᵢ·x and Σ nᵢ·x² over all parties (~1e15): two primes at scale 2^53 hold it.
SUM_BOUND = 2.0**50
# Relative variance below which a column counts as constant: decrypted moments carry ~1e-13 of
# encryption and flooding noise where the true variance is 0.
CONSTANT_TOLERANCE = 1e-9


def layout(n_columns: int) -> Layout:
    return Layout(("mean", "meansq"), ((n_columns,), (n_columns,)))


def party_moments(columns: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample means E[x] and E[x²] of one party's columns (the secure sum multiplies by n)."""
    return {"mean": columns.mean(axis=0), "meansq": (columns**2).mean(axis=0)}


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

    @classmethod
    def from_moments(
        cls, mean: np.ndarray, meansq: np.ndarray, *, with_target: bool = False
    ) -> Standardizer:
        std = std_from_moments(np.asarray(mean), np.asarray(meansq))
        if with_target:
            return cls(mean[:-1], std[:-1], float(mean[-1]), float(std[-1]))
        return cls(np.asarray(mean), std)

    def to_dict(self) -> dict[str, object]:
        return {
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "y_mean": self.y_mean,
            "y_std": self.y_std,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Standardizer:
        return cls(
            np.asarray(data["mean"], dtype=float),
            np.asarray(data["std"], dtype=float),
            float(data.get("y_mean", 0.0)),
            float(data.get("y_std", 1.0)),
        )  # type: ignore[arg-type]

    def features(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean) / self.std

    def target(self, y: np.ndarray) -> np.ndarray:
        return (y - self.y_mean) / self.y_std

    def target_to_original(self, y: np.ndarray) -> np.ndarray:
        return self.y_mean + self.y_std * np.asarray(y)

    def to_original(self, w: np.ndarray) -> np.ndarray:
        """Linear coefficients on standardized data → original units, intercept first."""
        coef = w[1:] * self.y_std / self.std
        intercept = self.y_mean + self.y_std * w[0] - float(coef @ self.mean)
        return np.concatenate([[intercept], coef])
