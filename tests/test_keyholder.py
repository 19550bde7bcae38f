"""The key holder decrypts only under policy, and every decision lands in its audit log."""

import dataclasses
import hashlib
import stat
import zlib

import numpy as np
import pytest
import tenseal as ts
import zstandard

from fedhe.crypto import PublicContext, _seal, _tenseal_proto, encrypt
from fedhe.crypto.framing import frame, unframe
from fedhe.errors import InvalidCiphertextError, PolicyError
from fedhe.keyholder import JobDeclaration, KeyHolder, OutputSpec
from fedhe.keyholder.inprocess import TaggedParties
from tests.conftest import SMALL_PARAMS

PARTIES = ("a", "b", "c")


def _declare(keyholder: KeyHolder, job_id="job-1", *, budget=2, min_parties=3, count_index=-1):
    job = JobDeclaration(
        job_id, "aggregate", {"sum": OutputSpec(budget, count_index)}, min_parties, SMALL_PARAMS
    )
    return PublicContext.from_bytes(keyholder.declare_job(job))


def _job(keyholder: KeyHolder, **terms) -> TaggedParties:
    """A declared job whose parties a, b, c registered with the key holder."""
    _declare(keyholder, **terms)
    return TaggedParties(keyholder, "job-1", PARTIES)


def _contributions(parties, values=None, names=PARTIES):
    """`values` split evenly over the named parties, each share encrypted by its party."""
    values = np.arange(4.0) if values is None else np.asarray(values, dtype=float)
    return {name: encrypt(parties.public, values / len(names)) for name in names}


def _request(parties, names=PARTIES, output="sum", values=None, round_=0):
    """A tagged sum of the named parties' shares of `values`, the release of `round_`."""
    return parties.request(output, _contributions(parties, values, names), round_)


@pytest.fixture
def keyholder(tmp_path):
    return KeyHolder(tmp_path / "kh", flooding_bits=None)


def _last(keyholder):
    return keyholder.audit.entries()[-1]


def _decisions(keyholder):
    return [e["decision"] for e in keyholder.audit.entries() if e["event"] == "decrypt"]


def test_declared_output_over_enough_parties_is_decrypted_and_audited(keyholder):
    parties = _job(keyholder)
    released = keyholder.decrypt_sum(_request(parties))
    np.testing.assert_allclose(released.values, np.arange(4.0), atol=1e-4)
    entry = _last(keyholder)
    assert entry["decision"] == "decrypted" and entry["parties"] == ["a", "b", "c"]
    assert entry["shape"] == [4] and entry["output"] == "sum" and len(entry["digest"]) == 32
    assert entry["round"] == 0


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda parties: _request(parties, output="gram_matrix"), "did not declare output"),
        (lambda parties: _request(parties, ["a", "b"]), "fewer than the job's min_parties=3"),
        (
            lambda parties: dataclasses.replace(
                _request(parties, ["a", "b"]), contributors=("a", "a", "b")
            ),
            "repeats parties",
        ),
        (
            lambda parties: dataclasses.replace(_request(parties), job_id="job-unknown"),
            "never declared",
        ),
    ],
    ids=["undeclared-output", "too-few-parties", "repeated-party", "unknown-job"],
)
def test_refusals_are_raised_and_audited(keyholder, make, reason):
    parties = _job(keyholder)
    with pytest.raises(PolicyError, match=reason):
        keyholder.decrypt_sum(make(parties))
    entry = _last(keyholder)
    assert entry["decision"] == "refused" and reason in entry["reason"]


def test_budget_is_spent_by_round_labels_then_refused(keyholder):
    """Budget 2: rounds 0 and 1 are released once each; a third round label is out of budget,
    and another ciphertext under a released round is refused."""
    parties = _job(keyholder, budget=2)
    for round_ in range(2):
        keyholder.decrypt_sum(_request(parties, round_=round_))
    with pytest.raises(PolicyError, match=r"round 2 of 'sum' is outside its budget of 2"):
        keyholder.decrypt_sum(_request(parties, round_=2))
    with pytest.raises(PolicyError, match="round 1 was released already, for another ciphertext"):
        keyholder.decrypt_sum(_request(parties, round_=1))  # a new, honestly tagged sum
    assert _decisions(keyholder) == ["decrypted", "decrypted", "refused", "refused"]


