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
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedhe import protocol, refusals
from fedhe.crypto import PublicContext, encrypt, load_tensor
from fedhe.crypto.tensor import COMPLEX, PACKINGS
from fedhe.data.sources import DataSource
from fedhe.errors import FedHEError, PolicyError
from fedhe.keyholder import DecryptionRequest, JobDeclaration, KeyHolder, OutputSpec
from fedhe.keyholder.inprocess import TaggedParties
from fedhe.learning import ModelSpec, build_model, get_weights
from fedhe.messages import GROUP_STEPS, SCHEMAS, Kind
from fedhe.tasks import aggregate, encrypted_model, knn, linreg, logreg, mlp, moments
from fedhe.tasks.moments import Standardizer
from tests.conftest import SMALL_PARAMS
from tests.inprocess import InProcessGrid, assign_roles

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same inputs every run
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
FEW = settings(FUZZ, max_examples=60)  # the properties whose every input costs a key or a job
HANDLED = settings(FUZZ, max_examples=300)  # requests over 23 schemas, each to a live node


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


# -- the handlers --------------------------------------------------------------------------------
#
# Each test builds its own world: a key holder (node 1002) that declared job "fuzz" (an aggregate
# job on small CKKS parameters), and two parties (1000, 1001) set up and registered for it, each
# holding a tagged contribution to its feature moments. A fuzzed request is built to a request
# schema of `fedhe.messages.SCHEMAS` (its config and payload keys, patterns instantiated): from a
# template valid in that world, or key by key, then edited; its values are valid in the world,
# of the right type but wrong, or garbage. A share goes off its schema. Bytes of the world (a
# public context, a tensor, a sealed tag) are named by a `Ref` and read when the request is sent.

PARTY_NODES = (1000, 1001)
KEYHOLDER_NODE = 1002
PARTIES = ("party-0", "party-1")
MEMBERS = ("kh-0", "kh-1")
KEYHOLDER_TYPES = {
    protocol.DECLARE,
    protocol.REGISTER,
    protocol.DECRYPT,
    protocol.AUDIT,
    protocol.GROUP,
}
IRIS = DataSource("iris", n_parties=2)  # 150 samples, 4 features, 3 classes
MODEL = ModelSpec(4, 3)
STANDARDIZER = Standardizer(np.zeros(4), np.ones(4)).to_dict()
MOMENTS_SETTINGS = {"job-id": "fuzz", "output": moments.OUTPUT, "release-round": 0}


def _declaration(job_id: str, *, encrypted: bool = True) -> dict[str, Any]:
    outputs = {
        aggregate.OUTPUT: (3, aggregate.Layout.of({"w": np.zeros(5)})),
        moments.OUTPUT: (1, moments.layout(4)),
    }
    return aggregate.declare(
        job_id, outputs=outputs, min_parties=2, encrypted=encrypted, params=SMALL_PARAMS
    ).to_dict()


@dataclass(frozen=True)
class Ref:
    """Bytes of the world, by name; `flips` (position, bit) mutate them."""

    name: str
    flips: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Hex:
    """The hex of the world's bytes `name` (a public identity in a key-holder group's spec)."""

    name: str


@dataclass(frozen=True)
class Request:
    """One fuzzed request: the schema it was drawn from (a group step's ``query.group/<step>``),
    its Flower message type, the node it goes to and its records (world bytes still named)."""

    schema: str
    message_type: str
    node: int
    config: dict[str, Any]
    payload: dict[str, Any]
    weights: Any = None  # Ref("weights"), arrays, or None
    metrics: dict[str, float] | None = None


@dataclass
class World:
    grid: InProcessGrid
    bytes: dict[str, bytes]
    weights: dict[str, np.ndarray]
    runs: int = 0  # query.whoami's federations so far


def _ask(grid: InProcessGrid, node: int, message_type: str, **records: Any) -> RecordDict:
    """A valid request of ours (built by `protocol.content`); its reply must be no error."""
    content = protocol.content(message_type, protocol.REQUEST, **records)
    message = Message(content, dst_node_id=node, message_type=message_type)
    (reply,) = grid.send_and_receive([message])
    assert not reply.has_error(), reply.error.reason
    return reply.content


def _setup_config(job_id: str, index: int) -> dict[str, Any]:
    return {
        "job-id": job_id,
        "source": IRIS.to_dict(),
        "party-index": index,
        "n-parties": 2,
        "querier": index == 0,
    }


