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
from fedhe.keyholder.registry import suffixed

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


def keyholders_of(payload: dict[str, bytes]) -> dict[str, bytes]:
    """The key holders' identities a setup message carries: one key holder (`keyholder-identity`,
    named "") or each member of a key-holder group (`keyholder-identity/<member>`)."""
    if payload.get("keyholder-identity"):
        return {"": payload["keyholder-identity"]}
    prefix = "keyholder-identity/"
    return {k.removeprefix(prefix): v for k, v in payload.items() if k.startswith(prefix)}


def join(
    context: Context,
    job_id: str,
    party: str,
    keyholders: dict[str, bytes],
    context_fingerprint: str = "",
) -> dict[str, bytes]:
    """Setup: accept the key holders' identities (checked against pinned fingerprints when the
    node config has `keyholder-fingerprint`, comma-separated for a group) and send each a
    random seed for its MAC key of the job: every member of a group checks tags on its own."""
    if not keyholders:
        raise ChannelError(f"job {job_id!r} names no key holder to register with.")
    pinned = context.node_config.get("keyholder-fingerprint")
    for member, public in keyholders.items():
        check_public_key(public)
        if pinned and fingerprint(public) not in str(pinned).split(","):
            raise ChannelError(
                f"the identity {fingerprint(public)} of key holder {member or '(single)'} is not "
                f"pinned in this node's config ({pinned}): refusing the job."
            )
    own = identity(context)
    record = context.state.get(_TRUST_RECORD + job_id)
    same = record is not None and json.loads(str(record["members"])) == sorted(keyholders)
    if same and all(bytes(record[suffixed("keyholder", m)]) == keyholders[m] for m in keyholders):
        pass  # the job resumes: same seeds, same MAC keys
    else:
        record = ConfigRecord(
            {
                "party": party,
                "members": json.dumps(sorted(keyholders)),
                "context": context_fingerprint,
            }
        )
        for member, public in keyholders.items():
            record[suffixed("keyholder", member)] = public
            record[suffixed("own-seed", member)] = os.urandom(MAC_SEED_BYTES)
        context.state[_TRUST_RECORD + job_id] = record
    link = {"identity": own.public}
    for member, public in keyholders.items():
        link[suffixed("mac-seed", member)] = _channel(own, public, job_id).seal(
            bytes(record[suffixed("own-seed", member)]), registry.mac_seed_label(job_id, party)
        )
    return link


def bind_context(context: Context, job_id: str, context_fingerprint: str) -> None:
    """The job's public context, come after setup (with the MAC-key envelopes): its
    fingerprint enters the MAC seed as it would have at setup. A job keeps one context."""
    record = _record(context, job_id)
    bound = str(record.get("context", ""))
    if bound and bound != context_fingerprint:
        raise ChannelError(
            f"job {job_id!r} already has public context {bound}; another one "
            f"({context_fingerprint}) arrived: refusing to switch keys within a job."
        )
    record["context"] = context_fingerprint


def accept_mac_keys(context: Context, job_id: str, payload: dict[str, bytes]) -> None:
    """Open each key holder's envelope (`envelope`, or `envelope/<member>` in a group; a
    group member that was silent at registration sends none, and gets no tags)."""
    record = _record(context, job_id)
    present = [m for m in _members(record) if suffixed("envelope", m) in payload]
    if not present:
        raise ProtocolError(f"no MAC-key envelope from any key holder of {job_id!r}.")
    for member in present:
        envelope = payload[suffixed("envelope", member)]
        channel = _channel(identity(context), bytes(record[suffixed("keyholder", member)]), job_id)
        record[suffixed("mac-seed", member)] = registry.party_mac_seed(
            channel,
            job_id,
            str(record["party"]),
            envelope,
            bytes(record[suffixed("own-seed", member)]),
            context_fingerprint=str(record.get("context", "")) or None,
        )


def tag(
    context: Context,
    job_id: str,
    contribution: bytes,
    public: PublicContext,
    output: str,
    round_: int,
) -> dict[str, bytes]:
    """This contribution's tag for (output, round), sealed to each key holder under its own
    MAC key (`tag`, or `tag/<member>` in a group).

    Asked again under the same label (a lost reply, a resumed round), a party tags its new
    encryption of the same values: the key holder releases one sum per label, so two tagged
    ciphertexts of one label never give two sums. Nothing of the contribution is kept here:
    a node's state travels with each of its messages in Flower's simulation."""
    record = _record(context, job_id)
    tensor = load_tensor(contribution, public)
    label = mac_label(output, round_)
    sealed = {}
    keyed = [m for m in _members(record) if suffixed("mac-seed", m) in record]
    if not keyed:
        raise ProtocolError(f"job {job_id!r} has no MAC key on this party: register first.")
    for member in keyed:
        seed = record[suffixed("mac-seed", member)]
        value = MacKey(bytes(seed)).tag(tensor, label)
        channel = _channel(identity(context), bytes(record[suffixed("keyholder", member)]), job_id)
        sealed[suffixed("tag", member)] = channel.seal(
            json.dumps(value.to_dict()).encode(),
            registry.tag_label(job_id, output, round_, str(record["party"])),
        )
    return sealed


def open_release(
    context: Context, job_id: str, output: str, round_: int, sealed: bytes, *, via: str = ""
) -> np.ndarray:
    """Values a key holder sealed to this party (in a group: the member that combined them;
    the channel's authentication tells which). `via`: the job whose registration holds the
    key holders' identities when `job_id` (an inference job) did not register its own."""
    record = _record(context, via or job_id)
    own = identity(context)
    for member in _members(record):
        channel = _channel(own, bytes(record[suffixed("keyholder", member)]), job_id)
        try:
            return registry.open_release(
                channel, job_id, output, round_, str(record["party"]), sealed
            )
        except ChannelError:
            continue
    raise ChannelError(
        f"the release of {output!r} (round {round_}) opens with no key holder of job {job_id!r}."
    )


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


def _members(record: ConfigRecord) -> list[str]:
    return [str(m) for m in json.loads(str(record["members"]))]


def _channel(own: Identity, keyholder_public: bytes, job_id: str) -> Channel:
    return own.channel(keyholder_public, job_id)
