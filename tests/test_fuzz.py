"""Fuzzing every deserializer, the message handlers and the decryption policy.

Each property counts the inputs it tried and how they ended; every input must end in a `fedhe`
error (or be accepted when it is valid), never another exception, and the handler must keep
serving.
"""

import contextlib
import json
from collections import Counter

import numpy as np
import pytest
from flwr.app import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedhe import protocol
from fedhe.crypto import PublicContext, encrypt, load_tensor
from fedhe.errors import FedHEError, PolicyError
from fedhe.keyholder import DecryptionRequest, JobDeclaration, KeyHolder, OutputSpec
from fedhe.keyholder.inprocess import TaggedParties
from tests.conftest import SMALL_PARAMS
from tests.inprocess import InProcessGrid, assign_roles

TRIED: Counter = Counter()
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


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


mutations = dict(
    flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 7)), max_size=4),
    cut=st.none() | st.integers(0, 2**31),
    tail=st.binary(max_size=8),
)


@FUZZ
@given(**mutations)
def test_tensor_loader_only_raises_fedhe_errors(public, valid, flips, cut, tail):
    TRIED["tensor"] += 1
    data = _mutate(valid, flips, cut, tail)
    try:
        tensor = load_tensor(data, public)
    except FedHEError:
        TRIED["tensor-refused"] += 1
        return
    TRIED["tensor-loaded"] += 1
    assert data == valid  # anything else that loads would be silent corruption
    assert tensor.shape == (SMALL_PARAMS.slots + 3,)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_never_load_as_anything(public, data):
    TRIED["random"] += 1
    for load in (
        lambda d: load_tensor(d, public),
        lambda d: load_tensor(d, None),
        PublicContext.from_bytes,
    ):
        with pytest.raises(FedHEError):
            load(data)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(**mutations)
def test_context_loader_only_raises_fedhe_errors(public, flips, cut, tail):
    TRIED["context"] += 1
    good = public.to_bytes()
    data = _mutate(good, flips, cut, tail)
    try:
        loaded = PublicContext.from_bytes(data)
    except FedHEError:
        TRIED["context-refused"] += 1
        return
    TRIED["context-loaded"] += 1
    assert loaded.fingerprint == public.fingerprint  # a flip that loads must be harmless


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@FUZZ
@given(
    data=st.dictionaries(
        st.sampled_from(["job_id", "task", "outputs", "min_parties", "params", "meta"]), json_values
    )
)
def test_job_declarations_parse_or_raise_a_fedhe_error(data):
    TRIED["declaration"] += 1
    with contextlib.suppress(FedHEError):  # anything else escaping fails the test
        JobDeclaration.from_dict(data)


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


@pytest.fixture(scope="module")
def grid():
    return assign_roles(InProcessGrid(2), keyholder=1)


