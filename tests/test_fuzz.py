"""Fuzzing every deserializer, the message handlers and the decryption policy.

Each property counts the inputs it tried; every input must end in a `fedhe` error (or be
accepted when it is valid), never another exception, and the handler must keep serving.
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
from tests.conftest import SMALL_PARAMS
from tests.inprocess import InProcessGrid

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
        return
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
        return
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
    protocol.DECLARE,
    protocol.DECRYPT,
    protocol.AUDIT,
]


@pytest.fixture(scope="module")
def grid():
    grid = InProcessGrid(2)
    whoami = [
        Message(
            protocol.content(config={"keyholder-partition-id": 1}),
            dst_node_id=node,
            message_type=protocol.WHOAMI,
        )
        for node in (1000, 1001)
    ]
    grid.send_and_receive(whoami)
    return grid


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
            ]
        ),
        st.text(max_size=6) | st.integers() | st.floats(allow_nan=True),
    ),
    payload=st.dictionaries(
        st.sampled_from(["tensor", "public-context", "contribution", "votes"]),
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
    if message_type == protocol.AUDIT and node == 1001:
        assert not reply.has_error()  # reading the audit log of any job id is a valid request
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


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    requests=st.lists(
        st.tuples(
            st.sampled_from(["sum", "gram", "model"]),
            st.lists(st.sampled_from("abcdef"), max_size=6),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_policy_never_decrypts_outside_the_declaration(tmp_path_factory, requests):
    TRIED["policy"] += len(requests)
    keyholder = KeyHolder(tmp_path_factory.mktemp("kh"), flooding_bits=None)
    job = JobDeclaration(
        "fuzz", "aggregate", {"sum": OutputSpec(2), "model": OutputSpec(1)}, 3, SMALL_PARAMS
    )
    public = PublicContext.from_bytes(keyholder.declare_job(job))
    tensor = encrypt(public, np.ones(3)).to_bytes()
    spent, released = Counter(), set()
    for output, parties in requests:
        replay = (output, tuple(sorted(parties))) in released  # same request again: same values
        allowed = replay or (
            output in job.outputs
            and len(set(parties)) == len(parties) >= 3
            and spent[output] < job.outputs[output].budget
        )
        try:
            keyholder.decrypt(DecryptionRequest("fuzz", output, tuple(parties), tensor))
            decrypted = True
        except PolicyError:
            decrypted = False
        assert decrypted == allowed, (output, parties, dict(spent))
        if decrypted and not replay:
            spent[output] += 1
            released.add((output, tuple(sorted(parties))))
    decisions = [e["decision"] for e in keyholder.audit.entries() if e["event"] == "decrypt"]
    assert len(decisions) == len(requests)


def test_zz_report_inputs_tried():
    """Runs last in this module: how many inputs the properties above tried."""
    print("fuzz inputs tried:", json.dumps(dict(TRIED)))
    assert sum(TRIED.values()) >= 500
