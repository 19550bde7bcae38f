"""What travels in Flower messages between the roles: message types, record keys, packing, and
the one check every message passes, built or received.

Shared by `fedhe.clients` and `fedhe.aggregator` so both sides name every key the same way.
Every message carries only what its schema (`fedhe.messages`) lists for its type and direction,
and every bytes value (payloads, and bytes anywhere in config values or weights) passes
`fedhe.payloads.check_bytes`: it must be of a kind the schema declares, and nothing that parses
as secret-key material in any serialization gets through (a fedhe frame, a raw TenSEAL
context, a raw SEAL object, base64 or hex of one in a config string).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedhe.crypto.secret_material import refuse_unframed
from fedhe.errors import ProtocolError
from fedhe.messages import (
    AUDIT,
    DECLARE,
    DECRYPT,
    DIRECTIONS,
    FINAL_MODEL,
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
    SHAPE,
    STATS,
    TRAIN,
    WHOAMI,
    Schema,
    schema_name,
)
from fedhe.payloads import check_bytes

# The message types and directions live in fedhe.messages (with the schemas); callers name
# them through this module.
__all__ = [
    "AUDIT",
    "CONFIG",
    "DECLARE",
    "DECRYPT",
    "FINAL_MODEL",
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
    "SHAPE",
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
                refuse_unframed(bytes(value), what=f"{what} payload {key!r}", embedded=True)
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
        refuse_unframed(data, what=f"{what} weights {key!r}", embedded=True)
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
        refuse_unframed(bytes(value), what=what, embedded=True)
        raise ProtocolError(f"{what} holds bytes: bytes travel only as typed payload values.")
    if isinstance(value, list | tuple):
        for item in value:
            _check_config_value(item, what=what)
    elif isinstance(value, str):
        for decoded in _encoded_runs(value):
            refuse_unframed(decoded, what=f"{what} (base64/hex in a string)", embedded=True)
        try:
            raw = value.encode("latin-1")  # pragma: no mutate  # LATIN-1 names the same codec
        except UnicodeEncodeError:
            return
        refuse_unframed(raw, what=what, embedded=True)


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
                yield base64.b64decode(
                    padded,
                    altchars=alphabet,
                    validate=True,  # pragma: no mutate  # unvalidated: the other alphabet runs too
                )
            except (binascii.Error, ValueError):
                continue


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
    np.save(
        buffer,
        np.asarray(array, dtype=np.float64),
        allow_pickle=False,  # pragma: no mutate  # float64 arrays never need a pickle
    )
    return buffer.getvalue()


def array_from_bytes(data: bytes) -> np.ndarray:
    return np.load(
        io.BytesIO(data),
        allow_pickle=False,  # pragma: no mutate  # None, or the default, is False too
    )


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
