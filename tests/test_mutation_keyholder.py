"""Deterministic kills of key-holder mutants that only the policy fuzz test caught by chance."""

import dataclasses
import hashlib
import io
import re

import numpy as np
import pytest

from fedhe.crypto import KeyRequest, PublicContext, encrypt
from fedhe.crypto.channel import fingerprint
from fedhe.crypto.tensor import PlainTensor
from fedhe.errors import ChannelError, PolicyError
from fedhe.keyholder import JobDeclaration, KeyHolder, OutputSpec
from fedhe.keyholder.inprocess import TaggedParties
from fedhe.keyholder.keyholder import _check_count, _SecretKeyOpener
from fedhe.keyholder.policy import DecryptionRequest
from tests.conftest import SMALL_PARAMS

PARTIES = ("a", "b", "c", "d")


@pytest.fixture
def parties(tmp_path):
    keyholder = KeyHolder(tmp_path / "kh", flooding_bits=None)
    job = JobDeclaration("job-r", "aggregate", {"sum": OutputSpec(1)}, 3, SMALL_PARAMS)
    PublicContext.from_bytes(keyholder.declare_job(job))
    return TaggedParties(keyholder, "job-r", PARTIES)


def _shares(parties, names):
    """Party i encrypts 10^i in every slot: each set of parties has its own sum."""
    return {n: encrypt(parties.public, np.full(3, 10.0 ** PARTIES.index(n))) for n in names}


def _decisions(keyholder):
    return [e["decision"] for e in keyholder.audit.entries() if e["event"] == "decrypt"]


def test_a_label_is_replayed_for_its_contributors_sum_and_refused_for_another(parties):
    """The released sum over a, b, c asked again with its contributors in another order is
    replayed (same values, no budget); an honest, tagged sum over a, b, d under that label is
    another ciphertext and is refused, whatever the contributor list says."""
    keyholder = parties.keyholder
    request = parties.request("sum", _shares(parties, "abc"))
    first = keyholder.decrypt_sum(request).values
    np.testing.assert_allclose(first, 111.0, atol=1e-3)
    reordered = dataclasses.replace(request, contributors=("c", "a", "b"))
    np.testing.assert_array_equal(keyholder.decrypt_sum(reordered).values, first)
    assert keyholder.audit.entries()[-1]["parties"] == ["a", "b", "c"]
    other = parties.request("sum", _shares(parties, "abd"))
    with pytest.raises(PolicyError, match="released already, for another ciphertext"):
        keyholder.decrypt_sum(other)
    with pytest.raises(PolicyError, match="released already, for another ciphertext"):
        keyholder.decrypt_unverified(other)
    assert _decisions(keyholder) == ["decrypted", "replayed", "refused", "refused"]


def test_a_replayed_release_is_the_stored_artifact_and_a_pickle_there_is_refused(parties):
    keyholder = parties.keyholder
    request = parties.request("sum", _shares(parties, "abc"))
    first = keyholder.decrypt_sum(request)
    again = keyholder.decrypt_sum(request)
    assert again.artifact == first.artifact and again.record["decision"] == "replayed"
    stored = keyholder._release_path(request)
    pickled = io.BytesIO()  # a tampered release file: an object array, i.e. a pickle
    np.save(pickled, np.array([{"not": "numbers"}], dtype=object), allow_pickle=True)
    stored.write_bytes(pickled.getvalue())
    with pytest.raises(PolicyError, match=r"is damaged .*allow_pickle=False"):
        keyholder.decrypt_sum(request)


def test_a_release_whose_stored_copy_is_gone_is_not_decrypted_again(parties):
    """Mutant `_replay` 18: with the stored release deleted, the key holder decrypted the same
    ciphertext again with fresh flooding noise (averaging such releases strips the noise)."""
    keyholder = parties.keyholder
    request = parties.request("sum", _shares(parties, "abc"))
    keyholder.decrypt_sum(request)
    keyholder._release_path(request).unlink()
    with pytest.raises(PolicyError, match=r"stored release .* is missing: restore it"):
        keyholder.decrypt_sum(request)
    assert _decisions(keyholder) == ["decrypted", "refused"]


def test_a_job_without_registered_parties_says_so(tmp_path):
    keyholder = KeyHolder(tmp_path / "kh", flooding_bits=None)
    keyholder.declare_job(
        JobDeclaration("job-x", "aggregate", {"sum": OutputSpec(1)}, 3, SMALL_PARAMS)
    )
    message = "job 'job-x' has no registered parties: register them first."
    with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
        keyholder.registration("job-x")


def _request_for(parties, output="sum", round_=0):
    return DecryptionRequest(parties.job_id, output, PARTIES[:3], b"", round_)


