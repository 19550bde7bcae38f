"""Who the key holder talks to end to end: its own identity, the parties', each job's MAC seed.

Registration (once per job, relayed by the aggregator): each party sends its public identity
and a random seed sealed to the key holder; the key holder opens the seeds, adds its own, and
derives the job's MAC seed from its own seed and the Merkle root of the parties' seeds
(`fedhe.crypto.mac.seed_from`). It returns to each party, sealed, its own seed and the party's
Merkle path (log₂ n hashes), so each party derives the MAC seed from a root it knows holds its
own seed: r is a hash output no single role chose. The aggregator sees only sealed bytes.

Identities arrive through the aggregator. A deployment pins them (`trusted` below: the set of
public keys the sites exported, in the key holder's node config; the aggregator names the
parties, so a pin is a key, not a name); without pins the key holder
trusts what the first registration of a job shows, and an aggregator that deviates *at
registration* could stand in for a party. docs/threat-model.md states it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedhe.crypto.channel import Channel, Identity, check_public_key, fingerprint
from fedhe.crypto.mac import MAC_SEED_BYTES, seed_from
from fedhe.errors import ChannelError, PolicyError
from fedhe.keyholder import sealing


def suffixed(key: str, member: str) -> str:
    """A payload key for one key holder: `key` for a single one, `key/<member>` in a group."""
    return f"{key}/{member}" if member else key


def mac_seed_label(job_id: str, party: str) -> str:
    return f"mac-seed/{job_id}/{party}"


def mac_key_label(job_id: str, party: str) -> str:
    return f"mac-key/{job_id}/{party}"


def tag_label(job_id: str, output: str, round_: int, party: str) -> str:
    return f"tag/{job_id}/{output}/{round_}/{party}"


def release_label(job_id: str, output: str, round_: int, party: str) -> str:
    return f"release/{job_id}/{output}/{round_}/{party}"


@dataclass(frozen=True)
class Registration:
    """The parties of one job (name → public identity), every seed that went into the job's
    MAC seed, and the MAC seed."""

    parties: dict[str, bytes]
    seeds: dict[str, bytes]
    keyholder_seed: bytes

    @property
    def mac_seed(self) -> bytes:
        return seed_from(_contributions(self.keyholder_seed, self.seeds))

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "parties": {k: v.hex() for k, v in self.parties.items()},
                "seeds": {k: v.hex() for k, v in self.seeds.items()},
                "keyholder_seed": self.keyholder_seed.hex(),
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Registration:
        raw = json.loads(data)
        return cls(
            {k: bytes.fromhex(v) for k, v in raw["parties"].items()},
            {k: bytes.fromhex(v) for k, v in raw["seeds"].items()},
            bytes.fromhex(raw["keyholder_seed"]),
        )


def load_identity(path: Path, passphrase: bytes | None = None) -> Identity:
    """A node's long-term identity, made on first use (file mode 0600; sealed like the secret
    keys when the node has a passphrase)."""
    binding = "identity"
    if path.exists():
        data = sealing.unseal(passphrase, path.read_bytes(), f"identity {path}", binding=binding)
        return Identity.from_private_bytes(data)
    identity = Identity.generate()
    data = identity.private_bytes()
    if passphrase:
        data = sealing.seal(passphrase, data, binding=binding)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return identity


def register(
    identity: Identity,
    job_id: str,
    identities: Mapping[str, bytes],
    sealed_seeds: Mapping[str, bytes],
    trusted: Collection[bytes] | None,
    previous: Registration | None = None,
    context_fingerprint: str = "",
) -> tuple[Registration, dict[str, bytes], dict[str, str]]:
    """Open every party's seed; return the registration, a sealed envelope per party and the
    parties refused (pinned key mismatch, seed that does not open) with the reason.

    With `previous` (the job registered before: an aggregator resuming after a crash), only
    the same parties with the same identities and seeds register again, and get envelopes of
    the same MAC seed: a resumed job cannot swap a party's key or pick a new r.

    Each envelope also names `context_fingerprint`, the job's public context as this key
    holder knows it: a party checks it against the context the aggregator handed it, so an
    aggregator cannot have the parties encrypt under a key of its own."""
    seeds: dict[str, bytes] = {}
    refused: dict[str, str] = {}
    for name in sorted(identities):
        try:
            public = identities[name]
            check_public_key(public)
            if trusted is not None and public not in trusted:
                raise PolicyError(
                    f"{name}'s identity {fingerprint(public)} is not among the pinned ones."
                )
            if list(identities.values()).count(public) > 1:
                raise PolicyError(f"{name}'s identity {fingerprint(public)} is claimed twice.")
            seed = identity.channel(public, job_id).open(
                sealed_seeds[name], mac_seed_label(job_id, name)
            )
            if len(seed) != MAC_SEED_BYTES:
                raise ChannelError(f"{name}'s MAC seed has {len(seed)} bytes.")
            seeds[name] = seed
        except (PolicyError, ChannelError, KeyError) as err:
            refused[name] = str(err) if not isinstance(err, KeyError) else "no sealed seed"
    parties = {name: identities[name] for name in seeds}
    if previous is None:
        registration = Registration(parties, seeds, os.urandom(MAC_SEED_BYTES))
    elif (parties, seeds) == (previous.parties, previous.seeds):
        registration = previous
    else:
        raise PolicyError(
            "the job registered other parties, identities or seeds before; a resumed job "
            "registers the same ones (declare a new job to start over)."
        )
    names = sorted(seeds)
    levels = _merkle_levels([_leaf(name, seeds[name]) for name in names])
    envelopes = {
        name: identity.channel(identities[name], job_id).seal(
            json.dumps(
                {
                    "keyholder": registration.keyholder_seed.hex(),
                    "context": context_fingerprint,
                    "index": index,
                    "path": [h.hex() for h in _merkle_path(levels, index)],
                }
            ).encode(),
            mac_key_label(job_id, name),
        )
        for index, name in enumerate(names)
    }
    return registration, envelopes, refused


def party_mac_seed(
    channel: Channel,
    job_id: str,
    party: str,
    envelope: bytes,
    own: bytes,
    context_fingerprint: str | None = None,
) -> bytes:
    """Party side: open the key holder's envelope, check that this party's seed is a leaf of
    the seeds' Merkle root (its path: log₂ n hashes, not every other seed), and derive the
    job's MAC seed from the key holder's seed and that root. With `context_fingerprint` (the
    public context this party encrypts under), the envelope must name the same context."""
    data = json.loads(channel.open(envelope, mac_key_label(job_id, party)))
    if context_fingerprint is not None and data.get("context") != context_fingerprint:
        raise ChannelError(
            f"the key holder vouches for public context {str(data.get('context'))[:12]}…, not "
            f"the {context_fingerprint[:12]}… this party was given: refusing to contribute "
            "under a key the key holders did not make."
        )
    node, index = _leaf(party, own), int(data["index"])
    for sibling in (bytes.fromhex(h) for h in data["path"]):
        node = _parent(sibling, node) if index % 2 else _parent(node, sibling)
        index //= 2
    return seed_from([bytes.fromhex(data["keyholder"]), node])


def _contributions(keyholder_seed: bytes, seeds: Mapping[str, bytes]) -> list[bytes]:
    """The MAC seed's inputs: the key holder's seed and the Merkle root of the parties'."""
    names = sorted(seeds)
    return [keyholder_seed, _merkle_levels([_leaf(n, seeds[n]) for n in names])[-1][0]]


