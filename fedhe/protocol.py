"""What travels in Flower messages between the roles: message types, record keys, packing, and
the one check every message passes, built or received.

Shared by `fedhe.clients` and `fedhe.aggregator` so both sides name every key the same way.
Every message carries only what its schema (`fedhe.messages`) lists for its type and direction,
and every bytes value (payloads, and bytes anywhere in config values or weights) passes
`check_bytes`: it must be of a kind the schema declares, and nothing that parses as secret-key
material in any serialization gets through (a fedhe frame, a raw TenSEAL context, a raw SEAL
object, base64 or hex of one in a config string).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import re
import struct
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import zstandard
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedhe.crypto.context import CONTEXT_MAGIC, PublicContext
from fedhe.crypto.multiparty import DECRYPTION_MAGIC, KEYGEN_MAGIC, SECRET_MAGIC
from fedhe.crypto.params import MAX_LOG_Q_128
from fedhe.errors import ProtocolError, SecretKeyLeakError
from fedhe.messages import (
    AUDIT,
    DECLARE,
    DECRYPT,
    DIRECTIONS,
    GRADIENT,
    GROUP,
    GROUP_STEPS,
    KNN_ANSWER,
    KNN_QUERY,
    KNN_UPLOAD,
    MLP_ANSWER,
    MLP_QUERY,
    MODEL_RELEASE,
    MODEL_STEP,
    MOMENTS,
    REGISTER,
    REPLY,
    REQUEST,
    SCHEMAS,
    SETUP,
    STATS,
    TRAIN,
    WHOAMI,
    Kind,
    Schema,
    schema_name,
)

# The message types and directions live in fedhe.messages (with the schemas); callers name
# them through this module.
__all__ = [
    "AUDIT",
    "CONFIG",
    "DECLARE",
    "DECRYPT",
    "GRADIENT",
    "GROUP",
    "KNN_ANSWER",
    "KNN_QUERY",
    "KNN_UPLOAD",
    "METRICS",
    "MLP_ANSWER",
    "MLP_QUERY",
    "MODEL_RELEASE",
    "MODEL_STEP",
    "MOMENTS",
    "PAYLOAD",
    "REGISTER",
    "REPLY",
    "REQUEST",
    "ROLES",
    "ROLE_KEYHOLDER",
    "ROLE_PARTY",
    "SETUP",
    "STATS",
    "TRAIN",
    "WEIGHTS",
    "WHOAMI",
    "array_from_bytes",
    "array_to_bytes",
    "check_bytes",
    "check_message",
    "config_of",
    "content",
    "from_json",
    "message_nbytes",
    "metrics_of",
    "payload_of",
    "to_json",
    "weights_of",
]

# Record names.
CONFIG = "config"
PAYLOAD = "payload"
METRICS = "metrics"
WEIGHTS = "weights"

ROLE_PARTY = "party"
ROLE_KEYHOLDER = "keyholder"
ROLES = (ROLE_PARTY, ROLE_KEYHOLDER)


# -- building and checking messages --------------------------------------------------------------


def content(
    message_type: str,
    direction: str,
    *,
    config: dict[str, Any] | None = None,
    payload: dict[str, bytes] | None = None,
    metrics: dict[str, float] | None = None,
    weights: dict[str, np.ndarray] | None = None,
) -> RecordDict:
    """The records of one message of `message_type` going `direction` (REQUEST: aggregator to
    node, REPLY: back), built only to its schema: a key the schema does not list, or bytes not
    of the kind it declares, raise ProtocolError; secret-key material SecretKeyLeakError."""
    schema, what = _schema_of(message_type, direction, config)
    records: dict[str, Any] = {}
    if config is not None:
        values = {k: _config_value(v) for k, v in config.items()}
        _check_config(schema, what, values)
        records[CONFIG] = ConfigRecord(values)
    if payload is not None:
        records[PAYLOAD] = ConfigRecord(_checked_payload(schema, what, payload))
    if metrics is not None:
        _check_metrics(schema, what, metrics)
        records[METRICS] = MetricRecord({k: float(v) for k, v in metrics.items()})
    if weights is not None:
        arrays = {k: np.ascontiguousarray(v) for k, v in weights.items()}
        _check_weights(schema, what, ((k, a.dtype, a.tobytes()) for k, a in arrays.items()))
        records[WEIGHTS] = ArrayRecord({k: Array(a) for k, a in arrays.items()})
    return RecordDict(records)


def check_message(records: RecordDict, message_type: str, direction: str) -> None:
    """The full check of a received (or logged) message: the same schema and byte checks that
    `content` applies when it builds one. Raises ProtocolError or SecretKeyLeakError."""
    config = records.get(CONFIG)
    if config is not None and not isinstance(config, ConfigRecord):
        raise ProtocolError(f"{message_type} {direction}: record {CONFIG!r} is not a ConfigRecord.")
    values = {} if config is None else dict(config.items())
    schema, what = _schema_of(message_type, direction, {k: from_json(v) for k, v in values.items()})
    extra = sorted(set(records.keys()) - {CONFIG, PAYLOAD, METRICS, WEIGHTS})
    if extra:
        raise ProtocolError(
            f"{what} carries records {extra}: a message holds only {CONFIG}, {PAYLOAD}, "
            f"{METRICS} and {WEIGHTS}."
        )
    _check_config(schema, what, values)
    payload = records.get(PAYLOAD)
    if payload is not None:
        if not isinstance(payload, ConfigRecord):
            raise ProtocolError(f"{what}: record {PAYLOAD!r} is not a ConfigRecord.")
        _checked_payload(schema, what, dict(payload.items()))
    metrics = records.get(METRICS)
    if metrics is not None:
        if not isinstance(metrics, MetricRecord):
            raise ProtocolError(f"{what}: record {METRICS!r} is not a MetricRecord.")
        _check_metrics(schema, what, dict(metrics.items()))
    weights = records.get(WEIGHTS)
    if weights is not None:
        if not isinstance(weights, ArrayRecord):
            raise ProtocolError(f"{what}: record {WEIGHTS!r} is not an ArrayRecord.")
        _check_weights(
            schema, what, ((k, np.dtype(a.dtype), bytes(a.data)) for k, a in weights.items())
        )


def _schema_of(
    message_type: str, direction: str, config: Mapping[str, Any] | None
) -> tuple[Schema, str]:
    if direction not in DIRECTIONS:
        raise ProtocolError(f"direction {direction!r} is not one of {list(DIRECTIONS)}.")
    step = (config or {}).get("step")
    if message_type == GROUP and step not in GROUP_STEPS:
        raise ProtocolError(
            f"a {GROUP} {direction} names its step in config 'step' (one of "
            f"{list(GROUP_STEPS)}), got {step!r}."
        )
    name = schema_name(message_type, step)
    schema = SCHEMAS.get((name, direction))
    if schema is None:
        raise ProtocolError(
            f"message type {message_type!r} has no {direction} schema: it is not a fedhe message."
        )
    return schema, f"{name} {direction}"


def _check_config(schema: Schema, what: str, config: Mapping[str, Any]) -> None:
    for key, value in config.items():
        _check_config_value(value, what=f"{what} config {key!r}")
        if not schema.allows_config(key):
            raise ProtocolError(
                f"{what} may not carry config {key!r}; its schema lists "
                f"{sorted(schema.config) or 'none'}."
            )


def _checked_payload(schema: Schema, what: str, payload: Mapping[str, Any]) -> dict[str, bytes]:
    checked = {}
    for key, value in payload.items():
        kinds = schema.payload_kinds(key)
        if kinds is None:
            if isinstance(value, bytes | bytearray | memoryview):
                _refuse_raw(bytes(value), what=f"{what} payload {key!r}", embedded=True)
            raise ProtocolError(
                f"{what} may not carry payload {key!r}; its schema lists "
                f"{sorted(schema.payload) or 'none'}."
            )
        checked[key] = check_bytes(value, kinds, what=f"{what} payload {key!r}")
    return checked


def _check_metrics(schema: Schema, what: str, metrics: Mapping[str, Any]) -> None:
    for key in metrics:
        if not schema.allows_metric(key):
            raise ProtocolError(
                f"{what} may not carry metric {key!r}; its schema lists "
                f"{sorted(schema.metrics) or 'none'}."
            )


def _check_weights(
    schema: Schema, what: str, arrays: Iterable[tuple[str, np.dtype, bytes]]
) -> None:
    for key, dtype, data in arrays:
        _refuse_raw(data, what=f"{what} weights {key!r}", embedded=True)
        if not schema.weights:
            raise ProtocolError(f"{what} carries no weights; got {key!r}.")
        if dtype.kind != "f":
            raise ProtocolError(
                f"{what} weights {key!r} are {dtype}: model weights travel as floats only."
            )


def _check_config_value(value: Any, *, what: str) -> None:
    """Config values are settings, not data: bytes never travel in them, and no string holds a
    secret key encoded (base64 or hex) or as raw characters."""
    if isinstance(value, bytes | bytearray | memoryview):
        _refuse_raw(bytes(value), what=what, embedded=True)
        raise ProtocolError(f"{what} holds bytes: bytes travel only as typed payload values.")
    if isinstance(value, list | tuple):
        for item in value:
            _check_config_value(item, what=what)
    elif isinstance(value, str):
        for decoded in _encoded_runs(value):
            _refuse_raw(decoded, what=f"{what} (base64/hex in a string)", embedded=True)
        try:
            raw = value.encode("latin-1")
        except UnicodeEncodeError:
            return
        _refuse_raw(raw, what=what, embedded=True)


# Runs of base64 (standard or URL-safe) or hex characters long enough to hold key material
# (kilobytes at the least); fingerprints and digests (≤ 64 hex digits) are shorter.
_ENCODED_RUN = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{128,}={0,2}")


def _encoded_runs(text: str) -> Iterator[bytes]:
    for match in _ENCODED_RUN.finditer(text):
        run = match.group()
        if len(run) % 2 == 0 and re.fullmatch(r"[0-9a-fA-F]+", run):
            yield bytes.fromhex(run)
        body = run.rstrip("=")
        body = body[: len(body) - len(body) % 4 if len(body) % 4 == 1 else len(body)]
        padded = body + "=" * (-len(body) % 4)
        for alphabet in (b"+/", b"-_"):
            try:
                yield base64.b64decode(padded, altchars=alphabet, validate=True)
            except (binascii.Error, ValueError):
                continue


# -- the encoder: every bytes value ------------------------------------------------------------


def check_bytes(data: Any, kinds: Iterable[Kind], *, what: str) -> bytes:
    """`data` as it may enter a message: bytes of one of `kinds` that hold no secret-key
    material. Raises SecretKeyLeakError for secret material (whatever its framing) and
    ProtocolError for bytes of another kind."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"{what} must be bytes, got {type(data).__name__}.")
    data = bytes(data)
    _refuse_raw(data, what=what, embedded=False)
    kinds = tuple(kinds)
    reasons = []
    for kind in kinds:
        reason = _KIND_CHECKS[kind](data, what)
        if reason is None:
            return data
        reasons.append(f"not {kind.value}: {reason}")
    raise ProtocolError(
        f"{what} must be {' or '.join(k.value for k in kinds)}; its {len(data)} bytes "
        f"(starting {data[:8].hex() or 'empty'}) are {'; '.join(reasons)}."
    )


