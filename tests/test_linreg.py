"""Linear regression on encrypted contributions, party → aggregator → key holder, no Flower."""

import numpy as np
import pytest
from scipy.linalg import sqrtm
from sklearn.linear_model import LinearRegression, Ridge

from fedhe.crypto import PublicContext, encrypt
from fedhe.data import load_builtin, partition_iid
from fedhe.errors import PolicyError, ProtocolError
from fedhe.keyholder import KeyHolder
from fedhe.keyholder.inprocess import TaggedParties
from fedhe.tasks import aggregate, keyholder_release, linreg, moments

BOUND_MOMENTS = moments.SUM_BOUND


def _exact(X, y, n_parties, tmp_path, *, encrypted=True, l2=0.0, seed=0):
    """The exact-mode protocol in one process: moments sum, masked statistics sum, solve."""
    shares = partition_iid(len(X), n_parties, seed=seed)
    keyholder = KeyHolder(tmp_path / f"kh-{encrypted}")
    d = X.shape[1]
    moments_layout, stats_layout = moments.layout(d + 1), linreg.statistics_layout(d)
    declaration = aggregate.declare(
        "job",
        outputs={moments.OUTPUT: (1, moments_layout), linreg.MASKED_OUTPUT: (1, stats_layout)},
        min_parties=2,
        encrypted=encrypted,
    )
    public = keyholder.declare_job(declaration)
    context = PublicContext.from_bytes(public) if public else None
    parties = TaggedParties(keyholder, "job", [f"p{i}" for i in range(n_parties)])

    def secure_sum(arrays_of, layout, output, bound, scale_bits=None):
        contributions = {
            f"p{i}": aggregate.party_contribution(
                arrays_of(share),
                len(share),
                layout,
                context,
                sum_bound=bound,
                n_terms=n_parties if output == moments.OUTPUT else 1,
                min_scale_bits=scale_bits,
            )
            for i, share in enumerate(shares)
        }
        total = aggregate.aggregator_sum(
            contributions,
            layout,
            context,
            sum_bound=bound,
            min_parties=2,
            min_scale_bits=scale_bits,
        )
        tagged = {name: contributions[name] for name in total.contributors}
        return keyholder_release(keyholder, parties.request(output, tagged, total=total.tensor))

    XY = np.column_stack([X, y])
    flat = secure_sum(
        lambda s: moments.party_moments(XY[s]), moments_layout, moments.OUTPUT, BOUND_MOMENTS
    )
    averaged, total = aggregate.average_update(flat, moments_layout)
    standardizer = moments.Standardizer.from_moments(
        averaged["mean"], averaged["meansq"], with_target=True
    )
    left, right = linreg.masking_matrices(d + 1)
    bound = linreg.statistics_sum_bound(d, round(total), l2)
    solution = secure_sum(
        lambda s: linreg.party_masked_statistics(
            standardizer.features(X[s]), standardizer.target(y[s]), left, right, l2=l2
        ),
        stats_layout,
        linreg.MASKED_OUTPUT,
        bound,
        linreg.STATISTICS_SCALE_BITS,
    )
    w = linreg.unmask_coefficients(solution, right)
    return standardizer.to_original(w), standardizer, keyholder, parties


def _relative_error(got, reference):
    return float(np.max(np.abs(got - reference) / np.maximum(np.abs(reference), 1e-12)))


def _sklearn(model):
    return np.concatenate([[model.intercept_], model.coef_])


def test_exact_mode_matches_sklearn_on_diabetes(tmp_path):
    train, _ = load_builtin("diabetes", seed=0)
    reference = _sklearn(LinearRegression().fit(train.X, train.y))
    for encrypted in (True, False):
        got, *_ = _exact(train.X, train.y, 5, tmp_path, encrypted=encrypted)
        assert _relative_error(got, reference) <= 1e-6, encrypted


def test_exact_mode_matches_sklearn_with_50_features_and_20_parties(tmp_path):
    rng = np.random.default_rng(7)
    X = rng.normal(size=(2000, 50)) * rng.uniform(0.1, 10, 50) + rng.uniform(-5, 5, 50)
    y = X @ rng.normal(size=50) + 3.0 + rng.normal(scale=0.1, size=2000)
    got, *_ = _exact(X, y, 20, tmp_path)
    assert _relative_error(got, _sklearn(LinearRegression().fit(X, y))) <= 1e-6


def test_ridge_matches_sklearn_on_the_same_standardization(tmp_path):
    train, _ = load_builtin("diabetes", seed=1)
    l2 = 0.05
    got, standardizer, *_ = _exact(train.X, train.y, 4, tmp_path, l2=l2, seed=1)
    Z, t = standardizer.features(train.X), standardizer.target(train.y)
    ridge = Ridge(alpha=l2 * len(Z)).fit(Z, t)  # our α is per sample: Σ over parties = α·N
    reference = standardizer.to_original(_sklearn(ridge))
    assert _relative_error(got, reference) <= 1e-6


