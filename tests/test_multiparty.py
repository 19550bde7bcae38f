"""Multiparty and threshold CKKS: collective keys, decryption by shares, and what smudging buys.

Keys are built once per module (fixtures); every cryptographic claim has a test that fails when
the claim does: ring arithmetic against SEAL and Python integers, decryption by every active
set, refusal of shares that do not belong together, and the key leak of an unsmudged share.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tenseal.sealapi as sealapi
import tenseal.sealapi.util as seal_util

from fedhe.crypto import (
    AGGREGATION_PARAMS,
    MODEL_PARAMS,
    KeyRequest,
    PublicContext,
    _ring,
    _seal,
    encrypt,
    encrypt_for_compute,
    generate_keys,
    rotate,
    sum_of_products,
    weighted_sum,
)
from fedhe.crypto import multiparty as mp
from fedhe.crypto.circuit import Circuit
from fedhe.crypto.framing import frame, unframe
from fedhe.crypto.lanes import Lanes
from fedhe.crypto.params import FRESH_NOISE_BITS
from fedhe.crypto.tensor import COMPLEX, QUANTIZED, REAL, EncryptedTensor, SealTensor
from fedhe.errors import FedHEError, InvalidCiphertextError, ParameterError, ShareError
from tests.conftest import SMALL_PARAMS

SEED = b"fedhe/tests/multiparty/seed-0001"
EVAL_KEYS = KeyRequest(relin=True, rotations=(1, 3, -2), conjugate=True)


class Group:
    """Key holders and the collective context of their keys."""

    def __init__(self, params, holders, context, thresholds=None):
        self.params = params
        self.holders = holders
        self.context = context
        self.shamir = thresholds or {}

    def decrypt(self, tensor, holders=None, active=None, sigma=mp.DEFAULT_SMUDGING_SIGMA):
        shares = [
            mp.decryption_share(h, tensor, active_points=active, smudging_sigma=sigma)
            for h in (self.holders if holders is None else holders)
        ]
        return mp.combine_decryption(tensor, shares)


def _collective(params, count, keys=None):
    keys = keys or KeyRequest()
    holders = [mp.SecretShare.generate(params) for _ in range(count)]
    public_key = mp.combine_public_key(
        params, [mp.public_key_share(h, SEED) for h in holders], SEED
    )
    relin = rotation = None
    if keys.relin:
        round1 = [mp.relin_round1(h, SEED) for h in holders]
        combined = mp.combine_relin_round1(params, [public for public, _ in round1])
        round2 = [
            mp.relin_round2(h, ephemeral, combined)
            for h, (_, ephemeral) in zip(holders, round1, strict=True)
        ]
        relin = mp.combine_relin(params, round2, combined)
    elements = mp.galois_elements_for(params, keys)
    if elements:
        shares = [mp.rotation_share(h, elements, SEED) for h in holders]
        rotation = mp.combine_rotations(params, shares, elements, SEED)
    context = mp.collective_public_context(params, keys, public_key, relin, rotation)
    return holders, context, (public_key, relin, rotation)


def _thresholdize(params, holders, threshold):
    points = tuple(range(1, len(holders) + 1))
    dealt = [mp.deal(h, threshold, points) for h in holders]
    return {p: mp.combine_dealt(params, p, [d[p] for d in dealt]) for p in points}


@pytest.fixture(scope="module")
def agg():
    holders, context, _ = _collective(AGGREGATION_PARAMS, 3)
    return Group(
        AGGREGATION_PARAMS, holders, context, _thresholdize(AGGREGATION_PARAMS, holders, 2)
    )


@pytest.fixture(scope="module")
def five():
    holders, context, _ = _collective(AGGREGATION_PARAMS, 5)
    return Group(
        AGGREGATION_PARAMS, holders, context, _thresholdize(AGGREGATION_PARAMS, holders, 3)
    )


@pytest.fixture(scope="module")
def model():
    holders, context, keys = _collective(MODEL_PARAMS, 3, EVAL_KEYS)
    group = Group(MODEL_PARAMS, holders, context)
    group.keys = keys
    return group


def _tolerance(tensor, holders, terms=1, sigma=mp.DEFAULT_SMUDGING_SIGMA):
    """Six deviations of the smudging error plus the fresh noise of `terms` encryptions."""
    params = tensor.context.params
    smudging = mp.smudging_deviation(params, tensor.scale, holders, sigma)
    return 6 * smudging + terms * 2.0**FRESH_NOISE_BITS / tensor.scale


def _garbage(released, values):
    """Far from the values everywhere: what decrypting with the wrong key gives."""
    return np.median(np.abs(released - values)) > 10 * max(1.0, np.max(np.abs(values)))


def _ciphertext(tensor, index=0):
    chunk = tensor.chunks[index]
    return _ring.read_ciphertext(chunk.ciphertext()[0]), chunk.ciphertext()[0].scale


def _share_polys(data):
    """The residues inside a decryption share (one chunk at level 1 or more)."""
    header, body = unframe(data, magic=b"FHED", version=1, what="share", error=ShareError)
    n = _ring.ring(AGGREGATION_PARAMS).n
    return header, np.frombuffer(body, dtype="<u8").reshape(-1, n).copy()


def _shamir_poly(share):
    _, body = unframe(share.to_bytes(), magic=b"FHES", version=1, what="s", error=ShareError)
    return np.frombuffer(body, dtype="<u8").reshape(-1, _ring.ring(share.params).n).copy()


# -- the ring against SEAL and Python integers ------------------------------------------------


@pytest.mark.parametrize("params", [AGGREGATION_PARAMS, MODEL_PARAMS])
def test_ntt_matches_seal_on_its_secret_key_at_every_key_prime(params):
    ring = _ring.ring(params)
    key = sealapi.KeyGenerator(ring.seal).secret_key()  # NTT form, key level (with P)
    ntt_form = _ring.read_secret_key(key, ring.n)
    coefficients = ring.intt(ntt_form).astype(object)
    primes = np.array(ring.primes, dtype=object).reshape(-1, 1)
    signed = np.where(coefficients > primes // 2, coefficients - primes, coefficients)
    assert set(np.unique(signed.astype(np.int64))) <= {-1, 0, 1}  # ternary
    assert all(np.array_equal(signed[0], row) for row in signed)  # one polynomial, every prime
    np.testing.assert_array_equal(ring.ntt(ring.to_rns(signed[0].astype(np.int64))), ntt_form)
    assert (
        ring.special_prime
        == ring.primes[-1]
        == sealapi.CoeffModulus.Create(ring.n, list(params.coeff_mod_bit_sizes))[-1].value()
    )


def test_ntt_evaluates_at_odd_powers_of_the_minimal_root_in_bit_reversed_order():
    """Index j of SEAL's NTT holds a(ψ^(2·bitrev(j)+1)); the Galois permutation relies on it."""
    ring = _ring.ring(AGGREGATION_PARAMS)
    q, n = ring.primes[0], ring.n
    x = np.zeros(n, dtype=np.int64)
    x[1] = 1
    powers = ring.ntt(ring.to_rns(x, 1))[0]  # NTT of X: the evaluation points themselves
    psi = int(powers[0])
    assert pow(psi, n, q) == q - 1
    assert psi == seal_util.NTTTables(n.bit_length() - 1, sealapi.Modulus(q)).get_root()
    log_n = n.bit_length() - 1
    a = np.random.default_rng(5).integers(-1000, 1000, n)
    transformed = ring.ntt(ring.to_rns(a, 1))[0]
    for j in (0, 1, 2, 777, n - 1):
        point = pow(psi, 2 * int(format(j, f"0{log_n}b")[::-1], 2) + 1, q)
        assert int(transformed[j]) == sum(int(c) * pow(point, i, q) for i, c in enumerate(a)) % q