def test_budget_survives_a_restart(tmp_path):
    first = KeyHolder(tmp_path / "kh", flooding_bits=None)
    public = _declare(first, budget=1)
    parties = TaggedParties(first, "job-1", PARTIES)
    request = _request(parties)
    released = first.decrypt_sum(request)
    restarted = KeyHolder(tmp_path / "kh", flooding_bits=None)
    assert restarted.public_context("job-1").fingerprint == public.fingerprint
    assert restarted.identity.public == first.identity.public
    with pytest.raises(PolicyError, match="outside its budget of 1"):
        restarted.decrypt_sum(_request(parties, round_=1))
    with pytest.raises(PolicyError, match="released already, for another ciphertext"):
        restarted.decrypt_sum(_request(parties))
    # the released round is remembered with its values: the same ciphertext is replayed
    np.testing.assert_array_equal(restarted.decrypt_sum(request).values, released.values)
    assert _decisions(restarted) == ["decrypted", "refused", "refused", "replayed"]


def test_count_slot_must_match_the_claimed_contributors(keyholder):
    """The aggregator cannot pass one party's count off as a sum over three, and the refusal
    names no decrypted value."""
    parties = _job(keyholder, count_index=3)
    single = {  # only a's count slot holds 1
        "a": encrypt(parties.public, np.array([5.0, 6.0, 7.0, 1.0])),
        "b": encrypt(parties.public, np.zeros(4)),
        "c": encrypt(parties.public, np.zeros(4)),
    }
    with pytest.raises(PolicyError, match="count slot does not hold the 3 contributions") as err:
        keyholder.decrypt_sum(parties.request("sum", single))
    assert not any(v in str(err.value) for v in ("1.0", "1.000", "5", "6", "7"))
    assert _last(keyholder)["decision"] == "refused"
    assert not any(v in _last(keyholder)["reason"] for v in ("1.0", "1.000"))
    summed = {
        "a": encrypt(parties.public, np.array([5.0, 6.0, 7.0, 1.0])),
        "b": encrypt(parties.public, np.array([0.0, 0.0, 0.0, 1.0])),
        "c": encrypt(parties.public, np.array([0.0, 0.0, 0.0, 1.0])),
    }
    released = keyholder.decrypt_sum(parties.request("sum", summed))
    np.testing.assert_allclose(released.values, [5.0, 6.0, 7.0, 3.0], atol=1e-4)


def test_foreign_ciphertext_is_refused_and_audited(keyholder, public):
    parties = _job(keyholder)
    honest = _request(parties)  # tags of an honest sum do not make a foreign tensor load
    foreign = encrypt(public, np.arange(4.0)).to_bytes()  # session key, not the job's
    with pytest.raises(PolicyError, match="another key pair"):
        keyholder.decrypt_sum(dataclasses.replace(honest, tensor=foreign))
    assert _last(keyholder)["decision"] == "refused"


def test_a_sum_is_released_only_with_every_contributors_valid_tag(tmp_path):
    # a refusal budget this test does not reach: it counts tag refusals, not the job's stop
    keyholder = KeyHolder(tmp_path / "kh", flooding_bits=None, max_refusals=99)
    parties = _job(keyholder, budget=4)
    contributions = _contributions(parties)
    honest = parties.request("sum", contributions)
    moved = parties.request("sum", contributions, 1)
    cases = {
        "carries no tag from b": dataclasses.replace(
            honest, tags={k: v for k, v in honest.tags.items() if k != "b"}
        ),
        # a's tag presented as b's: the seal names the party, the round and the output
        "b's tag does not open": dataclasses.replace(
            honest, tags={**honest.tags, "b": honest.tags["a"]}
        ),
        # round 1's tags presented for round 0
        "a's tag does not open": dataclasses.replace(honest, tags=moved.tags),
        # a sum without c's contribution, claimed over a, b, c with their tags
        "not the sum": dataclasses.replace(
            honest, tensor=parties.sum({k: contributions[k] for k in ("a", "b")}).to_bytes()
        ),
        # a's contribution alone, passed off as the sum
        "not the sum of": dataclasses.replace(honest, tensor=contributions["a"].to_bytes()),
    }
    for reason, request in cases.items():
        with pytest.raises(PolicyError, match=reason):
            keyholder.decrypt_sum(request)
    np.testing.assert_allclose(keyholder.decrypt_sum(honest).values, np.arange(4.0), atol=1e-4)
    assert _decisions(keyholder) == ["refused"] * len(cases) + ["decrypted"]