def build_world(other: PublicContext) -> World:
    grid = assign_roles(InProcessGrid(3), keyholder=2)
    declared = _ask(
        grid,
        KEYHOLDER_NODE,
        protocol.DECLARE,
        config={"declaration": _declaration("fuzz"), "keys": {}},
    )
    keys = protocol.payload_of(declared)
    public = PublicContext.from_bytes(keys["public-context"])
    world = {
        "context": keys["public-context"],
        "kh-identity": keys["keyholder-identity"],
        "other-context": other.to_bytes(),
        "tensor": encrypt(public, np.ones(10)).to_bytes(),
        "other-tensor": encrypt(other, np.ones(10)).to_bytes(),
    }
    for index, node in enumerate(PARTY_NODES):
        link = protocol.payload_of(
            _ask(
                grid,
                node,
                protocol.SETUP,
                config=_setup_config("fuzz", index),
                payload={k: world[v] for k, v in _SETUP_PAYLOAD.items()},
            )
        )
        world[f"identity-{index}"], world[f"mac-seed-{index}"] = link["identity"], link["mac-seed"]
    envelopes = protocol.payload_of(
        _ask(
            grid,
            KEYHOLDER_NODE,
            protocol.REGISTER,
            config={"job-id": "fuzz", "parties": list(PARTIES)},
            payload={k: world[v.name] for k, v in TEMPLATES[protocol.REGISTER][1].items()},
        )
    )
    for index, node in enumerate(PARTY_NODES):
        world[f"envelope-{index}"] = envelopes[f"envelope/{PARTIES[index]}"]
        contributed = protocol.payload_of(
            _ask(
                grid,
                node,
                protocol.MOMENTS,
                config={**MOMENTS_SETTINGS, "sum-bound": 1e6},
                payload={"envelope": world[f"envelope-{index}"]},
            )
        )
        world[f"contribution-{index}"] = contributed["contribution"]
        world[f"tag-{index}"] = contributed["tag"]
    parts = [load_tensor(world[f"contribution-{i}"], public) for i in range(len(PARTIES))]
    world["sum"] = (parts[0] + parts[1]).to_bytes()
    return World(grid, world, get_weights(build_model(MODEL, seed=0)))


