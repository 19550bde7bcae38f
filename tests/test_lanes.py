"""Quantized lanes: four values per slot, sums decoded exactly, no noise released."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedhe.crypto import AGGREGATION_PARAMS, PublicContext, decrypt, encrypt, load_tensor
from fedhe.crypto.framing import frame, unframe
from fedhe.crypto.lanes import MIN_ROOM, Lanes, min_guard_bits
from fedhe.crypto.tensor import COMPLEX, QUANTIZED
from fedhe.errors import InvalidCiphertextError, ParameterError, PolicyError, ShapeError
from fedhe.keyholder import JobDeclaration, KeyHolder, OutputSpec
from fedhe.keyholder.inprocess import TaggedParties
from fedhe.tasks import aggregate
from tests.conftest import SMALL_PARAMS

PRIME_BITS = SMALL_PARAMS.coeff_mod_bit_sizes[0]
SLOTS = SMALL_PARAMS.slots


def _quantized(public, values, lanes, bound, terms):
    """Encrypt into `lanes`; the caller guarantees that sums of `terms` stay within `bound`."""
    return encrypt(public, values, sum_bound=max(bound, terms), packing=QUANTIZED, lanes=lanes)


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    terms=st.integers(1, 12),
    size=st.integers(3, 4 * SLOTS + 9),
    log_bound=st.floats(-3, 20),
    seed=st.integers(0, 2**16),
)
def test_a_sum_decodes_exactly_to_the_sum_of_the_rounded_values(
    secret, public, terms, size, log_bound, seed
):
    bound = 2.0**log_bound
    lanes = Lanes.plan(PRIME_BITS, [(size - 1, bound), (size, float(terms))], terms)
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(terms):  # values at ±bound/terms: lanes filled to the edge
        part = rng.choice([-1.0, 1.0], size) * bound / terms * rng.uniform(0.9, 1.0, size)
        part[-1] = 1.0  # a contributor count
        parts.append(part)
    total = _quantized(public, parts[0], lanes, bound, terms)
    for part in parts[1:]:
        data = _quantized(public, part, lanes, bound, terms).to_bytes()
        total = total + load_tensor(data, public, shape=(size,), lanes=lanes)
    steps = lanes.step_of_each()
    rounded_sum = sum(np.rint(p / steps) for p in parts) * steps
    released = decrypt(secret, total)
    np.testing.assert_array_equal(released, rounded_sum)  # exact: the noise is rounded away
    assert released[-1] == terms
    assert np.max(np.abs(released - sum(parts))) <= terms * steps[0] / 2


def test_four_values_per_slot_half_the_bytes_of_complex_packing(secret, public):
    values = np.linspace(-50, 50, 8 * SLOTS + 3)
    lanes = Lanes.plan(PRIME_BITS, [(values.size, 100.0)], 2)
    quantized = _quantized(public, values, lanes, 100.0, 2)
    paired = encrypt(public, values, sum_bound=100.0, packing=COMPLEX)
    assert (len(quantized.chunks), len(paired.chunks)) == (3, 5)
    assert len(quantized.to_bytes()) < 0.65 * len(paired.to_bytes())
    np.testing.assert_allclose(decrypt(secret, quantized), values, atol=lanes.step_of_each()[0])


def test_steps_are_powers_of_two_and_integers_stay_exact():
    lanes = Lanes.plan(55, [(100, 14370.0), (102, 10.0)], 10)
    assert lanes.guard_bits == min_guard_bits(10) and lanes.lane_bits == 18
    assert lanes.steps == ((100, -3), (102, -13))  # 14370 / (2^17 − 10) ≤ 2^-3
    assert np.all(np.rint(np.arange(1000.0) / 0.125) * 0.125 == np.arange(1000.0))


def test_too_many_terms_for_the_prime_are_refused_with_the_fix():
    with pytest.raises(ParameterError, match="use complex packing"):
        Lanes.plan(40, [(10, 1.0)], 10_000)
    assert 2 ** (Lanes.plan(55, [(10, 1.0)], 1000).lane_bits - 1) - 1000 >= MIN_ROOM


def test_products_and_mixed_packings_are_refused(public):
    values = np.ones(10)
    lanes = Lanes.plan(PRIME_BITS, [(10, 10.0)], 2)
    quantized = _quantized(public, values, lanes, 10.0, 2)
    other = _quantized(public, values, Lanes.plan(PRIME_BITS, [(10, 20.0)], 2), 20.0, 2)
    for operation in (
        lambda t: t.mul_plain(values),
        lambda t: t.mul_scalar(2.0),
        lambda t: t + encrypt(public, values, sum_bound=10.0, packing=COMPLEX),
        lambda t: t + other,
    ):
        with pytest.raises(ShapeError):
            operation(quantized)
    with pytest.raises(InvalidCiphertextError, match="other lanes"):
        load_tensor(other.to_bytes(), public, lanes=lanes)


def test_a_header_that_lies_about_the_lanes_is_refused(public):
    lanes = Lanes.plan(PRIME_BITS, [(10, 10.0)], 2)
    data = _quantized(public, np.ones(10), lanes, 10.0, 2).to_bytes()
    header, body = unframe(data, magic=b"FHET", version=1, what="t", error=InvalidCiphertextError)
    header["lanes"]["guard_bits"] -= 4  # a smaller scale would let noise bits into the release
    forged = frame(b"FHET", 1, header, body)
    with pytest.raises(InvalidCiphertextError, match="scale"):
        load_tensor(forged, public)
    header["lanes"] = {"guard_bits": "x"}
    with pytest.raises(InvalidCiphertextError, match="malformed lane"):
        load_tensor(frame(b"FHET", 1, header, body), public)


def test_a_sum_of_more_terms_than_planned_is_refused_not_misdecoded(secret, public):
    lanes = Lanes.plan(PRIME_BITS, [(SLOTS, 1.0)], 1)
    zeros = np.zeros(SLOTS)
    total = _quantized(public, zeros, lanes, 1.0, 1)
    for _ in range(400):  # noise grows as √400 = 20× past what one term's guard absorbs
        total = total + _quantized(public, zeros, lanes, 1.0, 1)
    with pytest.raises(InvalidCiphertextError, match="noise exceeds"):
        decrypt(secret, total)


def _keyholder_with_job(tmp_path, size):
    keyholder = KeyHolder(tmp_path / "kh")  # flooding on, as deployed
    job = JobDeclaration("job-q", "aggregate", {"sum": OutputSpec(4, size - 1)}, 2, SMALL_PARAMS)
    public = PublicContext.from_bytes(keyholder.declare_job(job))
    return keyholder, public, TaggedParties(keyholder, "job-q", ("a", "b", "c"))


def test_the_key_holder_releases_lanes_exactly_and_without_flooding(tmp_path):
    size = 64
    keyholder, public, parties = _keyholder_with_job(tmp_path, size)
    lanes = Lanes.plan(PRIME_BITS, [(size - 1, 100.0), (size, 3.0)], 3)
    values = np.append(np.linspace(-30, 30, size - 1), 1.0)
    releases = []
    for round_ in range(2):  # two encryptions of the same values: different noise, same release
        contributions = {p: _quantized(public, values, lanes, 100.0, 3) for p in parties.names}
        request = parties.request("sum", contributions, round_)
        releases.append(keyholder.decrypt_sum(request).values)
    np.testing.assert_array_equal(releases[0], releases[1])
    assert [e["decision"] for e in keyholder.audit.entries()[-2:]] == ["decrypted"] * 2
    assert keyholder.audit.entries()[-1]["flooding_sigma"] == 0.0
    np.testing.assert_allclose(releases[0], 3 * values, atol=3 * lanes.step_of_each()[0] / 2)


def test_the_key_holder_refuses_lanes_whose_guard_cannot_absorb_the_noise(tmp_path):
    size = 64
    keyholder, public, parties = _keyholder_with_job(tmp_path, size)
    planned = Lanes.plan(PRIME_BITS, [(size - 1, 100.0), (size, 3.0)], 3)
    thin = Lanes(min_guard_bits(3) - 3, planned.lane_bits, planned.steps)
    part = _quantized(public, np.append(np.zeros(size - 1), 1.0), thin, 100.0, 3)
    request = parties.request("sum", dict.fromkeys(parties.names, part))  # tags verify
    with pytest.raises(PolicyError, match="guard bits"):
        keyholder.decrypt_sum(request)
    assert keyholder.audit.entries()[-1]["decision"] == "refused"


def test_contributions_quantized_for_another_federation_size_are_excluded(public):
    layout = aggregate.Layout.of({"w": np.zeros(20)})
    update = {"w": np.full(20, 0.5)}

    def contribution(parties):
        return aggregate.party_contribution(
            update, 10, layout, public, sum_bound=1000.0, packing=QUANTIZED, parties=parties
        )

    total = aggregate.aggregator_sum(
        {"a": contribution(3), "b": contribution(3), "c": contribution(4)},
        layout,
        public,
        sum_bound=1000.0,
        min_parties=2,
        packing=QUANTIZED,
        parties=3,
    )
    assert total.contributors == ("a", "b") and "other lanes" in total.rejected["c"]
    assert load_tensor(total.tensor, public).packing == QUANTIZED


@pytest.mark.parametrize(
    ("requested", "parties", "total_samples", "chosen"),
    [
        ("auto", 10, 1437, QUANTIZED),  # digits over 10 parties: rounding ≤ 4.4e-4 per round
        ("auto", 100, 1437, COMPLEX),  # 14 samples each: half a step × 100 parties is too much
        ("auto", 100_000, 10**7, COMPLEX),  # more parties than lanes can hold
        ("quantized", 100, 1437, QUANTIZED),  # asked for: the user accepts the rounding
        ("complex", 10, 1437, COMPLEX),
    ],
)
def test_auto_packing_quantizes_only_while_the_rounding_stays_small(
    requested, parties, total_samples, chosen
):
    layout = aggregate.Layout.of({"w": np.zeros(1000)})
    kwargs = {"sum_bound": 10.0 * total_samples, "parties": parties, "total_samples": total_samples}
    assert aggregate.choose_packing(requested, layout, AGGREGATION_PARAMS, **kwargs) == chosen
    if chosen == QUANTIZED and requested == "auto":
        bound = aggregate.quantization_error_bound(layout, AGGREGATION_PARAMS, **kwargs)
        assert bound <= aggregate.QUANTIZATION_TOLERANCE


@pytest.mark.parametrize("contributors", [4, 5], ids=["fits", "one-too-many"])
def test_the_guard_is_checked_against_the_actual_number_of_contributors(tmp_path, contributors):
    """Guard bits that just absorb the noise of 4 contributions: 4 are released, a fifth needs
    one bit more and is refused (the check counts the request's contributors, not one)."""
    assert min_guard_bits(5) == min_guard_bits(4) + 1
    size, names = 64, tuple("abcde"[:contributors])
    keyholder = KeyHolder(tmp_path / "kh")
    job = JobDeclaration("job-g", "aggregate", {"sum": OutputSpec(1, size - 1)}, 2, SMALL_PARAMS)
    public = PublicContext.from_bytes(keyholder.declare_job(job))
    parties = TaggedParties(keyholder, "job-g", names)
    planned = Lanes.plan(PRIME_BITS, [(size - 1, 100.0), (size, 5.0)], 5)
    lanes = Lanes(min_guard_bits(4), planned.lane_bits, planned.steps)
    values = np.append(np.linspace(-10, 10, size - 1), 1.0)
    shares = {name: _quantized(public, values, lanes, 100.0, 5) for name in names}
    request = parties.request("sum", shares)  # independent encryptions, tags that verify
    if contributors == 4:
        released = keyholder.decrypt_sum(request).values
        np.testing.assert_allclose(released, 4 * values, atol=4 * lanes.step_of_each()[0])
        assert released[-1] == 4
    else:
        with pytest.raises(PolicyError, match=r"17 guard bits cannot absorb the noise of 5"):
            keyholder.decrypt_sum(request)
    decision = keyholder.audit.entries()[-1]["decision"]
    assert decision == ("decrypted" if contributors == 4 else "refused")
