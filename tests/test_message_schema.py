"""Typed messages: a schema per message type and direction, and one encoder for every bytes
value that refuses secret-key material in any serialization (issue 18).

The issue's mutation: the key holder's declare reply adds a raw
`serialize(save_secret_key=True)` blob. Every variant below is refused where the message is
built (`protocol.content`) and where it is received (`protocol.check_message`, which the
aggregator's session and every node's handlers run, and the message scans of the tests).
"""

from __future__ import annotations

import base64
import os
import struct
import zlib

import numpy as np
import pytest
import zstandard
from flwr.app import ConfigRecord, Message, RecordDict

from fedhe import messages, protocol
from fedhe.aggregator.session import Session
from fedhe.crypto import encrypt, multiparty
from fedhe.crypto.channel import Identity
from fedhe.crypto.context import CONTEXT_MAGIC
from fedhe.crypto.framing import frame
from fedhe.errors import FedHEError, ProtocolError, SecretKeyLeakError
from fedhe.messages import Kind
from tests.inprocess import InProcessGrid, assign_roles

IDENTITY = Identity.generate().public


def _declare_reply(payload: dict[str, bytes], **records) -> RecordDict:
    return protocol.content(
        protocol.DECLARE,
        protocol.REPLY,
        payload=payload,
        metrics={"keygen-s": 0.1},
        **records,
    )


def _seal_secret_key(secret, compression: int | None = None) -> bytes:
    """SEAL's own SecretKey serialization (zstd), or re-encoded: 0 none, 1 zlib."""
    path = f"/tmp/fedhe-test-sk-{os.getpid()}.bin"
    secret.raw.secret_key().data.save(path)
    with open(path, "rb") as handle:
        data = handle.read()
    os.unlink(path)
    if compression is None:
        return data
    body = zstandard.ZstdDecompressor().decompressobj().decompress(data[16:])
    body = body if compression == 0 else zlib.compress(body)
    major, minor = data[3], data[4]
    header = struct.pack("<HBBBBHQ", 0xA15E, 16, major, minor, compression, 0, 16 + len(body))
    return header + body


# -- the mutation and its variants ---------------------------------------------------


def test_a_declare_reply_with_a_raw_secret_tenseal_context_is_refused(secret):
    raw = secret.raw.serialize(save_secret_key=True)
    public = secret.public().to_bytes()
    with pytest.raises(SecretKeyLeakError, match=r"query\.declare reply payload 'raw'.*TenSEAL"):
        _declare_reply({"public-context": public, "keyholder-identity": IDENTITY, "raw": raw})


@pytest.mark.parametrize("key", ["public-context", "keyholder-identity"])
def test_a_raw_secret_context_under_a_key_the_schema_lists_is_refused(secret, key):
    payload = {"public-context": secret.public().to_bytes(), "keyholder-identity": IDENTITY}
    payload[key] = secret.raw.serialize(save_secret_key=True)
    with pytest.raises(SecretKeyLeakError, match="secret key"):
        _declare_reply(payload)


@pytest.mark.parametrize("compression", [None, 0, 1], ids=["zstd", "none", "zlib"])
def test_raw_seal_secret_key_bytes_are_refused_and_named(secret, compression):
    data = _seal_secret_key(secret, compression)
    with pytest.raises(SecretKeyLeakError, match="raw SEAL SecretKey"):
        protocol.content(protocol.DECRYPT, protocol.REPLY, payload={"sealed": data})


def test_secret_material_hidden_inside_opaque_bytes_is_found(secret):
    """Sealed bytes cannot be read, but a key behind a few bytes of padding is still a key."""
    for hidden in (secret.raw.serialize(save_secret_key=True), _seal_secret_key(secret)):
        padded = os.urandom(37) + hidden + os.urandom(5)
        with pytest.raises(SecretKeyLeakError, match="at byte"):
            protocol.content(protocol.SETUP, protocol.REPLY, payload={"mac-seed": padded})


@pytest.mark.parametrize(
    "encode",
    [
        lambda b: base64.b64encode(b).decode(),
        lambda b: base64.urlsafe_b64encode(b).decode().rstrip("="),
        lambda b: b.hex(),
    ],
    ids=["base64", "urlsafe", "hex"],
)
def test_a_secret_key_encoded_in_a_config_string_is_refused(secret, encode):
    """Config strings are covered: a key encoded in one, even inside nested JSON."""
    blob = encode(secret.raw.serialize(save_secret_key=True))
    with pytest.raises(SecretKeyLeakError, match=r"config 'declaration'.*base64/hex"):
        protocol.content(
            protocol.DECLARE,
            protocol.REQUEST,
            config={"declaration": {"job_id": "j", "meta": {"note": blob}}},
        )


