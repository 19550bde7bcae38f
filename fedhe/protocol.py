"""What travels in Flower messages between the roles: message types, record keys, packing.

Shared by `fedhe.clients` and `fedhe.aggregator` so both sides name every key the same way.
Payloads are fedhe bytes (framed tensors, framed contexts) inside `ConfigRecord`s.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import OrderedDict
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedhe.crypto.context import CONTEXT_MAGIC, PublicContext
from fedhe.crypto.multiparty import SECRET_MAGIC
from fedhe.errors import SecretKeyLeakError

# Message types (Flower requires train/evaluate/query, optionally ".<name>").
WHOAMI = "query.whoami"
DECLARE = "query.declare"
SETUP = "query.setup"
REGISTER = "query.register"
MOMENTS = "query.moments"
STATS = "query.stats"
GRADIENT = "query.gradient"
MODEL_STEP = "query.model_step"
KNN_UPLOAD = "query.knn_upload"
KNN_QUERY = "query.knn_query"
KNN_ANSWER = "query.knn_answer"
MLP_QUERY = "query.mlp_query"
MLP_ANSWER = "query.mlp_answer"
MODEL_RELEASE = "query.model_release"
TRAIN = "train"
DECRYPT = "query.decrypt"
AUDIT = "query.audit"
GROUP = "query.group"  # a key-holder group step: config "step" names it

# Record names.
CONFIG = "config"
PAYLOAD = "payload"
METRICS = "metrics"
WEIGHTS = "weights"

ROLE_PARTY = "party"
ROLE_KEYHOLDER = "keyholder"
ROLES = (ROLE_PARTY, ROLE_KEYHOLDER)


def content(
    config: dict[str, Any] | None = None,
    payload: dict[str, bytes] | None = None,
    metrics: dict[str, float] | None = None,
    weights: dict[str, np.ndarray] | None = None,
) -> RecordDict:
    records: dict[str, Any] = {}
    if config is not None:
        records[CONFIG] = ConfigRecord({k: _config_value(v) for k, v in config.items()})
    if payload is not None:
        for key, value in payload.items():
            ensure_public(value, what=f"payload {key!r}")
        records[PAYLOAD] = ConfigRecord(dict(payload))
    if metrics is not None:
        records[METRICS] = MetricRecord({k: float(v) for k, v in metrics.items()})
    if weights is not None:
        records[WEIGHTS] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in weights.items()}
        )
    return RecordDict(records)


def ensure_public(data: bytes, *, what: str = "payload") -> None:
    """Refuse to put a context that holds a secret key, or a key-holder group's secret material
    (a key share, a dealt Shamir piece, an ephemeral key), into any message."""
    if data[:4] == SECRET_MAGIC:
        raise SecretKeyLeakError(
            f"{what} holds a key-holder group's secret material: it stays on its holder's disk "
            "(dealt pieces travel sealed to one member, never as they are)."
        )
    if data[:4] != CONTEXT_MAGIC:
        return
    # The same context goes to every party (~10 ms to parse each time): remember the digests
    # of contexts that passed; a refused one is parsed and refused every time.
    digest = hashlib.sha256(data).digest()
    if digest in _PUBLIC_DIGESTS:
        return
    PublicContext.from_bytes(data)  # raises SecretKeyLeakError if a secret key is inside
    _PUBLIC_DIGESTS[digest] = None
    while len(_PUBLIC_DIGESTS) > 64:
        _PUBLIC_DIGESTS.popitem(last=False)


_PUBLIC_DIGESTS: OrderedDict[bytes, None] = OrderedDict()


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