_SETUP_PAYLOAD = {"public-context": "context", "keyholder-identity": "kh-identity"}
_MATRIX = st.integers(0, 6).flatmap(
    lambda n: st.lists(st.lists(st.floats(-2, 2), min_size=n, max_size=n), min_size=n, max_size=n)
)
_VECTOR = st.lists(st.floats(-1, 1), max_size=6)
_PARTY_NAMES = st.lists(st.sampled_from([*PARTIES, "party-2", ""]), max_size=3)
_GROUP = st.fixed_dictionaries(
    {
        "members": st.just(list(MEMBERS))
        | st.lists(st.sampled_from([*MEMBERS, "x y"]), max_size=3),
        "threshold": st.integers(0, 3),
        "identities": st.just({"kh-0": Hex("kh-identity"), "kh-1": Hex("identity-0")})
        | st.dictionaries(st.sampled_from(MEMBERS), st.sampled_from(["00", "zz", ""]), max_size=2),
    }
)
# Per config key: values that are valid in the world, or of the right type and wrong.
VALID_CONFIG: dict[str, st.SearchStrategy[Any]] = {
    "job-id": st.sampled_from(["fuzz", "fuzz", "fuzz", "fuzz-new", "probe", "other"]),
    "inference-id": st.sampled_from(["fuzz", "fuzz-inference"]),
    "source": st.just(IRIS.to_dict())
    | st.fixed_dictionaries(
        {"dataset": st.sampled_from(["iris", "wine", "nope"])},
        optional={
            "n_parties": st.integers(-1, 3),
            "seed": st.integers(-1, 3),
            "classes": st.lists(st.floats(0, 3), max_size=3),
            "kind": st.sampled_from(["", "classification", "regression", "?"]),
            "alpha": st.floats(-1, 2),
            "bogus": st.integers(),
        },
    ),
    "party-index": st.integers(-1, 2),
    "n-parties": st.integers(-1, 3),
    "querier": st.booleans(),
    "parties": _PARTY_NAMES,
    "contributors": _PARTY_NAMES,
    "active": st.lists(st.sampled_from([*MEMBERS, "kh-9"]), max_size=3),
    "lead": st.sampled_from(["", *MEMBERS]),
    "name": st.sampled_from([*MEMBERS, "kh 9"]),
    "group": _GROUP,
    "step": st.sampled_from([*GROUP_STEPS, "nope"]),
    "output": st.sampled_from(
        [
            moments.OUTPUT,
            aggregate.OUTPUT,
            knn.VOTE_OUTPUT,
            encrypted_model.MODEL_OUTPUT,
            mlp.OUTPUT,
            "undeclared",
        ]
    ),
    "release-round": st.integers(-1, 3),
    "round": st.integers(-1, 3),
    "sum-bound": st.sampled_from([1e6, 0.0, -1.0, float("inf")]) | st.floats(0, 1e7),
    "with-target": st.booleans(),
    "seed": st.integers(-1, 2**33),
    "epochs": st.integers(0, 2),
    "batch-size": st.integers(-1, 200),
    "lr": st.floats(-1, 1),
    "optimizer": st.sampled_from(["sgd", "adam", "?"]),
    "model": st.just(MODEL.to_dict())
    | st.fixed_dictionaries(
        {
            "n_features": st.integers(0, 5),
            "n_classes": st.integers(0, 4),
            "hidden": st.lists(st.integers(0, 3), max_size=2),
            "activation": st.sampled_from(["relu", "square", "?"]),
        }
    ),
    "standardizer": st.just(STANDARDIZER)
    | st.fixed_dictionaries(
        {"mean": _VECTOR, "std": _VECTOR},
        optional={"y_mean": st.floats(-1, 1), "y_std": st.floats(0, 2)},
    ),
    "fail-party": st.integers(-1, 2),
    "clip": st.floats(-1, 10),
    "packing": st.sampled_from([*PACKINGS, "?"]),
    "lane-terms": st.integers(-1, 3),
    "mask": _MATRIX,
    "right-mask": _MATRIX,
    "l2": st.floats(0, 1),
    "min-scale-bits": st.integers(-1, 60),
    "task": st.sampled_from([linreg.TASK, logreg.TASK, aggregate.TASK, knn.TASK, "?"]),
    "w": _VECTOR,
    "gradient-mask": _VECTOR,
    "n-classes": st.integers(-1, 4),
    "segment": st.fixed_dictionaries(
        {
            "party": st.sampled_from(PARTIES),
            "offset": st.integers(-1, 100),
            "count": st.integers(-1, 100),
        }
    ),
    "slots": st.sampled_from([SMALL_PARAMS.slots, 16, 0, -1]),
    "encrypted-queries": st.booleans(),
    "start": st.integers(-1, 40),
    "stop": st.integers(-1, 40),
    "query": st.sampled_from(["plain", "encrypted", "?"]),
    "k": st.integers(-1, 5),
    "mode": st.sampled_from(["single", "batched", "?"]),
    "hidden": st.integers(-1, 8),
    "n-outputs": st.integers(-1, 4),
    "activation": st.sampled_from(["square", "relu-poly", "silu-poly", "?"]),
    "declaration": st.sampled_from(["fuzz", "fuzz-new", "fuzz-group"]).map(_declaration)
    | st.just(_declaration("twin", encrypted=False))
    | DECLARATIONS["data"],
    "keys": st.sampled_from([{}, {}, {"relin": True}, {"relin": "yes"}, {"nope": 1}]),
    "keyholder-partition-id": st.integers(-1, 3),
    "keyholders": st.integers(-1, 3),
    "parties-hold-keys": st.booleans(),
}
# "step" is a group message's step, but the size of a model step in query.model_step.
SCHEMA_CONFIG = {(protocol.MODEL_STEP, "step"): st.floats(-1, 1)}
# Any config value: scalars and lists of each type, or tagged JSON of anything.
GARBAGE_CONFIG = (
    st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=6)
    | st.booleans()
    | st.lists(st.integers(-2, 9), max_size=3)
    | st.lists(st.text(max_size=3), max_size=3)
    | json_values.map(protocol.to_json)
)
# Per kind of bytes: valid ones (the world's, or of the right form).
_WORLD_BYTES = {
    Kind.CONTEXT: ["context", "context", "other-context"],
    Kind.TENSOR: ["sum", "contribution-0", "contribution-1", "tensor", "other-tensor"],
    Kind.SEALED: ["tag-0", "tag-1", "envelope-0", "envelope-1", "mac-seed-0", "mac-seed-1"],
    Kind.IDENTITY: ["kh-identity", "identity-0", "identity-1"],
}
KIND_BYTES: dict[Kind, st.SearchStrategy[Any]] = {
    **{kind: st.sampled_from(names).map(Ref) for kind, names in _WORLD_BYTES.items()},
    Kind.ARRAY: st.lists(st.floats(-2, 2), max_size=12).map(
        lambda v: protocol.array_to_bytes(np.array(v))
    ),
    Kind.KEYGEN: st.binary(max_size=48).map(lambda b: b"FHEG" + b),
    Kind.DECRYPTION_SHARE: st.binary(max_size=48).map(lambda b: b"FHED" + b),
    Kind.EMPTY: st.just(b""),
}
KIND_BYTES[Kind.SEALED] |= st.binary(min_size=28, max_size=64)
KIND_BYTES[Kind.IDENTITY] |= st.binary(min_size=32, max_size=32)
GARBAGE_BYTES = st.binary(max_size=64) | st.builds(
    Ref,
    st.sampled_from(sorted({n for names in _WORLD_BYTES.values() for n in names})),
    st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 7)), min_size=1, max_size=3).map(
        tuple
    ),
)