def _refuse_raw(data: bytes, *, what: str, embedded: bool) -> None:
    """Refuse secret material, and raw SEAL or TenSEAL objects (which travel only inside fedhe
    frames), at the start of `data` and, when `embedded`, anywhere inside it."""
    offsets: Iterable[int] = _candidates(data) if embedded else (0,)
    refusal = None
    for offset in offsets:
        found = _material_at(data, offset)
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
        refusal = refusal or f"{what} holds {description}{where}"
    if refusal is not None:
        raise ProtocolError(
            f"{refusal}: raw SEAL and TenSEAL objects never travel unframed; send fedhe "
            "frames (PublicContext.to_bytes, tensor.to_bytes)."
        )


def _candidates(data: bytes) -> Iterator[int]:
    yield 0
    for needle in (SECRET_MAGIC, CONTEXT_MAGIC, _SEAL_MAGIC_BYTES):
        offset = data.find(needle, 1)
        while offset != -1:
            yield offset
            offset = data.find(needle, offset + 1)


def _material_at(data: bytes, offset: int) -> tuple[str, bool] | None:
    """(what, whether secret) of a serialization that must not travel as it is, starting at
    `offset`: a key-holder group's secret frame, a context frame with a secret key, a raw SEAL
    object, a raw TenSEAL context. None: nothing of the sort starts there."""
    if _frame_at(data, offset, SECRET_MAGIC) is not None:
        return (
            "a key-holder group's secret material (an FHES frame: a key share, a dealt piece "
            "or an ephemeral key)",
            True,
        )
    context = _frame_at(data, offset, CONTEXT_MAGIC)
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