def _leaf(name: str, seed: bytes) -> bytes:
    return hashlib.sha256(b"fedhe-leaf\x00" + name.encode() + b"\x00" + seed).digest()


def _parent(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"fedhe-node\x00" + left + right).digest()


def _merkle_levels(leaves: list[bytes]) -> list[list[bytes]]:
    """Every level of the tree, leaves first; an odd node out is paired with itself."""
    levels = [leaves]
    while len(levels[-1]) > 1:
        level = levels[-1]
        if len(level) % 2:
            level = [*level, level[-1]]
        levels.append([_parent(level[i], level[i + 1]) for i in range(0, len(level), 2)])
    return levels


def _merkle_path(levels: list[list[bytes]], index: int) -> list[bytes]:
    path = []
    for level in levels[:-1]:
        sibling = index ^ 1
        path.append(level[sibling] if sibling < len(level) else level[index])
        index //= 2
    return path


def array_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Equivalent mutants survive here: allow_pickle None, True or absent (floats never pickle).
    np.save(buffer, np.asarray(values, dtype=np.float64), allow_pickle=False)
    return buffer.getvalue()


def open_release(
    channel: Channel, job_id: str, output: str, round_: int, party: str, sealed: bytes
) -> np.ndarray:
    """Recipient side: the values the key holder sealed to this party for (output, round)."""
    data = channel.open(sealed, release_label(job_id, output, round_, party))
    return np.load(io.BytesIO(data), allow_pickle=False)  # equivalent survivors: None, absent
