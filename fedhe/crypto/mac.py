"""A linearly homomorphic MAC over CKKS ciphertexts (the key holder's proof that it decrypts a sum).

CKKS is not secure against chosen ciphertexts: decrypting (0, K) and publishing the result
hands out K·s, the secret key. So the key holder releases a sum in the clear only when it has
checked that the ciphertext *is* the sum of what the parties contributed, without ever
receiving one party's ciphertext.

Each party tags its ciphertext c (its raw RNS residues, both polynomials) with
t = ⟨r, c⟩ mod q for every prime q of every ciphertext, where r is a vector only the parties and
the key holder know (derived from `MacKey`'s seed, fresh per output and round: the label). The
tags reach the key holder sealed end to end (`fedhe.crypto.channel`); the aggregator adds the
ciphertexts, and the key holder checks ⟨r, Σc⟩ = Σt (mod q). Ciphertext addition is addition of
residues modulo each prime, so an honest sum passes; any other ciphertext c' passes only if
⟨r, c' − Σc⟩ ≡ 0 for every prime, which for a nonzero difference chosen without knowing r
happens with probability ≤ 1/q per prime (r is uniform).

Why a tag reveals nothing to the key holder, who holds s but never sees c: c1 = u·a + e₁ is an
RLWE sample in the party's fresh secret u, indistinguishable from uniform, and c0 = m + e − c1·s.
So t = ⟨r₀, m + e⟩ + ⟨r₁ − s*(r₀), c1⟩, where s* is the adjoint of multiplication by s: the
second term is uniform mod q unless r₁ = s*(r₀), which a jointly random r avoids with
overwhelming probability. Why the tags travel sealed: the aggregator holds every c_i; with
t_i in the clear it would know ⟨r, c_i⟩ and could pass any sum plus Σ a_i·c_i whose small
coefficients a_i solve Σ a_i·t_i ≡ 0 (a short vector found by lattice reduction), releasing
small combinations of single parties' values.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedhe.crypto import _seal
from fedhe.crypto.tensor import EncryptedTensor
from fedhe.errors import InvalidCiphertextError, ProtocolError, TagError

MAC_SEED_BYTES = 32
_DOMAIN = b"fedhe-mac-v1"
# Terms per exact dot-product block: 16-bit × 32-bit limbs, 2^15 terms stay below 2^63.
_BLOCK = 1 << 15


@dataclass(frozen=True)
class Tag:
    """One party's tag of one tensor, and the metadata the key holder must see unchanged."""

    values: tuple[tuple[int, ...], ...]  # per ciphertext, per prime
    meta: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"values": [list(v) for v in self.values], "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tag:
        try:
            values = tuple(tuple(int(t) for t in chunk) for chunk in data["values"])
            meta = dict(data["meta"])
        except (KeyError, TypeError, ValueError) as err:
            raise TagError(f"malformed tag: {err!r}") from err
        return cls(values, meta)


