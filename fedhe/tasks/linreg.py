"""Linear and ridge regression on encrypted contributions, party → aggregator → key holder.

Both modes start from the job's global feature moments (one secure sum, see
`fedhe.tasks.aggregate`): every party standardizes features (and, for linreg, the target) with
the same global mean and std, so no party's own statistics leak and the statistics are well
conditioned. Coefficients are reported in original units, intercept first.

**Exact mode (masked normal equations), one secure sum.** The aggregator draws a random
invertible, well-conditioned matrix R (`masking_matrix`) and sends it to the parties only.
Each party sends ``Enc(R·Aᵢ ‖ R·bᵢ ‖ nᵢ ‖ 1)`` with Aᵢ = ZᵢᵀZᵢ + α·nᵢ·I' and bᵢ = Zᵢᵀyᵢ
(Z with a leading column of ones, I' the identity without the intercept). The key holder
decrypts R·A and R·b under its policy, solves (RA)w = Rb and releases only w.

Why R is *not* orthogonal (as first suggested in DESIGN.md): A is symmetric positive definite,
so for orthogonal R, (RA)ᵀ(RA) = A² and A is its unique positive square root — the key holder
would recover A. For an invertible R with unequal singular values, every symmetric positive
definite A' is consistent with the observed M = RA (take R' = M·A'⁻¹), so M and Rb reveal w and
nothing else of A.

**Gradient mode.** Each round every party sends ``Enc(mean gradient of its loss at w ‖ nᵢ ‖ 1)``
(clipped to ±clip per coordinate so the sum stays bounded); the key holder decrypts only the
sum, the aggregator applies ``w ← w − lr·(g + α·w')``. `fedhe.tasks.logreg` reuses it with
the logistic loss.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedhe.crypto.randomness import secure_random
from fedhe.errors import ProtocolError
from fedhe.keyholder import DecryptionRequest, KeyHolder
from fedhe.tasks.aggregate import Layout

TASK = "linreg"
MASKED_OUTPUT = "masked_normal_equations"
GRADIENT_OUTPUT = "gradient_sum"

# Singular values of the mask R lie in [1/2, 2]: cond(R) ≤ 4 costs at most 2 bits of precision.
MASK_SINGULAR_RANGE = (0.5, 2.0)
# Every coordinate of R·A and R·b is at most 2·sqrt(d+1)·Σnᵢ·(1+α) (|R row|₂ ≤ 2 and
# |A column|₂ ≤ sqrt(d+1)·N(1+α) for standardized columns); a 1% margin covers the noise in the
# standardization moments.
_BOUND_MARGIN = 1.01
# The solve amplifies errors by cond(R)·cond(A): encode the statistics at ≥ 2^50 (two primes).
STATISTICS_SCALE_BITS = 50


def design(Z: np.ndarray) -> np.ndarray:
    """Z with a leading column of ones (the intercept)."""
    return np.column_stack([np.ones(len(Z)), Z])


def predict(coefficients: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Linear predictor in original units from `coefficients` (intercept first)."""
    return coefficients[0] + X @ coefficients[1:]


# -- exact mode ------------------------------------------------------------------------------------


def masking_matrix(dim: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A random invertible R = Q₁·diag(s)·Q₂ with singular values s in MASK_SINGULAR_RANGE.

    Drawn by the aggregator from the OS's CSPRNG and never sent to the key holder.
    """
    rng = secure_random() if rng is None else rng
    low, high = np.log(MASK_SINGULAR_RANGE[0]), np.log(MASK_SINGULAR_RANGE[1])
    singular = np.exp(rng.uniform(low, high, dim))
    singular[:2] = MASK_SINGULAR_RANGE  # spread the extremes so R is never near-orthogonal
    return _random_orthogonal(dim, rng) @ np.diag(singular) @ _random_orthogonal(dim, rng)


def statistics_layout(n_features: int) -> Layout:
    dim = n_features + 1
    return Layout(("masked_gram", "masked_xty"), ((dim, dim), (dim,)))


def statistics_sum_bound(n_features: int, total_samples: float, l2: float) -> float:
    return _BOUND_MARGIN * 2.0 * np.sqrt(n_features + 1) * total_samples * (1.0 + l2)


def party_masked_statistics(
    Z: np.ndarray, y: np.ndarray, mask: np.ndarray, *, l2: float = 0.0
) -> dict[str, np.ndarray]:
    """Per-sample means R·(ZᵀZ/n + α·I') and R·Zᵀy/n (the secure sum multiplies by n)."""
    Za = design(Z)
    n = len(Za)
    if n == 0:
        raise ProtocolError("a party with no samples has no statistics to contribute.")
    gram = Za.T @ Za / n + l2 * _penalty(Za.shape[1])
    return {"masked_gram": mask @ gram, "masked_xty": mask @ (Za.T @ y / n)}


def solve_masked(values: np.ndarray, layout: Layout) -> np.ndarray:
    """Key-holder side: w from the decrypted (R·A ‖ R·b ‖ n ‖ count); A and b stay masked."""
    arrays = layout.unflatten(values[: layout.n_params])
    masked_gram, masked_xty = arrays["masked_gram"], arrays["masked_xty"]
    try:
        return np.linalg.solve(masked_gram, masked_xty)
    except np.linalg.LinAlgError as err:
        raise ProtocolError(
            f"the masked normal equations are singular ({err}): a feature is constant or "
            "duplicated across all parties; drop it or use --l2 > 0."
        ) from err


def keyholder_solve(keyholder: KeyHolder, request: DecryptionRequest) -> np.ndarray:
    """Decrypt under policy, solve, release only the coefficients (standardized units)."""
    declared = keyholder.declaration(request.job_id).meta["layouts"][request.output_kind]
    return solve_masked(keyholder.decrypt_sum(request).values, Layout.from_dict(declared))


# -- gradient mode (shared with logreg) ------------------------------------------------------------

Link = Callable[[np.ndarray], np.ndarray]


def identity(eta: np.ndarray) -> np.ndarray:
    return eta


def party_gradient(
    Z: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    *,
    link: Link = identity,
    clip: float,
    batch: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Mean gradient of the loss whose canonical link is `link` (squared: identity, log-loss:
    sigmoid) over the batch, clipped to ±clip, and the batch size."""
    Za = design(Z)
    if batch is not None:
        Za, y = Za[batch], y[batch]
    residual = link(Za @ w) - y
    gradient = Za.T @ residual / max(len(Za), 1)
    return np.clip(gradient, -clip, clip), len(Za)


def gradient_step(w: np.ndarray, gradient: np.ndarray, *, lr: float, l2: float) -> np.ndarray:
    """One descent step on the averaged gradient, with an L2 penalty that spares the intercept."""
    return w - lr * (gradient + l2 * _penalty(len(w)) @ w)


def regression_metrics(y: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    residual = y - predicted
    mse = float(np.mean(residual**2))
    total = float(np.sum((y - y.mean()) ** 2))
    return {"mse": mse, "r2": 1.0 - float(np.sum(residual**2)) / total if total else 0.0}


def _penalty(dim: int) -> np.ndarray:
    eye = np.eye(dim)
    eye[0, 0] = 0.0
    return eye


def _random_orthogonal(dim: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))