# Requests valid in the world: config and payload (world bytes named), and weights.
_TAGS = {f"tag/{p}": Ref(f"tag-{i}") for i, p in enumerate(PARTIES)}
_KNN = {
    "job-id": "fuzz",
    "standardizer": STANDARDIZER,
    "n-classes": 3,
    "slots": SMALL_PARAMS.slots,
    "start": 0,
    "stop": 4,
    "query": "plain",
    "k": 3,
}
_MLP = {
    "job-id": "fuzz",
    "inference-id": "fuzz-inference",
    "mode": "batched",
    "start": 0,
    "stop": 4,
    "standardizer": STANDARDIZER,
    "hidden": 4,
    "n-outputs": 3,
}
_UPDATE = {"job-id": "fuzz", "output": aggregate.OUTPUT, "release-round": 1, "sum-bound": 1e6}
_ROUND = {"round": 1, "seed": 0, "batch-size": 0, "clip": 1.0}
_DECRYPTION = {
    "job-id": "fuzz",
    "output": moments.OUTPUT,
    "round": 0,
    "contributors": list(PARTIES),
}
TEMPLATES: dict[str, tuple[dict[str, Any], dict[str, Any], Any]] = {
    protocol.WHOAMI: ({"keyholder-partition-id": 2}, {}, None),
    protocol.DECLARE: ({"declaration": _declaration("fuzz-new"), "keys": {}}, {}, None),
    protocol.SETUP: (
        _setup_config("fuzz", 0),
        {k: Ref(v) for k, v in _SETUP_PAYLOAD.items()},
        None,
    ),
    protocol.REGISTER: (
        {"job-id": "fuzz", "parties": list(PARTIES)},
        {
            **{f"identity/{p}": Ref(f"identity-{i}") for i, p in enumerate(PARTIES)},
            **{f"mac-seed/{p}": Ref(f"mac-seed-{i}") for i, p in enumerate(PARTIES)},
        },
        None,
    ),
    protocol.MOMENTS: ({**MOMENTS_SETTINGS, "sum-bound": 1e6}, {}, None),
    protocol.TRAIN: (
        {
            **_UPDATE,
            **_ROUND,
            "epochs": 1,
            "batch-size": 16,
            "lr": 0.1,
            "model": MODEL.to_dict(),
            "standardizer": STANDARDIZER,
            "packing": COMPLEX,
            "lane-terms": 2,
        },
        {},
        Ref("weights"),
    ),
    protocol.STATS: (
        {
            **_UPDATE,
            "standardizer": STANDARDIZER,
            "mask": np.eye(5).tolist(),
            "right-mask": np.eye(5).tolist(),
            "l2": 0.1,
            "min-scale-bits": 20,
        },
        {},
        None,
    ),
    protocol.GRADIENT: (
        {
            **_UPDATE,
            **_ROUND,
            "task": linreg.TASK,
            "w": [0.0] * 5,
            "standardizer": STANDARDIZER,
            "gradient-mask": [0.0] * 5,
        },
        {},
        None,
    ),
    protocol.MODEL_STEP: (
        {
            "job-id": "fuzz",
            "task": linreg.TASK,
            "round": 1,
            "standardizer": STANDARDIZER,
            "step": 0.01,
            "l2": 0.0,
        },
        {f"broadcast-{j}": Ref("tensor") for j in range(5)},
        None,
    ),
    protocol.KNN_UPLOAD: (
        {
            **{k: _KNN[k] for k in ("job-id", "standardizer", "n-classes", "slots")},
            "segment": {"party": "party-0", "offset": 0, "count": 60},
            "encrypted-queries": False,
        },
        {},
        None,
    ),
    protocol.KNN_QUERY: (_KNN, {}, None),
    protocol.KNN_ANSWER: (
        {**_KNN, "output": knn.VOTE_OUTPUT, "round": 0},
        {"values": protocol.array_to_bytes(np.zeros((4, 3)))},
        None,
    ),
    protocol.MLP_QUERY: (_MLP, {"public-context": Ref("context")}, None),
    protocol.MLP_ANSWER: (
        {**_MLP, "output": mlp.OUTPUT, "round": 0, "activation": "square"},
        {"values": protocol.array_to_bytes(np.zeros((3, 4)))},
        None,
    ),
    protocol.MODEL_RELEASE: (
        {"job-id": "fuzz", "output": encrypted_model.MODEL_OUTPUT, "round": 0},
        {"sealed": Ref("envelope-0")},
        None,
    ),
    protocol.DECRYPT: (
        _DECRYPTION,
        {"tensor": Ref("sum"), **_TAGS},
        None,
    ),
    protocol.AUDIT: ({"job-id": "fuzz"}, {}, None),
    f"{protocol.GROUP}/setup-1": (
        {
            "step": "setup-1",
            "declaration": _declaration("fuzz-group"),
            "keys": {},
            "group": {
                "members": list(MEMBERS),
                "threshold": 2,
                "identities": {"kh-0": Hex("kh-identity"), "kh-1": Hex("identity-0")},
            },
            "name": "kh-0",
        },
        {},
        None,
    ),
    f"{protocol.GROUP}/setup-3": (
        {"step": "setup-3", "job-id": "fuzz-group"},
        {"public-context": Ref("context")},
        None,
    ),
    f"{protocol.GROUP}/share": (
        {
            **_DECRYPTION,
            "step": "share",
            "active": list(MEMBERS),
            "lead": "kh-0",
        },
        {"tensor": Ref("sum"), **_TAGS},
        None,
    ),
}

