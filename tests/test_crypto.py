"""Encrypted tensors: sums match plaintext, bytes are validated, no secret key travels."""

import math

import numpy as np
import pytest
import tenseal as ts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedhe.crypto import (
    EncryptedTensor,
    PlainTensor,
    PublicContext,
    decrypt,
    encrypt,
    generate_keys,
    load_tensor,
)
from fedhe.crypto.context import SecretContext
from fedhe.crypto.tensor import COMPLEX, REAL
from fedhe.errors import (
    ContextMismatchError,
    FedHEError,
    InvalidCiphertextError,
    ParameterError,
    SecretKeyLeakError,
    ShapeError,
    ValueRangeError,
)
from tests.conftest import SMALL_PARAMS
from tests.framed import context_in, tensor_frame, with_body, with_header

SLOTS = SMALL_PARAMS.slots

shapes = st.one_of(
    st.tuples(st.integers(1, 3 * SLOTS + 7)),
    st.tuples(st.integers(1, 40), st.integers(1, 300)),
    st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 200)),
)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    shape=shapes,
    n_terms=st.integers(1, 6),
    seed=st.integers(0, 2**31),
    packing=st.sampled_from([REAL, COMPLEX]),
)
def test_encrypted_sum_equals_plaintext_sum(secret, public, shape, n_terms, seed, packing):
    """Tolerance: n_terms · 2^(15 − scale_bits) absolute (CKKSParams.abs_error_bound)."""
    rng = np.random.default_rng(seed)
    arrays = [rng.uniform(-100, 100, size=shape) for _ in range(n_terms)]
    total = encrypt(public, arrays[0], packing=packing)
    for array in arrays[1:]:
        data = encrypt(public, array, packing=packing).to_bytes()
        total = total + load_tensor(data, public, shape=shape, packing=packing)
    assert total.shape == shape
    per_ciphertext = SLOTS * (2 if packing == COMPLEX else 1)
    assert len(total.chunks) == math.ceil(np.prod(shape) / per_ciphertext)
    got = decrypt(secret, total)
    assert got.shape == shape
    np.testing.assert_allclose(
        got, np.sum(arrays, axis=0), rtol=0, atol=SMALL_PARAMS.abs_error_bound(n_terms)
    )


def test_values_spanning_several_ciphertexts_keep_their_order(secret, public):
    values = np.arange(2 * SLOTS + 5, dtype=float)
    tensor = encrypt(public, values)
    assert len(tensor.chunks) == 3
    np.testing.assert_allclose(decrypt(secret, tensor), values, atol=1e-3)


def test_plain_tensor_twin_sums_exactly():
    a, b = np.arange(6.0).reshape(2, 3), np.ones((2, 3))
    total = load_tensor((PlainTensor(a) + PlainTensor(b)).to_bytes(), None, shape=(2, 3))
    np.testing.assert_array_equal(total.values, a + b)


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_before_encryption(public, bad):
    with pytest.raises(ValueRangeError, match="cannot be encrypted"):
        encrypt(public, np.array([1.0, bad]))


def test_values_beyond_the_bound_are_refused(public):
    with pytest.raises(ValueRangeError, match="exceeds the bound"):
        encrypt(public, np.array([SMALL_PARAMS.max_abs_value * 2]))
    with pytest.raises(ValueRangeError, match="exceeds the bound"):
        encrypt(public, np.array([60.0]), sum_bound=100.0, n_terms=2)


def test_bound_is_real_overflow_past_it_is_silent(agg_secret, agg_public):
    """The bound is not decorative: past it, a ciphertext at the lowest level decrypts to
    garbage without any error, which is why `encrypt` checks values first."""
    from fedhe.crypto import _seal

    params = agg_public.params
    limit = params.max_abs_at(1)
    for value, fits in ((limit, True), (limit * 16, False)):
        vector = ts.ckks_vector(agg_public.raw, [value] * params.slots)  # top level: fits
        low = _seal.mod_switch_to(vector, agg_public.raw, 1)
        error = np.max(np.abs(np.asarray(low.decrypt(agg_secret.raw.secret_key())) - value))
        assert bool(error < 1e-3 * value) == fits
    with pytest.raises(ValueRangeError):
        encrypt(agg_public, np.full(4, limit * 16), sum_bound=limit)