def test_bytes_in_config_are_refused_and_secret_bytes_named(secret):
    with pytest.raises(SecretKeyLeakError):
        protocol.content(
            protocol.AUDIT, protocol.REQUEST, config={"job-id": secret.to_secret_bytes()}
        )
    with pytest.raises(ProtocolError, match="typed payload"):
        protocol.content(protocol.AUDIT, protocol.REQUEST, config={"job-id": b"job"})


def test_a_key_holder_groups_secret_frame_is_refused_under_any_key(secret):
    share = multiparty.SecretShare.generate(secret.params).to_bytes()
    with pytest.raises(SecretKeyLeakError, match="FHES"):
        protocol.content(
            protocol.GROUP,
            protocol.REPLY,
            config={"step": "setup-1"},
            payload={"deal/keyholder-1": share},  # a dealt piece travels sealed, never as is
        )


def test_a_secret_context_frame_is_refused(secret):
    with pytest.raises(SecretKeyLeakError, match="context frame"):
        _declare_reply({"public-context": secret.to_secret_bytes()})


def test_a_secret_share_relabelled_as_a_public_keygen_share_is_refused(secret):
    share = multiparty.SecretShare.generate(secret.params)
    forged = frame(multiparty.KEYGEN_MAGIC, 1, {"kind": "additive", "shape": [1, 1]}, bytes(8))
    with pytest.raises(ProtocolError, match="'additive' is no public key-generation share"):
        protocol.content(
            protocol.GROUP,
            protocol.REPLY,
            config={"step": "setup-1"},
            payload={"pk-share": forged},
        )
    assert share.kind == multiparty.ADDITIVE


def test_a_raw_public_seal_or_tenseal_object_never_travels_unframed(secret):
    public = secret.public()
    with pytest.raises(ProtocolError, match="raw TenSEAL context"):
        _declare_reply({"public-context": public.raw.serialize()})


def test_the_receiving_side_runs_the_same_check(secret):
    """A reply built by hand (not through protocol.content) meets the same check."""
    forged = RecordDict(
        {protocol.PAYLOAD: ConfigRecord({"raw": secret.raw.serialize(save_secret_key=True)})}
    )
    with pytest.raises(SecretKeyLeakError):
        protocol.check_message(forged, protocol.DECLARE, protocol.REPLY)


class _ForgingGrid(InProcessGrid):
    """Answers every message with the same hand-built content (a deviating node)."""

    forged: RecordDict | None = None

    def send_and_receive(self, messages, timeout=None):
        return [Message(self.forged, reply_to=m) for m in messages]


def test_the_aggregator_refuses_a_reply_with_a_secret_key_and_reports_why(secret):
    forged = RecordDict(
        {
            protocol.PAYLOAD: ConfigRecord(
                {
                    "public-context": secret.public().to_bytes(),
                    "raw": secret.raw.serialize(save_secret_key=True),
                }
            )
        }
    )
    grid = _ForgingGrid(1)
    grid.forged = forged
    session = Session(grid, timeout_s=5)
    request = protocol.content(
        protocol.DECLARE, protocol.REQUEST, config={"declaration": {}, "keys": {}}
    )
    exchange = session.ask({"keyholder": 7}, protocol.DECLARE, request, role="keyholder")
    assert not exchange.replies
    assert exchange.failures["keyholder"].startswith("SecretKeyLeakError")


def test_a_node_refuses_a_request_outside_its_schema():
    grid = assign_roles(InProcessGrid(2), keyholder=1)
    request = RecordDict({protocol.CONFIG: ConfigRecord({"job-id": "a", "extra": 1})})
    (reply,) = grid.send_and_receive(
        [Message(request, dst_node_id=1001, message_type=protocol.AUDIT)]
    )
    assert reply.has_error()
    assert "ProtocolError" in reply.error.reason and "'extra'" in reply.error.reason


