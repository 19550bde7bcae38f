"""Fuzzing every deserializer, the message handlers and the decryption policy.

Every input must end in a `fedhe` error (or be accepted when it is valid), never another
exception, and the handlers must keep serving. Each property is one function that runs one input
and names its outcome; the last test drives them all with a fixed seed and checks that the
strategies reach every outcome (accepted and each kind of refusal), so a strategy that stops
reaching a path shows.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedhe import protocol
from fedhe.crypto import PublicContext, encrypt, load_tensor
from fedhe.errors import FedHEError, PolicyError
from fedhe.keyholder import DecryptionRequest, JobDeclaration, KeyHolder, OutputSpec
from fedhe.keyholder.inprocess import TaggedParties
from tests.conftest import SMALL_PARAMS
from tests.inprocess import InProcessGrid, assign_roles

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
FEW = settings(FUZZ, max_examples=60)  # the properties whose every input costs a key or a job


@pytest.fixture(scope="module")
def valid(public):
    return encrypt(public, np.linspace(-1, 1, SMALL_PARAMS.slots + 3)).to_bytes()


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None, tail: bytes) -> bytes:
    mutated = bytearray(data)
    for position, bit in flips:
        mutated[position % len(mutated)] ^= 1 << bit
    if cut is not None:
        mutated = mutated[: cut % (len(mutated) + 1)]
    return bytes(mutated) + tail


MUTATIONS = dict(
    flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 7)), max_size=4),
    cut=st.none() | st.integers(0, 2**31),
    tail=st.binary(max_size=8),
)


def tensor_case(public, valid, flips, cut, tail) -> str:
    data = _mutate(valid, flips, cut, tail)
    try:
        tensor = load_tensor(data, public)
    except FedHEError:
        return "refused"
    assert data == valid  # anything else that loads would be silent corruption
    assert tensor.shape == (SMALL_PARAMS.slots + 3,)
    return "loaded"


@FUZZ
@given(**MUTATIONS)
def test_tensor_loader_only_raises_fedhe_errors(public, valid, flips, cut, tail):
    tensor_case(public, valid, flips, cut, tail)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_never_load_as_anything(public, data):
    for load in (
        lambda d: load_tensor(d, public),
        lambda d: load_tensor(d, None),
        PublicContext.from_bytes,
    ):
        with pytest.raises(FedHEError):
            load(data)


def context_case(public, flips, cut, tail) -> str:
    data = _mutate(public.to_bytes(), flips, cut, tail)
    try:
        loaded = PublicContext.from_bytes(data)
    except FedHEError:
        return "refused"
    assert loaded.fingerprint == public.fingerprint  # a flip that loads must be harmless
    return "loaded"


@FEW
@given(**MUTATIONS)
def test_context_loader_only_raises_fedhe_errors(public, flips, cut, tail):
    context_case(public, flips, cut, tail)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
# Each field well formed (in or out of range) or any JSON value, or missing.
_FIELDS = {
    "job_id": st.text(max_size=8),
    "task": st.sampled_from(["aggregate", "knn", ""]),
    "outputs": st.dictionaries(
        st.text(max_size=4),
        st.fixed_dictionaries(
            {"budget": st.integers(-1, 3)},
            optional={"count_index": st.integers(-2, 5), "size": st.none() | st.integers(0, 9)},
        ),
        max_size=2,
    ),
    "min_parties": st.integers(-1, 5),
    "params": st.none() | st.just(SMALL_PARAMS.to_dict()),
    "meta": st.dictionaries(st.text(max_size=4), st.integers() | st.text(max_size=4), max_size=2),
}
DECLARATIONS = dict(
    data=st.fixed_dictionaries(
        {}, optional={key: valid | json_values for key, valid in _FIELDS.items()}
    )
)


def declaration_case(data) -> str:
    try:  # anything but a FedHEError escaping fails the test
        declaration = JobDeclaration.from_dict(data)
    except FedHEError:
        return "refused"
    assert JobDeclaration.from_dict(declaration.to_dict()) == declaration  # what is stored
    return "parsed"


@FUZZ
@given(**DECLARATIONS)
def test_job_declarations_parse_or_raise_a_fedhe_error(data):
    declaration_case(data)


HANDLERS = [
    protocol.SETUP,
    protocol.MOMENTS,
    protocol.TRAIN,
    protocol.STATS,
    protocol.GRADIENT,
    protocol.MODEL_STEP,
    protocol.KNN_UPLOAD,
    protocol.KNN_QUERY,
    protocol.KNN_ANSWER,
    protocol.MLP_QUERY,
    protocol.MLP_ANSWER,
    protocol.MODEL_RELEASE,
    protocol.DECLARE,
    protocol.REGISTER,
    protocol.DECRYPT,
    protocol.AUDIT,
]
HANDLER_ERRORS = {
    "ProtocolError",
    "PolicyError",
    "DataError",
    "ParameterError",
    "InvalidCiphertextError",
    "ContextMismatchError",
    "SecretKeyLeakError",
    "ShapeError",
    "ValueRangeError",
}
MESSAGES = dict(
    message_type=st.sampled_from([*HANDLERS, *[protocol.AUDIT] * 4]),  # audits: the valid case
    node=st.sampled_from([1000, 1001]),
    config=st.dictionaries(
        st.sampled_from(
            [
                "job-id",
                "source",
                "party-index",
                "sum-bound",
                "declaration",
                "output",
                "contributors",
                "w",
                "segment",
                "start",
                "stop",
                "query",
                "round",
                "parties",
                "inference-id",
            ]
        ),
        st.text(max_size=6) | st.integers() | st.floats(allow_nan=True),
    )
    | st.fixed_dictionaries({"job-id": st.text(min_size=1, max_size=6)}),
    payload=st.just({})
    | st.dictionaries(
        st.sampled_from(
            [
                "tensor",
                "public-context",
                "contribution",
                "votes",
                "keyholder-identity",
                "envelope",
                "sealed",
                "tag/party-0",
                "identity/party-0",
                "mac-seed/party-0",
            ]
        ),
        st.binary(max_size=64),
    ),
)


@pytest.fixture(scope="module")
def grid():
    return assign_roles(InProcessGrid(2), keyholder=1)


def _records(config: dict[str, Any], payload: dict[str, bytes]) -> RecordDict:
    """A message's records as anyone could build them: without `protocol.content`'s checks,
    which guard our own senders, not a receiver against a hostile one."""
    return RecordDict(
        {protocol.CONFIG: ConfigRecord(config), protocol.PAYLOAD: ConfigRecord(payload)}
    )


def _valid_audit(message_type, node, config, payload) -> bool:
    """Reading the audit log of a named job from the key holder: the one valid request here."""
    named = set(config) == {"job-id"} and config["job-id"] != ""
    return message_type == protocol.AUDIT and node == 1001 and named and not payload


def handler_case(grid, message_type, node, config, payload) -> str:
    """The outcome: "served" (a valid audit request) or the class of the handler's error."""
    message = Message(_records(config, payload), dst_node_id=node, message_type=message_type)
    (reply,) = grid.send_and_receive([message])
    if _valid_audit(message_type, node, config, payload):
        assert not reply.has_error(), reply.error.reason
        return "served"
    assert reply.has_error()
    error = reply.error.reason.split(":")[0]
    assert error in HANDLER_ERRORS, reply.error.reason
    # still serving: a valid audit request to the key holder works
    audit = Message(_records({"job-id": "none"}, {}), dst_node_id=1001, message_type=protocol.AUDIT)
    (answer,) = grid.send_and_receive([audit])
    assert not answer.has_error()
    return error