REQUEST_SCHEMAS = sorted(name for name, direction in SCHEMAS if direction == protocol.REQUEST)
_EVERY_CONFIG_KEY = sorted({k for schema in SCHEMAS.values() for k in schema.config})
_EVERY_PAYLOAD_KEY = sorted({k for schema in SCHEMAS.values() for k in schema.payload})


def _message_type(schema: str) -> str:
    return schema.partition("/")[0]  # query.group/<step>: a query.group message


def _members_of(pattern: str) -> list[str]:
    """The keys a payload key (``tag/*``, ``broadcast-*``) stands for here."""
    if not pattern.endswith("*"):
        return [pattern]
    prefix = pattern[:-1]
    if prefix == "broadcast-":
        names = [str(j) for j in range(5)]
    elif prefix in ("tag/", "identity/", "mac-seed/", "envelope/"):
        names = [*PARTIES, "party-2"]
    else:
        names = [*MEMBERS, "kh-9"]
    return [prefix + name for name in names]


@st.composite
def _config_value(draw: st.DrawFn, schema: str, key: str) -> Any:
    valid = SCHEMA_CONFIG.get((schema, key), VALID_CONFIG.get(key))
    if valid is not None and draw(st.integers(0, 3)):
        return draw(valid)
    return draw(GARBAGE_CONFIG)


@st.composite
def _payload_value(draw: st.DrawFn, kinds: frozenset[Kind]) -> Any:
    choice = draw(st.integers(0, 5))
    if choice < 4:
        return draw(KIND_BYTES[draw(st.sampled_from(sorted(kinds)))])
    if choice == 4:
        return draw(KIND_BYTES[draw(st.sampled_from(sorted(Kind)))])  # maybe of another kind
    return draw(GARBAGE_BYTES)