@FUZZ
@given(
    message_type=st.sampled_from(HANDLERS),
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
    ),
    payload=st.dictionaries(
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
def test_handlers_answer_garbage_with_a_fedhe_error_and_keep_serving(
    grid, message_type, node, config, payload
):
    TRIED["message"] += 1
    try:
        content = protocol.content(config=config, payload=payload)
    except FedHEError:
        return  # the sender's own guard refused bytes that look like a (broken) context
    message = Message(content, dst_node_id=node, message_type=message_type)
    (reply,) = grid.send_and_receive([message])
    if message_type == protocol.AUDIT and node == 1001 and config.get("job-id", "") != "":
        assert not reply.has_error()  # reading the audit log of a named job is a valid request
        return
    assert reply.has_error()
    assert reply.error.reason.split(":")[0] in {
        "ProtocolError",
        "PolicyError",
        "DataError",
        "ParameterError",
        "InvalidCiphertextError",
        "ContextMismatchError",
        "SecretKeyLeakError",
        "ShapeError",
        "ValueRangeError",
    }, reply.error.reason
    # still serving: a valid audit request to the key holder works
    audit = Message(
        protocol.content(config={"job-id": "none"}), dst_node_id=1001, message_type=protocol.AUDIT
    )
    (answer,) = grid.send_and_receive([audit])
    assert not answer.has_error()


POLICY_PARTIES = "abcdef"
DECLARED = {"sum": OutputSpec(2), "model": OutputSpec(1)}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    max_refusals=st.integers(1, 20),
    requests=st.lists(
        st.tuples(
            st.sampled_from(["sum", "sum", "model", "gram"]),
            # a few party lists (the same sum again, in another order: a replay), or any
            st.sampled_from(["abc", "cab", "abd", "bcde", "abcdef", "ab", "aab"]).map(list)
            | st.lists(st.sampled_from(POLICY_PARTIES), max_size=6),
            st.sampled_from([0, 0, 1, 1, 2, -1]),  # the round label
            st.sampled_from(["tagged", "tagged", "untagged", "forged"]),
            st.booleans(),  # True: decrypt_sum (tags checked), False: decrypt_unverified
            st.none() | st.integers(0, 9),  # ask an earlier request again (a retry)
        ),
        min_size=1,
        max_size=10,
    ),
)
def test_policy_never_decrypts_outside_the_declaration(tmp_path_factory, max_refusals, requests):
    """Against a model of the rules: declared output, enough distinct parties, a round label in
    the budget, each label released once (the same ciphertext replayed, another refused), tags
    that prove the sum for `decrypt_sum`, and a job stopped after `max_refusals` refusals."""
    TRIED["policy"] += len(requests)
    keyholder = KeyHolder(
        tmp_path_factory.mktemp("kh"), flooding_bits=None, max_refusals=max_refusals
    )
    keyholder.declare_job(JobDeclaration("fuzz", "aggregate", DECLARED, 3, SMALL_PARAMS))
    parties = TaggedParties(keyholder, "fuzz", POLICY_PARTIES)
    shares = {name: encrypt(parties.public, np.ones(3)) for name in POLICY_PARTIES}
    extra = encrypt(parties.public, np.ones(3))  # what a forged sum adds
    released: dict[tuple[str, int], tuple[frozenset[str], bool]] = {}  # label → its content
    values: dict[tuple[str, int], np.ndarray] = {}
    refusals, expected_decisions = 0, []
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
            "fuzz",
            output,
            tuple(names),
            tensor.to_bytes(),
            round_,
            parties.tags(output, tags, round_),
        )
        label, content = (output, round_), (distinct, forged)
        stopped = refusals >= max_refusals
        allowed = (
            not stopped
            and output in DECLARED
            and len(distinct) == len(names) >= 3
            and 0 <= round_ < DECLARED[output].budget
            and (
                released[label] == content  # replay
                if label in released
                else not verify or kind == "tagged"
            )
        )
        decrypt = keyholder.decrypt_sum if verify else keyholder.decrypt_unverified
        try:
            got = decrypt(request).values
        except PolicyError:
            assert not allowed, (request.output_kind, names, round_, kind, verify, refusals)
            expected_decisions.append("refused")
            refusals += 0 if stopped else 1
            continue
        assert allowed, (output, names, round_, kind, verify, released)
        if label in released:
            np.testing.assert_array_equal(got, values[label])  # no fresh decryption
            expected_decisions.append("replayed")
        else:
            released[label], values[label] = content, got
            np.testing.assert_allclose(got, len(distinct) + forged, atol=1e-3)
            expected_decisions.append("decrypted")
    decisions = [e["decision"] for e in keyholder.audit.entries() if e["event"] == "decrypt"]
    assert decisions == expected_decisions


def test_the_properties_try_their_inputs_and_reach_every_outcome(public, valid):
    """Runs the cheap properties above here, so that the count depends on no other test having
    run first (nor on their order): each tries its full number of examples, and the mutations
    reach both outcomes (a corrupted input refused, the intact one loaded)."""
    before = Counter(TRIED)
    test_tensor_loader_only_raises_fedhe_errors(public, valid)
    test_context_loader_only_raises_fedhe_errors(public)
    test_job_declarations_parse_or_raise_a_fedhe_error()
    tried = TRIED - before
    print("fuzz inputs tried:", json.dumps(dict(tried)))
    assert tried["tensor"] >= FUZZ.max_examples and tried["declaration"] >= FUZZ.max_examples
    assert tried["context"] >= 60
    for what in ("tensor", "context"):
        assert tried[f"{what}-refused"] >= 1 and tried[f"{what}-loaded"] >= 1, tried