@FUZZ
@given(**MESSAGES)
def test_handlers_answer_garbage_with_a_fedhe_error_and_keep_serving(
    grid, message_type, node, config, payload
):
    handler_case(grid, message_type, node, config, payload)


POLICY_PARTIES = "abcdef"
DECLARED = {"sum": OutputSpec(2), "model": OutputSpec(1)}
VALID_PARTIES = ["abc", "cab", "abd", "bcde", "abcdef"]  # "cab": the sum of "abc" again
POLICY_INPUTS = dict(
    max_refusals=st.integers(1, 20),
    requests=st.lists(
        st.tuples(
            st.sampled_from(["sum", "sum", "sum", "model", "gram"]),
            # mostly lists a release accepts, else too few or repeated parties, or any list
            st.sampled_from(VALID_PARTIES).map(list)
            | st.sampled_from([*VALID_PARTIES, "ab", "aab"]).map(list)
            | st.lists(st.sampled_from(POLICY_PARTIES), max_size=6),
            st.sampled_from([0, 0, 1, 1, 2, -1]),  # the round label
            st.sampled_from(["tagged", "tagged", "tagged", "untagged", "forged"]),
            st.booleans(),  # True: decrypt_sum (tags checked), False: decrypt_unverified
            st.none() | st.integers(0, 9),  # ask an earlier request again (a retry)
        ),
        min_size=1,
        max_size=10,
    ),
)
# Why the model refuses a request, and what the key holder's refusal must then say.
REFUSALS = {
    "stopped": "was stopped after",
    "undeclared": "did not declare output",
    "repeated": "repeats parties",
    "too-few": "fewer than the job's min_parties",
    "out-of-budget": "outside its budget",
    "relabelled": "released already, for another ciphertext",
    "untagged": "carries no tag",
    "forged": "not the sum of the contributions",
}