def test_results_are_sealed_to_each_party_and_answers_to_the_querier_only(tmp_path):
    keyholder = KeyHolder(tmp_path / "kh", flooding_bits=None)
    meta = {"querier": "b"}
    job = JobDeclaration("job-q", "aggregate", {"sum": OutputSpec(2)}, 3, SMALL_PARAMS, meta)
    keyholder.declare_job(job)
    parties = TaggedParties(keyholder, "job-q", PARTIES)
    values = np.array([1.5, -2.0, 3.25])
    request = _request_for(parties, round_=1)
    release = keyholder.release_to_parties(request, values)
    assert sorted(release) == [f"sealed/{name}" for name in PARTIES]
    for name in PARTIES:
        np.testing.assert_array_equal(parties.released(release, "sum", 1, name), values)
        with pytest.raises(ChannelError):  # sealed for this output and round only
            parties.released(release, "sum", 0, name)
    answer = keyholder.release_to_querier(request, values)
    assert list(answer) == ["sealed"]
    np.testing.assert_array_equal(parties.released(answer, "sum", 1, "b"), values)
    with pytest.raises(ChannelError):
        parties.released(answer, "sum", 1, "a")


@pytest.mark.parametrize("querier", [None, "", 3])
def test_answers_of_a_job_without_a_querier_are_refused(tmp_path, querier):
    keyholder = KeyHolder(tmp_path / "kh", flooding_bits=None)
    meta = {} if querier is None else {"querier": querier}
    job = JobDeclaration("job-q", "aggregate", {"sum": OutputSpec(1)}, 3, SMALL_PARAMS, meta)
    keyholder.declare_job(job)
    parties = TaggedParties(keyholder, "job-q", PARTIES)
    message = "job 'job-q' declares no querier for its answers."
    with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
        keyholder.release_to_querier(_request_for(parties), np.zeros(2))


def test_an_inference_job_seals_to_the_parties_of_the_job_it_serves(tmp_path):
    keyholder = KeyHolder(tmp_path / "kh", flooding_bits=None)
    keyholder.declare_job(
        JobDeclaration("train", "aggregate", {"sum": OutputSpec(1)}, 3, SMALL_PARAMS)
    )
    parties = TaggedParties(keyholder, "train", PARTIES)
    for parent in ("train", ""):
        job_id = f"infer-{parent or 'none'}"
        meta = {"parent": parent, "querier": "c"}
        keyholder.declare_job(
            JobDeclaration(job_id, "aggregate", {"votes": OutputSpec(1)}, 3, SMALL_PARAMS, meta)
        )
        request = DecryptionRequest(job_id, "votes", PARTIES[:3], b"")
        if parent:
            answer = keyholder.release_to_querier(request, np.arange(3.0))
            opened = parties.released(answer, "votes", 0, "c", job_id=job_id)
            np.testing.assert_array_equal(opened, np.arange(3.0))
        else:  # no parent: the job's own registration only, which it does not have
            message = f"c is not a registered party of job {job_id!r}."
            with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
                keyholder.release_to_querier(request, np.arange(3.0))
    message = "zed is not a registered party of job 'infer-train'."
    with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
        keyholder.seal_for("infer-train", "zed", b"data", "label")


def test_a_plaintext_twin_releases_in_the_clear_under_the_same_labels_and_budget(tmp_path):
    keyholder = KeyHolder(tmp_path / "kh", flooding_bits=None)
    job = JobDeclaration("twin", "aggregate", {"sum": OutputSpec(1)}, 3, None)
    assert keyholder.declare_job(job) == b""
    parties = TaggedParties(keyholder, "twin", PARTIES)
    shares = {n: PlainTensor(np.full(3, 10.0 ** PARTIES.index(n))) for n in "abc"}
    request = parties.request("sum", shares)
    released = keyholder.decrypt_sum(request)
    np.testing.assert_array_equal(released.values, np.full(3, 111.0))
    assert released.record["decision"] == "plaintext" and released.record["parties"] == [
        "a",
        "b",
        "c",
    ]
    again = keyholder.decrypt_unverified(request)  # the same bytes: the same label, no budget
    np.testing.assert_array_equal(again.values, released.values)
    assert keyholder._ledger("twin").released == {
        "sum": {"0": hashlib.sha256(request.tensor).hexdigest()}
    }
    other = parties.request("sum", {n: PlainTensor(np.ones(3)) for n in "abd"})
    with pytest.raises(PolicyError, match="released already, for another ciphertext"):
        keyholder.decrypt_sum(other)
    with pytest.raises(PolicyError, match="outside its budget"):
        keyholder.decrypt_sum(parties.request("sum", shares, round_=1))
    assert _decisions(keyholder) == ["plaintext", "plaintext", "refused", "refused"]
    values = np.array([0.5, 4.0])
    for release in (
        keyholder.release_to_parties(request, values),
        keyholder.release_to_querier(request, values),
    ):
        assert list(release) == ["values"]
        np.testing.assert_array_equal(np.load(io.BytesIO(release["values"])), values)


