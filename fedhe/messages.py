"""The schema of every Flower message between the roles: what each type may carry, each way.

A schema lists, for one message type and direction (a request from the aggregator to a node,
or the node's reply), the config keys, payload keys, metrics and weights the message may carry,
and for each payload key the kinds of bytes it may hold. Names ending in ``*`` are patterns:
``tag/*`` is ``tag/<member>`` for any member, ``broadcast-*`` any ``broadcast-<j>``.
A key-holder group's messages (one type, ``query.group``) have a schema per step, named by
their config ``step`` in both directions.

`fedhe.protocol.content` builds messages only to these schemas, and `fedhe.protocol.check_message`
checks a received one against them, with the same byte checks (`fedhe.payloads.check_bytes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

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
SHAPE = "query.shape"  # a site's columns and labels, when the coordinator holds no data
FINAL_MODEL = "query.final_model"  # the job's final model, kept at every site
TRAIN = "train"
DECRYPT = "query.decrypt"
AUDIT = "query.audit"
GROUP = "query.group"  # a key-holder group step: config "step" names it

# Directions.
REQUEST = "request"  # aggregator → node
REPLY = "reply"  # node → aggregator
DIRECTIONS = (REQUEST, REPLY)

GROUP_STEPS = ("setup-1", "setup-2", "setup-3", "share", "lead")


class Kind(StrEnum):
    """What bytes a payload value may be. Anything else is refused."""

    CONTEXT = "a public context frame (FHEC)"
    TENSOR = "a tensor frame (FHET)"
    KEYGEN = "a public key-generation share frame (FHEG)"
    DECRYPTION_SHARE = "a decryption share frame (FHED)"
    SEALED = "sealed channel bytes (nonce | AES-GCM)"
    IDENTITY = "a public identity key (32 bytes)"
    ARRAY = "a float numpy array (.npy)"
    EMPTY = "empty bytes"


@dataclass(frozen=True)
class Schema:
    """What one message type may carry in one direction."""

    config: frozenset[str] = frozenset()
    payload: Mapping[str, frozenset[Kind]] = field(default_factory=dict)
    metrics: frozenset[str] = frozenset()
    weights: bool = False

    def payload_kinds(self, key: str) -> frozenset[Kind] | None:
        """The kinds `key` may hold, or None when the schema does not list it."""
        return _lookup(self.payload, key)

    def allows_config(self, key: str) -> bool:
        return _lookup(dict.fromkeys(self.config, _LISTED), key) is not None

    def allows_metric(self, key: str) -> bool:
        return _lookup(dict.fromkeys(self.metrics, _LISTED), key) is not None


_LISTED = True  # pragma: no mutate  # any value but None marks a listed name


def _lookup(table: Mapping[str, object], key: str) -> object | None:
    if key in table:
        return table[key]
    for name, value in table.items():
        if name.endswith("*") and key.startswith(name[:-1]) and len(key) > len(name) - 1:
            return value
    return None


def _schema(
    config: tuple[str, ...] = (),
    payload: Mapping[str, tuple[Kind, ...]] | None = None,
    metrics: tuple[str, ...] = (),
    *,
    weights: bool = False,
) -> Schema:
    return Schema(
        frozenset(config),
        {k: frozenset(v) for k, v in (payload or {}).items()},
        frozenset(metrics),
        weights,
    )


# -- building blocks ------------------------------------------------------------------------------

_CONTRIBUTION_SETTINGS = ("job-id", "output", "release-round", "sum-bound")
_CONTRIBUTION = {"contribution": (Kind.TENSOR,), "tag": (Kind.SEALED,), "tag/*": (Kind.SEALED,)}
_CONTRIBUTION_METRICS = ("n-samples", "encrypt-s")
# What a key holder (or a group's lead) releases for an output kind (fedhe.tasks.KEYHOLDER_STEPS):
# values in the clear (a verified sum, or anything of a plaintext twin), values sealed to their
# recipients, or fresh ciphertexts.
_RELEASE = {
    "values": (Kind.ARRAY,),
    "sealed": (Kind.SEALED,),
    "sealed/*": (Kind.SEALED,),
    "selection": (Kind.TENSOR,),
    "vector": (Kind.TENSOR,),
    "broadcast-*": (Kind.TENSOR,),
}
_DECRYPTION_REQUEST = ("job-id", "output", "round", "contributors")
_TAGS = (Kind.SEALED, Kind.EMPTY)  # a contributor's sealed tag; none in a plaintext twin
_QUERIER_COUNTS = (  # fedhe.tasks.scores.batch_counts
    "n",
    "correct",
    "squared_error",
    "sum_y",
    "sum_y2",
    "agree",
    "compared_correct",
    "max_abs_logit_error",
)
# What a site that opts in (test-path, report-metrics) reports about the final model on its own
# test rows: the metrics result.json shows, and how many rows; never a row or a prediction.
_SITE_METRICS = ("n-test", "accuracy", "loss", "log_loss", "auc", "mse", "r2")
_KNN_BATCH = ("job-id", "standardizer", "n-classes", "slots", "start", "stop", "query", "k")
_MLP_BATCH = (
    "job-id",
    "inference-id",
    "mode",
    "start",
    "stop",
    "standardizer",
    "hidden",
    "n-outputs",
)
_ANSWER = {"sealed": (Kind.SEALED,), "values": (Kind.ARRAY,)}  # sealed, or the twin's clear
_GROUP_DECRYPTION = (*_DECRYPTION_REQUEST, "step", "active", "lead")
_GROUP_METRICS = ("keyholder-s",)

SCHEMAS: dict[tuple[str, str], Schema] = {
    (WHOAMI, REQUEST): _schema(("keyholder-partition-id", "keyholders", "parties-hold-keys")),
    (WHOAMI, REPLY): _schema(("role", "partition-id", "site-name"), {"identity": (Kind.IDENTITY,)}),
    (DECLARE, REQUEST): _schema(("declaration", "keys")),
    (DECLARE, REPLY): _schema(
        (),
        {
            "public-context": (Kind.CONTEXT, Kind.EMPTY),  # empty: a plaintext twin
            "keyholder-identity": (Kind.IDENTITY,),
        },
        ("keygen-s",),
    ),
    (SETUP, REQUEST): _schema(
        ("job-id", "source", "party-index", "n-parties", "querier", "context-follows"),
        {
            "public-context": (Kind.CONTEXT,),
            "keyholder-identity": (Kind.IDENTITY,),
            "keyholder-identity/*": (Kind.IDENTITY,),
        },
    ),
    (SETUP, REPLY): _schema(
        (),
        {"identity": (Kind.IDENTITY,), "mac-seed": (Kind.SEALED,), "mac-seed/*": (Kind.SEALED,)},
        ("n-samples", "n-features", "n-classes", "n-queries"),
    ),
    (REGISTER, REQUEST): _schema(
        ("job-id", "parties"),
        {"identity/*": (Kind.IDENTITY,), "mac-seed/*": (Kind.SEALED,)},
    ),
    (REGISTER, REPLY): _schema(("refused",), {"envelope/*": (Kind.SEALED,)}),
    (MOMENTS, REQUEST): _schema(
        (*_CONTRIBUTION_SETTINGS, "with-target"),
        {
            "envelope": (Kind.SEALED,),
            "envelope/*": (Kind.SEALED,),
            "public-context": (Kind.CONTEXT,),
        },
    ),
    (MOMENTS, REPLY): _schema((), _CONTRIBUTION, _CONTRIBUTION_METRICS),
    (TRAIN, REQUEST): _schema(
        (
            *_CONTRIBUTION_SETTINGS,
            "round",
            "seed",
            "epochs",
            "batch-size",
            "lr",
            "optimizer",
            "model",
            "standardizer",
            "fail-party",
            "clip",
            "packing",
            "lane-terms",
        ),
        weights=True,
    ),
    (TRAIN, REPLY): _schema((), _CONTRIBUTION, (*_CONTRIBUTION_METRICS, "train-loss", "train-s")),
    (STATS, REQUEST): _schema(
        (*_CONTRIBUTION_SETTINGS, "standardizer", "mask", "right-mask", "l2", "min-scale-bits")
    ),
    (STATS, REPLY): _schema((), _CONTRIBUTION, _CONTRIBUTION_METRICS),
    (GRADIENT, REQUEST): _schema(
        (
            *_CONTRIBUTION_SETTINGS,
            "task",
            "w",
            "standardizer",
            "batch-size",
            "round",
            "seed",
            "clip",
            "fail-party",
            "gradient-mask",
        )
    ),
    (GRADIENT, REPLY): _schema((), _CONTRIBUTION, (*_CONTRIBUTION_METRICS, "train-s")),
    (MODEL_STEP, REQUEST): _schema(
        ("job-id", "task", "round", "standardizer", "step", "l2", "fail-party"),
        {"broadcast-*": (Kind.TENSOR,)},
    ),
    (MODEL_STEP, REPLY): _schema((), {"contribution": (Kind.TENSOR,)}, _CONTRIBUTION_METRICS),
    (KNN_UPLOAD, REQUEST): _schema(
        (
            "job-id",
            "standardizer",
            "n-classes",
            "segment",
            "slots",
            "encrypted-queries",
            "fail-party",
        )
    ),
    (KNN_UPLOAD, REPLY): _schema(
        (), {"points-*": (Kind.TENSOR,), "labels-*": (Kind.TENSOR,)}, _CONTRIBUTION_METRICS
    ),
    (KNN_QUERY, REQUEST): _schema(_KNN_BATCH),
    (KNN_QUERY, REPLY): _schema(
        (),
        {"queries": (Kind.TENSOR, Kind.ARRAY), "masks": (Kind.TENSOR,)},  # array: plain queries
        ("encrypt-s",),
    ),
    (KNN_ANSWER, REQUEST): _schema((*_KNN_BATCH, "output", "round"), _ANSWER),
    (KNN_ANSWER, REPLY): _schema((), {}, _QUERIER_COUNTS),
    (MLP_QUERY, REQUEST): _schema(_MLP_BATCH, {"public-context": (Kind.CONTEXT,)}),
    (MLP_QUERY, REPLY): _schema(
        (), {"inputs": (Kind.TENSOR,), "mask": (Kind.TENSOR,)}, ("encrypt-s",)
    ),
    (MLP_ANSWER, REQUEST): _schema(
        (*_MLP_BATCH, "output", "round", "activation"), _ANSWER, weights=True
    ),
    (MLP_ANSWER, REPLY): _schema((), {}, _QUERIER_COUNTS),
    (MODEL_RELEASE, REQUEST): _schema(
        ("job-id", "output", "round", "model"), {"sealed": (Kind.SEALED,)}
    ),
    (MODEL_RELEASE, REPLY): _schema(  # the model: from a share-model node only
        (), {"model": (Kind.ARRAY,)}, _SITE_METRICS
    ),
    (SHAPE, REQUEST): _schema(("job-id", "source")),
    (SHAPE, REPLY): _schema(("columns", "features", "labels", "task"), {}, ("n-features",)),
    (FINAL_MODEL, REQUEST): _schema(("job-id", "model"), weights=True),
    (FINAL_MODEL, REPLY): _schema((), {}, _SITE_METRICS),
    (DECRYPT, REQUEST): _schema(_DECRYPTION_REQUEST, {"tensor": (Kind.TENSOR,), "tag/*": _TAGS}),
    (DECRYPT, REPLY): _schema((), _RELEASE, ("decrypt-s",)),
    (AUDIT, REQUEST): _schema(("job-id", "later-jobs")),
    (AUDIT, REPLY): _schema(("entries",)),
    # A key-holder group (fedhe.keyholder.group): one schema per step.
    (f"{GROUP}/setup-1", REQUEST): _schema(("step", "declaration", "keys", "group", "name")),
    (f"{GROUP}/setup-1", REPLY): _schema(
        ("step",),
        {
            "pk-share": (Kind.KEYGEN,),
            "relin-1": (Kind.KEYGEN,),
            "rotations": (Kind.KEYGEN,),
            "deal/*": (Kind.SEALED,),  # a dealt Shamir piece, sealed to one member
            "attest/*": (Kind.SEALED,),
            "public-context": (Kind.CONTEXT,),  # the job was set up before
        },
        _GROUP_METRICS,
    ),
    (f"{GROUP}/setup-2", REQUEST): _schema(
        ("step", "job-id"),
        {
            "pk-share/*": (Kind.KEYGEN,),
            "relin-1/*": (Kind.KEYGEN,),
            "deal/*": (Kind.SEALED,),
            "attest/*": (Kind.SEALED,),
            "public-context": (Kind.CONTEXT,),
        },
    ),
    (f"{GROUP}/setup-2", REPLY): _schema(("step",), {"relin-2": (Kind.KEYGEN,)}, _GROUP_METRICS),
    (f"{GROUP}/setup-3", REQUEST): _schema(("step", "job-id"), {"public-context": (Kind.CONTEXT,)}),
    (f"{GROUP}/setup-3", REPLY): _schema(("step",), {}, _GROUP_METRICS),
    (f"{GROUP}/share", REQUEST): _schema(
        _GROUP_DECRYPTION, {"tensor": (Kind.TENSOR,), "tag/*": _TAGS}
    ),
    (f"{GROUP}/share", REPLY): _schema(
        ("step",),
        {"share": (Kind.DECRYPTION_SHARE, Kind.SEALED)},  # sealed: to the lead
        _GROUP_METRICS,
    ),
    (f"{GROUP}/lead", REQUEST): _schema(
        _GROUP_DECRYPTION,
        {"tensor": (Kind.TENSOR,), "tag/*": _TAGS, "share/*": (Kind.SEALED,)},
    ),
    (f"{GROUP}/lead", REPLY): _schema(("step", "sealed-by"), _RELEASE, _GROUP_METRICS),
}


def schema_name(message_type: str, step: object = None) -> str:
    """The name a message's schema is filed under: its type, and a group message's step."""
    return f"{GROUP}/{step}" if message_type == GROUP else message_type
