"""Lane planning, packing and decoding at their boundaries, and their refusals word for word
(mutation testing of fedhe/crypto/lanes.py; no encryption needed)."""

import math
import re

import numpy as np
import pytest

from fedhe.crypto.lanes import MAX_RESIDUAL, MIN_ROOM, Lanes, min_guard_bits
from fedhe.errors import InvalidCiphertextError, ParameterError, ValueRangeError

ONE_STEP = Lanes(16, 14, ((4, 0),))  # four values, step 1, lanes of 14 bits: |q| < 2^13


def test_min_guard_bits_grows_with_the_square_root_of_the_terms():
    expected = {0: 16, 1: 16, 2: 17, 4: 17, 5: 18, 16: 18, 17: 19, 1024: 21}
    assert {terms: min_guard_bits(terms) for terms in expected} == expected


def test_a_plan_needs_a_term():
    with pytest.raises(ParameterError, match=re.escape("a sum needs at least one term, got 0.")):
        Lanes.plan(55, [(4, 1.0)], 0)


def test_exactly_min_room_quantization_levels_are_enough():
    lanes = Lanes.plan(51, [(10, 1.0)], 4096)  # guard 22, lanes of 14 bits: 2^13 − 4096 levels
    assert (lanes.guard_bits, lanes.lane_bits) == (22, 14)
    assert 2 ** (lanes.lane_bits - 1) - 4096 == MIN_ROOM
    with pytest.raises(ParameterError, match=r"^a 40-bit prime leaves 0 quantization levels"):
        Lanes.plan(40, [(10, 1.0)], 10_000)


def test_segments_start_at_zero_and_each_step_is_its_bound_over_the_room():
    lanes = Lanes.plan(55, [(1, 1.0), (5, 4.0)], 2)
    room = 2 ** (lanes.lane_bits - 1) - 2
    assert lanes.steps == ((1, math.ceil(math.log2(1 / room))), (5, math.ceil(math.log2(4 / room))))
    np.testing.assert_array_equal(
        lanes.step_of_each(), [2.0 ** lanes.steps[0][1]] + [2.0 ** lanes.steps[1][1]] * 4
    )


@pytest.mark.parametrize(
    "segments",
    [[(5, 1.0), (5, 1.0)], [(0, 1.0)], [(5, 0.0)], [(5, -1.0)], [(5, math.inf)]],
    ids=["empty-segment", "stop-0", "bound-0", "negative-bound", "infinite-bound"],
)
def test_bad_segments_are_refused(segments):
    stop, bound = segments[-1]
    message = f"bad lane segment (stop={stop}, bound={bound})."
    with pytest.raises(ParameterError, match=re.escape(message)):
        Lanes.plan(55, segments, 2)


def test_pack_refuses_the_wrong_size_and_a_value_at_the_lane_edge():
    with pytest.raises(ValueRangeError, match=re.escape("lanes hold 4 values, got 3.")):
        ONE_STEP.pack(np.zeros(3))
    edge = 2.0 ** (ONE_STEP.lane_bits - 1)
    np.testing.assert_array_equal(
        ONE_STEP.pack([edge - 1, -(edge - 1), 0, 1]),
        [(edge - 1) * 2**14 - (edge - 1) + 1j],
    )
    message = "a value exceeds its lane: it is larger than the sum bound."
    for value in (edge, -edge):
        with pytest.raises(ValueRangeError, match=f"^{re.escape(message)}$"):
            ONE_STEP.pack([0, 0, value, 0])


def test_a_one_bit_lane_holds_zeros():
    np.testing.assert_array_equal(Lanes(16, 1, ((4, 0),)).pack(np.zeros(4)), [0j])


def test_unpack_splits_signed_lanes_and_refuses_too_few_slots():
    packed = ONE_STEP.pack([-3, 5, 7, -8191])
    np.testing.assert_array_equal(ONE_STEP.unpack(packed), [-3, 5, 7, -8191])
    wide = Lanes(16, 14, ((13, 0),))
    with pytest.raises(
        InvalidCiphertextError, match=re.escape("3 slots cannot hold the 13 values")
    ):
        wide.unpack(np.zeros(3, dtype=complex))


def test_decoding_accepts_a_residual_up_to_the_limit_and_refuses_beyond():
    assert MAX_RESIDUAL == 0.375
    np.testing.assert_array_equal(ONE_STEP.unpack([2.375 - 0.375j]), [0, 2, 0, 0])
    message = (
        "decrypted lanes are 0.376 from an integer (at most 0.375): the ciphertext noise exceeds "
        "what the lanes' guard bits absorb."
    )
    with pytest.raises(InvalidCiphertextError, match=f"^{re.escape(message)}$"):
        ONE_STEP.unpack([2.376 + 0j])


@pytest.mark.parametrize(
    ("lane_bits", "guard_bits", "steps", "plausible"),
    [
        (1, 1, [[4, 0]], True),
        (31, 39, [[4, 0]], True),
        (0, 16, [[4, 0]], False),
        (32, 16, [[4, 0]], False),
        (14, 0, [[4, 0]], False),
        (14, 40, [[4, 0]], False),
        (14, 16, [], False),
    ],
)
def test_lane_records_outside_plausible_bounds_are_refused(lane_bits, guard_bits, steps, plausible):
    record = {"lane_bits": lane_bits, "guard_bits": guard_bits, "steps": steps}
    if plausible:
        assert Lanes.from_dict(record).to_dict() == record
    else:
        with pytest.raises(InvalidCiphertextError, match=r"^implausible lane record \{"):
            Lanes.from_dict(record)