def test_releases_are_kept_private_under_the_jobs_released_folder(parties):
    keyholder = parties.keyholder
    request = parties.request("sum", _shares(parties, "abc"))
    keyholder.decrypt_sum(request)
    folder = keyholder.state_dir / "jobs" / "job-r" / "released"
    assert [p.name for p in folder.iterdir()] == ["sum-0.npy"]
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / "sum-0.npy").stat().st_mode & 0o777 == 0o600


def test_a_job_without_a_secret_key_has_nothing_to_open(tmp_path):
    keyholder = KeyHolder(tmp_path / "kh", flooding_bits=None)
    keyholder.declare_job(JobDeclaration("twin", "aggregate", {"sum": OutputSpec(1)}, 3, None))
    request = DecryptionRequest("twin", "sum", PARTIES[:3], b"")
    message = "this job has no secret key on this key holder."
    with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
        _SecretKeyOpener(keyholder).open(None, request)


def test_a_tensor_of_another_size_than_declared_is_refused_by_name(tmp_path):
    keyholder = KeyHolder(tmp_path / "kh", flooding_bits=None)
    job = JobDeclaration("job-s", "aggregate", {"sum": OutputSpec(1, size=4)}, 3, SMALL_PARAMS)
    keyholder.declare_job(job)
    parties = TaggedParties(keyholder, "job-s", PARTIES)
    shares = {n: encrypt(parties.public, np.ones(5)) for n in "abc"}
    message = "'sum' was declared with 4 values, this tensor holds 5."
    with pytest.raises(PolicyError, match=f"{re.escape(message)}$"):
        keyholder.decrypt_sum(parties.request("sum", shares))


@pytest.mark.parametrize(
    ("values", "index", "claimed", "accepted"),
    [
        ([3.0, 0.0], 0, 3, True),  # the count slot may be the first
        ([2.0, 0.0], 0, 3, False),
        ([0.0, 3.49], 1, 3, True),
        ([0.0, 3.5], 1, 3, False),  # half a contribution away: not a count of 3
        ([0.0, 2.5], 1, 3, False),
        ([3.0, 3.0], 2, 3, False),  # a count slot past the end of the tensor
        ([7.0, 7.0], -1, 3, True),  # no count slot
    ],
)
def test_the_count_slot_holds_the_claimed_count_within_half_a_contribution(
    values, index, claimed, accepted
):
    if accepted:
        _check_count(np.array(values), index, claimed)
    else:
        with pytest.raises(PolicyError, match="count slot does not hold the 3 contributions"):
            _check_count(np.array(values), index, claimed)


def _record(keyholder, *fields):
    record = keyholder.audit.entries()[-1]
    return {field: record.get(field) for field in fields}


def test_declaring_a_job_is_audited_with_its_terms_and_keygen_time(tmp_path):
    keyholder = KeyHolder(tmp_path / "kh", flooding_bits=None)
    (tmp_path / "kh" / "jobs" / "job-d").mkdir(parents=True)  # left by an interrupted declaration
    outputs = {"sum": OutputSpec(2), "model": OutputSpec(1)}
    job = JobDeclaration("job-d", "aggregate", outputs, 3, SMALL_PARAMS)
    public = keyholder.declare_job(job, KeyRequest(relin=True))
    held = keyholder.public_context("job-d")
    assert PublicContext.from_bytes(public).fingerprint == held.fingerprint
    assert held.raw.has_relin_keys()
    fields = ("job", "event", "task", "encrypted", "outputs", "min_parties", "decision")
    expected = ("job-d", "declare", "aggregate", True, {"sum": 2, "model": 1}, 3, "declared")
    assert _record(keyholder, *fields) == dict(zip(fields, expected, strict=True))
    keygen_s = keyholder.audit.entries()[-1]["keygen_s"]
    assert 0 < keygen_s < 5 and round(keygen_s, 6) == keygen_s
    assert keyholder.declare_job(job) == public  # declared again: the same keys, none made
    assert keyholder.audit.entries()[-1]["keygen_s"] == 0.0
    twin = JobDeclaration("twin", "aggregate", outputs, 3, None)
    assert keyholder.declare_job(twin) == b"" and keyholder.public_context("twin") is None
    assert _record(keyholder, "job", "encrypted", "decision") == {
        "job": "twin",
        "encrypted": False,
        "decision": "declared",
    }


