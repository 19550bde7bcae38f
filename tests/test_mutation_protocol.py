"""Deterministic tests that pin the message checks down byte by byte (issue 18's mutation
testing of fedhe/protocol.py, fedhe/payloads.py, fedhe/crypto/secret_material.py and
fedhe/messages.py): every test here kills mutants that the schema tests let survive.

Crafted bytes stand in for what an attacker (or a buggy node) could put in a message: SEAL
headers with one field off, protobufs with each wire type, frames at their size limits.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib
from collections import OrderedDict

import numpy as np
import pytest
import zstandard

from fedhe import messages, payloads, protocol
from fedhe.crypto import CKKSParams, encrypt, encrypt_for_compute, generate_keys, multiparty
from fedhe.crypto._tenseal_proto import varint
from fedhe.crypto.context import CONTEXT_MAGIC
from fedhe.crypto.framing import MAX_FRAME_HEADER, frame, unframe
from fedhe.crypto.secret_material import frame_at, material_at, refuse_unframed
from fedhe.crypto.tensor import TENSOR_MAGIC, TENSOR_VERSION, weighted_sum
from fedhe.errors import ProtocolError, SecretKeyLeakError
from fedhe.messages import Kind, Schema

SEAL_MAGIC = struct.pack("<H", 0xA15E)


def _saved(obj) -> bytes:
    """A SEAL object's own serialization (zstd-compressed)."""
    path = f"/tmp/fedhe-test-mutation-{os.getpid()}.bin"
    obj.save(path)
    with open(path, "rb") as handle:
        data = handle.read()
    os.unlink(path)
    return data


@pytest.fixture(scope="module")
def seal_secret_key(secret) -> bytes:
    return _saved(secret.raw.secret_key().data)


@pytest.fixture(scope="module")
def seal_public_key(secret) -> bytes:
    return _saved(secret.raw.public_key().data)


def _kind(data: bytes, *kinds: Kind) -> bytes:
    return protocol.check_bytes(data, kinds, what="x")


# -- messages: the schema table's functions -------------------------------------------------------


def test_schema_builds_every_field_from_its_arguments():
    built = messages._schema(("a", "b"), {"p": (Kind.SEALED, Kind.EMPTY)}, ("m",), weights=True)
    assert built == Schema(
        frozenset({"a", "b"}),
        {"p": frozenset({Kind.SEALED, Kind.EMPTY})},
        frozenset({"m"}),
        True,
    )
    assert type(built.config) is frozenset and type(built.metrics) is frozenset
    assert messages._schema() == Schema(frozenset(), {}, frozenset(), False)
    assert messages._schema().weights is False


@pytest.mark.parametrize(
    ("key", "kinds"),
    [
        ("mac-seed/x", {Kind.SEALED}),  # one character is a member
        ("mac-seedzz", None),  # the pattern's prefix is "mac-seed/", slash included
        ("mzzzzzzzzzzz", None),
        ("mac-seed/", None),
        ("identity/p", {Kind.IDENTITY}),
    ],
)
def test_a_pattern_matches_its_whole_prefix_and_one_more_character(key, kinds):
    schema = messages.SCHEMAS[(messages.REGISTER, messages.REQUEST)]
    assert schema.payload_kinds(key) == kinds


def test_config_and_metric_patterns_and_exact_names():
    schema = Schema(frozenset({"job-id", "opt/*"}), {}, frozenset({"n", "t/*"}))
    assert schema.allows_config("job-id") and schema.allows_config("opt/a")
    assert not schema.allows_config("opt/") and not schema.allows_config("job")
    assert schema.allows_metric("n") and schema.allows_metric("t/1")
    assert not schema.allows_metric("t/") and not schema.allows_metric("job-id")


def test_a_group_schema_is_named_by_its_step():
    assert messages.schema_name(messages.GROUP, "share") == "query.group/share"
    assert messages.schema_name(messages.AUDIT, "share") == messages.AUDIT
    assert messages.schema_name(messages.AUDIT) == messages.AUDIT


# -- payloads: check_bytes and each kind ---------------------------------------------------------


def test_a_refusal_names_every_kind_and_why_each_does_not_fit():
    with pytest.raises(ProtocolError) as refused:
        _kind(b"\x01" * 40, Kind.IDENTITY, Kind.EMPTY)
    assert str(refused.value) == (
        "x must be a public identity key (32 bytes) or empty bytes; its 40 bytes (starting "
        "0101010101010101) are not a public identity key (32 bytes): 40 bytes; "
        "not empty bytes: 40 bytes."
    )
    with pytest.raises(ProtocolError, match=r"its 0 bytes \(starting empty\)"):
        _kind(b"", Kind.IDENTITY)


def test_check_bytes_returns_bytes_for_any_buffer():
    assert _kind(bytearray(32), Kind.IDENTITY) == bytes(32)
    assert type(_kind(memoryview(bytes(32)), Kind.EMPTY, Kind.IDENTITY)) is bytes
    with pytest.raises(ProtocolError, match="must be bytes, got str"):
        _kind("x" * 32, Kind.IDENTITY)  # type: ignore[arg-type]


def test_the_second_kind_is_tried_when_the_first_does_not_fit():
    assert _kind(b"", Kind.IDENTITY, Kind.EMPTY) == b""
    assert _kind(bytes(32), Kind.EMPTY, Kind.IDENTITY) == bytes(32)