@st.composite
def _key_by_key(draw: st.DrawFn, schema: str) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Every config key of the schema (some dropped), each listed payload key or not."""
    spec = SCHEMAS[(schema, protocol.REQUEST)]
    keys = sorted(spec.config)
    dropped = draw(st.just(set()) | st.sets(st.sampled_from(keys), max_size=2)) if keys else set()
    config = {k: draw(_config_value(schema, k)) for k in keys if k not in dropped}
    if _message_type(schema) == protocol.GROUP:
        config["step"] = schema.partition("/")[2]
    payload = {
        key: draw(_payload_value(kinds))
        for pattern, kinds in sorted(spec.payload.items())
        for key in _members_of(pattern)
        if draw(st.booleans())
    }
    return config, payload, Ref("weights") if spec.weights and draw(st.booleans()) else None


@st.composite
def _edited(draw: st.DrawFn, schema: str, config: dict, payload: dict) -> tuple[dict, dict]:
    """Up to three edits within the schema: a config or payload value redrawn, or one dropped."""
    spec = SCHEMAS[(schema, protocol.REQUEST)]
    config, payload = dict(config), dict(payload)
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(["config", "config", "payload", "drop"]))
        if edit == "config" and spec.config:
            key = draw(st.sampled_from(sorted(spec.config)))
            config[key] = draw(_config_value(schema, key))
        elif edit == "payload" and spec.payload:
            pattern, kinds = draw(st.sampled_from(sorted(spec.payload.items())))
            payload[draw(st.sampled_from(_members_of(pattern)))] = draw(_payload_value(kinds))
        elif edit == "drop" and (config or payload):
            key = draw(st.sampled_from(sorted([*config, *(f"payload:{k}" for k in payload)])))
            if key.startswith("payload:"):
                del payload[key.removeprefix("payload:")]
            else:
                del config[key]
    return config, payload


@st.composite
def _off_schema(draw: st.DrawFn, request: Request) -> Request:
    """The request with something its schema does not allow: a key, a record, weights."""
    spec = SCHEMAS[(request.schema, protocol.REQUEST)]
    edit = draw(st.sampled_from(["config", "payload", "metrics", "weights"]))
    if edit == "config":
        key = draw(st.sampled_from([k for k in _EVERY_CONFIG_KEY if not spec.allows_config(k)]))
        return replace(request, config={**request.config, key: draw(_config_value("", key))})
    if edit == "payload":
        pattern = draw(st.sampled_from(_EVERY_PAYLOAD_KEY))
        key = draw(st.sampled_from(_members_of(pattern)))
        value = draw(_payload_value(SCHEMAS_KINDS[pattern]))
        return replace(request, payload={**request.payload, key: value})
    if edit == "metrics":
        return replace(request, metrics={"keygen-s": draw(st.floats(0, 1))})
    arrays = {"w": np.arange(3, dtype=draw(st.sampled_from(["float64", "int64"])))}
    return replace(request, weights=arrays)


SCHEMAS_KINDS = {
    pattern: kinds for schema in SCHEMAS.values() for pattern, kinds in schema.payload.items()
}
_OLD_HANDLERS = sorted(
    {_message_type(name) for name in REQUEST_SCHEMAS} - {protocol.WHOAMI, protocol.GROUP}
)


@st.composite
def _garbage(draw: st.DrawFn) -> Request:
    """Config and payload keys of any schema, with any values, to any handler."""
    message_type = draw(st.sampled_from(_OLD_HANDLERS))
    config = draw(st.dictionaries(st.sampled_from(_EVERY_CONFIG_KEY), GARBAGE_CONFIG, max_size=4))
    payload = draw(
        st.dictionaries(
            st.sampled_from(_EVERY_PAYLOAD_KEY).map(lambda k: k.rstrip("*")),
            st.binary(max_size=64),
            max_size=3,
        )
    )
    node = draw(_node(message_type))
    return Request(f"off-schema {message_type}", message_type, node, config, payload)


def _node(message_type: str) -> st.SearchStrategy[int]:
    """Mostly a node of the handler's role, sometimes another."""
    if message_type == protocol.WHOAMI:
        return st.sampled_from([PARTY_NODES[0], KEYHOLDER_NODE])
    if message_type in KEYHOLDER_TYPES:
        return st.sampled_from([KEYHOLDER_NODE] * 5 + [PARTY_NODES[0]])
    return st.sampled_from([*PARTY_NODES * 3, KEYHOLDER_NODE])


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """A request to its schema (from a template or key by key, then edited), or off it."""
    if not draw(st.integers(0, 7)):
        return draw(_garbage())
    schema = draw(st.sampled_from(REQUEST_SCHEMAS))
    message_type = _message_type(schema)
    if schema in TEMPLATES and draw(st.integers(0, 2)):
        config, payload, weights = TEMPLATES[schema]
    else:
        config, payload, weights = draw(_key_by_key(schema))
    config, payload = draw(_edited(schema, config, payload))
    request = Request(schema, message_type, draw(_node(message_type)), config, payload, weights)
    return draw(_off_schema(request)) if not draw(st.integers(0, 6)) else request


