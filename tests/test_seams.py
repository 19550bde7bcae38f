"""The seams issue 18 named: seeds, the error hierarchy on load paths, checks without assert,
one value-range check, and the split of the SEAL shims."""

from __future__ import annotations

import numpy as np
import pytest

from fedhe import seeds
from fedhe.clients.party import _round_seed
from fedhe.config import ConfigError
from fedhe.crypto import (
    CKKSParams,
    KeyRequest,
    PlainTensor,
    PublicContext,
    SecretContext,
    _seal,
    _tenseal_proto,
    _zero_pool,
    check_values,
    decrypt,
    encrypt,
    encrypt_for_compute,
    generate_keys,
    sum_of_products,
    weighted_sum,
)
from fedhe.crypto.validation import check_range
from fedhe.errors import (
    FedHEError,
    InvalidCiphertextError,
    ParameterError,
    PolicyError,
    TensorKindError,
    ValueRangeError,
)
from fedhe.keyholder import JobDeclaration, KeyHolder, OutputSpec
from fedhe.keyholder.inprocess import TaggedParties
from fedhe.tasks import knn, mlp
from tests.conftest import SMALL_PARAMS

# -- seeds ---------------------------------------------------------------------------------------


def test_every_round_and_party_up_to_1000_parties_and_100_rounds_gets_its_own_stream():
    derived = {
        seeds.derive_seed(7, round_=r, party=p, purpose=seeds.TRAIN)
        for r in range(100)
        for p in range(1000)
    }
    assert len(derived) == 100 * 1000
    # distinct seeds, distinct streams: the first draws of neighbouring keys differ too
    firsts = {
        int(
            np.random.default_rng(
                seeds.derive_seed(7, round_=r, party=p, purpose=seeds.BATCH)
            ).integers(2**63)
        )
        for r in (9, 10, 99)
        for p in (0, 99, 100, 999)
    }
    assert len(firsts) == 12


def test_the_hand_combined_seeds_that_collided_are_distinct_now():
    # seed·1000 + round·100 + party: (round 12, party 150) and (round 13, party 50) both 2350
    config = {"seed": 1}
    a = _round_seed({**config, "round": 12}, {"party-index": 150}, seeds.TRAIN)
    b = _round_seed({**config, "round": 13}, {"party-index": 50}, seeds.TRAIN)
    assert a != b
    # and (seed 1, round 0) against (seed 0, round 10)
    c = _round_seed({"seed": 0, "round": 10}, {"party-index": 0}, seeds.TRAIN)
    d = _round_seed({"seed": 1, "round": 0}, {"party-index": 0}, seeds.TRAIN)
    assert c != d


def test_the_same_inputs_give_the_same_seed_and_purposes_do_not_share_one():
    first = seeds.derive_seed(42, round_=3, party=7, purpose=seeds.TRAIN)
    assert first == seeds.derive_seed(42, round_=3, party=7, purpose=seeds.TRAIN)
    assert first != seeds.derive_seed(42, round_=3, party=7, purpose=seeds.BATCH)
    assert first != seeds.derive_seed(43, round_=3, party=7, purpose=seeds.TRAIN)
    # pinned: a change to the derivation changes every run's training (and its twin's)
    assert first == int(
        np.random.SeedSequence(42, spawn_key=(3, 7, seeds.TRAIN)).generate_state(1, np.uint64)[0]
    )


def test_a_negative_seed_is_a_config_error():
    with pytest.raises(ConfigError, match="non-negative"):
        seeds.derive_seed(-1, round_=0, party=0, purpose=seeds.TRAIN)


# -- one value-range check -------------------------------------------------------------------------


def test_the_range_check_names_what_the_value_and_the_bound():
    with pytest.raises(ValueRangeError, match=r"largest \|weight\| 5 exceeds the bound 4: shrink"):
        check_range(np.array([1.0, -5.0]), 4.0, what="weight", fix="shrink it")
    with pytest.raises(ValueRangeError, match=r"weight at flat index 1 is nan.*; drop it"):
        check_range(np.array([1.0, np.nan]), np.inf, what="weight", nonfinite_fix="drop it")
    values = check_range([1, 2], 2.0)
    assert values.dtype == np.float64 and values.tolist() == [1.0, 2.0]
    assert check_range(np.array([]), 0.0).size == 0


@pytest.mark.parametrize(
    "check, message",
    [
        (lambda: check_values(np.full(3, 10.0), 4.0), r"\|value\| 10 exceeds the bound 4"),
        (lambda: mlp.check_inputs(np.full((1, 2), 300.0), 2), r"\|input\| 300 exceeds the bound"),
        (
            lambda: knn.check_queries(np.full((1, 2), 1e6), 2),
            r"\|squared norm of a query\| 2e\+12 exceeds the bound",
        ),
        (
            lambda: knn.label_rows(np.array([1e6]), 0),
            r"\|standardized target\| 1e\+06 exceeds the bound 256",
        ),
        (lambda: knn.check_queries(np.array([[np.inf, 0.0]]), 2), "query value at flat index 0"),
        (lambda: mlp.check_inputs(np.array([[0.0, np.nan]]), 2), "input at flat index 1"),
    ],
)
def test_every_encoder_refuses_out_of_range_values_with_the_same_error(check, message):
    with pytest.raises(ValueRangeError, match=message):
        check()


