"""The decryption policy's bounds and wording, and job declarations read back from JSON
(mutation testing of fedhe/keyholder/policy.py)."""

import re

import pytest

from fedhe.config import ConfigError
from fedhe.errors import PolicyError, ProtocolError
from fedhe.keyholder.policy import (
    DecryptionPolicy,
    DecryptionRequest,
    JobDeclaration,
    OutputSpec,
)
from tests.conftest import SMALL_PARAMS


def test_a_floor_of_one_party_is_allowed_and_zero_is_refused_with_the_fix():
    assert DecryptionPolicy(min_parties_floor=1).min_parties_floor == 1
    message = (
        "min_parties_floor must be ≥ 1, got 0: a key holder releases nothing below one party; "
        "start it with a floor of 1 or more (default 2)."
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        DecryptionPolicy(min_parties_floor=0)


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({}, "job 'j' declares no output: nothing may be decrypted."),
        (
            {"sum": OutputSpec(1), "model": OutputSpec(0), "gram": OutputSpec(-1)},
            "job 'j' declares outputs without budget: {'model': 0, 'gram': -1}.",
        ),
    ],
    ids=["no-output", "no-budget"],
)
def test_declarations_without_a_release_are_refused_by_name(outputs, message):
    with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
        DecryptionPolicy().check_declaration(JobDeclaration("j", "aggregate", outputs, 2, None))


def test_a_round_outside_the_budget_names_the_rounds_allowed():
    job = JobDeclaration("j", "aggregate", {"sum": OutputSpec(3)}, 2, None)
    request = DecryptionRequest("j", "sum", ("a", "b"), b"", 3)
    message = "round 3 of 'sum' is outside its budget of 3 releases (rounds 0-2)."
    with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
        DecryptionPolicy().check_request(job, request)


def test_a_declaration_read_back_without_optional_fields_takes_their_defaults():
    data = {
        "job_id": "j",
        "task": "aggregate",
        "outputs": {"sum": {"budget": 2}},
        "min_parties": 3,
    }
    job = JobDeclaration.from_dict(data)
    assert job == JobDeclaration("j", "aggregate", {"sum": OutputSpec(2, -1, None)}, 3, None, {})
    assert job.outputs["sum"].count_index == -1 and job.meta == {} and job.params is None
    encrypted = JobDeclaration("j", "aggregate", {"sum": OutputSpec(2, 5, 6)}, 3, SMALL_PARAMS)
    assert JobDeclaration.from_dict(encrypted.to_dict()) == encrypted
    assert JobDeclaration.from_dict(job.to_dict()) == job and job.to_dict()["params"] is None


def test_a_malformed_declaration_is_refused_naming_the_defect():
    with pytest.raises(ProtocolError, match=r"^malformed job declaration: KeyError\('task'\)$"):
        JobDeclaration.from_dict({"job_id": "j"})