@pytest.fixture(scope="module")
def good_bytes(public):
    return encrypt(public, np.linspace(-1, 1, SLOTS + 10)).to_bytes()


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b"",
        lambda b: b"garbage" * 20,
        lambda b: b[:10],
        lambda b: b[: len(b) // 2],
        lambda b: b[:-1],
        lambda b: b + b"\x00",
        lambda b: b"XXXX" + b[4:],
        lambda b: b[:4] + b"\x00\x09" + b[6:],
        lambda b: b[:200] + bytes(x ^ 0xFF for x in b[200:400]) + b[400:],
        lambda b: b[: len(b) - 5000] + np.random.default_rng(0).bytes(5000),
    ],
    ids=[
        "empty",
        "garbage",
        "header-cut",
        "half",
        "one-byte-short",
        "padded",
        "magic",
        "version",
        "header-flipped",
        "tail-random",
    ],
)
def test_malformed_bytes_raise_a_fedhe_error(public, good_bytes, mangle):
    with pytest.raises(FedHEError):
        load_tensor(mangle(good_bytes), public, shape=(SLOTS + 10,))


def test_ciphertext_body_replaced_by_random_bytes_is_rejected(public, good_bytes):
    _, body = tensor_frame(good_bytes)
    forged = with_body(good_bytes, np.random.default_rng(1).bytes(len(body)))
    with pytest.raises(InvalidCiphertextError):
        load_tensor(forged, public)


def test_foreign_context_is_rejected_by_fingerprint(public):
    other = generate_keys(SMALL_PARAMS).public()
    data = encrypt(other, np.ones(5)).to_bytes()
    with pytest.raises(ContextMismatchError, match="another key pair"):
        load_tensor(data, public)


def test_foreign_context_with_forged_fingerprint_fails_on_params(public):
    """A ciphertext of other parameters with this job's fingerprint pasted in still fails."""
    other = generate_keys(type(SMALL_PARAMS)(8192, (60, 40, 60), 40)).public()
    forged = with_header(encrypt(other, np.ones(5)).to_bytes(), fingerprint=public.fingerprint)
    with pytest.raises(FedHEError):
        load_tensor(forged, public)


def test_wrong_shape_and_wrong_kind_are_rejected(public):
    data = encrypt(public, np.ones((3, 4))).to_bytes()
    with pytest.raises(ShapeError, match=r"\(3, 4\).*expects \(12,\)"):
        load_tensor(data, public, shape=(12,))
    with pytest.raises(InvalidCiphertextError, match="disagree"):
        load_tensor(PlainTensor(np.ones(3)).to_bytes(), public)
    with pytest.raises(InvalidCiphertextError, match="disagree"):
        load_tensor(data, None)


def test_adding_mismatched_tensors_fails(public):
    with pytest.raises(ShapeError):
        encrypt(public, np.ones(3)) + encrypt(public, np.ones(4))
    other = generate_keys(SMALL_PARAMS).public()
    with pytest.raises(ContextMismatchError):
        encrypt(public, np.ones(3)) + encrypt(other, np.ones(3))


# -- levels: ciphertexts travel with only the primes they need ------------------------------------


def test_small_sums_travel_at_the_lowest_level_and_cost_fewer_bytes(agg_secret, agg_public):
    params = agg_public.params
    values = np.linspace(-5, 5, params.slots)
    low = encrypt(agg_public, values)
    high = encrypt(agg_public, values, sum_bound=params.max_abs_at(2) * 2)
    assert low.level == 1 and high.level == 3
    assert len(low.to_bytes()) < 0.5 * len(high.to_bytes())
    for tensor in (low, high):
        np.testing.assert_allclose(decrypt(agg_secret, tensor), values, atol=1e-4)
    per_value = len(low.to_bytes()) / params.slots
    assert per_value <= 32, f"{per_value:.1f} bytes per value at the lowest level"


def test_terms_of_one_sum_must_agree_on_level_and_scale(agg_public):
    params = agg_public.params
    data = encrypt(agg_public, np.ones(4), sum_bound=params.max_abs_at(2)).to_bytes()
    with pytest.raises(InvalidCiphertextError, match="use level 1"):
        load_tensor(data, agg_public, sum_bound=100.0)
    same_level = encrypt(agg_public, np.ones(4), sum_bound=1000.0).to_bytes()
    with pytest.raises(InvalidCiphertextError, match="another bound"):
        load_tensor(same_level, agg_public, sum_bound=100.0)  # level 1 too, but another scale
    assert load_tensor(same_level, agg_public, sum_bound=1000.0).level == 1