@pytest.mark.parametrize("element", [3, 27, 2 * 8192 - 1, pow(3, 4094, 2 * 8192)])
def test_galois_permutation_is_the_automorphism_in_ntt_form(element):
    ring = _ring.ring(AGGREGATION_PARAMS)
    n = ring.n
    a = np.random.default_rng(element).integers(-50, 50, n)
    image = np.zeros(n, dtype=np.int64)  # X^i → X^(i·g) = ±X^(i·g mod N)
    for i, c in enumerate(a):
        k = i * element % (2 * n)
        image[k % n] += c if k < n else -c
    expected = ring.ntt(ring.to_rns(image[None]))[0]
    permuted = ring.ntt(ring.to_rns(a[None]))[0][:, ring.galois_permutation(element)]
    np.testing.assert_array_equal(permuted, expected)


@pytest.mark.parametrize("params", [AGGREGATION_PARAMS, MODEL_PARAMS])
def test_mulmod_is_exact_against_python_integers(params):
    ring = _ring.ring(params)
    rng = np.random.default_rng(7)
    for q in ring.primes:
        edges = [0, 1, 2, q - 1, q - 2, q // 2, (q + 1) // 2, (1 << (q.bit_length() - 1))]
        a = np.array(edges + list(rng.integers(0, q, 2000, dtype=np.uint64)), dtype=np.uint64)
        b = np.array(list(reversed(edges)) + list(rng.integers(0, q, 2000, dtype=np.uint64)))
        b = b.astype(np.uint64)
        # Products just above a multiple of q (a·b ≡ 1, 2, 3): where a quotient estimated in
        # floating point falls one short, and the remainder needs its upper correction.
        near = rng.integers(1, q, 3000, dtype=np.uint64)
        above = np.array(
            [pow(int(x), -1, q) * (1 + i % 3) % q for i, x in enumerate(near)], dtype=np.uint64
        )
        a, b = np.concatenate([a, a, b, near]), np.concatenate([b, a, b, above])
        expected = [int(x) * int(y) % q for x, y in zip(a, b, strict=True)]
        modulus = np.uint64(q)
        assert _ring.mulmod(a, b, modulus).tolist() == expected
        assert _ring.mulmod_exact(a, b, modulus).tolist() == expected


def test_ring_product_equals_seals_own_plaintext_product(model):
    """c·s by numpy equals SEAL's multiply_plain of the same ciphertext and polynomial."""
    ring = _ring.ring(MODEL_PARAMS)
    tensor = encrypt_for_compute(model.context, np.linspace(-1, 1, 50))
    (ct,) = tensor.chunks[0].ciphertext()
    polys = _ring.read_ciphertext(ct)
    level = polys.shape[1]
    secret = model.holders[0].secret()[:level]
    plain = _ring.load(
        sealapi.Plaintext(), ring.seal, _ring.plaintext_parts(secret, ring.parms_id(level), 1.0)
    )
    product = sealapi.Ciphertext(ring.seal)
    sealapi.Evaluator(ring.seal).multiply_plain(ct, plain, product)
    np.testing.assert_array_equal(_ring.read_ciphertext(product), ring.mul(polys, secret))


def test_samplers_have_the_distributions_they_claim():
    n = 200_000
    ternary = _ring.sample_ternary(n)
    assert set(np.unique(ternary)) == {-1, 0, 1}
    assert np.all(np.abs(np.bincount(ternary + 1) / n - 1 / 3) < 0.01)
    noise = _ring.sample_cbd(n)
    assert abs(noise.std() - 10.5**0.5) < 0.05 and np.abs(noise).max() <= 21
    smudge = _ring.sample_gaussian(n, 2.0**20)
    assert abs(smudge.std() / 2.0**20 - 1) < 0.01 and abs(smudge.mean()) < 2.0**20 * 0.02
    assert not _ring.sample_gaussian(10, 0.0).any()
    with pytest.raises(ParameterError):
        _ring.sample_gaussian(10, float("nan"))


def test_common_random_is_deterministic_uniform_and_label_separated():
    ring = _ring.ring(AGGREGATION_PARAMS)
    a = mp.common_random(AGGREGATION_PARAMS, SEED, "x")
    np.testing.assert_array_equal(a, mp.common_random(AGGREGATION_PARAMS, SEED, "x"))
    assert not np.array_equal(a, mp.common_random(AGGREGATION_PARAMS, SEED, "y"))
    assert not np.array_equal(a, mp.common_random(AGGREGATION_PARAMS, SEED + b"!", "x"))
    assert np.all(a < ring.moduli)
    top = (a >> np.uint64(1)).astype(np.float64) / (ring.moduli.astype(np.float64) / 2)
    assert np.all(np.abs(top.mean(axis=1) - 0.5) < 0.02)  # spread over the whole range
    with pytest.raises(ParameterError):
        mp.common_random(AGGREGATION_PARAMS, b"short", "x")


# -- N-of-N: the collective key and decryption by every holder ---------------------------------


@pytest.mark.parametrize("packing", [REAL, COMPLEX])
def test_sum_of_parties_decrypts_to_the_plaintext_sum(agg, packing):
    rng = np.random.default_rng(11)
    size = AGGREGATION_PARAMS.slots * 3 + 17  # several ciphertexts
    parts = [rng.uniform(-10, 10, size) for _ in range(4)]
    total = encrypt(agg.context, parts[0], sum_bound=100.0, packing=packing)
    for part in parts[1:]:
        total = total + encrypt(agg.context, part, sum_bound=100.0, packing=packing)
    released = agg.decrypt(total)
    error = np.max(np.abs(released - sum(parts)))
    assert error < _tolerance(total, holders=3, terms=4)
    assert error > 0  # smudged: not the exact sum


def test_missing_holder_or_foreign_holder_gives_garbage(agg):
    values = np.linspace(-1, 1, 100)
    tensor = encrypt(agg.context, values, sum_bound=10.0)
    assert _garbage(agg.decrypt(tensor, holders=agg.holders[:2]), values)
    stranger = mp.SecretShare.generate(AGGREGATION_PARAMS)
    assert _garbage(agg.decrypt(tensor, holders=[*agg.holders[:2], stranger]), values)


def test_quantized_lanes_are_refused_at_the_default_smudging(agg):
    lanes = Lanes.plan(AGGREGATION_PARAMS.coeff_mod_bit_sizes[0], [(40, 100.0)], 3)
    rng = np.random.default_rng(3)
    parts = [rng.uniform(-30, 30, 40) for _ in range(3)]
    total = encrypt(agg.context, parts[0], sum_bound=100.0, packing=QUANTIZED, lanes=lanes)
    for part in parts[1:]:
        total = total + encrypt(agg.context, part, sum_bound=100.0, packing=QUANTIZED, lanes=lanes)
    with pytest.raises(ParameterError, match="COMPLEX packing"):
        agg.decrypt(total)
    # The unpacking itself works: noise small enough for the lanes (NOT a secure σ) rounds
    # away, and the sum is exactly the sum of the rounded values.
    steps = lanes.step_of_each()
    expected = sum(np.rint(p / steps) for p in parts) * steps
    np.testing.assert_array_equal(agg.decrypt(total, sigma=4.0), expected)


@pytest.mark.parametrize(
    ("params", "encryptor"),
    [
        (AGGREGATION_PARAMS, lambda ctx, x: encrypt(ctx, x, sum_bound=100.0)),
        (MODEL_PARAMS, lambda ctx, x: encrypt_for_compute(ctx, x, multiplications=0)),
    ],
)
def test_smudging_error_matches_its_prediction(agg, model, params, encryptor):
    group = agg if params == AGGREGATION_PARAMS else model
    values = np.random.default_rng(1).uniform(-1, 1, 2 * params.slots)
    tensor = encryptor(group.context, values)
    error = group.decrypt(tensor) - values
    predicted = mp.smudging_deviation(params, tensor.scale, holders=3)
    assert 0.5 < error.std() / predicted < 2.0
    unsmudged = group.decrypt(tensor, sigma=0.0) - values
    assert unsmudged.std() < predicted / 100  # the rest is the encryption's own noise


# -- threshold: any T of K ----------------------------------------------------------------------


def test_lambda_weighted_shamir_shares_add_up_to_the_key_exactly(agg, five):
    for group, threshold in ((agg, 2), (five, 3)):
        ring = _ring.ring(group.params)
        key = ring.sum(h.secret() for h in group.holders)
        points = sorted(group.shamir)
        for size in range(threshold, len(points) + 1):
            for active in itertools.combinations(points, size):
                parts = [group.shamir[p].secret(active) for p in active]
                np.testing.assert_array_equal(ring.sum(parts), key)


@pytest.mark.parametrize(("name", "threshold"), [("agg", 2), ("five", 3)])
def test_every_active_set_of_threshold_size_decrypts_alike(request, name, threshold):
    group = request.getfixturevalue(name)
    values = np.random.default_rng(2).uniform(-5, 5, 300)
    tensor = encrypt(group.context, values, sum_bound=10.0)
    tolerance = _tolerance(tensor, holders=threshold)
    results = []
    for active in itertools.combinations(sorted(group.shamir), threshold):
        holders = [group.shamir[p] for p in active]
        released = group.decrypt(tensor, holders=holders, active=active)
        assert np.max(np.abs(released - values)) < tolerance
        results.append(released)
    for other in results[1:]:
        assert np.max(np.abs(other - results[0])) < 2 * tolerance


@pytest.mark.parametrize(("name", "threshold"), [("agg", 2), ("five", 3)])
def test_fewer_than_threshold_shares_give_garbage_and_are_refused(request, name, threshold):
    group = request.getfixturevalue(name)
    ring = _ring.ring(group.params)
    values = np.linspace(-1, 1, 64)
    tensor = encrypt(group.context, values, sum_bound=10.0)
    (c0, c1), scale = _ciphertext(tensor)
    level = c0.shape[0]
    short = sorted(group.shamir)[: threshold - 1]
    # T − 1 holders pooling all they have: any λ-combination of their Shamir shares
    for weights in itertools.product([1, 2, -1], repeat=len(short)):
        guess = ring.sum(
            ring.mul(_shamir_poly(group.shamir[p]), ring.scalar([w % q for q in ring.primes]))
            for p, w in zip(short, weights, strict=True)
        )[:level]
        decoded = ring.decode(ring.add(c0, ring.mul(c1, guess)), scale).real[: values.size]
        assert _garbage(decoded, values)
    shares = [
        mp.decryption_share(group.shamir[p], tensor, active_points=sorted(group.shamir)[:threshold])
        for p in short
    ]
    with pytest.raises(ShareError, match="active set"):
        mp.combine_decryption(tensor, shares)
    with pytest.raises(ParameterError):  # a holder refuses an active set below the threshold
        mp.decryption_share(group.shamir[short[0]], tensor, active_points=short)


def test_a_share_for_one_active_set_does_not_combine_into_another(agg):
    values = np.linspace(-1, 1, 64)
    tensor = encrypt(agg.context, values, sum_bound=10.0)
    one = mp.decryption_share(agg.shamir[1], tensor, active_points=(1, 2))
    three = mp.decryption_share(agg.shamir[3], tensor, active_points=(1, 3))
    with pytest.raises(ShareError, match="different active sets"):
        mp.combine_decryption(tensor, [one, three])
    # Relabelled to pass the check, its λ is still that of the other set: garbage.
    header, body = unframe(one, magic=b"FHED", version=1, what="share", error=ShareError)
    relabelled = frame(b"FHED", 1, {**header, "active": [1, 3]}, body)
    assert _garbage(mp.combine_decryption(tensor, [relabelled, three]), values)


def test_a_share_of_one_ciphertext_is_refused_for_another(agg):
    a = encrypt(agg.context, np.ones(10), sum_bound=10.0)
    b = encrypt(agg.context, np.ones(10), sum_bound=10.0)
    shares = [mp.decryption_share(h, a) for h in agg.holders]
    shares[2] = mp.decryption_share(agg.holders[2], b)
    with pytest.raises(ShareError, match="share 2 was made for other ciphertexts"):
        mp.combine_decryption(a, shares)
    longer = encrypt(agg.context, np.ones(AGGREGATION_PARAMS.slots + 1), sum_bound=10.0)
    with pytest.raises(ShareError, match="share 0 is for another tensor"):
        mp.combine_decryption(longer, [mp.decryption_share(h, a) for h in agg.holders])
    with pytest.raises(ShareError, match="repeats"):
        mp.combine_decryption(a, [shares[0], shares[0], shares[1]])


def test_dealing_checks_its_points_and_pieces(agg):
    holder = agg.holders[0]
    with pytest.raises(ParameterError):
        mp.deal(holder, 4, (1, 2, 3))
    with pytest.raises(ParameterError):
        mp.deal(holder, 2, (1, 1, 2))
    with pytest.raises(ParameterError):
        mp.deal(agg.shamir[1], 2, (1, 2, 3))
    pieces = [mp.deal(h, 2, (1, 2, 3)) for h in agg.holders]
    with pytest.raises(ShareError):  # a piece for point 2 offered to point 1
        mp.combine_dealt(AGGREGATION_PARAMS, 1, [pieces[0][1], pieces[1][2], pieces[2][1]])
    with pytest.raises(ShareError):  # one dealer twice
        mp.combine_dealt(AGGREGATION_PARAMS, 1, [pieces[0][1], pieces[0][1], pieces[2][1]])
    with pytest.raises(ShareError):  # a dealer missing
        mp.combine_dealt(AGGREGATION_PARAMS, 1, [pieces[0][1], pieces[1][1]])
    assert mp.lagrange_at_zero(AGGREGATION_PARAMS, 1, (1,)) == (1,) * 4


# -- smudging: why every share needs its own noise ----------------------------------------------


def test_an_unsmudged_share_of_a_chosen_ciphertext_is_the_holders_key(agg):
    """With σ = 0, the share of the ciphertext (0, 1) is λ·s_i itself: whoever holds it makes
    that holder's share of any ciphertext without it. Holders must answer only for ciphertexts
    they have checked, and always smudge."""
    ring = _ring.ring(AGGREGATION_PARAMS)
    active = (1, 2)
    level = 2
    chosen = np.stack([np.zeros((level, ring.n)), np.ones((level, ring.n))]).astype(np.uint64)
    blob = _ring.ciphertext_bytes(chosen, ring.parms_id(level), scale=2.0**40)
    ct = _ring.load(sealapi.Ciphertext(), ring.seal, blob)
    trap = SealTensor([ct], [1], (1,), agg.context)
    _, stolen = _share_polys(
        mp.decryption_share(agg.shamir[1], trap, active_points=active, smudging_sigma=0.0)
    )
    np.testing.assert_array_equal(stolen, agg.shamir[1].secret(active)[:level])

    values = np.linspace(-3, 3, 200)
    fresh = encrypt(agg.context, values, sum_bound=1e6)  # two primes
    (c0, c1), scale = _ciphertext(fresh)
    assert c0.shape[0] == level
    _, honest = _share_polys(mp.decryption_share(agg.shamir[2], fresh, active_points=active))
    forged = ring.mul(c1, stolen)  # holder 1 never saw this ciphertext
    decoded = ring.decode(ring.sum([c0, forged, honest]), scale).real[: values.size]
    assert np.max(np.abs(decoded - values)) < _tolerance(fresh, holders=2)

    _, smudged = _share_polys(mp.decryption_share(agg.shamir[1], trap, active_points=active))
    forged = ring.mul(c1, smudged)  # the same attack on a smudged share
    decoded = ring.decode(ring.sum([c0, forged, honest]), scale).real[: values.size]
    assert _garbage(decoded, values)


# -- collective evaluation keys ------------------------------------------------------------------


def test_collective_relin_key_multiplies(model):
    rng = np.random.default_rng(4)
    x, y, z, w = (rng.uniform(-1, 1, 300) for _ in range(4))
    tx, ty, tz, tw = (encrypt_for_compute(model.context, v) for v in (x, y, z, w))
    product = tx * ty
    assert np.max(np.abs(model.decrypt(product) - x * y)) < _tolerance(product, 3, terms=4)
    summed = sum_of_products([tx, tz], [ty, tw])
    assert np.max(np.abs(model.decrypt(summed) - (x * y + z * w))) < _tolerance(summed, 3, 8)
    square = product * product  # a second level: the key works at every level
    assert np.max(np.abs(model.decrypt(square) - (x * y) ** 2)) < _tolerance(square, 3, 8)
    mixed = weighted_sum([tx, ty], [0.5, -2.0])
    assert np.max(np.abs(model.decrypt(mixed) - (0.5 * x - 2 * y))) < _tolerance(mixed, 3, 4)


def test_collective_rotation_and_conjugation_keys(model):
    slots = MODEL_PARAMS.slots
    x = np.random.default_rng(6).uniform(-1, 1, slots)
    tensor = encrypt_for_compute(model.context, x)
    for step in (1, 3, -2):
        rotated = rotate(tensor, step)
        assert np.max(np.abs(model.decrypt(rotated) - np.roll(x, -step))) < _tolerance(
            rotated, 3, 2
        )
    z = x[0::2] + 1j * x[1::2]
    packed = encrypt_for_compute(model.context, x, packing=COMPLEX)
    circuit = Circuit(model.context)
    (cipher,) = circuit.ciphers(packed)
    conjugated = circuit.tensor([circuit.conjugate(cipher)], (slots,))
    conjugated = EncryptedTensor(conjugated.chunks, (slots,), model.context, COMPLEX)
    released = model.decrypt(conjugated)
    expected = np.column_stack([z.real, -z.imag]).ravel()
    assert np.max(np.abs(released - expected)) < _tolerance(conjugated, 3, 2)


def test_collective_context_round_trips_with_its_keys(model):
    data = model.context.to_bytes()
    loaded = PublicContext.from_bytes(data)
    assert loaded.fingerprint == model.context.fingerprint
    assert loaded.keys == EVAL_KEYS and loaded.raw.has_relin_keys()
    assert not loaded.raw.has_galois_keys()  # only the explicit rotation keys were asked for
    x = np.random.default_rng(8).uniform(-1, 1, MODEL_PARAMS.slots)
    tensor = encrypt_for_compute(loaded, x)
    result = rotate(tensor * tensor, 3)
    assert np.max(np.abs(model.decrypt(result) - np.roll(x * x, -3))) < _tolerance(result, 3, 4)


def test_collective_context_fingerprint_is_deterministic(model):
    public_key, relin, rotation = model.keys
    again = mp.collective_public_context(MODEL_PARAMS, EVAL_KEYS, public_key, relin, rotation)
    assert again.fingerprint == model.context.fingerprint
    assert again.to_bytes() == model.context.to_bytes()
    lean = mp.collective_public_context(MODEL_PARAMS, KeyRequest(), public_key)
    assert lean.fingerprint == model.context.fingerprint  # params and public key only
    with pytest.raises(ParameterError, match="relinearization key"):
        mp.collective_public_context(MODEL_PARAMS, EVAL_KEYS, public_key, None, rotation)
    with pytest.raises(ParameterError, match="Galois elements"):
        mp.collective_public_context(MODEL_PARAMS, EVAL_KEYS, public_key, relin, None)
    with pytest.raises(ParameterError, match="no key for elements"):
        mp.collective_public_context(
            MODEL_PARAMS, KeyRequest(relin=True, rotations=(5,)), public_key, relin, rotation
        )


def test_galois_elements_match_what_seal_and_tenseal_generate():
    params = SMALL_PARAMS
    tool = seal_util.GaloisTool(params.poly_modulus_degree.bit_length() - 1)
    assert mp.galois_elements_for(params, KeyRequest(galois=True)) == tuple(
        sorted(set(tool.get_elts_all()))
    )
    request = KeyRequest(rotations=(1, 3, -2), conjugate=True)
    secret = generate_keys(params, request)  # what a single key holder would make
    assert tuple(_ring.galois_elements_in(secret.rotation_key_bytes)) == mp.galois_elements_for(
        params, request
    )
    assert [tool.get_elt_from_step(s) for s in (1, 3, -2)] == [
        pow(3, s % params.slots, 2 * params.poly_modulus_degree) for s in (1, 3, -2)
    ]


def test_tenseal_power_of_two_keys_generated_collectively():
    holders, context, _ = _collective(SMALL_PARAMS, 2, KeyRequest(galois=True))
    group = Group(SMALL_PARAMS, holders, context)
    assert context.raw.has_galois_keys() and not context.rotation_key_bytes
    x = np.random.default_rng(9).uniform(-1, 1, SMALL_PARAMS.slots)
    tensor = encrypt_for_compute(context, x)
    for step in (5, -7):  # several power-of-two key switches each
        rotated = rotate(tensor, step)
        assert np.max(np.abs(group.decrypt(rotated) - np.roll(x, -step))) < _tolerance(
            rotated, 2, 4
        )
    total = tensor.chunks[0].sum()  # TenSEAL's own rotate-and-add under the collective keys
    summed = SealTensor([total.ciphertext()[0]], [1], (1,), context)
    tolerance = _tolerance(summed, 2, terms=SMALL_PARAMS.slots)  # noise of every slot, added
    assert abs(group.decrypt(summed)[0] - x.sum()) < tolerance


# -- messages: malformed bytes, mixed rounds, secret material ------------------------------------


def test_secret_shares_round_trip_and_stay_out_of_public_contexts(agg):
    for share in (agg.holders[0], agg.shamir[2]):
        data = share.to_bytes()
        loaded = mp.SecretShare.from_bytes(AGGREGATION_PARAMS, data)
        assert (loaded.kind, loaded.point, loaded.threshold, loaded.points) == (
            share.kind,
            share.point,
            share.threshold,
            share.points,
        )
        assert loaded.holder_id == share.holder_id
        with pytest.raises(ParameterError, match="not a fedhe context"):
            PublicContext.from_bytes(data)
        with pytest.raises(ShareError):
            mp.SecretShare.from_bytes(MODEL_PARAMS, data)
    assert "holder=" in repr(agg.shamir[2]) and len(repr(agg.holders[0])) < 100


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d[:-1],
        lambda d: d[:30],
        lambda d: d[:8],
        lambda d: b"",
        lambda d: b"FHEX" + d[4:],
        lambda d: d[:-8] + b"\xff" * 8,  # a residue out of range
        lambda d: bytes(64),
    ],
)
def test_malformed_bytes_raise_share_errors(agg, mangle):
    tensor = encrypt(agg.context, np.ones(5), sum_bound=10.0)
    decryption = [mp.decryption_share(h, tensor) for h in agg.holders]
    with pytest.raises(ShareError):
        mp.combine_decryption(tensor, [mangle(decryption[0]), *decryption[1:]])
    with pytest.raises(ShareError):
        mp.SecretShare.from_bytes(AGGREGATION_PARAMS, mangle(agg.holders[0].to_bytes()))
    keygen = [mp.public_key_share(h, SEED) for h in agg.holders]
    with pytest.raises(ShareError):
        mp.combine_public_key(AGGREGATION_PARAMS, [mangle(keygen[0]), *keygen[1:]], SEED)