def test_unverified_decryption_takes_no_tags_but_the_same_labels(keyholder):
    """For steps that re-encrypt or seal the result: no tags, but budget and labels hold."""
    parties = _job(keyholder, budget=1)
    untagged = dataclasses.replace(_request(parties), tags={})
    with pytest.raises(PolicyError, match="carries no tag"):
        keyholder.decrypt_sum(untagged)
    released = keyholder.decrypt_unverified(untagged)
    np.testing.assert_allclose(released.values, np.arange(4.0), atol=1e-4)
    with pytest.raises(PolicyError, match="outside its budget of 1"):
        keyholder.decrypt_unverified(dataclasses.replace(untagged, round=1))


def test_refusals_past_the_refusal_budget_stop_the_job(tmp_path):
    keyholder = KeyHolder(tmp_path / "kh", flooding_bits=None, max_refusals=3)
    parties = _job(keyholder, budget=2)
    for _ in range(3):
        with pytest.raises(PolicyError, match="fewer than the job's min_parties"):
            keyholder.decrypt_sum(_request(parties, ["a", "b"]))
    with pytest.raises(PolicyError, match="stopped after 3 refused requests"):
        keyholder.decrypt_sum(_request(parties))  # valid, but the job is stopped
    restarted = KeyHolder(tmp_path / "kh", flooding_bits=None)
    with pytest.raises(PolicyError, match="stopped"):
        restarted.decrypt_unverified(_request(parties))
    assert _decisions(restarted) == ["refused"] * 5


def test_job_below_the_key_holders_floor_is_refused(tmp_path):
    keyholder = KeyHolder(tmp_path, min_parties_floor=3)
    with pytest.raises(PolicyError, match="floor of 3"):
        _declare(keyholder, min_parties=2)
    assert _last(keyholder)["decision"] == "refused" and _last(keyholder)["event"] == "declare"


def test_redeclaring_a_job_with_other_terms_is_refused(keyholder):
    first = _declare(keyholder)
    assert _declare(keyholder).fingerprint == first.fingerprint  # idempotent
    with pytest.raises(PolicyError, match="other terms"):
        _declare(keyholder, budget=99)