def test_key_holder_releases_coefficients_only_once(tmp_path):
    train, _ = load_builtin("diabetes", seed=0)
    _, _, keyholder, _ = _exact(train.X, train.y, 3, tmp_path)
    released = [e for e in keyholder.audit.entries() if e.get("output") == linreg.MASKED_OUTPUT]
    assert [e["decision"] for e in released] == ["decrypted"]
    assert released[0]["shape"] == [linreg.statistics_layout(10).size]  # the masked sum
    # ...but what leaves the key holder is the coefficient vector (checked in the job tests).


def test_orthogonal_masks_would_leak_the_gram_matrix_ours_do_not():
    """Why R is not orthogonal: for symmetric A, (RA)ᵀ(RA) = A² when R is orthogonal."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 4))
    A = X.T @ X
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    leaked = np.real(sqrtm((q @ A).T @ (q @ A)))
    np.testing.assert_allclose(leaked, A, rtol=1e-8)
    R, S = linreg.masking_matrices(4, rng)
    for mask in (R, S):
        singular = np.linalg.svd(mask, compute_uv=False)
        assert singular.min() == pytest.approx(linreg.MASK_SINGULAR_RANGE[0])
        assert singular.max() == pytest.approx(linreg.MASK_SINGULAR_RANGE[1])
    guessed = np.real(sqrtm((R @ A @ S).T @ (R @ A @ S)))
    guessed *= np.trace(A) / np.trace(guessed)  # even at A's known scale
    assert np.max(np.abs(guessed - A) / np.abs(A).max()) > 0.05
    # (one-sided masks leak more than this test shows: tests/test_regression_privacy.py)


def test_masks_differ_per_job():
    a, b = linreg.masking_matrix(5), linreg.masking_matrix(5)
    assert not np.allclose(a, b)


def test_singular_statistics_name_the_fix():
    layout = linreg.statistics_layout(2)
    singular = np.zeros(layout.size)
    with pytest.raises(ProtocolError, match=r"singular.*--l2"):
        linreg.solve_masked(singular, layout)


def test_gradient_steps_converge_to_the_exact_solution():
    rng = np.random.default_rng(3)
    Z = rng.normal(size=(400, 3))
    y = Z @ np.array([1.0, -2.0, 0.5]) + 0.7
    w = np.zeros(4)
    for _ in range(300):
        gradient, n = linreg.party_gradient(Z, y, w, clip=10.0)
        w = linreg.gradient_step(w, gradient, lr=0.3, l2=0.0)
    assert n == 400
    np.testing.assert_allclose(w, [0.7, 1.0, -2.0, 0.5], atol=1e-6)


def test_second_solve_is_refused_by_budget(tmp_path):
    """One release of the masked statistics: no second round label, and no other sum (say,
    over other parties, which would difference one party out) under the released one."""
    train, _ = load_builtin("diabetes", seed=0)
    _, _, keyholder, parties = _exact(train.X, train.y, 3, tmp_path)
    last = [e for e in keyholder.audit.entries() if e.get("output") == linreg.MASKED_OUTPUT][-1]
    assert last["decision"] == "decrypted"
    job = keyholder.declaration("job")
    assert job.outputs[linreg.MASKED_OUTPUT].budget == 1
    size = linreg.statistics_layout(10).size
    other = {
        name: encrypt(parties.public, np.zeros(size), sum_bound=1.0, n_terms=2)
        for name in ("p0", "p1")
    }
    with pytest.raises(PolicyError, match="outside its budget of 1"):
        keyholder_release(keyholder, parties.request(linreg.MASKED_OUTPUT, other, 1))
    with pytest.raises(PolicyError, match="released already, for another ciphertext"):
        keyholder_release(keyholder, parties.request(linreg.MASKED_OUTPUT, other, 0))
    decisions = [
        e["decision"] for e in keyholder.audit.entries() if e.get("output") == linreg.MASKED_OUTPUT
    ]
    assert decisions == ["decrypted", "refused", "refused"]


def test_party_step_computes_the_scaled_gradient_from_a_broadcast_model(agg_public):
    from fedhe.crypto import MODEL_PARAMS, decrypt, generate_keys
    from fedhe.tasks import encrypted_model

    secret = generate_keys(MODEL_PARAMS)
    public = secret.public()
    rng = np.random.default_rng(2)
    Z, y = rng.normal(size=(80, 3)), rng.normal(size=80)
    A, b = encrypted_model.party_statistics(Z, y, logistic=False, l2=0.1)
    w = rng.normal(size=4)
    step = encrypted_model.party_step(encrypted_model.broadcast(public, w), A, b, 0.01)
    np.testing.assert_allclose(decrypt(secret, step), 0.01 * (A @ w - b), atol=1e-5)
    surrogate_A, surrogate_b = encrypted_model.party_statistics(
        Z, (y > 0) * 1.0, logistic=True, l2=0.0
    )
    Za = linreg.design(Z)
    np.testing.assert_allclose(
        surrogate_A @ w - surrogate_b, Za.T @ (0.5 + Za @ w / 4 - (y > 0)), atol=1e-9
    )