def test_a_refused_declaration_is_audited_with_its_reason(tmp_path):
    keyholder = KeyHolder(tmp_path / "kh", flooding_bits=None, min_parties_floor=3)
    job = JobDeclaration("job-low", "aggregate", {"sum": OutputSpec(1)}, 2, SMALL_PARAMS)
    with pytest.raises(PolicyError) as refused:
        keyholder.declare_job(job)
    assert keyholder.audit.entries()[-1] == {
        **keyholder.audit.entries()[-1],
        "job": "job-low",
        "event": "declare",
        "decision": "refused",
        "reason": str(refused.value),
    }
    assert set(keyholder.audit.entries()[-1]) == {"time", "job", "event", "decision", "reason"} | {
        "prev",
        "hash",
    }


def test_registration_is_audited_and_a_resumed_job_keeps_its_parties(parties):
    keyholder = parties.keyholder
    registered = [e for e in keyholder.audit.entries() if e["event"] == "register"][-1]
    assert {k: registered[k] for k in ("job", "event", "refused", "decision")} == {
        "job": "job-r",
        "event": "register",
        "refused": {},
        "decision": "registered",
    }
    assert registered["parties"] == {
        name: fingerprint(parties.identities[name].public) for name in PARTIES
    }
    with pytest.raises(PolicyError) as refused:  # other identities for the same job
        TaggedParties(keyholder, "job-r", PARTIES)
    assert str(refused.value).startswith("the job registered other parties, identities or seeds")
    assert _record(keyholder, "job", "event", "decision", "reason") == {
        "job": "job-r",
        "event": "register",
        "decision": "refused",
        "reason": str(refused.value),
    }
    assert set(parties.mac_seeds.values()) == {keyholder.registration("job-r").mac_seed}


def test_a_plaintext_twin_has_nothing_to_register(tmp_path):
    keyholder = KeyHolder(tmp_path / "kh", flooding_bits=None)
    keyholder.declare_job(JobDeclaration("twin", "aggregate", {"sum": OutputSpec(1)}, 3, None))
    message = "job 'twin' is a plaintext twin: it has nothing to tag."
    with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
        keyholder.register_parties("twin", {}, {})
    assert _record(keyholder, "job", "event", "decision", "reason") == {
        "job": "twin",
        "event": "register",
        "decision": "refused",
        "reason": message,
    }


def test_a_release_returns_its_audit_record_and_keeps_a_ledger(parties):
    keyholder = parties.keyholder
    released = keyholder.decrypt_sum(parties.request("sum", _shares(parties, "abc")))
    assert released.record == keyholder.audit.entries()[-1]
    assert released.record["n_parties"] == 3
    assert (keyholder.state_dir / "jobs" / "job-r" / "ledger.json").exists()


def test_a_stopped_job_is_named_in_the_refusal(tmp_path):
    keyholder = KeyHolder(tmp_path / "kh", flooding_bits=None, max_refusals=1)
    job = JobDeclaration("job-r", "aggregate", {"sum": OutputSpec(1)}, 3, SMALL_PARAMS)
    keyholder.declare_job(job)
    parties = TaggedParties(keyholder, "job-r", PARTIES)
    with pytest.raises(PolicyError):
        keyholder.decrypt_sum(parties.request("nothing", _shares(parties, "abc")))
    message = "job 'job-r' was stopped after 1 refused requests; declare a new job."
    with pytest.raises(PolicyError, match=re.escape(message)):
        keyholder.decrypt_sum(parties.request("sum", _shares(parties, "abc")))


def test_fewer_parties_than_the_job_needs_are_refused_by_count(tmp_path):
    keyholder = KeyHolder(tmp_path / "kh", flooding_bits=None)
    job = JobDeclaration("job-r", "aggregate", {"sum": OutputSpec(1)}, 3, SMALL_PARAMS)
    keyholder.declare_job(job)
    message = "2 parties registered, fewer than the job's min_parties=3; refused: {}."
    with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
        TaggedParties(keyholder, "job-r", ("a", "b"))


def test_the_state_folder_is_private_and_holds_the_audit_log(tmp_path):
    keyholder = KeyHolder(tmp_path / "state" / "kh", flooding_bits=None)
    assert keyholder.state_dir.stat().st_mode & 0o777 == 0o700
    assert keyholder.audit.path == tmp_path / "state" / "kh" / "audit.jsonl"


def test_a_job_id_that_could_leave_the_state_folder_is_refused_with_the_rule(tmp_path):
    keyholder = KeyHolder(tmp_path / "kh", flooding_bits=None)
    message = (
        "job id '../x' must be 1-128 letters, digits, '.', '_' or '-', starting with a "
        "letter or digit."
    )
    with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
        keyholder.declare_job(JobDeclaration("../x", "aggregate", {"sum": OutputSpec(1)}, 3, None))