def test_secret_key_file_is_private_to_the_key_holder(keyholder):
    parties = _job(keyholder)
    keyholder.decrypt_sum(_request(parties))  # parties.json, ledger.json, released/ too
    job_dir = keyholder.state_dir / "jobs" / "job-1"
    for path in job_dir.rglob("*"):
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert stat.S_IMODE(keyholder.audit.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((keyholder.state_dir / "identity.key").stat().st_mode) == 0o600


def test_job_ids_cannot_escape_the_state_directory(keyholder):
    with pytest.raises(PolicyError, match="job id"):
        _declare(keyholder, job_id="../../etc")


def test_noise_flooding_is_on_by_default_and_bounded(tmp_path):
    keyholder = KeyHolder(tmp_path)
    parties = _job(keyholder)
    values = np.zeros(2000)
    released = keyholder.decrypt_sum(_request(parties, values=values))
    sigma = _last(keyholder)["flooding_sigma"]
    assert sigma == 2.0 ** (keyholder.flooding_bits - SMALL_PARAMS.scale_bits)
    spread = float(np.std(released.values))
    assert 0.8 * sigma < spread < 1.2 * sigma
    np.testing.assert_allclose(released.values, values, atol=6 * sigma + 1e-4)


def _uncompressed(data: bytes, public) -> bytes:
    """The same ciphertexts in another framing: each SEAL blob stored uncompressed (other bytes,
    other digest, the same residues), as another sender's serializer might write them."""
    header, body = unframe(data, magic=b"FHET", version=1, what="t", error=InvalidCiphertextError)
    chunks, offset = [], 0
    for size in header["chunk_bytes"]:
        vector = ts.ckks_vector_from(public.raw, body[offset : offset + size])
        offset += size
        (ct,) = vector.ciphertext()
        blob = _seal._save(ct)
        magic, length, major, minor, mode, reserved, total = _seal._SEAL_HEADER.unpack_from(blob)
        inner = blob[_seal._SEAL_HEADER.size : total]
        if mode == 2:  # zstd
            inner = zstandard.ZstdDecompressor().decompressobj().decompress(inner)
        elif mode == 1:  # zlib
            inner = zlib.decompress(inner)
        raw = _seal._SEAL_HEADER.pack(
            magic, length, major, minor, 0, reserved, _seal._SEAL_HEADER.size + len(inner)
        )
        chunks.append(_tenseal_proto.vector_proto(vector.size(), raw + inner, ct.scale))
    body = b"".join(chunks)
    digest = hashlib.sha256(body).hexdigest()
    sizes = [len(chunk) for chunk in chunks]
    return frame(b"FHET", 1, {**header, "chunk_bytes": sizes, "body_sha256": digest}, body)


def test_an_identical_ciphertext_is_replayed_without_new_noise_or_budget(tmp_path):
    """The same ciphertext asked again, in any framing, gets the same values (flooding on: a
    fresh decryption would let the noise be averaged away); another one is refused."""
    keyholder = KeyHolder(tmp_path / "kh")
    parties = _job(keyholder, budget=1)
    request = _request(parties)
    first = keyholder.decrypt_sum(request)
    again = keyholder.decrypt_sum(request)
    reframed = _uncompressed(request.tensor, parties.public)
    assert reframed != request.tensor and len(reframed) > len(request.tensor)
    third = keyholder.decrypt_sum(dataclasses.replace(request, tensor=reframed))
    np.testing.assert_array_equal(first.values, again.values)
    np.testing.assert_array_equal(first.values, third.values)
    assert _decisions(keyholder) == ["decrypted", "replayed", "replayed"]
    with pytest.raises(PolicyError, match="released already, for another ciphertext"):
        keyholder.decrypt_sum(_request(parties))  # a new ciphertext: budget holds
    assert _decisions(keyholder)[-1] == "refused"


def _task_keyholder(tmp_path):
    from fedhe.tasks import check_declaration

    return KeyHolder(tmp_path / "kh-tasks", declaration_check=check_declaration)


def test_an_output_foreign_to_the_task_is_refused_and_audited(tmp_path):
    """An aggregator may not declare linreg's masked statistics under FedAvg's raw release."""
    from fedhe.tasks import aggregate, linreg, moments

    keyholder = _task_keyholder(tmp_path)
    job = aggregate.declare(
        "smuggle",
        outputs={
            moments.OUTPUT: (1, moments.layout(11)),
            linreg.MASKED_OUTPUT: (1, linreg.statistics_layout(10)),
        },
        min_parties=2,
        task="aggregate",
    )
    with pytest.raises(PolicyError, match="may not declare"):
        keyholder.declare_job(job)
    assert _last(keyholder)["decision"] == "refused"


def test_regression_output_sizes_must_fit_one_number_of_features(tmp_path):
    """Declaring the masked statistics' size under the raw gradient kind is refused."""
    from fedhe.tasks import aggregate, linreg, moments

    keyholder = _task_keyholder(tmp_path)
    stats = linreg.statistics_layout(10)
    job = aggregate.declare(
        "resize",
        outputs={moments.OUTPUT: (1, moments.layout(11)), linreg.GRADIENT_OUTPUT: (5, stats)},
        min_parties=2,
        task="linreg",
    )
    with pytest.raises(PolicyError, match="do not fit a linreg job over 10 features"):
        keyholder.declare_job(job)
    fine = aggregate.declare(
        "fine",
        outputs={moments.OUTPUT: (1, moments.layout(11)), linreg.MASKED_OUTPUT: (1, stats)},
        min_parties=2,
        task="linreg",
    )
    assert keyholder.declare_job(fine)


def test_unknown_tasks_are_refused(tmp_path):
    keyholder = _task_keyholder(tmp_path)
    job = JobDeclaration("x", "mlp-v9", {"votes": OutputSpec(1)}, 2, SMALL_PARAMS)
    with pytest.raises(PolicyError, match="unknown to this key holder"):
        keyholder.declare_job(job)


def test_a_passphrase_seals_the_secret_keys_at_rest(tmp_path):
    from fedhe.crypto.context import SecretContext
    from fedhe.errors import FedHEError

    job = JobDeclaration("sealed", "aggregate", {"update_sum": OutputSpec(1)}, 2, SMALL_PARAMS)
    public = KeyHolder(tmp_path, passphrase=b"correct horse").declare_job(job)
    stored = (tmp_path / "jobs" / "sealed" / "secret.ctx").read_bytes()
    assert stored.startswith(b"FHEK1")
    with pytest.raises(FedHEError):
        SecretContext.from_secret_bytes(stored)  # a copied folder yields no key
    # restart with the passphrase: the same key pair, no new key for the job
    again = KeyHolder(tmp_path, passphrase=b"correct horse")
    assert again.declare_job(job) == public
    with pytest.raises(PolicyError, match="passphrase-protected"):
        KeyHolder(tmp_path).public_context("sealed")
    with pytest.raises(PolicyError, match="wrong passphrase"):
        KeyHolder(tmp_path, passphrase=b"wrong").public_context("sealed")
    for folder in (tmp_path, tmp_path / "jobs", tmp_path / "jobs" / "sealed"):
        assert folder.stat().st_mode & 0o777 == 0o700
