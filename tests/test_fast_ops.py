"""Lazily rescaled sums (`weighted_sum`, `sum_of_products`) and `rotations`, against the slow
path (one `mul_scalar` / `*` per term), the plaintext twin and numpy.

Tolerances are derived from the parameters, not fitted. At scale Δ = 2^40:
- a fresh ciphertext decrypts within e = `abs_error_bound(1)` = 2^15/Δ of its value, and a
  rescale adds a rounding error below that again;
- a product by w scales an error by |w|; a ciphertext product a·b has error ≲ (|a| + |b|)·e;
- TenSEAL's products record the nominal scale Δ after a rescale by the prime p although the
  true scale is Δ²/p (or Δ·s/p): their values come out multiplied by Δ/p, a relative bias of
  |Δ/p − 1| (1.3e-7 from three primes, 6.7e-7 from two at MODEL_PARAMS). `weighted_sum`
  encodes its weights so that it lands exactly on Δ (no bias); `sum_of_products` records Δ as
  `*` does (the same bias as the slow path).
- a rotation adds key-switching error. It does not depend on the level (the decomposition's
  digits are primes of at most 60 bits, divided by the 60-bit special prime): measured at most
  2^19.5 in the slots at N=8192 (every level, 12 rotations of 4096 slots each); K = 2^21/Δ
  keeps a 2.8× margin. A step that SEAL composes from power-of-two keys costs one K per key
  switch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedhe.crypto import (
    MODEL_PARAMS,
    KeyRequest,
    PlainTensor,
    decrypt,
    encrypt,
    encrypt_for_compute,
    generate_keys,
    load_tensor,
    rotate,
    rotations,
    sum_of_products,
    weighted_sum,
)
from fedhe.crypto.circuit import Circuit
from fedhe.errors import ContextMismatchError, ParameterError, ShapeError, ValueRangeError

PARAMS = MODEL_PARAMS  # KNN's parameters: N=8192, primes [60, 40, 40 | 60], 2^40
SLOTS = PARAMS.slots
E = PARAMS.abs_error_bound(1)  # fresh-encryption (and rescale rounding) error bound, 2^-25
K = 2.0**21 / PARAMS.scale  # key-switching error of one rotation (see above)
STEPS = (1, -3, 100)


@pytest.fixture(scope="module")
def keys():
    return generate_keys(PARAMS, KeyRequest(relin=True, rotations=STEPS))


@pytest.fixture(scope="module")
def public(keys):
    return keys.public()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    X = rng.uniform(-3, 3, (32, SLOTS))
    Q = rng.uniform(-3, 3, (32, SLOTS))
    w = rng.uniform(-2, 2, 32)
    w[5] = 0.0  # skipped (SEAL refuses a product that is exactly zero)
    return X, Q, w


@pytest.fixture(scope="module")
def features(public, data):  # three primes, like KNN's features for encrypted queries
    return [encrypt_for_compute(public, x, multiplications=2) for x in data[0]]


@pytest.fixture(scope="module")
def queries(public, data):
    return [encrypt_for_compute(public, q, multiplications=2) for q in data[1]]


def bias(keys, level: int) -> float:
    """|Δ/p − 1| for the prime a rescale from `level` primes drops."""
    data = keys.raw.seal_context().data.first_context_data()
    primes = [m.value() for m in data.parms().coeff_modulus()]
    return abs(PARAMS.scale / primes[level - 1] - 1)


def test_the_bias_is_what_the_notes_say(keys):
    assert 1e-7 < bias(keys, 3) < 2e-7 and 6e-7 < bias(keys, 2) < 7e-7


# -- weighted_sum ------------------------------------------------------------------------------


def test_weighted_sum_matches_the_slow_path_and_the_plaintext_without_bias(keys, features, data):
    X, _, w = data
    X, w = X[:31], w[:31]
    fast = weighted_sum(features[:31], w)
    slow = features[0].mul_scalar(w[0])
    for tensor, factor in zip(features[1:31], w[1:], strict=True):
        slow = slow + tensor.mul_scalar(factor)
    assert (fast.level, fast.scale) == (2, PARAMS.scale) == (slow.level, slow.scale)
    expected = w @ X
    noise = (np.abs(w).sum() + 1) * E + np.abs(X).sum(axis=0).max() * 2.0**-40  # + rounding
    biased = bias(keys, 3) * (np.abs(w) @ np.abs(X)).max()
    got, slow_got = decrypt(keys, fast), decrypt(keys, slow)
    assert np.abs(got - expected).max() < noise  # exact scale: no bias
    assert np.abs(slow_got - expected).max() < biased + (np.abs(w).sum() + 31) * E
    assert np.abs(got - slow_got).max() < biased + 2 * noise + 31 * E
    assert weighted_sum([PlainTensor(x) for x in X], w).values == pytest.approx(expected)


def test_weighted_sum_at_two_primes_over_several_ciphertexts(keys, public):
    rng = np.random.default_rng(3)
    X = rng.uniform(-100, 100, (4, SLOTS + 904))  # two ciphertexts, the second partly full
    w = np.array([0.5, -1.25, 3.0, 1e-3])
    tensors = [encrypt_for_compute(public, x, multiplications=1) for x in X]
    fast = weighted_sum(tensors, w)
    assert fast.shape == (SLOTS + 904,) and (fast.level, fast.scale) == (1, PARAMS.scale)
    noise = (np.abs(w).sum() + 1) * E + np.abs(X).sum(axis=0).max() * 2.0**-40
    assert np.abs(decrypt(keys, fast) - w @ X).max() < noise


def test_weighted_sum_of_zeros_is_a_fresh_encryption_of_zero(keys, features):
    for tensors, weights in (
        (features[:2], [0.0, 1e-14]),  # both encode to zero at 2^40
        ([features[0], features[0]], [1.5, -1.5]),  # exact cancellation
    ):
        zero = weighted_sum(tensors, weights)
        assert (zero.level, zero.scale) == (2, PARAMS.scale)
        assert np.abs(decrypt(keys, zero)).max() < 2 * E


# -- sum_of_products ---------------------------------------------------------------------------


def test_sum_of_products_matches_the_slow_path_and_the_plaintext(keys, features, queries, data):
    X, Q, _ = data
    fast = sum_of_products(queries, features)
    slow = queries[0] * features[0]
    for q, x in zip(queries[1:], features[1:], strict=True):
        slow = slow + q * x
    assert (fast.level, fast.scale) == (2, PARAMS.scale) == (slow.level, slow.scale)
    expected = np.sum(Q * X, axis=0)
    noise = ((np.abs(Q) + np.abs(X)).sum(axis=0).max() + 32) * E
    biased = bias(keys, 3) * np.abs(Q * X).sum(axis=0).max()
    got, slow_got = decrypt(keys, fast), decrypt(keys, slow)
    assert np.abs(got - expected).max() < noise + biased  # recorded at Δ, as `*` does
    assert np.abs(got - slow_got).max() < 2 * noise  # the same bias on both sides
    plain = sum_of_products([PlainTensor(q) for q in Q], [PlainTensor(x) for x in X])
    assert plain.values == pytest.approx(expected)


def test_sum_of_products_of_one_pair_and_of_squares(keys, features, data):
    X = data[0]
    one = sum_of_products([features[0]], [features[1]])
    assert np.abs(decrypt(keys, one) - X[0] * X[1]).max() < 7 * E + bias(keys, 3) * 9
    squares = sum_of_products(features[:3], features[:3])  # same tensor twice: SEAL's square
    expected = np.sum(X[:3] ** 2, axis=0)
    assert (squares.level, squares.scale) == (2, PARAMS.scale)
    assert np.abs(decrypt(keys, squares) - expected).max() < 21 * E + bias(keys, 3) * 27


# -- what comes next: products, plaintext additions, the wire --------------------------------


def test_results_take_further_products_additions_and_travel(keys, public, features, queries):
    summed = weighted_sum(features[:4], [1.0, -0.5, 0.25, 2.0])
    products = sum_of_products(queries[:4], features[:4])
    rotated = rotate(features[0], 1)
    values = {id(t): decrypt(keys, t) for t in (summed, products, rotated)}
    fresh = np.full(SLOTS, 0.5)
    for tensor, level in ((summed, 2), (products, 2), (rotated, 3)):
        v = values[id(tensor)]
        loaded = load_tensor(tensor.to_bytes(), keys, shape=(SLOTS,), level=level)
        assert np.abs(decrypt(keys, loaded) - v).max() < 1e-12  # the key holder reads it back
        squared = tensor * tensor
        assert squared.level == level - 1
        assert np.abs(decrypt(keys, squared) - v**2).max() < 1e-3  # |v| ≲ 40 here
        assert np.abs(decrypt(keys, tensor.add_plain(fresh)) - v - 0.5).max() < 4 * E
        # exactly the nominal scale: adds to a fresh ciphertext at the same level
        other = encrypt_for_compute(public, fresh, multiplications=level - 1)
        assert np.abs(decrypt(keys, tensor + other) - v - 0.5).max() < 4 * E
        scaled = weighted_sum([tensor], [2.0]) if level > 1 else None
        if scaled is not None:
            assert np.abs(decrypt(keys, scaled) - 2 * v).max() < 6 * E


# -- rotations ---------------------------------------------------------------------------------


def test_rotations_match_numpy_and_the_twin(keys, features, data):
    x = data[0][0]
    steps = [*STEPS, 0, SLOTS + 1, -SLOTS - 3]  # modulo the slot count
    for step, rotated, twin in zip(
        steps, rotations(features[0], steps), rotations(PlainTensor(x), steps), strict=True
    ):
        assert (rotated.level, rotated.scale) == (3, PARAMS.scale)
        assert np.array_equal(twin.values, np.roll(x, -step))
        assert np.abs(decrypt(keys, rotated) - twin.values).max() < E + K
    low = features[0].mod_switch_to(2)
    assert np.abs(decrypt(keys, rotate(low, -3)) - np.roll(x, 3)).max() < E + K


def test_rotations_with_tenseals_power_of_two_keys():
    keys = generate_keys(PARAMS, KeyRequest(galois=True))
    x = np.arange(SLOTS, dtype=float) / SLOTS
    tensor = encrypt_for_compute(keys.public(), x, multiplications=0)
    for step, switches in ((4, 1), (3, 2), (-5, 2), (SLOTS - 6, 2)):  # 3 = 4 − 1, …
        assert (
            np.abs(decrypt(keys, rotate(tensor, step)) - np.roll(x, -step)).max() < E + switches * K
        )


def test_circuit_rotate_sum_still_adds_rotations(keys, public):
    x = np.arange(SLOTS, dtype=float) / SLOTS
    circuit = Circuit(public)
    (cipher,) = circuit.ciphers(encrypt_for_compute(public, x, multiplications=0))
    total = circuit.tensor([circuit.rotate_sum(cipher, (1, -3))], (SLOTS,))
    once = x + np.roll(x, -1)
    assert np.abs(decrypt(keys, total) - (once + np.roll(once, 3))).max() < 4 * E + 3 * K


# -- refusals ----------------------------------------------------------------------------------


def test_refusals_name_the_fix(keys, public, features, queries):
    x = np.ones(SLOTS)
    with pytest.raises(ShapeError, match="one weight per tensor"):
        weighted_sum(features[:2], [1.0])
    with pytest.raises(ShapeError, match="pair"):
        sum_of_products(queries[:2], features[:3])
    with pytest.raises(ShapeError, match="at least one"):
        weighted_sum([], [])
    with pytest.raises(ShapeError, match="one shape"):
        weighted_sum([features[0], encrypt_for_compute(public, x[:10])], [1.0, 1.0])
    with pytest.raises(TypeError):
        weighted_sum([features[0], PlainTensor(x)], [1.0, 1.0])
    with pytest.raises(ValueRangeError, match="finite"):
        weighted_sum(features[:2], [1.0, math.nan])
    with pytest.raises(ParameterError, match="mod_switch_to"):
        weighted_sum([features[0], features[1].mod_switch_to(2)], [1.0, 1.0])
    with pytest.raises(ParameterError, match="mod_switch_to"):
        sum_of_products(queries[:2], [features[0], features[1].mod_switch_to(2)])
    last = [encrypt_for_compute(public, x, multiplications=0)] * 2
    with pytest.raises(ParameterError, match="room for one more multiplication"):
        weighted_sum(last, [1.0, 1.0])
    with pytest.raises(ParameterError, match="room for one more multiplication"):
        sum_of_products(last[:1], last[:1])
    with pytest.raises(ContextMismatchError):
        other = generate_keys(PARAMS, KeyRequest(relin=True)).public()
        weighted_sum([features[0], encrypt_for_compute(other, x, multiplications=2)], [1, 1])
    packed = encrypt(public, np.ones(2 * SLOTS), packing="complex")
    with pytest.raises(ShapeError, match="encrypt_for_compute"):
        weighted_sum([packed, packed], [1.0, 1.0])
    with pytest.raises(ShapeError, match="encrypt_for_compute"):
        rotate(packed, 1)


def test_missing_keys_are_named(public, features):
    no_relin = public.encryption_only()
    plain_only = encrypt_for_compute(no_relin, np.ones(SLOTS), multiplications=2)
    with pytest.raises(ParameterError, match=r"KeyRequest\(relin=True\)"):
        sum_of_products([plain_only, plain_only], [plain_only, plain_only])
    with pytest.raises(ParameterError, match=r"steps \[2, 5\].*KeyRequest\(rotations="):
        rotations(features[0], [1, 2, 5])
    with pytest.raises(ParameterError, match="rotation keys"):
        rotate(plain_only, 1)
    with pytest.raises(ShapeError, match=f"shape \\({SLOTS},\\)"):
        rotate(encrypt_for_compute(public, np.ones(10)), 1)
    with pytest.raises(ShapeError, match="1-D"):
        rotate(PlainTensor(np.ones((2, 3))), 1)
    with pytest.raises(TypeError):
        rotate(features[0], 1.5)  # type: ignore[arg-type]


def test_plain_twin_semantics():
    a, b, c = (PlainTensor(np.arange(6.0) + k) for k in range(3))
    assert np.array_equal(
        weighted_sum([a, b, c], [1, -2, 0.5]).values, a.values - 2 * b.values + 0.5 * c.values
    )
    assert np.array_equal(
        sum_of_products([a, b], [c, a]).values, a.values * c.values + b.values * a.values
    )
    assert np.array_equal(rotate(a, 2).values, [2, 3, 4, 5, 0, 1])
    assert np.array_equal(rotate(a, -1).values, [5, 0, 1, 2, 3, 4])
    assert weighted_sum([a], [2]).shape == (6,)
