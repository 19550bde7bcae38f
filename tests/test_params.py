import pytest

from fedhe.crypto import AGGREGATION_PARAMS, MAX_LOG_Q_128, CKKSParams, generate_keys
from fedhe.errors import ParameterError


@pytest.mark.parametrize("n, limit", sorted(MAX_LOG_Q_128.items()))
def test_modulus_at_the_limit_is_accepted_and_one_bit_more_refused(n, limit):
    primes = [60] * (limit // 60)
    rest = limit - sum(primes)
    if rest >= 20:
        primes.append(rest)
    else:
        primes[-1] -= 20 - rest
        primes.append(20)
    assert sum(primes) == limit
    CKKSParams(n, tuple(primes), 25)
    too_big = (*primes[:-1], primes[-1] + 1)
    with pytest.raises(ParameterError, match=f"exceeds the 128-bit limit of {limit} bits"):
        CKKSParams(n, too_big, 25)


@pytest.mark.parametrize("n", [1024, 2048, 5000, 65536])
def test_unsupported_ring_degree_is_refused(n):
    with pytest.raises(ParameterError, match="not supported"):
        CKKSParams(n, (40, 40), 30)


def test_refused_params_never_reach_keygen():
    with pytest.raises(ParameterError):
        generate_keys(CKKSParams(8192, (60, 60, 60, 60), 40))


@pytest.mark.parametrize(
    "primes, scale, match",
    [((60,), 40, "at least two primes"), ((61, 40), 30, "outside"), ((40, 40), 45, "no room")],
)
def test_malformed_params_name_the_problem(primes, scale, match):
    with pytest.raises(ParameterError, match=match):
        CKKSParams(4096, primes, scale)


def test_levels_grow_with_the_bound():
    p = AGGREGATION_PARAMS
    assert p.level_for(1.0) == 1
    assert p.level_for(p.max_abs_at(1) * 2) == 2
    assert p.level_for(p.max_abs_at(2) * 2) == 3
    with pytest.raises(ParameterError, match="exceed the largest bound"):
        p.level_for(p.max_abs_at(3) * 2)


def test_params_round_trip():
    assert CKKSParams.from_dict(AGGREGATION_PARAMS.to_dict()) == AGGREGATION_PARAMS
    with pytest.raises(ParameterError, match="malformed"):
        CKKSParams.from_dict({"poly_modulus_degree": 8192})
