"""Linear and ridge regression on encrypted contributions, party → aggregator → key holder.

Both modes start from the job's global feature moments (one secure sum, see
`fedhe.tasks.aggregate`): every party standardizes features (and, for linreg, the target) with
the same global mean and std, so no party's own statistics leak and the statistics are well
conditioned. Coefficients are reported in original units, intercept first.

**Exact mode (masked normal equations), one secure sum.** The aggregator draws two random
invertible matrices R and S (`masking_matrices`) and sends them to the parties only. Each party
sends ``Enc(R·Aᵢ·S ‖ R·bᵢ ‖ nᵢ ‖ 1)`` with Aᵢ = ZᵢᵀZᵢ + α·nᵢ·I' and bᵢ = Zᵢᵀyᵢ (Z with a
leading column of ones, I' the identity without the intercept). The key holder decrypts
M = R·A·S and c = R·b under its policy, solves M·z = c and releases only z = S⁻¹·w; the
aggregator, which alone knows S, recovers w = S·z (`unmask_coefficients`).

What the key holder (honest but curious: it keeps what it decrypts) can read from M and c,
and why the mask has this shape (tests/test_regression_privacy.py runs each attack):

- *Orthogonal R* (first suggested in DESIGN.md): A is symmetric positive definite, so
  (RA)ᵀ(RA) = A² and A is its unique positive square root: the key holder recovers A.
- *One-sided invertible R* with singular values in [½, 2] (the first fix): every positive
  definite A′ is *consistent* with RA, but not equally *likely*: (RA)ᵀ(RA) = A·RᵀR·A is A²
  distorted by at most 4, and its square root rescaled to unit diagonal estimates the global
  correlation matrix of the features (mean absolute error 0.08 on diabetes, 0.04 on breast
  cancer, against 0.33 and 0.39 for guessing 0).
- *Two-sided R·A·S*, R = Q₁·D·Q₂ and S = Q₃·D′·Q₄ with Qₖ Haar-random rotations: for every
  rotation U, the data rotated by U (A → U·A·Uᵀ, b → U·b) gives a view (M, c) with exactly
  the same distribution (R·U and Uᵀ·S are distributed as R and S). So the view depends on
  (A, b) only through their rotation invariants: A's eigenvalues and b's weight on each
  eigenvector, never on the eigenvectors, which carry the correlations. Flipping the sign of
  a feature is such a rotation: the key holder's posterior of every correlation is symmetric
  about 0 and no estimate beats guessing 0 (the attacks above and their variants, knowing w
  too, score at or above guessing 0, with no skill). The known structure of A (intercept row
  (n, 0, …, 0), unit diagonal) does not help: sign flips and permutations of features keep
  it. z = M⁻¹·c adds nothing (the key holder computes it anyway) and, unlike before, the key
  holder no longer learns w (|z| tells |w| within the masks' spread only).
- What is left is A's spectrum, roughly: σᵢ(M) ∈ [σmin(R)·σmin(S), σmax(R)·σmax(S)]·λᵢ(A),
  and since the distortion averages over random directions it concentrates: a key holder
  that calibrates on the masks' known distribution estimates λmin(A) within ~0.2–0.5 nats
  (how nearly collinear the features are overall, never which ones). A wider range does not
  fix that (±0.5 nats at 2^14) and costs precision (the solve's relative error grows as
  ε·σmax(R)·σmax(S)·cond(A) once the values outgrow the flooding noise); a random positive
  scalar does not either (the key holder knows A's trace, n·(1 + d·(1+α)), and the spectrum's
  shape is scale-free). MASK_SINGULAR_RANGE = [1, 16] costs no measurable precision
  (coefficients within 1e-11 of the unmasked solve on diabetes, 1e-10 on breast cancer, whose
  correlation matrix has condition number 1e5). Hiding the spectrum too would need the key
  holder not to solve at all.

Parties know R and S (they apply them, so each sends one ciphertext): a party colluding with
the key holder would learn the *aggregate* A = Σ XᵢᵀXᵢ, though no single party's statistics.

**Gradient mode.** Each round every party sends ``Enc(nᵢ·gᵢ + mᵢ ‖ nᵢ ‖ 1)``: its mean gradient
at w (clipped to ±clip per coordinate so the sum stays bounded) times nᵢ, plus a fresh uniform
mask mᵢ ∈ [−B, B]^(d+1) the aggregator drew for this party and round (`gradient_masks`). The
key holder decrypts only the sum, Σnᵢgᵢ + Σmᵢ; the aggregator subtracts the masks of the
parties in the sum (`unmask_gradient_sum`) and applies ``w ← w − lr·(g + α·w')``. Without the
masks the key holder would read every round's gradient g_t and, from w₀ = 0, replay the
aggregator's steps: it would know every w_t, b = −g₀, and A from g_{t+1} − g_t = A·(w_{t+1} −
w_t) after d+1 rounds (linreg exactly; logreg the Hessian Zᵀ·diag(p(1−p))·Z/n, hence the
correlations; for logreg g₀ alone gives the mean of every feature over each class). With
B = 2^GRADIENT_MASK_BITS·clip·Σnᵢ, two gradient sums G, G′ (each within ±clip·Σnᵢ) give masked
sums at statistical distance ≤ |G − G′|/2B ≤ 2^-GRADIENT_MASK_BITS per coordinate and round,
so ≤ rounds·(d+1)·2^-24 over a job (3e-5 for 40 rounds of diabetes): statistical hiding, not
a one-time pad, bought with precision (below). One party's mask alone suffices (the others
only blur further), so a dropped party's missing mask changes nothing. The masked sum needs
two primes instead of one (sum bound clip·Σnᵢ·(1 + parties·2^24)). Parties still see every
model wₜ and so every gₜ: this protects the gradients from the key holder, not from them.
`fedhe.tasks.logreg` reuses it with the logistic loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from fedhe.crypto.randomness import secure_random
from fedhe.errors import ProtocolError
from fedhe.keyholder import DecryptionRequest, KeyHolder
from fedhe.tasks.aggregate import Layout

TASK = "linreg"
MASKED_OUTPUT = "masked_normal_equations"
GRADIENT_OUTPUT = "gradient_sum"

# Singular values of each mask, R and S, lie in this range (log-uniform, both ends drawn). It
# starts at 1 so that neither mask amplifies the absolute noise of the decrypted sum in the
# solve (δw = A⁻¹·R⁻¹·δM·S⁻¹·w); its width blurs A's spectrum a little (module docstring).
MASK_SINGULAR_RANGE = (1.0, 16.0)
# |(R·A·S)ᵢⱼ| ≤ σmax(R)·σmax(S)·λmax(A) with λmax(A) ≤ (d+1)·Σnᵢ·(1+α) (Gershgorin: every
# entry of A is at most Σnᵢ·(1+α) for standardized columns), |(R·b)ᵢ| ≤ σmax(R)·sqrt(d+1)·Σnᵢ;
# a 1% margin covers the noise in the standardization moments.
_BOUND_MARGIN = 1.01
# The solve amplifies errors by cond(A): encode the statistics at ≥ 2^50 (two primes).
STATISTICS_SCALE_BITS = 50
# Gradient mode: each party's mask is uniform in ±2^GRADIENT_MASK_BITS·clip·Σnᵢ per coordinate.
# Every bit hides one more bit of the gradient sum and costs one bit of its precision (the
# masked sum, ~2^37 on diabetes, is decoded in float64): unmasked, the sum's error is 2e-5
# there (8e-7 before masking, at 2^40 on one prime), the mean gradient's 1e-7.
GRADIENT_MASK_BITS = 24


def design(Z: np.ndarray) -> np.ndarray:
    """Z with a leading column of ones (the intercept)."""
    return np.column_stack([np.ones(len(Z)), Z])


def predict(coefficients: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Linear predictor in original units from `coefficients` (intercept first)."""
    return coefficients[0] + X @ coefficients[1:]