_FRAME_PREFIX = struct.Struct(">4sHI")  # fedhe.crypto.framing: magic, version, header length
_FRAME_VERSION = 1
_MAX_FRAME_HEADER = 1 << 20


def _frame_at(data: bytes, offset: int, magic: bytes) -> tuple[dict[str, Any], int] | None:
    """(header, offset of the body) of a fedhe frame of `magic` at `offset`, or None."""
    if data[offset : offset + 4] != magic or len(data) - offset < _FRAME_PREFIX.size:
        return None
    _, version, length = _FRAME_PREFIX.unpack_from(data, offset)
    start = offset + _FRAME_PREFIX.size
    if version != _FRAME_VERSION or length > _MAX_FRAME_HEADER or start + length > len(data):
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
    if len(data) - offset < _SEAL_HEADER.size:
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
    while offset < len(data) and shift < 64:
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
    while offset < len(data):
        tag, position = _varint(data, offset)
        if tag is None or tag >> 3 == 0:
            break
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, end = _varint(data, position)
            if value is None:
                break
            begin = position
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


# -- the kinds of bytes a payload may hold ------------------------------------------------------


def _context_reason(data: bytes, what: str) -> str | None:
    if data[:4] != CONTEXT_MAGIC:
        return "no FHEC magic"
    # The same context goes to every party (~10 ms to parse each time): remember the digests
    # of contexts that passed; a refused one is parsed and refused every time.
    digest = hashlib.sha256(data).digest()
    if digest in _PUBLIC_DIGESTS:
        return None
    PublicContext.from_bytes(data)  # raises SecretKeyLeakError if a secret key is inside
    _PUBLIC_DIGESTS[digest] = None
    while len(_PUBLIC_DIGESTS) > 64:
        _PUBLIC_DIGESTS.popitem(last=False)
    return None