MESSAGES = dict(fuzzed=requests())


def _subclasses(cls: type) -> set[type]:
    return {cls}.union(*(_subclasses(sub) for sub in cls.__subclasses__()))


FEDHE_ERRORS = frozenset(cls.__name__ for cls in _subclasses(FedHEError))
OUTCOMES = ("rejected by schema", "refused: wrong role", "reached handler and refused", "served")


def _resolve(value: Any, world: World) -> Any:
    if isinstance(value, Ref):
        data = world.bytes[value.name]
        return _mutate(data, list(value.flips), None, b"") if value.flips else data
    if isinstance(value, Hex):
        return world.bytes[value.name].hex()
    if isinstance(value, dict):
        return {k: _resolve(v, world) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, world) for v in value]
    return value


def _setting(value: Any) -> Any:
    """A config value as a sender puts it in a ConfigRecord: nested values as tagged JSON."""
    nested = isinstance(value, list) and any(isinstance(v, dict | list) for v in value)
    return protocol.to_json(value) if isinstance(value, dict) or nested else value


def _records(world: World, request: Request) -> RecordDict:
    """A message's records as anyone could build them: without `protocol.content`'s checks,
    which guard our own senders, not a receiver against a hostile one."""
    config = {k: _setting(_resolve(v, world)) for k, v in request.config.items()}
    payload = {k: _resolve(v, world) for k, v in request.payload.items()}
    records: dict[str, Any] = {
        protocol.CONFIG: ConfigRecord(config),
        protocol.PAYLOAD: ConfigRecord(payload),
    }
    weights = world.weights if request.weights == Ref("weights") else request.weights
    if weights is not None:
        records[protocol.WEIGHTS] = ArrayRecord(
            {k: Array(np.asarray(a)) for k, a in weights.items()}
        )
    if request.metrics is not None:
        records[protocol.METRICS] = MetricRecord(request.metrics)
    return RecordDict(records)


def _role(node: int) -> str:
    return protocol.ROLE_KEYHOLDER if node == KEYHOLDER_NODE else protocol.ROLE_PARTY


def _refused_before_the_handler(request: Request, records: RecordDict) -> tuple[str, str] | None:
    """What the node must answer before its handler runs (`fedhe.clients.app`: the role, then
    the schema): (outcome, error class), or None when the handler gets the message."""
    if request.message_type != protocol.WHOAMI:
        wanted = (
            protocol.ROLE_KEYHOLDER
            if request.message_type in KEYHOLDER_TYPES
            else protocol.ROLE_PARTY
        )
        if _role(request.node) != wanted:
            return "refused: wrong role", "ProtocolError"
    try:
        protocol.check_message(records, request.message_type, protocol.REQUEST)
    except FedHEError as err:
        return "rejected by schema", type(err).__name__
    return None


def _probe(grid: InProcessGrid, node: int, message_type: str) -> None:
    """The node still serves: a valid request to it succeeds."""
    if message_type == protocol.WHOAMI:
        _ask(grid, node, protocol.WHOAMI, config={"keyholder-partition-id": 2})
    elif node == KEYHOLDER_NODE:
        _ask(grid, node, protocol.AUDIT, config={"job-id": "fuzz"})
    else:
        config = _setup_config("probe", PARTY_NODES.index(node))
        _ask(grid, node, protocol.SETUP, config=config)  # a plaintext twin's: no keys


def _grid_for(world: World, request: Request) -> InProcessGrid:
    """query.whoami decides a node's role: it goes to a fresh federation of its own."""
    if request.message_type != protocol.WHOAMI:
        return world.grid
    # Its own run (a key holder's state is per run and node): hypothesis seeds `random`, so a
    # run id drawn inside an example would be the same in every example.
    world.runs += 1
    fresh = assign_roles(InProcessGrid(3, run_id=world.grid.run_id + world.runs), keyholder=2)
    TaskIdentity.run_id = world.grid.run_id  # the world's messages stay of the world's run
    return fresh