def test_passed_contexts_are_remembered_and_the_oldest_forgotten(public, monkeypatch):
    """At most 64 digests, oldest out first; a remembered context is not parsed again."""
    fakes = OrderedDict((i.to_bytes(32, "big"), None) for i in range(64))
    monkeypatch.setattr(payloads, "_PUBLIC_DIGESTS", fakes)
    data = public.to_bytes()
    _kind(data, Kind.CONTEXT)
    digests = list(payloads._PUBLIC_DIGESTS)
    assert len(digests) == 64
    assert digests[0] == (1).to_bytes(32, "big")
    assert (0).to_bytes(32, "big") not in payloads._PUBLIC_DIGESTS
    assert digests[-1] == __import__("hashlib").sha256(data).digest()

    def unparsed(*args, **kwargs):
        raise AssertionError("a remembered context was parsed again")

    monkeypatch.setattr(payloads.PublicContext, "from_bytes", unparsed)
    assert _kind(data, Kind.CONTEXT) == data


def test_a_context_without_its_magic_is_refused(public):
    data = public.to_bytes()
    with pytest.raises(ProtocolError, match="no FHEC magic"):
        _kind(b"FHEX" + data[4:], Kind.CONTEXT)


def _plain(shape, body: bytes, kind: str = "plain") -> bytes:
    return frame(b"FHET", 1, {"kind": kind, "shape": shape}, body)


def test_plain_tensors_fit_their_shape_exactly():
    _kind(_plain([2, 3], bytes(48)), Kind.TENSOR)
    _kind(_plain([0], b""), Kind.TENSOR)
    _kind(_plain([], bytes(8)), Kind.TENSOR)  # a scalar
    for shape, size in (([2, 3], 40), ([2, 3], 56), ([-1], 0), ([2.0], 16), (None, 8)):
        with pytest.raises(ProtocolError, match="must be a tensor frame"):
            _kind(_plain(shape, bytes(size)), Kind.TENSOR)


