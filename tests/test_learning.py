import numpy as np

from fedhe.learning import standardize


def test_constant_feature_stays_finite_despite_moment_noise():
    """Encrypted moments leave ~1e-13 of noise in a zero variance; that must not become a std."""
    X = np.array([[0.0, 1.0], [0.0, 3.0], [1.0, 5.0]])
    mean = np.array([0.0, 3.0])
    meansq = np.array([1e-13, 35.0 / 3.0])  # column 0 constant in training, noisy moment
    Z = standardize(X, mean, meansq)
    assert np.all(np.abs(Z[:, 0]) <= 1.0)
    np.testing.assert_allclose(Z[:, 1], (X[:, 1] - 3.0) / np.sqrt(35.0 / 3.0 - 9.0))


def test_small_but_real_variance_is_kept():
    mean, meansq = np.array([1e-3]), np.array([1e-6 + 1e-8])  # std 1e-4
    np.testing.assert_allclose(standardize(np.array([[1.1e-3]]), mean, meansq), [[1.0]], rtol=1e-6)