_PUBLIC_DIGESTS: OrderedDict[bytes, None] = OrderedDict()
_TENSOR_MAGIC = b"FHET"


def _tensor_reason(data: bytes, what: str) -> str | None:
    """Framing only (the ciphertexts are not parsed): the header, the body's size, and no raw
    SEAL object, TenSEAL context or fedhe secret frame where a ciphertext starts."""
    framed = _frame_at(data, 0, _TENSOR_MAGIC)
    if framed is None:
        return "no FHET frame"
    header, start = framed
    shape = _shape(header)
    if shape is None:
        return f"header shape {header.get('shape')!r} is malformed"
    if header.get("kind") == "plain":
        if len(data) - start != 8 * math.prod(shape):
            return f"a plain tensor of shape {shape} with {len(data) - start} bytes of values"
        _refuse_raw(data[start:], what=what, embedded=True)
        return None
    sizes = header.get("chunk_bytes")
    if header.get("kind") != "ckks" or not _counts(sizes) or sum(sizes) != len(data) - start:
        return f"kind {header.get('kind')!r} with chunks {sizes!s:.40} of {len(data) - start}"
    for size in sizes:
        if _material_at(data, start) is not None:
            _refuse_raw(data[start : start + size], what=f"{what} ciphertext", embedded=False)
        start += size
    return None


_KEYGEN_KINDS = frozenset({"ckg-share", "rkg1-share", "rkg2-share", "rtg-share", "rkg1"})


def _keygen_reason(data: bytes, what: str) -> str | None:
    framed = _frame_at(data, 0, KEYGEN_MAGIC)
    if framed is None:
        return "no FHEG frame"
    header, start = framed
    shape = _shape(header)
    if header.get("kind") not in _KEYGEN_KINDS:
        return f"kind {header.get('kind')!r} is no public key-generation share"
    if shape is None or len(data) - start != 8 * math.prod(shape):
        return f"shape {header.get('shape')!r} does not fit {len(data) - start} bytes"
    return None