# -- schema violations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ({"config": {"job-id": "j", "nonsense": 1}}, "query.audit request may not carry config"),
        ({"payload": {"identity": IDENTITY}}, "query.audit request may not carry payload"),
        ({"metrics": {"keygen-s": 1.0}}, "query.audit request may not carry metric"),
        ({"weights": {"w": np.zeros(2)}}, "query.audit request carries no weights"),
    ],
    ids=["config", "payload", "metric", "weights"],
)
def test_a_key_the_schema_does_not_list_is_refused(records, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.content(protocol.AUDIT, protocol.REQUEST, **records)


def test_bytes_of_another_kind_are_refused_naming_type_key_and_kind(public):
    with pytest.raises(ProtocolError) as refused:
        _declare_reply({"public-context": b"\x00" * 64})
    message = str(refused.value)
    assert "query.declare reply payload 'public-context'" in message
    assert Kind.CONTEXT.value in message and Kind.EMPTY.value in message
    tensor = encrypt(public, np.arange(4.0)).to_bytes()
    with pytest.raises(ProtocolError, match="must be a public identity key"):
        _declare_reply({"keyholder-identity": tensor})
    with pytest.raises(ProtocolError, match="shorter than a nonce"):
        protocol.content(protocol.DECRYPT, protocol.REPLY, payload={"sealed": b"short"})


def test_arrays_and_weights_travel_as_floats_only():
    ints = protocol.array_to_bytes(np.arange(3.0)).replace(b"<f8", b"<u8")
    with pytest.raises(ProtocolError, match="not of floats"):
        protocol.content(protocol.DECRYPT, protocol.REPLY, payload={"values": ints})
    with pytest.raises(ProtocolError, match="floats only"):
        protocol.content(
            protocol.TRAIN, protocol.REQUEST, weights={"w": np.arange(3, dtype=np.uint64)}
        )


def test_a_tensor_whose_ciphertext_is_a_secret_context_is_refused(secret, public):
    tensor = encrypt(public, np.arange(4.0)).to_bytes()
    header_len = struct.unpack_from(">I", tensor, 6)[0]
    header = __import__("json").loads(tensor[10 : 10 + header_len])
    hidden = secret.raw.serialize(save_secret_key=True)
    header["chunk_bytes"] = [len(hidden)]
    forged = frame(b"FHET", 1, header, hidden)
    with pytest.raises(SecretKeyLeakError, match="ciphertext"):
        protocol.content(protocol.DECRYPT, protocol.REQUEST, payload={"tensor": forged})


def test_a_group_message_names_its_step():
    with pytest.raises(ProtocolError, match="config 'step'"):
        protocol.content(protocol.GROUP, protocol.REQUEST, config={"job-id": "j"})
    with pytest.raises(ProtocolError, match="no request schema"):
        protocol.content("query.unknown", protocol.REQUEST)
    with pytest.raises(ProtocolError, match="direction"):
        protocol.content(protocol.AUDIT, "sideways")


def test_patterns_name_one_member_each():
    schema = messages.SCHEMAS[(protocol.REGISTER, protocol.REQUEST)]
    assert schema.payload_kinds("mac-seed/party-3") == {Kind.SEALED}
    assert schema.payload_kinds("mac-seed/") is None
    assert schema.payload_kinds("mac-seed") is None
    assert schema.payload_kinds("identity/party-0") == {Kind.IDENTITY}


def test_every_message_type_has_a_schema_each_way():
    types = [
        getattr(messages, name)
        for name in dir(messages)
        if name.isupper()
        and isinstance(getattr(messages, name), str)
        and getattr(messages, name).startswith(("query.", "train"))
    ]
    names = [messages.schema_name(t) for t in types if t != protocol.GROUP]
    names += [messages.schema_name(protocol.GROUP, s) for s in messages.GROUP_STEPS]
    assert {(n, d) for n in names for d in messages.DIRECTIONS} == set(messages.SCHEMAS)


def test_public_material_passes(public):
    tensor = encrypt(public, np.arange(4.0)).to_bytes()
    digest = "ab" * 32  # a hex digest in a config string decodes to nothing secret
    records = protocol.content(
        protocol.DECRYPT,
        protocol.REQUEST,
        config={"job-id": digest, "output": "update_sum", "round": 0, "contributors": ["a"]},
        payload={"tensor": tensor, "tag/party-0": os.urandom(60), "tag/party-1": b""},
    )
    protocol.check_message(records, protocol.DECRYPT, protocol.REQUEST)
    assert protocol.payload_of(records)["tensor"] == tensor
    reply = _declare_reply({"public-context": public.to_bytes(), "keyholder-identity": IDENTITY})
    protocol.check_message(reply, protocol.DECLARE, protocol.REPLY)
    assert protocol.payload_of(reply)["public-context"][:4] == CONTEXT_MAGIC


# -- each kind of bytes, accepted and refused ------------------------------------------------


def _kind(data: bytes, kind: Kind) -> None:
    protocol.check_bytes(data, (kind,), what="x")


def test_public_multiparty_frames_pass_and_malformed_ones_do_not(secret, public):
    share = multiparty.SecretShare.generate(secret.params)
    keygen = multiparty.public_key_share(share, b"s" * 32)
    _kind(keygen, Kind.KEYGEN)
    decryption = multiparty.decryption_share(share, encrypt(public, np.arange(4.0)))
    _kind(decryption, Kind.DECRYPTION_SHARE)
    with pytest.raises(ProtocolError, match="does not fit"):
        _kind(keygen[:-8], Kind.KEYGEN)
    with pytest.raises(ProtocolError, match="do not fit levels"):
        _kind(decryption[:-8], Kind.DECRYPTION_SHARE)
    with pytest.raises(ProtocolError, match="no FHEG frame"):
        _kind(decryption, Kind.KEYGEN)
    with pytest.raises(ProtocolError, match="no FHED frame"):
        _kind(keygen, Kind.DECRYPTION_SHARE)
    header = {"chunks": 2, "levels": [1]}
    with pytest.raises(ProtocolError, match="do not match chunks"):
        _kind(frame(multiparty.DECRYPTION_MAGIC, 1, header, bytes(8)), Kind.DECRYPTION_SHARE)


@pytest.mark.parametrize(
    ("data", "kind", "match"),
    [
        (frame(b"FHET", 1, {"kind": "plain", "shape": [2]}, bytes(8)), Kind.TENSOR, "plain"),
        (frame(b"FHET", 1, {"kind": "plain", "shape": "2"}, bytes(16)), Kind.TENSOR, "shape"),
        (frame(b"FHET", 1, {"kind": "ckks", "shape": [1]}, bytes(9)), Kind.TENSOR, "chunks"),
        (frame(b"FHET", 2, {"kind": "plain", "shape": [1]}, bytes(8)), Kind.TENSOR, "no FHET"),
        (b"\x93NUMPY\x03\x00" + bytes(30), Kind.ARRAY, "version"),
        (b"not an array at all, not at all", Kind.ARRAY, "no .npy"),
        (bytes(31), Kind.IDENTITY, "31 bytes"),
        (b"x", Kind.EMPTY, "1 bytes"),
        (b"FHEC" + bytes(40), Kind.CONTEXT, "context"),
    ],
)
def test_bytes_that_are_not_their_kind_are_refused(data, kind, match):
    with pytest.raises((ProtocolError, FedHEError), match=match):
        _kind(data, kind)


def test_a_plain_tensor_and_an_array_pass():
    _kind(frame(b"FHET", 1, {"kind": "plain", "shape": [2]}, bytes(16)), Kind.TENSOR)
    _kind(protocol.array_to_bytes(np.ones((2, 3))), Kind.ARRAY)
    _kind(b"", Kind.EMPTY)
    with pytest.raises(ProtocolError, match="must be bytes"):
        _kind("text", Kind.SEALED)  # type: ignore[arg-type]


def test_check_message_refuses_records_of_the_wrong_shape():
    from flwr.app import MetricRecord

    with pytest.raises(ProtocolError, match="records"):
        protocol.check_message(
            RecordDict({"other": ConfigRecord({})}), protocol.AUDIT, protocol.REQUEST
        )
    with pytest.raises(ProtocolError, match="not a ConfigRecord"):
        protocol.check_message(
            RecordDict({protocol.PAYLOAD: MetricRecord({"a": 1.0})}),
            protocol.AUDIT,
            protocol.REQUEST,
        )
    with pytest.raises(ProtocolError, match="bytes"):
        protocol.check_message(
            RecordDict({protocol.CONFIG: ConfigRecord({"job-id": [b"a", b"b"]})}),
            protocol.AUDIT,
            protocol.REQUEST,
        )


def test_weights_pass_the_same_check_both_ways():
    records = protocol.content(
        protocol.TRAIN, protocol.REQUEST, config={"round": 1}, weights={"w": np.ones(3)}
    )
    protocol.check_message(records, protocol.TRAIN, protocol.REQUEST)
    assert protocol.weights_of(records)["w"].tolist() == [1.0, 1.0, 1.0]
