"""Masks come from the operating system's CSPRNG, not from a predictable generator."""

import numpy as np
import pytest

from fedhe.crypto import PlainTensor, randomness
from fedhe.tasks import encrypted_model, knn, linreg, mlp


def test_draws_have_the_right_range_shape_and_distribution():
    rng = randomness.secure_random()
    uniform = rng.uniform(-2.0, 3.0, (200, 500))
    assert uniform.shape == (200, 500)
    assert uniform.min() >= -2.0 and uniform.max() < 3.0
    assert abs(uniform.mean() - 0.5) < 0.02 and abs(uniform.std() - 5 / np.sqrt(12)) < 0.02
    normal = rng.normal(1.0, 2.0, 100_000)
    assert abs(normal.mean() - 1.0) < 0.03 and abs(normal.std() - 2.0) < 0.03
    assert sorted(rng.permutation(50)) == list(range(50))
    assert not np.array_equal(rng.uniform(0, 1, 10), rng.uniform(0, 1, 10))
    assert isinstance(rng.uniform(0, 1), float)


@pytest.fixture
def urandom_zeros(monkeypatch):
    """If the masks really read os.urandom, all-zero bytes make every draw the lowest value."""
    monkeypatch.setattr(randomness.os, "urandom", lambda n: bytes(n))


def test_every_mask_reads_os_urandom(urandom_zeros, public):
    _, rho = knn.querier_masks(None, 2, 3, 8)
    assert np.all(rho == -knn.VOTE_MASK_BOUND)
    _, mlp_rho = mlp.querier_mask(public, (4,))
    assert np.all(mlp_rho == -mlp.mask_bound(public.params))
    masked, mask = encrypted_model.aggregator_mask(PlainTensor(np.zeros(3)))
    assert np.all(mask == -encrypted_model.MASK_BOUND)
    assert np.all(masked.values == mask)
    # with the OS's entropy pinned, the "random" matrix is the same every time
    assert np.array_equal(linreg.masking_matrix(4), linreg.masking_matrix(4), equal_nan=True)
    assert knn.StoreLayout.plan({"a": 1, "b": 1, "c": 1}, 8).segments[0].party == "a"