def _decryption_share_reason(data: bytes, what: str) -> str | None:
    framed = _frame_at(data, 0, DECRYPTION_MAGIC)
    if framed is None:
        return "no FHED frame"
    header, start = framed
    levels = header.get("levels")
    if not _counts(levels) or len(levels) != header.get("chunks"):
        return f"levels {levels!s:.40} do not match chunks {header.get('chunks')!r}"
    n, rest = divmod(len(data) - start, 8 * sum(levels)) if levels else (0, 0)
    if levels and (rest or n not in MAX_LOG_Q_128):  # n: the ring degree N of the residues
        return f"{len(data) - start} bytes of residues do not fit levels {levels}"
    return None


_SEALED_MIN_BYTES = 12 + 16  # nonce and AES-GCM tag (fedhe.crypto.channel)


def _sealed_reason(data: bytes, what: str) -> str | None:
    if len(data) < _SEALED_MIN_BYTES:
        return f"shorter than a nonce and a tag ({_SEALED_MIN_BYTES} bytes)"
    _refuse_raw(data, what=what, embedded=True)  # sealed bytes look random: nothing in them
    return None


def _identity_reason(data: bytes, what: str) -> str | None:
    return None if len(data) == 32 else f"{len(data)} bytes"


def _array_reason(data: bytes, what: str) -> str | None:
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = _NPY_HEADERS.get(version)
        if read_header is None:
            return f".npy format version {version} (this fedhe writes 1.0)"
        shape, _, dtype = read_header(buffer)
    except (ValueError, TypeError, SyntaxError, EOFError) as err:
        return f"no .npy array ({err})"
    if dtype.kind != "f" or dtype.hasobject:
        return f"an array of {dtype}, not of floats"
    if len(data) - buffer.tell() != dtype.itemsize * math.prod(shape):
        return f"an array of shape {shape} with {len(data) - buffer.tell()} bytes of values"
    _refuse_raw(data, what=what, embedded=True)
    return None


_NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _empty_reason(data: bytes, what: str) -> str | None:
    return None if not data else f"{len(data)} bytes"


_KIND_CHECKS = {
    Kind.CONTEXT: _context_reason,
    Kind.TENSOR: _tensor_reason,
    Kind.KEYGEN: _keygen_reason,
    Kind.DECRYPTION_SHARE: _decryption_share_reason,
    Kind.SEALED: _sealed_reason,
    Kind.IDENTITY: _identity_reason,
    Kind.ARRAY: _array_reason,
    Kind.EMPTY: _empty_reason,
}


def _shape(header: Mapping[str, Any]) -> list[int] | None:
    shape = header.get("shape")
    ok = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
    return shape if ok else None


def _counts(values: Any) -> bool:
    return isinstance(values, list) and all(isinstance(v, int) and v > 0 for v in values)


# -- reading records ---------------------------------------------------------------------------


def config_of(records: RecordDict) -> dict[str, Any]:
    record = records.get(CONFIG)
    return {} if record is None else {k: from_json(v) for k, v in record.items()}


def payload_of(records: RecordDict) -> dict[str, bytes]:
    record = records.get(PAYLOAD)
    return {} if record is None else {k: bytes(v) for k, v in record.items()}


def metrics_of(records: RecordDict) -> dict[str, float]:
    record = records.get(METRICS)
    return {} if record is None else {k: float(v) for k, v in record.items()}


def weights_of(records: RecordDict) -> dict[str, np.ndarray]:
    record = records.get(WEIGHTS)
    return {} if record is None else {k: v.numpy() for k, v in record.items()}


def message_nbytes(records: RecordDict) -> int:
    """Bytes a message carries: payload, model weights, and its settings as JSON (Flower's own
    framing not counted)."""
    total = sum(len(v) for v in payload_of(records).values())
    weights = records.get(WEIGHTS)
    if weights is not None:
        total += sum(len(a.data) for a in weights.values())
    record = records.get(CONFIG)
    if record is not None:
        total += len(json.dumps(dict(record.items()), default=str))
    return total


def array_to_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float64), allow_pickle=False)
    return buffer.getvalue()


def array_from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def to_json(value: Any) -> str:
    """Nested structures travel as tagged JSON strings: a ConfigRecord holds scalars and lists."""
    return _JSON_TAG + json.dumps(value)


def from_json(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_JSON_TAG):
        return json.loads(value[len(_JSON_TAG) :])
    return value


_JSON_TAG = "json:"


def _config_value(value: Any) -> Any:
    nested = isinstance(value, list) and any(isinstance(v, dict | list) for v in value)
    return to_json(value) if isinstance(value, dict | tuple) or nested else value