class MacKey:
    """The shared secret r comes from this seed; one vector per label, ciphertext and prime."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != MAC_SEED_BYTES:
            raise ProtocolError(
                f"a MAC seed has {MAC_SEED_BYTES} bytes, got {len(seed)}: the registration that "
                "carried it is damaged; register the parties with the key holder again."
            )
        self._seed = seed

    def tag(self, tensor: EncryptedTensor, label: str) -> Tag:
        values = []
        for index, chunk in enumerate(tensor.chunks):
            residues, primes = _residues(chunk, tensor)
            values.append(
                tuple(
                    _dot_mod(self._vector(label, index, j, q, residues[j].size), residues[j], q)
                    for j, q in enumerate(primes)
                )
            )
        return Tag(tuple(values), tensor_meta(tensor))

    def verify(self, total: EncryptedTensor, tags: Sequence[Tag], label: str) -> None:
        """Raise TagError unless `total` is the sum of the tagged ciphertexts."""
        if not tags:
            raise TagError("a sum without tags cannot be verified.")
        meta = tensor_meta(total)
        if any(tag.meta != meta for tag in tags):
            raise TagError(
                "the sum's shape, packing, level or scale differs from what the parties tagged."
            )
        expected = self.tag(total, label).values
        for index, chunk_tags in enumerate(expected):
            for j, value in enumerate(chunk_tags):
                q = _prime(total, index, j)
                claimed = sum(_at(tag, index, j) for tag in tags) % q
                if claimed != value:
                    raise TagError(
                        "the ciphertext is not the sum of the contributions the parties tagged."
                    )

    def _vector(self, label: str, chunk: int, prime_index: int, q: int, n: int) -> np.ndarray:
        """n values uniform in [0, q) by rejection (no modulo bias), from AES-256-CTR keyed by
        SHAKE-256 of the seed and (label, ciphertext, prime): a PRG ~50× faster than SHAKE's
        own output at the ~0.1 MB each vector takes."""
        name = f"{label}\x00{chunk}\x00{prime_index}\x00{q}".encode()
        key = hashlib.shake_256(_DOMAIN + self._seed + name).digest(32)
        stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        mask = np.uint64((1 << q.bit_length()) - 1)
        out = np.empty(0, dtype=np.uint64)
        while out.size < n:  # primes sit just below a power of two: ~1 round
            want = n - out.size
            words = np.frombuffer(stream.update(bytes(8 * (want + want // 4 + 16))), "<u8") & mask
            out = np.concatenate([out, words[words < np.uint64(q)]])
        return out[:n]


def mac_label(output: str, round_: int) -> str:
    """The label that picks r: one vector per output kind and round."""
    return f"{output}/{round_}"


def tensor_meta(tensor: EncryptedTensor) -> dict[str, Any]:
    """What a release depends on beyond the residues: decoding must use the tagged values."""
    return {
        "shape": list(tensor.shape),
        "packing": tensor.packing,
        "lanes": tensor.lanes.to_dict() if tensor.lanes else None,
        "level": tensor.level,
        "scale": tensor.scale,
        "fingerprint": tensor.fingerprint,
    }


def content_digest(tensor: EncryptedTensor) -> str:
    """Identifies a ciphertext by its residues and metadata, whatever its framing."""
    digest = hashlib.sha256(repr(sorted(tensor_meta(tensor).items())).encode())
    for chunk in tensor.chunks:
        residues, _ = _residues(chunk, tensor)
        digest.update(residues.tobytes())
    return digest.hexdigest()


def _residues(chunk, tensor: EncryptedTensor) -> tuple[np.ndarray, tuple[int, ...]]:
    """Extracted once per ciphertext object: the key holder digests, then verifies a sum."""
    cached = _RESIDUES.get(chunk)
    if cached is None:
        cached = _RESIDUES[chunk] = _extract(chunk, tensor)
    return cached


# Ciphertext objects are immutable once loaded (every operation makes a new one).
_RESIDUES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _extract(chunk, tensor: EncryptedTensor) -> tuple[np.ndarray, tuple[int, ...]]:
    try:
        residues, primes = _seal.residues(chunk, tensor.context.raw)
    except ValueError as err:
        raise InvalidCiphertextError(str(err)) from err
    if residues.shape[0] != 2:
        raise InvalidCiphertextError(
            f"a sum is a 2-polynomial ciphertext, this one has {residues.shape[0]}."
        )
    # (polynomials, primes, N) → (primes, polynomials·N): row j holds prime j's residues.
    return np.ascontiguousarray(residues.transpose(1, 0, 2)).reshape(len(primes), -1), primes


def _prime(tensor: EncryptedTensor, index: int, j: int) -> int:
    return _residues(tensor.chunks[index], tensor)[1][j]


def _at(tag: Tag, index: int, j: int) -> int:
    try:
        return tag.values[index][j]
    except IndexError:
        raise TagError("a tag covers fewer ciphertexts or primes than the sum.") from None


def _dot_mod(r: np.ndarray, c: np.ndarray, q: int) -> int:
    """Σ r_k·c_k mod q, exact for r, c < 2^61: limbs of 16 (r) and 32 (c) bits keep every
    partial sum of a block of 2^15 terms below 2^63, then Python integers combine them."""
    total = 0
    for start in range(0, r.size, _BLOCK):
        rb = r[start : start + _BLOCK]
        cb = c[start : start + _BLOCK]
        c_limbs = (cb & np.uint64(0xFFFFFFFF), cb >> np.uint64(32))
        for k in range(4):
            r_limb = (rb >> np.uint64(16 * k)) & np.uint64(0xFFFF)
            for m, c_limb in enumerate(c_limbs):
                total += int(np.dot(r_limb, c_limb)) << (16 * k + 32 * m)
    return total % q


def seed_from(contributions: Sequence[bytes]) -> bytes:
    """The MAC seed from every contribution (key holder's and each party's): one honest
    contributor is enough to make it uniform and out of any single role's choosing."""
    digest = hashlib.sha256(_DOMAIN + b"seed")
    for part in contributions:
        digest.update(len(part).to_bytes(4, "little") + part)
    return digest.digest()
