"""A party's end-to-end link with the key holder: its identity, the job's MAC key, its tags.

Everything here stays on the party's node (`context.state`, or the identity file a deployed
site names in its node config as `identity-path`); the aggregator relays only sealed bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context

from fedhe.crypto import PublicContext, load_tensor
from fedhe.crypto.channel import Channel, Identity, check_public_key, fingerprint
from fedhe.crypto.mac import MAC_SEED_BYTES, MacKey, mac_label
from fedhe.errors import ChannelError, ProtocolError
from fedhe.keyholder import registry

_IDENTITY_RECORD = "fedhe.identity"
_TRUST_RECORD = "fedhe.trust."


def identity(context: Context) -> Identity:
    """This node's long-term identity: from `identity-path` (made there on first use, 0600)
    when the node config names one, else kept in the node's state for this run."""
    path = context.node_config.get("identity-path")
    if path:
        return registry.load_identity(Path(str(path)))
    record = context.state.get(_IDENTITY_RECORD)
    if record is None:
        made = Identity.generate()
        context.state[_IDENTITY_RECORD] = ConfigRecord({"private": made.private_bytes()})
        return made
    return Identity.from_private_bytes(bytes(record["private"]))


def join(context: Context, job_id: str, party: str, keyholder_public: bytes) -> dict[str, bytes]:
    """Setup: accept the key holder's identity (checked against a pinned fingerprint when the
    node config has `keyholder-fingerprint`) and send it a random seed for the job's MAC key."""
    check_public_key(keyholder_public)
    pinned = context.node_config.get("keyholder-fingerprint")
    if pinned and str(pinned) != fingerprint(keyholder_public):
        raise ChannelError(
            f"the key holder's identity {fingerprint(keyholder_public)} is not the one pinned "
            f"in this node's config ({pinned}): refusing the job."
        )
    own = identity(context)
    record = context.state.get(_TRUST_RECORD + job_id)
    if record is not None and bytes(record["keyholder"]) == keyholder_public:
        seed = bytes(record["own-seed"])  # the job resumes: same seed, same MAC key
    else:
        seed = os.urandom(MAC_SEED_BYTES)
        context.state[_TRUST_RECORD + job_id] = ConfigRecord(
            {"party": party, "keyholder": keyholder_public, "own-seed": seed, "used": "[]"}
        )
    sealed = _channel(own, keyholder_public, job_id).seal(
        seed, registry.mac_seed_label(job_id, party)
    )
    return {"identity": own.public, "mac-seed": sealed}


def accept_mac_key(context: Context, job_id: str, envelope: bytes) -> None:
    record = _record(context, job_id)
    channel = _channel(identity(context), bytes(record["keyholder"]), job_id)
    seed = registry.party_mac_seed(
        channel, job_id, str(record["party"]), envelope, bytes(record["own-seed"])
    )
    record["mac-seed"] = seed


def tag(
    context: Context,
    job_id: str,
    contribution: bytes,
    public: PublicContext,
    output: str,
    round_: int,
) -> bytes:
    """This contribution's tag for (output, round), sealed to the key holder. One tag per label:
    a second contribution under a label this party has tagged is refused (it would let two
    sums of one round differ by this party's value); the same request again gets the same
    contribution back (`cached`)."""
    record = _record(context, job_id)
    if "mac-seed" not in record:
        raise ProtocolError(f"job {job_id!r} has no MAC key on this party: register first.")
    label = mac_label(output, round_)
    used = json.loads(str(record["used"]))
    if label in used:
        raise ProtocolError(f"this party has contributed to {label!r} of job {job_id!r} already.")
    tensor = load_tensor(contribution, public)
    value = MacKey(bytes(record["mac-seed"])).tag(tensor, label)
    record["used"] = json.dumps([*used, label])
    party = str(record["party"])
    channel = _channel(identity(context), bytes(record["keyholder"]), job_id)
    sealed = channel.seal(
        json.dumps(value.to_dict()).encode(),
        registry.tag_label(job_id, output, round_, party),
    )
    # The latest contribution per output, for an aggregator that asks again (a lost reply, a
    # resumed round): it gets these very bytes, never a second contribution under the label.
    record[f"last/{output}"] = json.dumps(label)
    record[f"last-contribution/{output}"] = contribution
    record[f"last-tag/{output}"] = sealed
    return sealed


def cached(context: Context, job_id: str, output: str, round_: int) -> dict[str, bytes] | None:
    """The contribution and tag this party already sent for (output, round), if it did."""
    record = context.state.get(_TRUST_RECORD + job_id)
    if record is None or str(record.get(f"last/{output}", "")) != json.dumps(
        mac_label(output, round_)
    ):
        return None
    return {
        "contribution": bytes(record[f"last-contribution/{output}"]),
        "tag": bytes(record[f"last-tag/{output}"]),
    }


def open_release(
    context: Context, job_id: str, output: str, round_: int, sealed: bytes, *, via: str = ""
) -> np.ndarray:
    """Values the key holder sealed to this party. `via`: the job whose registration holds the
    key holder's identity when `job_id` (an inference job) did not register its own."""
    record = _record(context, via or job_id)
    channel = _channel(identity(context), bytes(record["keyholder"]), job_id)
    return registry.open_release(channel, job_id, output, round_, str(record["party"]), sealed)


def check_new_model(context: Context, job_id: str, weights: dict[str, np.ndarray]) -> None:
    """Refuse to train twice from the same global model in one job: two updates from one model
    differ only by sampling, so their sums under two labels would difference one party out."""
    record = _record(context, job_id)
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode() + np.ascontiguousarray(weights[name]).tobytes())
    seen = json.loads(str(record.get("models", "[]")))
    if digest.hexdigest() in seen:
        raise ProtocolError(f"job {job_id!r} sent this party a global model it trained on before.")
    record["models"] = json.dumps([*seen, digest.hexdigest()])


def has_mac_key(context: Context, job_id: str) -> bool:
    record = context.state.get(_TRUST_RECORD + job_id)
    return record is not None and "mac-seed" in record


def _record(context: Context, job_id: str) -> ConfigRecord:
    record = context.state.get(_TRUST_RECORD + job_id)
    if record is None:
        raise ProtocolError(f"job {job_id!r} has no key-holder link on this party: set up first.")
    return record


def _channel(own: Identity, keyholder_public: bytes, job_id: str) -> Channel:
    return own.channel(keyholder_public, job_id)