def handler_case(world: World, fuzzed: Request) -> str:
    """The outcome (one of OUTCOMES): a fedhe error reply, or a reply to the schema."""
    request = fuzzed
    records = _records(world, request)
    grid = _grid_for(world, request)
    before = _refused_before_the_handler(request, records)
    message = Message(records, dst_node_id=request.node, message_type=request.message_type)
    (reply,) = grid.send_and_receive([message])
    if reply.has_error():
        assert reply.error.code == refusals.FEDHE_ERROR_CODE, reply.error.reason
        error = reply.error.reason.split(":")[0]
        assert error in FEDHE_ERRORS, reply.error.reason
        outcome = "reached handler and refused"
        if before is not None:
            outcome, expected = before
            assert error == expected, (before, reply.error.reason)
    else:
        assert before is None, (before, request)
        protocol.check_message(reply.content, request.message_type, protocol.REPLY)
        outcome = "served"
    _probe(grid, request.node, request.message_type)
    return outcome


@pytest.fixture
def world(public):
    return build_world(public)


@HANDLED
@given(**MESSAGES)
def test_handlers_answer_garbage_with_a_fedhe_error_and_keep_serving(world, fuzzed):
    handler_case(world, fuzzed)


@pytest.mark.parametrize(
    "fuzzed",
    [
        Request(protocol.WHOAMI, protocol.WHOAMI, KEYHOLDER_NODE, {"keyholders": "two"}, {}),
        Request(
            protocol.TRAIN,
            protocol.TRAIN,
            PARTY_NODES[0],
            TEMPLATES[protocol.TRAIN][0],
            {},
            weights={"w": np.zeros(3)},  # not the model's layers
        ),
    ],
    ids=["whoami-count-not-an-int", "train-weights-of-another-model"],
)
def test_what_the_fuzz_found_is_refused_with_a_fedhe_error(world, fuzzed):
    """Requests the handler fuzz found crashing a node with a ValueError (query.whoami) or
    torch's RuntimeError (train): now refused with a fedhe error."""
    assert handler_case(world, fuzzed) == "reached handler and refused"


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


def test_the_properties_reach_every_outcome(public, valid, world, tmp_path_factory):
    """With a fixed seed (the same inputs every run, whatever ran before), each property's
    strategy reaches every outcome: mutated bytes both refused and (intact) loaded, declarations
    parsed and refused, requests rejected by their schema, by the node's role, refused by the
    handler and served (the handlers get a real share of the requests), and every decision of
    the policy (a release, a replay and each reason to refuse)."""
    tensors = _outcomes(functools.partial(tensor_case, public, valid), MUTATIONS, FUZZ)
    _check(tensors, {"loaded", "refused"}, FUZZ.max_examples)
    contexts = _outcomes(functools.partial(context_case, public), MUTATIONS, FEW)
    _check(contexts, {"loaded", "refused"}, FEW.max_examples)
    declarations = _outcomes(declaration_case, DECLARATIONS, FUZZ)
    _check(declarations, {"parsed", "refused"}, FUZZ.max_examples)
    per_schema: Counter = Counter()

    def handler(fuzzed: Request) -> str:
        outcome = handler_case(world, fuzzed)
        per_schema[fuzzed.schema, outcome] += 1
        return outcome

    messages = _outcomes(handler, MESSAGES, HANDLED)
    print("per schema:", json.dumps({f"{s} {o}": n for (s, o), n in sorted(per_schema.items())}))
    _check(messages, OUTCOMES, HANDLED.max_examples)
    reached = messages["reached handler and refused"] + messages["served"]
    assert reached >= 0.3 * sum(messages.values()), messages
    handled = {s for s, o in per_schema if o in OUTCOMES[2:] and s in REQUEST_SCHEMAS}
    assert len(handled) >= 0.75 * len(REQUEST_SCHEMAS), sorted(set(REQUEST_SCHEMAS) - handled)

    def policy(max_refusals, requests):
        return policy_case(tmp_path_factory.mktemp("kh"), max_refusals, requests)

    decisions = _outcomes(policy, POLICY_INPUTS, FEW)
    _check(decisions, {"decrypted", "replayed", *REFUSALS}, FEW.max_examples)