def _refusal(stopped, output, names, round_, kind, verify, earlier) -> str | None:
    """The model of the rules, in the key holder's order: why a request is refused (a key of
    REFUSALS), or None. `earlier`: what was released under the request's label, if anything."""
    distinct = frozenset(names)
    checks = [
        ("stopped", stopped),
        ("undeclared", output not in DECLARED),
        ("repeated", len(distinct) != len(names)),
        ("too-few", len(distinct) < 3),
        ("out-of-budget", output in DECLARED and not 0 <= round_ < DECLARED[output].budget),
        ("relabelled", earlier is not None and earlier != (distinct, kind == "forged")),
    ]
    if earlier is None and verify:  # a replay is answered before the tags are checked
        checks += [("untagged", kind == "untagged"), ("forged", kind == "forged")]
    return next((why for why, failed in checks if failed), None)


def policy_case(state_dir, max_refusals, requests) -> list[str]:
    """Against the model: declared output, enough distinct parties, a round label in the budget,
    each label released once (the same ciphertext replayed, another refused), tags that prove
    the sum for `decrypt_sum`, and a job stopped after `max_refusals` refusals. The outcome of
    each request: "decrypted", "replayed" or the model's reason for refusing it."""
    keyholder = KeyHolder(state_dir, flooding_bits=None, max_refusals=max_refusals)
    keyholder.declare_job(JobDeclaration("fuzz", "aggregate", DECLARED, 3, SMALL_PARAMS))
    parties = TaggedParties(keyholder, "fuzz", POLICY_PARTIES)
    shares = {name: encrypt(parties.public, np.ones(3)) for name in POLICY_PARTIES}
    extra = encrypt(parties.public, np.ones(3))  # what a forged sum adds
    released: dict[tuple[str, int], tuple[frozenset[str], bool]] = {}  # label → its content
    values: dict[tuple[str, int], np.ndarray] = {}
    refusals, outcomes = 0, []
    asked: list[tuple[str, list[str], int, str]] = []
    for output, names, round_, kind, verify, again in requests:
        if again is not None and asked:
            output, names, round_, kind = asked[again % len(asked)]
        asked.append((output, names, round_, kind))
        distinct = frozenset(names)
        honest = parties.sum({n: shares[n] for n in distinct}) if distinct else None
        forged = kind == "forged" or honest is None  # no party: the extra ciphertext alone
        tensor = extra if honest is None else honest + extra if forged else honest
        tags = {n: shares[n] for n in distinct} if kind != "untagged" else {}
        request = DecryptionRequest(
            "fuzz", output, tuple(names), tensor.to_bytes(), round_,
            parties.tags(output, tags, round_),
        )  # fmt: skip
        label = (output, round_)
        stopped = refusals >= max_refusals
        why = _refusal(stopped, output, names, round_, kind, verify, released.get(label))
        decrypt = keyholder.decrypt_sum if verify else keyholder.decrypt_unverified
        try:
            got = decrypt(request).values
        except PolicyError as err:
            assert why is not None, (output, names, round_, kind, verify, released, str(err))
            assert re.search(REFUSALS[why], str(err)), (why, str(err))
            outcomes.append(why)
            refusals += 0 if stopped else 1
            continue
        assert why is None, (why, output, names, round_, kind, verify, released)
        if label in released:
            np.testing.assert_array_equal(got, values[label])  # no fresh decryption
            outcomes.append("replayed")
        else:
            released[label], values[label] = (distinct, forged), got
            np.testing.assert_allclose(got, len(distinct) + forged, atol=1e-3)
            outcomes.append("decrypted")
    decisions = [e["decision"] for e in keyholder.audit.entries() if e["event"] == "decrypt"]
    assert decisions == [o if o in ("decrypted", "replayed") else "refused" for o in outcomes]
    return outcomes


