"""Logistic regression on encrypted gradients: the sibling of `fedhe.tasks.linreg`.

Binary classification only. Each round every party sends ``Enc(nᵢ·(mean log-loss gradient at
w) + mᵢ ‖ nᵢ ‖ 1)`` (`linreg.party_gradient` with the sigmoid link, `linreg.mask_gradient`
with its mask mᵢ from the aggregator); the key holder decrypts only the masked sum, the
aggregator removes the masks and takes a gradient step. Unmasked, the sums would tell the key
holder each class's mean of every feature (the first round's, at w = 0, is Zᵀ(½ − y)/n) and,
over the rounds, the Hessian Zᵀ·diag(p(1−p))·Z/n, hence the feature correlations
(tests/test_regression_privacy.py). Features are standardized with the job's global
moments; coefficients are reported in original units, intercept first.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

from fedhe.errors import DataError
from fedhe.tasks.linreg import GRADIENT_OUTPUT, design
from fedhe.tasks.moments import Standardizer

TASK = "logreg"
OUTPUT = GRADIENT_OUTPUT


def sigmoid(eta: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * eta))  # stable for large |eta|


def check_binary(y: np.ndarray, where: str) -> None:
    labels = set(np.unique(y).tolist())
    if not labels <= {0, 1}:
        raise DataError(
            f"{where}: logistic regression needs binary labels 0/1, got {sorted(labels)[:10]}; "
            "use the aggregate task (softmax model) for more classes."
        )


def predict_proba(
    w_standardized: np.ndarray, standardizer: Standardizer, X: np.ndarray
) -> np.ndarray:
    return sigmoid(design(standardizer.features(X)) @ w_standardized)


def classification_metrics(y: np.ndarray, probability: np.ndarray) -> dict[str, float]:
    clipped = np.clip(probability, 1e-12, 1 - 1e-12)
    metrics = {
        "accuracy": float(np.mean((probability >= 0.5) == (y == 1))),
        "log_loss": float(log_loss(y, clipped, labels=[0, 1])),
    }
    if len(np.unique(y)) == 2:
        metrics["auc"] = float(roc_auc_score(y, probability))
    return metrics


def to_original(w_standardized: np.ndarray, standardizer: Standardizer) -> np.ndarray:
    """Logit coefficients in original feature units, intercept first."""
    return Standardizer(standardizer.mean, standardizer.std).to_original(w_standardized)
