"""Where secret-key material can hide in bytes, and the check that refuses it.

Three serializations can carry a CKKS secret key or a share of one: fedhe frames (a group's
`FHES` secret material, a context frame whose TenSEAL context keeps its private part), raw SEAL
objects (a `SecretKey` is saved as a Plaintext) and raw TenSEAL contexts (protobuf, the private
part in field 3). `refuse_unframed` finds each at the start of some bytes or, for bytes that
may wrap others (sealed bytes, arrays, config strings), anywhere inside them. It reads only
headers and the first members of an object: no secret key is ever loaded to tell.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import zstandard

from fedhe.crypto.context import CONTEXT_MAGIC
from fedhe.crypto.framing import FRAME_PREFIX, MAX_FRAME_HEADER
from fedhe.crypto.multiparty import SECRET_MAGIC
from fedhe.errors import ProtocolError, SecretKeyLeakError

__all__ = ["frame_at", "material_at", "refuse_unframed"]


def refuse_unframed(data: bytes, *, what: str, embedded: bool, secret_only: bool = False) -> None:
    """Refuse secret material, and raw SEAL or TenSEAL objects (which travel only inside fedhe
    frames), at the start of `data` and, when `embedded`, anywhere inside it. `secret_only`:
    public SEAL objects are expected there (a ciphertext's own), only secret material is
    refused."""
    offsets: Iterable[int] = sorted(_candidates(data)) if embedded else (0,)
    refusal = None
    inside_until = 0  # the end of the last public SEAL object found: what lies within is its own
    for offset in offsets:
        if offset < inside_until:
            continue  # a member of that object (a ciphertext's coefficient array, say)
        found = material_at(data, offset)
        if found is None:
            continue
        description, secret = found
        where = f" at byte {offset}" if offset else ""
        if secret:
            raise SecretKeyLeakError(
                f"{what} holds {description}{where}: secret keys and key shares never leave "
                "their holder's disk. Nothing was sent; send public material only (a "
                "PublicContext, a public key-generation share, a decryption share)."
            )
        inside_until = offset + _seal_object_at(data, offset)
        refusal = refusal or f"{what} holds {description}{where}"
    if refusal is not None and not secret_only:
        raise ProtocolError(
            f"{refusal}: raw SEAL and TenSEAL objects never travel unframed; send fedhe "
            "frames (PublicContext.to_bytes, tensor.to_bytes)."
        )


def _candidates(data: bytes) -> Iterator[int]:
    """Offset 0, then every offset where a secret frame, a context frame or a SEAL object may
    start (bytes.find per needle: faster here than one regular expression for all three)."""
    yield 0
    for needle in (SECRET_MAGIC, CONTEXT_MAGIC, _SEAL_MAGIC_BYTES):
        offset = data.find(needle, 1)  # pragma: no mutate  # from 0 only re-yields offset 0
        while offset != -1:
            yield offset
            offset = data.find(needle, offset + 1)  # pragma: no mutate  # no needle overlaps itself


def material_at(data: bytes, offset: int) -> tuple[str, bool] | None:
    """(what, whether secret) of a serialization that must not travel as it is, starting at
    `offset`: a key-holder group's secret frame, a context frame with a secret key, a raw SEAL
    object, a raw TenSEAL context. None: nothing of the sort starts there."""
    if frame_at(data, offset, SECRET_MAGIC) is not None:
        return (
            "a key-holder group's secret material (an FHES frame: a key share, a dealt piece "
            "or an ephemeral key)",
            True,
        )
    context = frame_at(data, offset, CONTEXT_MAGIC)
    if context is not None:
        header, body = context
        inner = _tenseal_at(data, body)
        if header.get("secret") or (inner is not None and inner[1]):
            return "a context frame (FHEC) holding a secret key", True
        return None
    total = _seal_object_at(data, offset)
    if total:
        kind = _seal_type(data[offset : offset + total])
        if kind is None:
            return "a raw SEAL object of a type that cannot be told (it may be a SecretKey)", True
        return f"a raw SEAL {kind}", kind == "SecretKey"
    return _tenseal_at(data, offset)


# -- fedhe frames ------------------------------------------------------------------------------

_FRAME_VERSION = 1  # every fedhe frame is at version 1 (fedhe.crypto.framing)


def frame_at(data: bytes, offset: int, magic: bytes) -> tuple[dict[str, Any], int] | None:
    """(header, offset of the body) of a fedhe frame of `magic` at `offset`, or None."""
    if data[offset : offset + 4] != magic:
        return None
    if len(data) - offset < FRAME_PREFIX.size:  # pragma: no mutate  # 10 bytes: no header, no JSON
        return None
    _, version, length = FRAME_PREFIX.unpack_from(data, offset)
    start = offset + FRAME_PREFIX.size
    if version != _FRAME_VERSION or length > MAX_FRAME_HEADER or start + length > len(data):
        return None
    try:
        header = json.loads(data[start : start + length])
    except ValueError:
        return None
    return (header, start + length) if isinstance(header, dict) else None


# -- raw SEAL and TenSEAL serializations --------------------------------------------------------

# SEAL's serialization header: magic 0xA15E, header size 16, version, compression mode,
# reserved, total size (seal/serialization.h).
_SEAL_HEADER = struct.Struct("<HBBBBHQ")
_SEAL_MAGIC = 0xA15E
_SEAL_MAGIC_BYTES = _SEAL_MAGIC.to_bytes(2, "little")
_SEAL_MAJORS = (3, 4)
_SEAL_COMPRESSION = (0, 1, 2)  # none, zlib, zstd
_SEAL_PREFIX_BYTES = 96  # enough of a body to tell its members apart


def _seal_object_at(data: bytes, offset: int, *, size: int | None = None) -> int:
    """The total size of a complete SEAL object at `offset` (exactly `size` when given), or 0."""
    if len(data) - offset < _SEAL_HEADER.size:  # pragma: no mutate  # 16 bytes: no total fits
        return 0
    magic, header, major, _, compression, reserved, total = _SEAL_HEADER.unpack_from(data, offset)
    plausible = (
        magic == _SEAL_MAGIC
        and header == _SEAL_HEADER.size
        and major in _SEAL_MAJORS
        and compression in _SEAL_COMPRESSION
        and reserved == 0
        and _SEAL_HEADER.size < total <= len(data) - offset
    )
    return total if plausible and (size is None or total == size) else 0


def _seal_type(obj: bytes) -> str | None:
    """The SEAL class of a serialized object, told from its first members; None if unknown."""
    body = _seal_prefix(obj)
    if body is None:
        return None
    if _nested_header(body, 48):
        coefficients, count = struct.unpack_from("<Q", body, 32)[0], _u64(body, 64)
        if count is not None and coefficients == count:
            return "SecretKey"  # SEAL saves a secret key as a Plaintext: parms_id, count, scale
        return "RelinKeys or GaloisKeys"
    if _nested_header(body, 73):
        return "Ciphertext or PublicKey"
    if _nested_header(body, 17):
        return "EncryptionParameters"
    return None


def _nested_header(body: bytes, offset: int) -> bool:
    if len(body) < offset + _SEAL_HEADER.size:
        return False
    magic, header, major, *_ = _SEAL_HEADER.unpack_from(body, offset)
    return magic == _SEAL_MAGIC and header == _SEAL_HEADER.size and major in _SEAL_MAJORS


def _u64(body: bytes, offset: int) -> int | None:
    return struct.unpack_from("<Q", body, offset)[0] if len(body) >= offset + 8 else None


def _seal_prefix(obj: bytes) -> bytes | None:
    """The first members of a SEAL object, decompressed (only as far as needed)."""
    compression = _SEAL_HEADER.unpack_from(obj)[4]
    body = obj[_SEAL_HEADER.size :]
    try:
        if compression == 0:
            return body[:_SEAL_PREFIX_BYTES]
        if compression == 1:
            return zlib.decompressobj().decompress(body, _SEAL_PREFIX_BYTES)
        with zstandard.ZstdDecompressor().stream_reader(body) as reader:
            return reader.read(_SEAL_PREFIX_BYTES)
    except (zlib.error, zstandard.ZstdError):
        return None


def _tenseal_at(data: bytes, offset: int) -> tuple[str, bool] | None:
    """A raw TenSEAL context (protobuf: field 1 the SEAL encryption parameters, field 3 the
    private part holding the secret key), or a protobuf whose first field is a SEAL
    SecretKey (TenSEAL's private part on its own), at `offset`."""
    if data[offset : offset + 1] != b"\x0a":
        return None
    length, start = _varint(data, offset + 1)
    if length is None or not _seal_object_at(data, start, size=length):
        return None
    fields = _proto_fields(data, offset)
    if any(number == 3 and wire == 2 and end > begin for number, wire, begin, end in fields):
        return "a raw TenSEAL context holding a secret key (its private part)", True
    if _seal_type(data[start : start + length]) == "SecretKey":
        return "a protobuf around a raw SEAL SecretKey", True
    return "a raw TenSEAL context", False


def _varint(data: bytes, offset: int) -> tuple[int | None, int]:
    value = shift = 0
    while offset < len(data) and shift < 64:  # pragma: no mutate  # shift: 63, then 70
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7
    return None, offset


def _proto_fields(data: bytes, offset: int) -> list[tuple[int, int, int, int]]:
    """Top-level protobuf fields (number, wire type, start, end) from `offset` up to the first
    byte that does not parse (the lengths are skipped, not read)."""
    fields = []
    while offset < len(data):  # pragma: no mutate  # at the end _varint gives None: break
        tag, position = _varint(data, offset)
        if tag is None or tag >> 3 == 0:
            break
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, end = _varint(data, position)
            if value is None:
                break
            begin = position  # pragma: no mutate  # begin is read for length-delimited fields only
        elif wire in (1, 5):
            begin, end = position, position + (8 if wire == 1 else 4)
        elif wire == 2:
            length, begin = _varint(data, position)
            if length is None:
                break
            end = begin + length
        else:
            break
        if end > len(data):
            break
        fields.append((number, wire, begin, end))
        offset = end
    return fields