@FEW
@given(**POLICY_INPUTS)
def test_policy_never_decrypts_outside_the_declaration(tmp_path_factory, max_refusals, requests):
    policy_case(tmp_path_factory.mktemp("kh"), max_refusals, requests)


def _outcomes(
    case: Callable[..., str | list[str]], inputs: dict[str, Any], how: settings
) -> Counter:
    """Run `case` on `how.max_examples` inputs drawn with a fixed seed; count the outcomes."""
    seen: Counter = Counter()

    @settings(how, derandomize=True, database=None)
    @given(**inputs)
    def run(**drawn: Any) -> None:
        outcome = case(**drawn)
        seen.update([outcome] if isinstance(outcome, str) else outcome)

    run()
    return seen


def _check(seen: Counter, expected: Iterable[str], at_least: int) -> None:
    print("fuzz outcomes:", json.dumps(dict(seen)))
    assert sum(seen.values()) >= at_least, seen
    missing = set(expected) - set(seen)
    assert not missing, f"no input reached {sorted(missing)}: {dict(seen)}"


def test_the_properties_reach_every_outcome(public, valid, grid, tmp_path_factory):
    """With a fixed seed (the same inputs every run, whatever ran before), each property's
    strategy reaches every outcome: mutated bytes both refused and (intact) loaded, declarations
    parsed and refused, a valid request served and garbage refused by the handlers (all with a
    ProtocolError today: the messages' schemas stop it), and every decision of the policy (a
    release, a replay and each reason to refuse)."""
    tensors = _outcomes(functools.partial(tensor_case, public, valid), MUTATIONS, FUZZ)
    _check(tensors, {"loaded", "refused"}, FUZZ.max_examples)
    contexts = _outcomes(functools.partial(context_case, public), MUTATIONS, FEW)
    _check(contexts, {"loaded", "refused"}, FEW.max_examples)
    declarations = _outcomes(declaration_case, DECLARATIONS, FUZZ)
    _check(declarations, {"parsed", "refused"}, FUZZ.max_examples)
    messages = _outcomes(functools.partial(handler_case, grid), MESSAGES, FUZZ)
    _check(messages, {"served", "ProtocolError"}, FUZZ.max_examples)

    def policy(max_refusals, requests):
        return policy_case(tmp_path_factory.mktemp("kh"), max_refusals, requests)

    decisions = _outcomes(policy, POLICY_INPUTS, FEW)
    _check(decisions, {"decrypted", "replayed", *REFUSALS}, FEW.max_examples)
