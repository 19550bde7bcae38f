"""What a querier may report about its answers: summary counts, never a prediction.

The querier keeps its predictions and logits (they answer its own queries); a querier that opts
in reports per batch the counts below, which add up across batches into accuracy or MSE and
R² on its labelled test set. Nothing else about its answers reaches the aggregator.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np


def batch_counts(
    y: np.ndarray, predicted: np.ndarray, n_classes: int, *, compared: np.ndarray | None = None
) -> dict[str, float]:
    """Counts of one batch: classification (correct), regression (sums for MSE and R²);
    `compared`: the same queries answered another way (the plaintext model), for agreement."""
    y = np.asarray(y, dtype=float)
    predicted = np.asarray(predicted, dtype=float)
    counts = {"n": float(len(y))}
    if n_classes:
        counts["correct"] = float(np.sum(predicted == y))
    else:
        counts |= {
            "squared_error": float(np.sum((y - predicted) ** 2)),
            "sum_y": float(np.sum(y)),
            "sum_y2": float(np.sum(y**2)),
        }
    if compared is not None:
        counts["agree"] = float(np.sum(np.asarray(compared, dtype=float) == predicted))
        if n_classes:
            counts["compared_correct"] = float(np.sum(np.asarray(compared) == y))
    return counts


def combine(batches: Iterable[Mapping[str, float]], n_classes: int) -> dict[str, float]:
    """Accuracy (classification) or MSE and R² (regression) over all reported batches; {} when
    the querier reported no counts (it did not opt in)."""
    totals: dict[str, float] = {}
    for batch in batches:
        for key, value in batch.items():
            if key.startswith("max_"):  # e.g. max_abs_logit_error: the largest over batches
                totals[key] = max(totals.get(key, 0.0), float(value))
            else:
                totals[key] = totals.get(key, 0.0) + float(value)
    n = totals.get("n", 0.0)
    if not n or ("correct" not in totals and "squared_error" not in totals):
        return {}
    if n_classes:
        result = {"accuracy": totals["correct"] / n}
        if "compared_correct" in totals:
            result["compared_accuracy"] = totals["compared_correct"] / n
    else:
        spread = totals["sum_y2"] - totals["sum_y"] ** 2 / n
        mse = totals["squared_error"] / n
        result = {"mse": mse, "r2": 1.0 - totals["squared_error"] / spread if spread else 0.0}
    if "agree" in totals:
        result["agreement"] = totals["agree"] / n
    return result | {k: v for k, v in totals.items() if k.startswith("max_")}