def test_a_secret_key_inside_a_plain_tensors_values_is_refused(seal_secret_key):
    body = bytes(8) + seal_secret_key
    body += bytes(-len(body) % 8)
    with pytest.raises(SecretKeyLeakError, match=r"^x holds a raw SEAL SecretKey at byte 8: "):
        _kind(_plain([len(body) // 8], body), Kind.TENSOR)


def _ckks(chunks: list[bytes], sizes: list | None = None, kind: str = "ckks") -> bytes:
    header = {"kind": kind, "shape": [4], "chunk_bytes": sizes or [len(c) for c in chunks]}
    return frame(b"FHET", 1, header, b"".join(chunks))


def test_every_chunk_of_a_ckks_tensor_is_checked_where_it_starts(public, seal_secret_key):
    ciphertext = encrypt(public, np.arange(4.0)).to_bytes()
    real = _real_chunk(ciphertext)
    _kind(_ckks([real, real]), Kind.TENSOR)
    with pytest.raises(SecretKeyLeakError, match="x ciphertext holds a raw SEAL SecretKey"):
        _kind(_ckks([real, seal_secret_key]), Kind.TENSOR)
    with pytest.raises(SecretKeyLeakError, match="x ciphertext"):
        _kind(_ckks([seal_secret_key, real]), Kind.TENSOR)


def test_the_members_of_an_uncompressed_ciphertext_are_its_own(seal_secret_key):
    """A SEAL-level result travels uncompressed: its ciphertexts' coefficient arrays are SEAL
    objects of their own, of no type the scan can tell; they lie within a public ciphertext."""
    deep = generate_keys(CKKSParams(8192, (60, 40, 60), 40)).public()  # one level to spend
    fresh = encrypt_for_compute(deep, np.arange(4.0), multiplications=1)
    summed = weighted_sum([fresh, fresh], [1.0, 0.5]).to_bytes()
    _kind(summed, Kind.TENSOR)
    real = _real_chunk(summed)
    message = f"x ciphertext holds a raw SEAL SecretKey at byte {len(real)}"
    with pytest.raises(SecretKeyLeakError, match=message):
        _kind(_ckks([real + seal_secret_key]), Kind.TENSOR)


def test_a_ckks_chunk_that_is_a_raw_public_seal_object_is_refused(public, seal_public_key):
    real = _real_chunk(encrypt(public, np.arange(4.0)).to_bytes())
    with pytest.raises(
        ProtocolError, match=r"x ciphertext holds a raw SEAL .*never travel unframed"
    ):
        _kind(_ckks([real, seal_public_key]), Kind.TENSOR)


def test_a_secret_key_inside_a_ckks_chunk_is_refused(public, seal_secret_key):
    """A chunk is TenSEAL's vector around raw SEAL ciphertexts, so public SEAL objects inside
    it are expected; a SecretKey spliced in after them is not."""
    real = _real_chunk(encrypt(public, np.arange(4.0)).to_bytes())
    _kind(_ckks([real, real]), Kind.TENSOR)  # the ciphertexts' own SEAL objects pass
    message = f"x ciphertext holds a raw SEAL SecretKey at byte {len(real)}"
    with pytest.raises(SecretKeyLeakError, match=message):
        _kind(_ckks([real, real + seal_secret_key]), Kind.TENSOR)


def _real_chunk(tensor: bytes) -> bytes:
    _, body = unframe(
        tensor, magic=TENSOR_MAGIC, version=TENSOR_VERSION, what="t", error=ProtocolError
    )
    return body


@pytest.mark.parametrize(
    ("sizes", "kind"),
    [
        ([8, 0], "ckks"),
        ([9], "ckks"),
        ([7], "ckks"),
        ([8], "plainish"),
        ("8", "ckks"),
        ([8.0], "ckks"),
    ],
)
def test_ckks_chunks_must_be_positive_and_fill_the_body(sizes, kind):
    data = frame(b"FHET", 1, {"kind": kind, "shape": [1], "chunk_bytes": sizes}, bytes(8))
    with pytest.raises(ProtocolError, match="must be a tensor frame"):
        _kind(data, Kind.TENSOR)
    _kind(
        frame(b"FHET", 1, {"kind": "ckks", "shape": [1], "chunk_bytes": [3, 5]}, bytes(8)),
        Kind.TENSOR,
    )


@pytest.mark.parametrize("kind", sorted(payloads._KEYGEN_KINDS))
def test_each_public_keygen_kind_passes_and_a_malformed_shape_does_not(kind):
    _kind(
        frame(multiparty.KEYGEN_MAGIC, 1, {"kind": kind, "shape": [2, 3]}, bytes(48)), Kind.KEYGEN
    )
    for shape, size in (("6", 48), ([2, 3], 40), ([2, 3], 56), ([-2, -3], 48)):
        data = frame(multiparty.KEYGEN_MAGIC, 1, {"kind": kind, "shape": shape}, bytes(size))
        with pytest.raises(ProtocolError, match="does not fit"):
            _kind(data, Kind.KEYGEN)


def _decryption(levels, body: bytes, chunks=None) -> bytes:
    header = {"levels": levels, "chunks": len(levels) if chunks is None else chunks}
    return frame(multiparty.DECRYPTION_MAGIC, 1, header, body)


def test_decryption_share_residues_fit_a_supported_ring_degree():
    _kind(_decryption([1], bytes(8 * 4096)), Kind.DECRYPTION_SHARE)
    _kind(_decryption([1, 2], bytes(8 * 3 * 8192)), Kind.DECRYPTION_SHARE)
    _kind(_decryption([], b""), Kind.DECRYPTION_SHARE)
    for levels, size, chunks in (
        ([1], 8 * 4096 + 8, None),
        ([1], 8 * 2048, None),
        ([1], 0, None),
        ([0], 0, None),
        ([1], 8 * 4096, 2),
        ("1", 8 * 4096, 1),
    ):
        with pytest.raises(ProtocolError, match="must be a decryption share"):
            _kind(_decryption(levels, bytes(size), chunks), Kind.DECRYPTION_SHARE)


def test_sealed_bytes_are_a_nonce_and_a_tag_at_the_least():
    _kind(bytes(28), Kind.SEALED)
    with pytest.raises(ProtocolError, match=r"shorter than a nonce and a tag \(28 bytes\)"):
        _kind(bytes(27), Kind.SEALED)


def test_a_secret_key_inside_sealed_bytes_is_refused(seal_secret_key):
    with pytest.raises(SecretKeyLeakError, match=r"^x holds a raw SEAL SecretKey at byte 3: "):
        _kind(b"abc" + seal_secret_key, Kind.SEALED)
    with pytest.raises(SecretKeyLeakError, match=r"^x holds a raw SEAL SecretKey: "):
        _kind(seal_secret_key, Kind.SEALED)


def test_an_identity_is_32_bytes():
    _kind(bytes(32), Kind.IDENTITY)
    for size in (31, 33):
        with pytest.raises(ProtocolError, match=f"{size} bytes"):
            _kind(bytes(size), Kind.IDENTITY)


def _npy(array: np.ndarray, version=(1, 0)) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version, allow_pickle=False)
    return buffer.getvalue()


def test_float_arrays_of_either_npy_version_pass_and_others_do_not():
    _kind(_npy(np.ones(3, dtype=np.float32)), Kind.ARRAY)
    _kind(_npy(np.ones((2, 2)), (2, 0)), Kind.ARRAY)
    for bad, match in (
        (_npy(np.ones(3))[:-1], "shape"),
        (_npy(np.ones(3)) + b"\x00", "shape"),
        (_npy(np.ones(3, dtype=np.int64)), "not of floats"),
        (_npy(np.ones(3), (3, 0)), "version"),
        (b"\x93NUMPY", "no .npy"),
    ):
        with pytest.raises(ProtocolError, match=match):
            _kind(bad, Kind.ARRAY)


def test_a_secret_key_inside_an_array_is_refused(seal_secret_key):
    body = seal_secret_key + bytes(-len(seal_secret_key) % 8)
    data = _npy(np.frombuffer(body, dtype=np.float64))
    with pytest.raises(SecretKeyLeakError, match=r"^x holds a raw SEAL SecretKey at byte 128: "):
        _kind(data, Kind.ARRAY)


def test_empty_is_no_bytes():
    assert _kind(b"", Kind.EMPTY) == b""
    with pytest.raises(ProtocolError, match="1 bytes"):
        _kind(b"\x00", Kind.EMPTY)


def test_secret_material_in_a_keygen_share_body_is_refused(secret):
    """A key-generation share is checked by its framing; its residues must hold nothing else."""
    raw = bytes(8) + secret.raw.serialize(save_secret_key=True)  # past the start
    body = raw + bytes(-len(raw) % 8)
    header = {"kind": "ckg-share", "shape": [len(body) // 8]}
    with pytest.raises(SecretKeyLeakError, match=r"^x holds a raw SEAL SecretKey at byte \d+: "):
        _kind(frame(multiparty.KEYGEN_MAGIC, 1, header, body), Kind.KEYGEN)


def test_secret_material_in_a_decryption_share_body_is_refused(secret):
    raw = bytes(8) + secret.raw.serialize(save_secret_key=True)  # past the start
    body = raw + bytes(-len(raw) % (8 * 4096))
    levels = [len(body) // (8 * 4096)]
    with pytest.raises(SecretKeyLeakError, match=r"^x holds a raw SEAL SecretKey at byte \d+: "):
        _kind(_decryption(levels, body), Kind.DECRYPTION_SHARE)
    with pytest.raises(ProtocolError, match=r"\d+ bytes of residues for no levels"):
        _kind(_decryption([], raw), Kind.DECRYPTION_SHARE)


@pytest.mark.parametrize(
    ("data", "kind", "reason"),
    [
        (b"FHEX" + bytes(40), Kind.CONTEXT, "no FHEC magic"),
        (bytes(40), Kind.TENSOR, "no FHET frame"),
        (_plain("2", bytes(16)), Kind.TENSOR, "header shape '2' is malformed"),
        (_plain([2], bytes(8)), Kind.TENSOR, "a plain tensor of shape [2] with 8 bytes of values"),
        (
            frame(b"FHET", 1, {"kind": "other", "shape": [1], "chunk_bytes": [8]}, bytes(8)),
            Kind.TENSOR,
            "kind 'other' with chunks [8] of 8",
        ),
        (bytes(40), Kind.KEYGEN, "no FHEG frame"),
        (
            frame(multiparty.KEYGEN_MAGIC, 1, {"kind": "rkg1", "shape": [2]}, bytes(8)),
            Kind.KEYGEN,
            "shape [2] does not fit 8 bytes",
        ),
        (bytes(40), Kind.DECRYPTION_SHARE, "no FHED frame"),
        (_decryption([1], bytes(8), 2), Kind.DECRYPTION_SHARE, "levels [1] do not match chunks 2"),
        (_decryption([1], bytes(8)), Kind.DECRYPTION_SHARE, "8 bytes of residues do not fit"),
        (bytes(3), Kind.SEALED, "shorter than a nonce and a tag (28 bytes)"),
        (bytes(3), Kind.IDENTITY, "3 bytes"),
        (
            b"\x93NUMPY\x01\x00" + bytes(2),
            Kind.ARRAY,
            "no .npy array",
        ),
        (_npy(np.ones(2))[:-8], Kind.ARRAY, "an array of shape (2,) with 8 bytes of values"),
        (bytes(3), Kind.EMPTY, "3 bytes"),
    ],
)
def test_each_refusal_names_its_reason(data, kind, reason):
    with pytest.raises(ProtocolError) as refused:
        _kind(data, kind)
    assert f"are not {kind.value}: {reason}" in str(refused.value)


@pytest.mark.parametrize("shape", [{}, ""])
def test_a_shape_is_a_list_of_integers(shape):
    data = frame(multiparty.KEYGEN_MAGIC, 1, {"kind": "rkg1", "shape": shape}, bytes(8))
    with pytest.raises(ProtocolError, match="does not fit"):
        _kind(data, Kind.KEYGEN)


# -- secret_material: what counts as secret, at which offsets -----------------------------------


def _seal(
    body: bytes,
    *,
    magic: int = 0xA15E,
    header: int = 16,
    major: int = 3,
    compression: int = 0,
    reserved: int = 0,
    total: int | None = None,
) -> bytes:
    """A SEAL serialization header (seal/serialization.h) and `body`."""
    size = 16 + len(body) if total is None else total
    return struct.pack("<HBBBBHQ", magic, header, major, 4, compression, reserved, size) + body


def _plaintext(coefficients: int, count: int, tail: int = 24, nested_header: int = 16) -> bytes:
    """The first members of a SEAL Plaintext (how SEAL saves a SecretKey): parms_id, the
    coefficient count, the scale, then the coefficients' own header and count."""
    nested = struct.pack("<HBBBBHQ", 0xA15E, nested_header, 3, 4, 0, 0, 16 + 8 + tail)
    return (
        bytes(32)
        + struct.pack("<Q", coefficients)
        + bytes(8)
        + nested
        + struct.pack("<Q", count)
        + bytes(tail)
    )


def test_the_description_of_each_raw_seal_object(secret, seal_secret_key, seal_public_key):
    relin = _saved(secret.raw.relin_keys().data)
    public_context = secret.public().raw.serialize()
    parameters = public_context[2 : 2 + public_context[1]]
    assert material_at(seal_secret_key, 0) == ("a raw SEAL SecretKey", True)
    assert material_at(seal_public_key, 0) == ("a raw SEAL Ciphertext or PublicKey", False)
    assert material_at(relin, 0) == ("a raw SEAL RelinKeys or GaloisKeys", False)
    assert material_at(parameters, 0) == ("a raw SEAL EncryptionParameters", False)
    assert material_at(public_context, 0) == ("a raw TenSEAL context", False)
    assert material_at(secret.raw.serialize(save_secret_key=True), 0) == (
        "a raw TenSEAL context holding a secret key (its private part)",
        True,
    )


def test_a_seal_object_of_a_type_that_cannot_be_told_counts_as_secret():
    assert material_at(_seal(bytes(100)), 0) == (
        "a raw SEAL object of a type that cannot be told (it may be a SecretKey)",
        True,
    )
    # zlib that does not inflate: not told either
    assert material_at(_seal(b"not zlib at all" * 8, compression=1), 0)[1] is True


@pytest.mark.parametrize("compression", [0, 1, 2])
def test_a_crafted_plaintext_is_told_a_secret_key_in_every_compression(compression):
    body = _plaintext(7, 7)
    body = {0: body, 1: zlib.compress(body), 2: zstandard.ZstdCompressor().compress(body)}[
        compression
    ]
    assert material_at(_seal(body, compression=compression), 0) == ("a raw SEAL SecretKey", True)


@pytest.mark.parametrize(
    ("body", "told"),
    [
        (_plaintext(2**63 + 5, 2**63 + 5), ("a raw SEAL SecretKey", True)),  # top bit set
        (_plaintext(7, 8), ("a raw SEAL RelinKeys or GaloisKeys", False)),
        (_plaintext(7, 7, tail=0), ("a raw SEAL SecretKey", True)),  # 72 bytes: count read
        (_plaintext(7, 7)[:64], ("a raw SEAL RelinKeys or GaloisKeys", False)),  # no count
        (
            bytes(40),
            ("a raw SEAL object of a type that cannot be told (it may be a SecretKey)", True),
        ),
        # the coefficients' header with its size field wrong: not a Plaintext
        (
            _plaintext(7, 8, nested_header=17),
            ("a raw SEAL object of a type that cannot be told (it may be a SecretKey)", True),
        ),
    ],
    ids=["top-bit", "counts-differ", "72-bytes", "64-bytes", "40-bytes", "nested-size"],
)
def test_a_plaintext_is_told_from_its_first_members(body, told):
    assert material_at(_seal(body), 0) == told


def test_a_nested_header_of_another_major_version_is_no_plaintext():
    body = bytearray(_plaintext(7, 8))
    body[50] = 5  # the coefficients' header: major version 5
    assert material_at(_seal(bytes(body)), 0)[1] is True  # cannot be told


@pytest.mark.parametrize(
    "fields",
    [
        {"magic": 0xA15F},
        {"header": 17},
        {"major": 2},
        {"compression": 3},
        {"reserved": 1},
        {"total": 16},
        {"total": 16 + 96 + 1},
    ],
    ids=["magic", "header", "major", "compression", "reserved", "total-16", "total-long"],
)
def test_a_seal_header_with_one_field_off_is_no_seal_object(fields):
    assert material_at(_seal(_plaintext(7, 7), **fields), 0) is None


def test_only_a_complete_seal_object_is_told(seal_secret_key):
    """Random (sealed) bytes may hold a plausible header whose object would run past the end."""
    data = os.urandom(40) + _seal(bytes(96), total=16 + 96 + 30)
    refuse_unframed(data, what="x", embedded=True)
    refuse_unframed(b"abc" + SEAL_MAGIC + b"\x10\x03", what="x", embedded=True)
    refuse_unframed(b"xyzFHES\x00\x01", what="x", embedded=True)


def test_inflating_a_zlib_seal_object_stops_after_its_first_members(monkeypatch):
    """A small zlib object can inflate to gigabytes: only the first members are inflated."""
    inflated = []
    real = zlib.decompressobj

    class Recorder:
        def __init__(self):
            self.inner = real()

        def decompress(self, data, *args):
            out = self.inner.decompress(data, *args)
            inflated.append(len(out))
            return out

    from fedhe.crypto import secret_material

    monkeypatch.setattr(secret_material.zlib, "decompressobj", Recorder)
    data = _seal(zlib.compress(_plaintext(7, 7) + bytes(1 << 20)), compression=1)
    assert material_at(data, 0) == ("a raw SEAL SecretKey", True)
    assert inflated == [96]


def test_a_secret_right_after_the_first_byte_is_found(seal_secret_key, secret):
    share = multiparty.SecretShare.generate(secret.params).to_bytes()
    for hidden, found in ((seal_secret_key, "raw SEAL SecretKey"), (share, "FHES")):
        with pytest.raises(SecretKeyLeakError, match=f"^x holds .*{found}.* at byte 1: "):
            refuse_unframed(b"x" + hidden + SEAL_MAGIC, what="x", embedded=True)
        refuse_unframed(b"x" + hidden, what="x", embedded=False)  # at the start only


def test_refusal_messages_say_what_was_found_where_and_what_to_do(seal_secret_key, secret):
    with pytest.raises(SecretKeyLeakError) as leak:
        refuse_unframed(seal_secret_key, what="x", embedded=False)
    assert str(leak.value) == (
        "x holds a raw SEAL SecretKey: secret keys and key shares never leave their holder's "
        "disk. Nothing was sent; send public material only (a PublicContext, a public "
        "key-generation share, a decryption share)."
    )
    with pytest.raises(ProtocolError) as raw:
        refuse_unframed(secret.public().raw.serialize(), what="x", embedded=False)
    assert str(raw.value) == (
        "x holds a raw TenSEAL context: raw SEAL and TenSEAL objects never travel unframed; "
        "send fedhe frames (PublicContext.to_bytes, tensor.to_bytes)."
    )
    share = multiparty.SecretShare.generate(secret.params).to_bytes()
    assert material_at(share, 0) == (
        "a key-holder group's secret material (an FHES frame: a key share, a dealt piece "
        "or an ephemeral key)",
        True,
    )


def test_a_context_frame_is_secret_by_its_header_or_by_what_it_wraps(secret):
    public = secret.public().raw.serialize()
    private = secret.raw.serialize(save_secret_key=True)
    told = ("a context frame (FHEC) holding a secret key", True)
    assert material_at(frame(CONTEXT_MAGIC, 1, {}, private), 0) == told
    assert material_at(frame(CONTEXT_MAGIC, 1, {"secret": True}, public), 0) == told
    assert material_at(frame(CONTEXT_MAGIC, 1, {"secret": False}, public), 0) is None
    assert material_at(frame(CONTEXT_MAGIC, 1, {}, b"not tenseal"), 0) is None


def _raw_frame(magic: bytes, header: bytes, body: bytes = b"", *, length=None) -> bytes:
    size = len(header) if length is None else length
    return magic + struct.pack(">HI", 1, size) + header + body


def test_frame_bounds():
    secret_magic = multiparty.SECRET_MAGIC
    assert frame_at(_raw_frame(secret_magic, b"{}"), 0, secret_magic) == ({}, 12)
    # a header of exactly the largest size still frames
    big = b"{" + b" " * (MAX_FRAME_HEADER - 2) + b"}"
    assert frame_at(_raw_frame(secret_magic, big), 0, secret_magic) == ({}, 10 + len(big))
    assert frame_at(_raw_frame(secret_magic, big + b" "), 0, secret_magic) is None
    # a header that runs past the end, a header that is no object, another version
    assert frame_at(_raw_frame(secret_magic, b"{}", length=12), 0, secret_magic) is None
    assert material_at(_raw_frame(CONTEXT_MAGIC, b"[1]"), 0) is None
    assert frame_at(b"FHES\x00\x02\x00\x00\x00\x02{}", 0, secret_magic) is None
    # at an offset
    data = b"xyz" + _raw_frame(secret_magic, b'{"a": 1}', b"body")
    assert frame_at(data, 3, secret_magic) == ({"a": 1}, 3 + 10 + 8)
    with pytest.raises(SecretKeyLeakError, match="at byte 3"):
        refuse_unframed(data, what="x", embedded=True)


@pytest.fixture(scope="module")
def parameters(secret) -> bytes:
    """SEAL EncryptionParameters, the first field of every TenSEAL context."""
    context = secret.public().raw.serialize()
    return context[2 : 2 + context[1]]


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return varint(number << 3 | wire) + payload


def _context(parameters: bytes, *fields: bytes) -> bytes:
    return _field(1, 2, varint(len(parameters)) + parameters) + b"".join(fields)


SECRET_PART = _field(3, 2, b"\x03key")


@pytest.mark.parametrize(
    "before",
    [
        b"",
        _field(2, 0, b"\x96\x01"),  # a varint
        _field(4, 1, b"\x00" * 8),  # fixed64
        _field(5, 5, b"\x00" * 4),  # fixed32
        _field(6, 2, b"\x02ab"),
        _field(2, 0, b"\x01") + _field(4, 1, bytes(8)) + _field(5, 5, bytes(4)),
    ],
    ids=["alone", "varint", "fixed64", "fixed32", "bytes", "all"],
)
def test_the_private_part_is_found_after_fields_of_every_wire_type(parameters, before):
    data = _context(parameters, before, SECRET_PART)
    assert material_at(data, 0) == (
        "a raw TenSEAL context holding a secret key (its private part)",
        True,
    )


@pytest.mark.parametrize(
    "after",
    [
        b"\x80",  # a tag cut short
        b"\x02\x00",  # field number 0
        _field(2, 0, b"\x80"),  # a varint value cut short
        _field(2, 2, b"\x80"),  # a length cut short
        _field(2, 3, b""),  # a group (wire type 3): not parsed
        _field(2, 2, b"\x09abc"),  # longer than the data
    ],
    ids=["tag", "field-0", "varint", "length", "group", "overlong"],
)
def test_parsing_stops_at_the_first_field_that_does_not_parse(parameters, after):
    """What follows an unparsable field is not read: the context is still refused as raw."""
    data = _context(parameters, after, SECRET_PART)
    assert material_at(data, 0) == ("a raw TenSEAL context", False)
    assert material_at(_context(parameters, after), 0) == ("a raw TenSEAL context", False)


def test_an_empty_private_part_holds_no_key(parameters):
    data = _context(parameters, _field(3, 2, b"\x00"))
    assert material_at(data, 0) == ("a raw TenSEAL context", False)


def test_a_protobuf_around_a_raw_secret_key_is_secret(seal_secret_key, parameters):
    data = _field(1, 2, varint(len(seal_secret_key)) + seal_secret_key)
    assert material_at(data, 0) == ("a protobuf around a raw SEAL SecretKey", True)
    # the first field's length must be the SEAL object's size exactly
    wrong = _field(1, 2, varint(len(parameters) + 1) + parameters + b"\x00")
    assert material_at(wrong, 0) is None
    assert material_at(b"\x0a\x80", 0) is None  # a length cut short
    assert material_at(b"\x0a", 0) is None


# -- protocol: building and checking whole messages ---------------------------------------------


def _padded(secret_bytes: bytes, before: bytes = b"pad") -> bytes:
    return before + secret_bytes


def test_secret_material_behind_a_few_bytes_is_found_wherever_bytes_travel(seal_secret_key):
    hidden = _padded(seal_secret_key)
    at = r" holds a raw SEAL SecretKey at byte 3: "
    cases = [
        (protocol.AUDIT, {"config": {"job-id": hidden}}, r"query\.audit request config 'job-id'"),
        (
            protocol.AUDIT,
            {"config": {"job-id": ["a", hidden]}},
            r"query\.audit request config 'job-id'",
        ),
        (
            protocol.AUDIT,
            {"config": {"job-id": hidden.decode("latin-1")}},
            r"query\.audit request config 'job-id'",
        ),
        (
            protocol.AUDIT,
            {"config": {"job-id": "note " + hidden.hex().upper()}},
            r"query\.audit request config 'job-id' \(base64/hex in a string\)",
        ),
        (protocol.AUDIT, {"payload": {"x": hidden}}, r"query\.audit request payload 'x'"),
    ]
    for message_type, records, what in cases:
        with pytest.raises(SecretKeyLeakError, match="^" + what + at):
            protocol.content(message_type, protocol.REQUEST, **records)


@pytest.mark.parametrize("message_type", [protocol.TRAIN, protocol.AUDIT])
def test_secret_material_in_weights_is_found_before_the_schema_is_asked(
    seal_secret_key, message_type
):
    body = bytes(8) + seal_secret_key
    weights = np.frombuffer(body + bytes(-len(body) % 8), dtype=np.float64)
    with pytest.raises(SecretKeyLeakError, match=r"request weights 'w' holds .* at byte 8: "):
        protocol.content(message_type, protocol.REQUEST, weights={"w": weights})


def _seal_ending_in(size: int, last: int = 0) -> bytes:
    """A crafted SEAL SecretKey of exactly `size` bytes (≥ 88) whose last byte is `last`."""
    data = bytearray(_seal(_plaintext(7, 7, tail=size - 88)))
    data[-1] = last
    return bytes(data)


@pytest.mark.parametrize("size", [97, 98, 96], ids=["one-over", "two-over", "whole-groups"])
def test_unpadded_base64_of_any_length_is_decoded_to_its_last_byte(size):
    """The key runs to the last byte: cutting one off would leave no complete SEAL object."""
    text = base64.urlsafe_b64encode(_seal_ending_in(size, 0x17)).decode().rstrip("=")
    with pytest.raises(SecretKeyLeakError, match=r"base64/hex in a string.*raw SEAL SecretKey"):
        protocol.content(protocol.AUDIT, protocol.REQUEST, config={"job-id": f"k {text} ."})


def test_base64_with_a_stray_character_after_it_is_decoded():
    """One character more than whole 4-character groups (and padding after it) is dropped."""
    text = base64.b64encode(_seal_ending_in(96)).decode() + "A="
    assert len(text.rstrip("=")) % 4 == 1
    with pytest.raises(SecretKeyLeakError, match=r"base64/hex in a string.*raw SEAL SecretKey"):
        protocol.content(protocol.AUDIT, protocol.REQUEST, config={"job-id": text})


def test_a_refused_key_names_what_the_schema_lists_or_none():
    for records, listed in (
        ({"config": {"nope": 1}}, "config 'nope'; its schema lists none."),
        (
            {"payload": {"nope": b""}},
            "payload 'nope'; its schema lists ['identity', 'mac-seed', 'mac-seed/*'].",
        ),
        (
            {"payload": {"nope": "text"}},
            "payload 'nope'; its schema lists ['identity', 'mac-seed', 'mac-seed/*'].",
        ),
        (
            {"metrics": {"nope": 1.0}},
            "metric 'nope'; its schema lists "
            "['n-classes', 'n-features', 'n-queries', 'n-samples'].",
        ),
    ):
        with pytest.raises(ProtocolError) as refused:
            protocol.content(protocol.SETUP, protocol.REPLY, **records)
        assert str(refused.value) == f"query.setup reply may not carry {listed}"
    with pytest.raises(ProtocolError) as refused:
        protocol.content(protocol.AUDIT, protocol.REQUEST, payload={"nope": b""})
    assert str(refused.value).endswith("its schema lists none.")
    with pytest.raises(ProtocolError) as refused:
        protocol.content(protocol.AUDIT, protocol.REPLY, config={"nope": 1})
    assert str(refused.value).endswith("its schema lists ['entries'].")
    with pytest.raises(ProtocolError) as refused:
        protocol.content(protocol.AUDIT, protocol.REQUEST, metrics={"nope": 1.0})
    assert str(refused.value).endswith("its schema lists none.")


def test_config_bytes_are_refused_naming_the_key():
    for value in (b"job", [b"job"]):
        with pytest.raises(ProtocolError) as refused:
            protocol.content(protocol.AUDIT, protocol.REQUEST, config={"job-id": value})
        assert str(refused.value) == (
            "query.audit request config 'job-id' holds bytes: bytes travel only as typed "
            "payload values."
        )


def test_a_non_latin_1_string_is_still_searched_for_encoded_runs(seal_secret_key):
    protocol.content(protocol.AUDIT, protocol.REQUEST, config={"job-id": "naïve ☃"})
    text = "☃ " + seal_secret_key.hex()
    with pytest.raises(SecretKeyLeakError, match="base64/hex"):
        protocol.content(protocol.AUDIT, protocol.REQUEST, config={"job-id": text})


def _received(records: dict) -> protocol.RecordDict:
    return protocol.RecordDict(records)


def test_check_message_applies_every_schema_check_to_what_it_receives():
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

    audit = (protocol.AUDIT, protocol.REQUEST)
    cases = [
        (
            {"config": MetricRecord({"a": 1.0})},
            "query.audit request: record 'config' is not a ConfigRecord.",
        ),
        ({"config": ConfigRecord({"nope": 1})}, "query.audit request may not carry config 'nope'"),
        ({"payload": ConfigRecord({"nope": b""})}, "query.audit request may not carry payload"),
        (
            {"metrics": ConfigRecord({})},
            "query.audit request: record 'metrics' is not a MetricRecord.",
        ),
        ({"metrics": MetricRecord({"nope": 1.0})}, "query.audit request may not carry metric"),
        (
            {"weights": ConfigRecord({})},
            "query.audit request: record 'weights' is not an ArrayRecord.",
        ),
        (
            {"weights": ArrayRecord({"w": Array(np.ones(2))})},
            "query.audit request carries no weights; got 'w'.",
        ),
    ]
    for records, message in cases:
        with pytest.raises(ProtocolError) as refused:
            protocol.check_message(_received(records), *audit)
        assert str(refused.value).startswith(message)
    ints = _received({"weights": ArrayRecord({"w": Array(np.arange(2))})})
    with pytest.raises(ProtocolError, match=r"weights 'w' are int64: .* floats only"):
        protocol.check_message(ints, protocol.TRAIN, protocol.REQUEST)


def test_check_message_reads_a_group_step_from_its_config():
    records = protocol.content(
        protocol.GROUP, protocol.REPLY, config={"step": "setup-3"}, metrics={"keyholder-s": 1.0}
    )
    protocol.check_message(records, protocol.GROUP, protocol.REPLY)
    forged = _received(
        {
            "config": protocol.ConfigRecord({"step": "setup-3"}),
            "metrics": protocol.MetricRecord({"nope": 1.0}),
        }
    )
    with pytest.raises(ProtocolError, match=r"^query\.group/setup-3 reply may not carry metric"):
        protocol.check_message(forged, protocol.GROUP, protocol.REPLY)


def test_records_are_read_back_as_they_were_built():
    records = protocol.content(
        protocol.TRAIN,
        protocol.REPLY,
        payload={"contribution": _plain([1], bytes(8))},
        metrics={"n-samples": 3, "train-loss": 0.5},
    )
    assert protocol.metrics_of(records) == {"n-samples": 3.0, "train-loss": 0.5}
    assert protocol.config_of(records) == {} and protocol.weights_of(records) == {}
    assert protocol.metrics_of(protocol.RecordDict({})) == {}
    nested = {"contributors": [["a", "b"], ["c"]], "output": [{"k": 1}], "round": [1, 2]}
    request = protocol.content(protocol.DECRYPT, protocol.REQUEST, config=nested)
    assert protocol.config_of(request) == nested
    raw = dict(request[protocol.CONFIG].items())
    assert raw["round"] == [1, 2] and raw["contributors"].startswith("json:")
    assert protocol.from_json(protocol.to_json({"a": [1]})) == {"a": [1]}
    assert protocol.from_json("plain") == "plain"


def test_message_nbytes_counts_payload_weights_and_settings():
    records = protocol.content(
        protocol.TRAIN, protocol.REQUEST, config={"round": 1}, weights={"w": np.ones(3)}
    )
    weights = sum(len(a.data) for a in records[protocol.WEIGHTS].values())
    assert weights >= 24
    assert protocol.message_nbytes(records) == weights + len('{"round": 1}')
    reply = protocol.content(
        protocol.TRAIN, protocol.REPLY, payload={"contribution": _plain([1], bytes(8))}
    )
    assert protocol.message_nbytes(reply) == len(_plain([1], bytes(8)))
    assert protocol.message_nbytes(protocol.RecordDict({})) == 0
    both = protocol.RecordDict({protocol.PAYLOAD: protocol.ConfigRecord({"a": b"xyz"}), **records})
    assert protocol.message_nbytes(both) == 3 + weights + len('{"round": 1}')


def test_arrays_travel_as_float64_npy_without_pickles():
    data = protocol.array_to_bytes(np.arange(3))
    back = protocol.array_from_bytes(data)
    assert back.dtype == np.float64 and back.tolist() == [0.0, 1.0, 2.0]
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        protocol.array_from_bytes(buffer.getvalue())
