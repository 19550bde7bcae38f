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
            {"party": party, "keyholder": keyholder_public, "own-seed": seed}
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
    """This contribution's tag for (output, round), sealed to the key holder.

    Asked again under the same label (a lost reply, a resumed round), a party tags its new
    encryption of the same values: the key holder releases one sum per label, so two tagged
    ciphertexts of one label never give two sums. Nothing of the contribution is kept here:
    a node's state travels with each of its messages in Flower's simulation."""
    record = _record(context, job_id)
    if "mac-seed" not in record:
        raise ProtocolError(f"job {job_id!r} has no MAC key on this party: register first.")
    label = mac_label(output, round_)
    value = MacKey(bytes(record["mac-seed"])).tag(load_tensor(contribution, public), label)
    channel = _channel(identity(context), bytes(record["keyholder"]), job_id)
    return channel.seal(
        json.dumps(value.to_dict()).encode(),
        registry.tag_label(job_id, output, round_, str(record["party"])),
    )


def open_release(
    context: Context, job_id: str, output: str, round_: int, sealed: bytes, *, via: str = ""
) -> np.ndarray:
    """Values the key holder sealed to this party. `via`: the job whose registration holds the
    key holder's identity when `job_id` (an inference job) did not register its own."""
    record = _record(context, via or job_id)
    channel = _channel(identity(context), bytes(record["keyholder"]), job_id)
    return registry.open_release(channel, job_id, output, round_, str(record["party"]), sealed)


def check_new_model(
    context: Context, job_id: str, weights: dict[str, np.ndarray], label: str
) -> None:
    """Refuse to start from a global model this party already used for another release label
    of the job: two updates from one model differ only by sampling, so their sums under two
    labels would difference one party out. The same label again (a retry) is fine."""
    record = _record(context, job_id)
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode() + np.ascontiguousarray(weights[name]).tobytes())
    seen = json.loads(str(record.get("models", "{}")))
    if seen.get(digest.hexdigest(), label) != label:
        raise ProtocolError(
            f"job {job_id!r} sent this party a model it already used for "
            f"{seen[digest.hexdigest()]!r}, now for {label!r}: refused."
        )
    seen[digest.hexdigest()] = label
    record["models"] = json.dumps(seen)


def _record(context: Context, job_id: str) -> ConfigRecord:
    record = context.state.get(_TRUST_RECORD + job_id)
    if record is None:
        raise ProtocolError(f"job {job_id!r} has no key-holder link on this party: set up first.")
    return record


def _channel(own: Identity, keyholder_public: bytes, job_id: str) -> Channel:
    return own.channel(keyholder_public, job_id)