# -- exact mode ------------------------------------------------------------------------------------


def masking_matrix(dim: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A random invertible Q₁·diag(s)·Q₂: Q₁, Q₂ Haar rotations, s log-uniform in
    MASK_SINGULAR_RANGE with both ends drawn (so no mask is near a multiple of a rotation)."""
    rng = secure_random() if rng is None else rng
    low, high = np.log(MASK_SINGULAR_RANGE[0]), np.log(MASK_SINGULAR_RANGE[1])
    singular = np.exp(rng.uniform(low, high, dim))
    singular[:2] = MASK_SINGULAR_RANGE
    return _random_orthogonal(dim, rng) @ np.diag(singular) @ _random_orthogonal(dim, rng)


def masking_matrices(
    dim: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The exact mode's masks (R, S), independent, drawn by the aggregator from the OS's CSPRNG
    and sent to the parties only, never to the key holder."""
    return masking_matrix(dim, rng), masking_matrix(dim, rng)


def statistics_layout(n_features: int) -> Layout:
    dim = n_features + 1
    return Layout(("masked_gram", "masked_xty"), ((dim, dim), (dim,)))


def statistics_sum_bound(n_features: int, total_samples: float, l2: float) -> float:
    """Bound on every coordinate of Σ (R·Aᵢ·S ‖ R·bᵢ ‖ nᵢ) for masks from `masking_matrices`."""
    dim = n_features + 1
    high = MASK_SINGULAR_RANGE[1]
    gram = high * high * dim * (1.0 + l2)
    xty = high * np.sqrt(dim)
    return _BOUND_MARGIN * max(gram, xty, 1.0) * total_samples


def party_masked_statistics(
    Z: np.ndarray, y: np.ndarray, left: np.ndarray, right: np.ndarray, *, l2: float = 0.0
) -> dict[str, np.ndarray]:
    """Per-sample means R·(ZᵀZ/n + α·I')·S and R·Zᵀy/n (the secure sum multiplies by n);
    `left` is R, `right` is S."""
    Za = design(Z)
    n = len(Za)
    if n == 0:
        raise ProtocolError("a party with no samples has no statistics to contribute.")
    gram = Za.T @ Za / n + l2 * _penalty(Za.shape[1])
    return {"masked_gram": left @ gram @ right, "masked_xty": left @ (Za.T @ y / n)}


def solve_masked(values: np.ndarray, layout: Layout) -> np.ndarray:
    """Key-holder side: z = S⁻¹·w from the decrypted (R·A·S ‖ R·b ‖ n ‖ count); A, b and w
    stay masked."""
    arrays = layout.unflatten(values[: layout.n_params])
    masked_gram, masked_xty = arrays["masked_gram"], arrays["masked_xty"]
    try:
        return np.linalg.solve(masked_gram, masked_xty)
    except np.linalg.LinAlgError as err:
        raise ProtocolError(
            f"the masked normal equations are singular ({err}): a feature is constant or "
            "duplicated across all parties; drop it or use --l2 > 0."
        ) from err


def unmask_coefficients(solution: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Aggregator side: w = S·z from the key holder's z = S⁻¹·w."""
    return right @ np.asarray(solution, dtype=float)


def keyholder_solve(keyholder: KeyHolder, request: DecryptionRequest) -> np.ndarray:
    """Decrypt under policy, solve, release only z = S⁻¹·w (the aggregator unmasks it)."""
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


def gradient_mask_bound(total_samples: float, clip: float) -> float:
    """Each party's gradient mask lies in ±this per coordinate: 2^GRADIENT_MASK_BITS times the
    bound clip·Σnᵢ of the gradient sum it hides."""
    return math.ldexp(clip * total_samples, GRADIENT_MASK_BITS)


def gradient_sum_bound(total_samples: float, clip: float, n_parties: int) -> float:
    """Bound on every coordinate of Σ (nᵢ·gᵢ + mᵢ ‖ nᵢ): the gradient sum and one mask per
    party that may contribute."""
    return clip * total_samples + n_parties * gradient_mask_bound(total_samples, clip)


def gradient_masks(
    parties: Iterable[str],
    dim: int,
    total_samples: float,
    clip: float,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Aggregator side, every round: one fresh uniform mask per party, from the OS's CSPRNG.
    Each goes to its party only, never to the key holder."""
    rng = secure_random() if rng is None else rng
    bound = gradient_mask_bound(total_samples, clip)
    return {name: np.asarray(rng.uniform(-bound, bound, dim)) for name in parties}


def mask_gradient(mean_gradient: np.ndarray, mask: np.ndarray, n_samples: int) -> np.ndarray:
    """Party side: the mean gradient plus mask/nᵢ, so the contribution (× nᵢ) is nᵢ·gᵢ + mᵢ."""
    if n_samples < 1:
        raise ProtocolError("a party with no samples in its batch has no gradient to mask.")
    if mask.shape != mean_gradient.shape:
        raise ProtocolError(
            f"the gradient mask has shape {mask.shape}, the gradient {mean_gradient.shape}."
        )
    return mean_gradient + mask / n_samples


def unmask_gradient_sum(
    values: np.ndarray,
    layout: Layout,
    masks: Mapping[str, np.ndarray],
    contributors: Iterable[str],
) -> np.ndarray:
    """Aggregator side: the released Σ(nᵢ·gᵢ + mᵢ) ‖ Σnᵢ ‖ count minus the masks of exactly the
    parties in the sum."""
    unmasked = np.array(values, dtype=float)
    for name in contributors:
        unmasked[: layout.n_params] -= masks[name]
    return unmasked


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