def test_keygen_shares_must_belong_to_one_round(agg):
    shares = [mp.public_key_share(h, SEED) for h in agg.holders]
    other = mp.public_key_share(agg.holders[2], SEED + b"-other")
    with pytest.raises(ShareError, match="another common seed"):
        mp.combine_public_key(AGGREGATION_PARAMS, [*shares[:2], other], SEED)
    with pytest.raises(ShareError, match="same holder"):
        mp.combine_public_key(AGGREGATION_PARAMS, [shares[0], shares[0], shares[1]], SEED)
    with pytest.raises(ShareError):  # a secret share is not a key-generation share
        mp.combine_public_key(AGGREGATION_PARAMS, [agg.holders[0].to_bytes()], SEED)
    round1 = [mp.relin_round1(h, SEED) for h in agg.holders]
    combined = mp.combine_relin_round1(AGGREGATION_PARAMS, [p for p, _ in round1])
    with pytest.raises(ShareError, match="another holder"):
        mp.relin_round2(agg.holders[0], round1[1][1], combined)
    assert isinstance(ShareError("x"), FedHEError)


def test_only_two_polynomial_ciphertexts_are_decrypted_by_shares(model):
    tensor = encrypt_for_compute(model.context, np.ones(4))
    ring = _ring.ring(MODEL_PARAMS)
    (ct,) = tensor.chunks[0].ciphertext()
    three = sealapi.Ciphertext(ring.seal)
    sealapi.Evaluator(ring.seal).square(ct, three)  # not relinearized
    unrelinearized = SealTensor([three], [4], (4,), model.context)
    with pytest.raises(InvalidCiphertextError, match="3 polynomials"):
        mp.decryption_share(model.holders[0], unrelinearized)
    with pytest.raises(ParameterError):  # additive shares take no active set
        mp.decryption_share(model.holders[0], tensor, active_points=(1, 2))
    assert _seal.ciphertext_info(tensor.chunks[0])[0] == 2