# -- checks, not asserts ---------------------------------------------------------------------------


def test_mixing_kinds_or_non_tensors_is_a_fedhe_error(public):
    encrypted = encrypt_for_compute(public, np.ones(4))
    plain = PlainTensor(np.ones(4))
    with pytest.raises(TensorKindError, match="cannot add"):
        weighted_sum([encrypted, plain], [1.0, 1.0])
    with pytest.raises(TensorKindError, match="not a fedhe tensor"):
        weighted_sum([np.ones(4), plain], [1.0, 1.0])  # type: ignore[list-item]
    with pytest.raises(TensorKindError, match="not a fedhe tensor"):
        sum_of_products([np.ones(4)], [np.ones(4)])  # type: ignore[list-item]
    assert issubclass(TensorKindError, FedHEError) and issubclass(TensorKindError, TypeError)


def test_a_ciphertext_product_sum_of_several_pairs_needs_no_assert():
    secret = generate_keys(CKKSParams(8192, (60, 40, 60), 40), KeyRequest(relin=True))
    public = secret.public()
    a = encrypt_for_compute(public, np.array([1.0, 2.0]))
    b = encrypt_for_compute(public, np.array([3.0, -1.0]))
    total = sum_of_products([a, b, a], [a, b, b])  # 1+9+3, 4+1-2
    np.testing.assert_allclose(decrypt(secret, total), [13.0, 3.0], atol=1e-3)


# -- the SEAL shims ----------------------------------------------------------------------------


def test_seal_shims_raise_fedhe_errors(agg_public):
    vector = encrypt(agg_public, np.ones(3)).chunks[0]
    level = _seal.ciphertext_info(vector)[1]
    with pytest.raises(ParameterError, match="cannot raise"):
        _seal.mod_switch_to(vector, agg_public.raw, level + 1)
    with pytest.raises(ParameterError, match="does not exist"):
        _seal.parms_id_at(agg_public.raw.seal_context().data, 0)
    pool = _zero_pool.zero_pool(agg_public.raw, "seams", 1)
    with pytest.raises(ParameterError, match="another level"):
        _seal.LevelEncryptor(agg_public.raw, 2, 2.0**20, pool)
    with pytest.raises(ParameterError, match=r"rotation keys .*; fetch them again"):
        _seal.check_whole(b"\x00" * 40, "rotation keys", "fetch them again")
    residues, primes = _seal.residues(vector, agg_public.raw)
    assert residues.shape == (2, level, agg_public.params.poly_modulus_degree)
    assert len(primes) == level
    with pytest.raises(InvalidCiphertextError, match="level this context does not have"):
        _seal.residues(vector, generate_keys(SMALL_PARAMS).public().raw)


def test_the_hand_written_protobuf_is_what_tenseal_writes(public):
    vector = encrypt(public, np.arange(5.0)).chunks[0]
    (ct,) = vector.ciphertext()
    assert _tenseal_proto.vector_proto(5, _seal._save(ct), ct.scale) == vector.serialize()
    assert _tenseal_proto.varint(1) == b"\x01" and _tenseal_proto.varint(300) == b"\xac\x02"


# -- load paths ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rotating():
    return generate_keys(SMALL_PARAMS, KeyRequest(rotations=(1, 2)))


@pytest.mark.parametrize("cut", [1, 100, 10_000])
def test_truncated_rotation_keys_are_refused_when_the_context_loads(rotating, cut):
    secret_bytes = rotating.to_secret_bytes()[:-cut]
    with pytest.raises(ParameterError, match=r"rotation keys of key file k.*restore the key file"):
        SecretContext.from_secret_bytes(secret_bytes, what="key file k")
    public_bytes = rotating.public().to_bytes()[:-cut]
    with pytest.raises(ParameterError, match=r"rotation keys of public context.*fetch the job"):
        PublicContext.from_bytes(public_bytes)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"",
        lambda data: data[:10],
        lambda data: data[: len(data) // 2],
        lambda data: data[:-1],
        lambda data: b"XXXX" + data[4:],
        lambda data: data[:200] + bytes(len(data) - 200),
    ],
    ids=["empty", "header-cut", "half", "last-byte", "magic", "zeroed-body"],
)
def test_a_corrupt_key_file_is_an_audited_refusal_naming_the_file(tmp_path, damage):
    keyholder = KeyHolder(tmp_path / "kh", flooding_bits=None)
    job = JobDeclaration("job-1", "aggregate", {"sum": OutputSpec(2)}, 3, SMALL_PARAMS)
    keyholder.declare_job(job)
    parties = TaggedParties(keyholder, "job-1", ("a", "b", "c"))
    shares = {name: encrypt(parties.public, np.ones(4) / 3) for name in parties.names}
    request = parties.request("sum", shares, 0)
    key_file = tmp_path / "kh" / "jobs" / "job-1" / "secret.ctx"
    key_file.write_bytes(damage(key_file.read_bytes()))
    with pytest.raises(PolicyError, match=r"decryption refused: .*secret key of job 'job-1'") as e:
        keyholder.decrypt_sum(request)
    assert "secret.ctx" in str(e.value) and "restore the key file" in str(e.value)
    entry = keyholder.audit.entries()[-1]
    assert entry["event"] == "decrypt" and entry["decision"] == "refused"
    assert "secret.ctx" in entry["reason"]
