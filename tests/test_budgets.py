"""The key holder's budgets at their edges: exactly at a budget is allowed, one more is refused.

The budgets (fedhe/keyholder/policy.py, ledger.py): each output releases the round labels
0 … budget-1, once each; a job may be refused `max_refusals` times, the last refusal stops it;
a release covers at least the job's min_parties; a job declares at least the key holder's floor
of parties and a budget of at least 1.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedhe.crypto import encrypt
from fedhe.errors import PolicyError
from fedhe.keyholder import (
    DecryptionPolicy,
    DecryptionRequest,
    JobDeclaration,
    KeyHolder,
    OutputSpec,
)
from fedhe.keyholder.inprocess import TaggedParties
from fedhe.keyholder.ledger import Ledger
from tests.conftest import SMALL_PARAMS

PARTIES = ("a", "b", "c", "d")
VALUES = np.arange(4.0)


def _keyholder(tmp_path, **options) -> KeyHolder:
    return KeyHolder(tmp_path / "kh", flooding_bits=None, **options)


def _job(
    keyholder: KeyHolder, outputs: dict[str, OutputSpec], *, min_parties: int = 3
) -> TaggedParties:
    keyholder.declare_job(JobDeclaration("job", "aggregate", outputs, min_parties, SMALL_PARAMS))
    return TaggedParties(keyholder, "job", PARTIES)


def _request(
    parties: TaggedParties, output: str = "sum", round_: int = 0, names=PARTIES[:3]
) -> DecryptionRequest:
    """A tagged sum of VALUES shared evenly among `names`, as the release of (output, round)."""
    shares = {name: encrypt(parties.public, VALUES / len(names)) for name in names}
    return parties.request(output, shares, round_)


def _decisions(keyholder: KeyHolder) -> list[str]:
    return [e["decision"] for e in keyholder.audit.entries() if e["event"] == "decrypt"]


def _ledger(keyholder: KeyHolder) -> Ledger:
    return Ledger.load(keyholder.state_dir / "jobs" / "job" / "ledger.json")


# -- releases per output ---------------------------------------------------------------------


@pytest.mark.parametrize("budget", [1, 3])
def test_an_output_releases_exactly_its_budget_then_refuses(tmp_path, budget):
    keyholder = _keyholder(tmp_path, max_refusals=99)
    parties = _job(keyholder, {"sum": OutputSpec(budget), "other": OutputSpec(1)})
    for round_ in range(budget):  # the last of them is the budget's edge
        released = keyholder.decrypt_sum(_request(parties, round_=round_))
        np.testing.assert_allclose(released.values, VALUES, atol=1e-4)
    assert _ledger(keyholder).spent("sum") == budget
    with pytest.raises(PolicyError, match=f"round {budget} of 'sum' is outside its budget"):
        keyholder.decrypt_sum(_request(parties, round_=budget))
    with pytest.raises(PolicyError, match="round -1 of 'sum' is outside its budget"):
        keyholder.decrypt_sum(_request(parties, round_=-1))
    # another output's budget is its own: the spent one takes nothing from it
    released = keyholder.decrypt_sum(_request(parties, "other"))
    np.testing.assert_allclose(released.values, VALUES, atol=1e-4)
    assert _decisions(keyholder) == ["decrypted"] * budget + ["refused"] * 2 + ["decrypted"]
    assert _ledger(keyholder).spent("sum") == budget


@pytest.mark.parametrize("budget", [1, 2, 5])
def test_the_policy_admits_rounds_zero_to_budget_minus_one(budget):
    job = JobDeclaration("job", "aggregate", {"sum": OutputSpec(budget)}, 2, None)
    policy = DecryptionPolicy()
    for round_ in (0, budget - 1):
        assert policy.check_request(job, _plain_request(round_)) == job.outputs["sum"]
    for round_ in (-1, budget):
        with pytest.raises(PolicyError, match=f"outside its budget of {budget} releases"):
            policy.check_request(job, _plain_request(round_))


def _plain_request(round_: int, contributors: tuple[str, ...] = ("a", "b")) -> DecryptionRequest:
    return DecryptionRequest("job", "sum", contributors, b"", round_)


def test_a_declared_budget_of_one_is_accepted_and_zero_refused():
    policy = DecryptionPolicy()
    policy.check_declaration(JobDeclaration("job", "aggregate", {"sum": OutputSpec(1)}, 2, None))
    with pytest.raises(PolicyError, match=r"outputs without budget: \{'sum': 0\}"):
        policy.check_declaration(
            JobDeclaration("job", "aggregate", {"sum": OutputSpec(0)}, 2, None)
        )


# -- refused requests per job ----------------------------------------------------------------


@pytest.mark.parametrize("max_refusals", [1, 3])
def test_a_job_stays_open_until_its_last_refusal_then_stops(tmp_path, max_refusals):
    keyholder = _keyholder(tmp_path, max_refusals=max_refusals)
    parties = _job(keyholder, {"sum": OutputSpec(2)})
    too_few = _request(parties, names=PARTIES[:2])
    for _ in range(max_refusals - 1):
        with pytest.raises(PolicyError, match="fewer than the job's min_parties"):
            keyholder.decrypt_sum(too_few)
    # one refusal short of the budget: a valid request is still served
    first = _request(parties, round_=0)
    np.testing.assert_allclose(keyholder.decrypt_sum(first).values, VALUES, atol=1e-4)
    assert not _ledger(keyholder).stopped
    with pytest.raises(PolicyError, match="fewer than the job's min_parties"):
        keyholder.decrypt_sum(too_few)  # the refusal that spends the budget
    assert _ledger(keyholder).stopped and _ledger(keyholder).refusals == max_refusals
    stopped = f"stopped after {max_refusals} refused requests"
    with pytest.raises(PolicyError, match=stopped):
        keyholder.decrypt_sum(_request(parties, round_=1))  # valid, in budget, and too late
    with pytest.raises(PolicyError, match=stopped):
        keyholder.decrypt_sum(first)  # not even a replay of what was released
    assert _ledger(keyholder).refusals == max_refusals  # refusals of a stopped job add nothing
    expected = ["refused"] * (max_refusals - 1) + ["decrypted"] + ["refused"] * 3
    assert _decisions(keyholder) == expected


def test_the_ledger_stops_at_exactly_max_refusals_and_remembers(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    for _ in range(2):
        ledger.record_refusal(max_refusals=3)
        ledger.check_open("job")
    ledger.record_refusal(max_refusals=3)
    with pytest.raises(PolicyError, match="stopped after 3 refused requests"):
        ledger.check_open("job")
    reloaded = Ledger.load(tmp_path / "ledger.json")
    assert reloaded.stopped and reloaded.refusals == 3


# -- parties per release and per job ---------------------------------------------------------


@pytest.mark.parametrize("min_parties", [2, 3])
def test_a_release_covers_exactly_min_parties_or_is_refused(tmp_path, min_parties):
    keyholder = _keyholder(tmp_path, max_refusals=99)
    parties = _job(keyholder, {"sum": OutputSpec(1)}, min_parties=min_parties)
    below = _request(parties, names=PARTIES[: min_parties - 1])
    with pytest.raises(PolicyError, match=f"covers {min_parties - 1} parties, fewer than"):
        keyholder.decrypt_sum(below)
    at = _request(parties, names=PARTIES[:min_parties])
    np.testing.assert_allclose(keyholder.decrypt_sum(at).values, VALUES, atol=1e-4)
    assert _decisions(keyholder) == ["refused", "decrypted"]


@pytest.mark.parametrize("floor", [2, 4])
def test_a_job_may_declare_the_key_holders_floor_but_not_one_party_less(tmp_path, floor):
    keyholder = _keyholder(tmp_path, min_parties_floor=floor)
    outputs = {"sum": OutputSpec(1)}
    keyholder.declare_job(JobDeclaration("at-floor", "aggregate", outputs, floor, None))
    with pytest.raises(PolicyError, match=f"min_parties={floor - 1}, below this key holder's"):
        keyholder.declare_job(JobDeclaration("below", "aggregate", outputs, floor - 1, None))
    declared = [e["decision"] for e in keyholder.audit.entries() if e["event"] == "declare"]
    assert declared == ["declared", "refused"]
