"""End-to-end channels between a party and the key holder, through an aggregator that relays.

Every role has a long-term X25519 identity. Two identities agree on a pairwise key per job
(static-static X25519, HKDF-SHA256 bound to the job and both public keys); messages sealed with
it (AES-256-GCM, associated data naming what the message is) can be read and made only by the
two ends. The aggregator relays the bytes: it can drop or delay them, not read, alter,
relabel or forge them. Forging would need one of the two private keys, and relabelling (a tag
of party 0 presented as party 3's, a round-1 tag as round 2's) changes the associated data.

Static-static agreement authenticates both ends without a separate signature scheme; it has
no forward secrecy within a job (a stolen identity key opens that job's sealed messages),
which the key holder's secret key would open anyway.
"""

from __future__ import annotations

import functools
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedhe.errors import ChannelError

PUBLIC_KEY_BYTES = 32
_NONCE_BYTES = 12
_INFO = b"fedhe-channel-v1"


class Identity:
    """An X25519 key pair: the private half never leaves the node that made it."""

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private

    @classmethod
    def generate(cls) -> Identity:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> Identity:
        if len(data) != 32:
            raise ChannelError(f"an identity key has 32 bytes, got {len(data)}.")
        return cls(X25519PrivateKey.from_private_bytes(data))

    def private_bytes(self) -> bytes:
        return self._private.private_bytes_raw()

    @property
    def public(self) -> bytes:
        return self._private.public_key().public_bytes_raw()

    def channel(self, peer: bytes, job_id: str) -> Channel:
        """The pairwise channel with `peer` (its public key) for one job."""
        check_public_key(peer)
        return Channel(_pairwise_key(self.private_bytes(), peer, job_id))


class Channel:
    """AES-256-GCM under a pairwise key; `label` is authenticated, not encrypted."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, label: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, label.encode())

    def open(self, sealed: bytes, label: str) -> bytes:
        """The plaintext, or ChannelError without detail (one opaque error for any tampering)."""
        if len(sealed) < _NONCE_BYTES + 16:
            raise ChannelError(f"sealed message {label!r} is truncated.")
        try:
            return self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], label.encode())
        except InvalidTag:
            raise ChannelError(
                f"sealed message {label!r} does not open: altered, relabelled, or not sealed "
                "by the expected peer."
            ) from None


# A key holder opens every party's tag each round: one X25519 agreement per party and job per
# process, not per message (~0.1 ms each, 0.1 s per sum at 1,000 parties).
@functools.lru_cache(maxsize=4096)
def _pairwise_key(private: bytes, peer: bytes, job_id: str) -> bytes:
    own = X25519PrivateKey.from_private_bytes(private)
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer))
    ends = b"".join(sorted((own.public_key().public_bytes_raw(), peer)))
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=hashlib.sha256(ends).digest(),
        info=_INFO + job_id.encode(),
    ).derive(shared)


def check_public_key(data: bytes) -> None:
    if not isinstance(data, bytes | bytearray) or len(data) != PUBLIC_KEY_BYTES:
        raise ChannelError(f"a public identity key has {PUBLIC_KEY_BYTES} bytes, got {data!r:.40}.")


def fingerprint(public: bytes) -> str:
    """What an operator compares out of band (and pins in a node config)."""
    return hashlib.sha256(public).hexdigest()[:32]