def test_smaller_bounds_buy_precision_at_the_same_size(agg_secret, agg_public):
    """The scale grows into the room a level leaves: bound 10 is ~2^10 more precise than 10^4."""
    values = np.random.default_rng(0).uniform(-1, 1, 4096)
    errors = {}
    for bound in (10.0, 1e4):
        tensor = encrypt(agg_public, values, sum_bound=bound)
        assert tensor.level == 1
        errors[bound] = np.max(np.abs(decrypt(agg_secret, tensor) - values))
    assert errors[10.0] * 100 < errors[1e4]


# -- contexts: the secret key never crosses a role boundary ----------------------------------------


def test_public_context_holds_no_secret_key(secret, public):
    assert secret.raw.is_private()
    data = public.to_bytes()
    restored = PublicContext.from_bytes(data)
    assert not restored.raw.is_private() and not restored.raw.has_secret_key()
    assert not context_in(data)[1].is_private()
    assert restored.fingerprint == secret.fingerprint


def test_a_context_with_secret_key_is_refused_as_public(secret):
    with pytest.raises(SecretKeyLeakError):
        PublicContext.from_bytes(secret.to_secret_bytes())
    with pytest.raises(SecretKeyLeakError):
        PublicContext(secret.raw, secret.params, secret.keys)


def test_tampered_public_context_fingerprint_is_refused(public):
    other = generate_keys(SMALL_PARAMS).public()
    forged = with_header(public.to_bytes(), fingerprint=other.fingerprint)
    with pytest.raises(ContextMismatchError):
        PublicContext.from_bytes(forged)


def test_secret_context_round_trips_for_the_key_holder_only(secret, public):
    restored = SecretContext.from_secret_bytes(secret.to_secret_bytes())
    assert restored.fingerprint == secret.fingerprint
    np.testing.assert_allclose(decrypt(restored, encrypt(public, np.ones(3))), 1.0, atol=1e-4)
    with pytest.raises(ParameterError, match="no secret key"):
        SecretContext.from_secret_bytes(public.to_bytes())


def test_aggregation_keys_ship_without_evaluation_keys(agg_public):
    """Addition needs no relinearization or Galois key: the public context carries neither."""
    data = agg_public.to_bytes()
    _, shipped = context_in(data)
    assert not shipped.has_galois_keys() and not shipped.has_relin_keys()
    assert len(data) < 1_000_000


def test_encrypted_tensor_checks_its_chunk_count(public):
    tensor = encrypt(public, np.ones(SLOTS + 1))
    with pytest.raises(ShapeError):
        EncryptedTensor(tensor.chunks[:1], tensor.shape, public)


def test_mod_switch_drops_primes_exactly(agg_secret, agg_public):
    """For ciphertexts computed at a high level (TenSEAL encrypts at the top at scale 2^35)."""
    values = np.linspace(-3, 3, 100)
    high = EncryptedTensor([ts.ckks_vector(agg_public.raw, values.tolist())], (100,), agg_public)
    low = high.mod_switch_to(1)
    assert (high.level, low.level) == (3, 1)
    assert len(low.to_bytes()) < len(high.to_bytes()) / 2
    np.testing.assert_allclose(decrypt(agg_secret, low), values, atol=1e-6)
    with pytest.raises(ValueError, match="cannot raise"):
        low.mod_switch_to(2)


def test_complex_packing_halves_the_bytes_and_allows_only_sums(secret, public):
    values = np.linspace(-50, 50, 3 * SLOTS + 1)
    real = encrypt(public, values)
    paired = encrypt(public, values, packing=COMPLEX)
    assert len(paired.chunks) == 2 and len(real.chunks) == 4
    assert len(paired.to_bytes()) < 0.55 * len(real.to_bytes())
    np.testing.assert_allclose(decrypt(secret, paired + paired), 2 * values, atol=1e-3)
    for operation in (
        lambda t: t.mul_plain(np.ones(values.size)),
        lambda t: t.mul_scalar(2.0),
        lambda t: t.add_plain(np.ones(values.size)),
        lambda t: t + real,
    ):
        with pytest.raises(ShapeError):
            operation(paired)
    with pytest.raises(InvalidCiphertextError, match="complex-packed"):
        load_tensor(paired.to_bytes(), public, packing=REAL)
    with pytest.raises(InvalidCiphertextError, match="real-packed"):
        load_tensor(real.to_bytes(), public, packing=COMPLEX)
