"""The key holder decrypts only under policy, and every decision lands in its audit log."""

import stat

import numpy as np
import pytest

from fedhe.crypto import PublicContext, encrypt
from fedhe.errors import PolicyError
from fedhe.keyholder import DecryptionRequest, JobDeclaration, KeyHolder, OutputSpec
from tests.conftest import SMALL_PARAMS


def _declare(keyholder: KeyHolder, job_id="job-1", *, budget=2, min_parties=3, count_index=-1):
    job = JobDeclaration(
        job_id, "aggregate", {"sum": OutputSpec(budget, count_index)}, min_parties, SMALL_PARAMS
    )
    return PublicContext.from_bytes(keyholder.declare_job(job))


def _request(public, parties, output="sum", job_id="job-1", values=None):
    values = np.arange(4.0) if values is None else values
    return DecryptionRequest(job_id, output, tuple(parties), encrypt(public, values).to_bytes())


@pytest.fixture
def keyholder(tmp_path):
    return KeyHolder(tmp_path / "kh", flooding_bits=None)


def _last(keyholder):
    return keyholder.audit.entries()[-1]


def test_declared_output_over_enough_parties_is_decrypted_and_audited(keyholder):
    public = _declare(keyholder)
    released = keyholder.decrypt(_request(public, ["a", "b", "c"]))
    np.testing.assert_allclose(released.values, np.arange(4.0), atol=1e-4)
    entry = _last(keyholder)
    assert entry["decision"] == "decrypted" and entry["parties"] == ["a", "b", "c"]
    assert entry["shape"] == [4] and entry["output"] == "sum" and len(entry["digest"]) == 32


@pytest.mark.parametrize(
    "make, reason",
    [
        (
            lambda pub: _request(pub, ["a", "b", "c"], output="gram_matrix"),
            "did not declare output",
        ),
        (lambda pub: _request(pub, ["a", "b"]), "fewer than the job's min_parties=3"),
        (lambda pub: _request(pub, ["a", "a", "b"]), "repeats parties"),
        (lambda pub: _request(pub, ["a", "b", "c"], job_id="job-unknown"), "never declared"),
    ],
    ids=["undeclared-output", "too-few-parties", "repeated-party", "unknown-job"],
)
def test_refusals_are_raised_and_audited(keyholder, make, reason):
    public = _declare(keyholder)
    with pytest.raises(PolicyError, match=reason):
        keyholder.decrypt(make(public))
    entry = _last(keyholder)
    assert entry["decision"] == "refused" and reason in entry["reason"]


def test_budget_is_spent_then_refused(keyholder):
    public = _declare(keyholder, budget=2)
    for _ in range(2):
        keyholder.decrypt(_request(public, ["a", "b", "c"]))
    with pytest.raises(PolicyError, match="budget of 2"):
        keyholder.decrypt(_request(public, ["a", "b", "c"]))
    decisions = [e["decision"] for e in keyholder.audit.entries() if e["event"] == "decrypt"]
    assert decisions == ["decrypted", "decrypted", "refused"]


def test_budget_survives_a_restart(tmp_path):
    first = KeyHolder(tmp_path / "kh", flooding_bits=None)
    public = _declare(first, budget=1)
    first.decrypt(_request(public, ["a", "b", "c"]))
    restarted = KeyHolder(tmp_path / "kh", flooding_bits=None)
    assert restarted.public_context("job-1").fingerprint == public.fingerprint
    with pytest.raises(PolicyError, match="spent"):
        restarted.decrypt(_request(public, ["a", "b", "c"]))


def test_count_slot_must_match_the_claimed_contributors(keyholder):
    """The aggregator cannot pass one party's ciphertext off as a sum over three."""
    public = _declare(keyholder, count_index=3)
    single = np.array([5.0, 6.0, 7.0, 1.0])  # one contributor's count slot holds 1
    with pytest.raises(PolicyError, match=r"holds 1\.000 contributions, the aggregator claims 3"):
        keyholder.decrypt(_request(public, ["a", "b", "c"], values=single))
    assert _last(keyholder)["decision"] == "refused"
    summed = np.array([5.0, 6.0, 7.0, 3.0])
    keyholder.decrypt(_request(public, ["a", "b", "c"], values=summed))


def test_foreign_ciphertext_is_refused_and_audited(keyholder, public):
    _declare(keyholder)
    with pytest.raises(PolicyError, match="another key pair"):
        keyholder.decrypt(_request(public, ["a", "b", "c"]))  # session key, not the job's
    assert _last(keyholder)["decision"] == "refused"


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
    _declare(keyholder)
    for path in (keyholder.state_dir / "jobs" / "job-1").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(keyholder.audit.path.stat().st_mode) == 0o600


def test_job_ids_cannot_escape_the_state_directory(keyholder):
    with pytest.raises(PolicyError, match="job id"):
        _declare(keyholder, job_id="../../etc")


def test_noise_flooding_is_on_by_default_and_bounded(tmp_path):
    keyholder = KeyHolder(tmp_path)
    public = _declare(keyholder)
    values = np.zeros(2000)
    released = keyholder.decrypt(_request(public, ["a", "b", "c"], values=values))
    sigma = _last(keyholder)["flooding_sigma"]
    assert sigma == 2.0 ** (keyholder.flooding_bits - SMALL_PARAMS.scale_bits)
    spread = float(np.std(released.values))
    assert 0.8 * sigma < spread < 1.2 * sigma
    np.testing.assert_allclose(released.values, values, atol=6 * sigma + 1e-4)


def test_an_identical_request_is_replayed_without_spending_budget(keyholder):
    public = _declare(keyholder, budget=1)
    request = _request(public, ["a", "b", "c"])
    first = keyholder.decrypt(request)
    again = keyholder.decrypt(request)
    np.testing.assert_array_equal(first.values, again.values)
    decisions = [e["decision"] for e in keyholder.audit.entries() if e["event"] == "decrypt"]
    assert decisions == ["decrypted", "replayed"]
    with pytest.raises(PolicyError, match="spent"):
        keyholder.decrypt(_request(public, ["a", "b", "c"]))  # a new ciphertext: budget holds


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
