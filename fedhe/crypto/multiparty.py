"""Multiparty and threshold CKKS: K key holders jointly hold the secret key; all of them (or,
after thresholdizing, any T of them) decrypt, and no one ever holds the key itself.

The protocols are those of Mouchet, Troncoso-Pastoriza, Bossuat and Hubaux, "Multiparty
Homomorphic Encryption from Ring-Learning-with-Errors" (PETS 2021), as Lattigo's `multiparty`
package implements them, over SEAL's own key formats so that the keys they produce load into
SEAL and TenSEAL unchanged:

1. Each holder draws its additive share s_i (`SecretShare.generate`); the key is s = Σ s_i.
2. CKG (one round): from a common random polynomial a (`common_random`, derived from a public
   seed) each holder sends p_i = −a·s_i + e_i; pk = (Σ p_i, a) = (−a·s + e, a).
3. RKG (two rounds, optional): the relinearization key for s², with SEAL's RNS gadget (one
   key per data prime q_j, carrying P·s² on that prime only). Round 1 needs an ephemeral
   secret u_i that the holder keeps (secret!) until round 2.
4. RTG (one round, optional): the Galois keys for π_g(s), one per Galois element.
5. `collective_public_context` wraps them as an ordinary `PublicContext`: every fedhe
   operation (encrypt, sums, `Circuit`, rotations, …) works under it unchanged.
6. Threshold (optional, Lattigo's Thresholdizer/Combiner): each holder Shamir-shares its s_i
   over every RNS prime (`deal`); each holder adds what it receives (`combine_dealt`) into its
   Shamir share of s. Any T holders then decrypt, weighting their shares by their Lagrange
   coefficients at zero for the active set (`lagrange_at_zero`).
7. Decryption: each active holder sends h_i = c1·(λ_i·)s_i + e_i (`decryption_share`); anyone
   with all of them computes c0 + Σ h_i = Δ·m + noise and decodes (`combine_decryption`).

Smudging. A decryption share must carry fresh noise e_i of its own: c0 + Σ h_i reveals the
ciphertext's noise, and Li and Micciancio (EUROCRYPT 2021) showed that CKKS decryptions that
reveal noise correlated with the key let an adversary who knows the encryption randomness
recover the key. Every share smudges on its own, because colluding holders know their own
noise and would subtract it: only the honest holders' noise protects them. With no noise at
all a share is key material outright (for c1 = 1, h_i = λ_i·s_i: see the tests), so holders
must only ever answer for ciphertexts they have checked. `DEFAULT_SMUDGING_BITS` = 20 follows
OpenFHE, whose FIXED_NOISE_MULTIPARTY mode adds 20 bits of noise per decryption share.

Its price is precision: T shares add Gaussian noise of σ·√T per coefficient, which decodes to
an error of deviation σ·√(T·N/2)/scale in every value (`smudging_deviation`). Measured with 3
holders at σ = 2^20, N = 8192, over 32768 values (the test checks the ratio): deviation 1.65e-6,
largest 7.4e-6, at AGGREGATION_PARAMS' scale 2^46 for sums up to 100 on its 55-bit prime
(predicted 1.65e-6); deviation 1.05e-4, largest 4.6e-4, at MODEL_PARAMS' scale 2^40 (predicted
1.06e-4). The ciphertexts' own noise is four orders of magnitude smaller. Quantized lanes
(`fedhe.crypto.lanes`) have too few guard bits to absorb smudging: combining their shares is
refused; use COMPLEX packing for threshold decryption.

Every message is framed (`fedhe.crypto.framing`) and says what it binds: key-generation shares
(b"FHEG", public) the seed's digest and the holder; decryption shares (b"FHED") the context,
the ciphertexts (a digest of their c1), the holder, its point and the active set. Secret
material (b"FHES": secret shares, dealt Shamir pieces, RKG ephemerals) must be sealed at rest
by the caller; `PublicContext.from_bytes` refuses it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from fedhe.crypto import _ring
from fedhe.crypto._tenseal_proto import varint
from fedhe.crypto.context import KeyRequest, PublicContext, check_real_params
from fedhe.crypto.framing import frame, unframe
from fedhe.crypto.lanes import MAX_RESIDUAL
from fedhe.crypto.params import CKKSParams
from fedhe.crypto.tensor import QUANTIZED, EncryptedTensor, SealTensor, values_from_slots
from fedhe.errors import InvalidCiphertextError, ParameterError, ShareError

DEFAULT_SMUDGING_BITS = 20
DEFAULT_SMUDGING_SIGMA = 2.0**DEFAULT_SMUDGING_BITS

ADDITIVE = "additive"
SHAMIR = "shamir"

SECRET_MAGIC = b"FHES"  # secret material: shares, dealt pieces, ephemerals (seal at rest)
KEYGEN_MAGIC = b"FHEG"  # public key-generation shares and aggregates
DECRYPTION_MAGIC = b"FHED"  # decryption shares
_VERSION = 1

_CKG_LABEL = "ckg"
_MAX_POINT = 1 << 16  # Shamir points are small positive integers (one per holder)
_TENSEAL_AUTO_FLAGS = 7  # TenSEAL's default: auto relinearize, rescale and mod switch
# Quantized lanes are planned for noise near ¼ unit and refuse beyond MAX_RESIDUAL: smudging may
# use what lies between, at six deviations.
_QUANTIZED_SLACK = MAX_RESIDUAL - 0.25


# -- secret shares ------------------------------------------------------------------------------


class SecretShare:
    """One holder's share of the secret key: a polynomial in NTT form at the key level.

    ADDITIVE: its s_i of s = Σ s_i (all holders decrypt). SHAMIR: its evaluation at `point`
    of a degree-(threshold − 1) sharing of s (any `threshold` of `points` decrypt)."""

    def __init__(
        self,
        params: CKKSParams,
        poly: np.ndarray,
        *,
        kind: str = ADDITIVE,
        point: int | None = None,
        threshold: int | None = None,
        points: Sequence[int] = (),
    ) -> None:
        ring = _ring.ring(params)
        if poly.shape != (ring.key_primes, ring.n) or poly.dtype != np.uint64:
            raise ShareError(f"a secret share is a ({ring.key_primes}, {ring.n}) uint64 array.")
        if np.any(poly >= ring.moduli):
            raise ShareError("a secret share has residues out of range for its parameters.")
        if kind == ADDITIVE and (point is not None or threshold is not None or points):
            raise ShareError("an additive share has no point, threshold or points.")
        if kind == SHAMIR:
            _check_points(points, threshold)
            if point not in points:
                raise ShareError(f"Shamir share at point {point} is not one of {list(points)}.")
        elif kind != ADDITIVE:
            raise ShareError(f"unknown share kind {kind!r}; expected {ADDITIVE} or {SHAMIR}.")
        self.params = params
        self.kind = kind
        self.point = point
        self.threshold = threshold
        self.points = tuple(points)
        self._poly = poly

    def __repr__(self) -> str:  # never the polynomial
        where = (
            f", point={self.point}, {self.threshold}-of-{len(self.points)}" if self.point else ""
        )
        return f"SecretShare({self.kind}{where}, holder={self.holder_id})"

    @classmethod
    def generate(cls, params: CKKSParams) -> SecretShare:
        """A fresh additive share: a ternary polynomial from os.urandom, as SEAL's keys are."""
        ring = _ring.ring(params)
        return cls(params, ring.small_ntt(ring.ternary()))

    @cached_property
    def holder_id(self) -> str:
        """Names this share in messages (so duplicates are caught); reveals nothing of it."""
        digest = hashlib.sha256(b"fedhe/holder\x00" + self._poly.tobytes())
        return digest.hexdigest()[:32]

    def secret(self, active_points: Sequence[int] | None = None) -> np.ndarray:
        """This holder's additive part of s among `active_points`: s_i for an additive share
        (`active_points` None: every holder takes part), λ_i·s_i for a Shamir share."""
        if self.kind == ADDITIVE:
            if active_points is not None:
                raise ParameterError(
                    "an additive share decrypts only with every holder: pass "
                    "active_points=None (active sets are for thresholdized Shamir shares)."
                )
            return self._poly
        active = self.check_active(active_points)
        ring = _ring.ring(self.params)
        return ring.mul(self._poly, ring.scalar(lagrange_at_zero(self.params, self.point, active)))

    def check_active(self, active_points: Sequence[int] | None) -> tuple[int, ...]:
        """The active set, once it is a valid set for this Shamir share."""
        if active_points is None:
            raise ParameterError(
                f"a {self.threshold}-of-{len(self.points)} share needs the active set: pass "
                f"active_points, {self.threshold} or more of {list(self.points)} including "
                f"{self.point}."
            )
        active = tuple(int(p) for p in active_points)
        unknown = sorted(set(active) - set(self.points))
        if len(set(active)) != len(active) or unknown or self.point not in active:
            raise ParameterError(
                f"active set {list(active)} must list distinct points of {list(self.points)} "
                f"and include this holder's point {self.point}."
            )
        if len(active) < (self.threshold or 0):
            raise ParameterError(
                f"{len(active)} active holders cannot decrypt a {self.threshold}-of-"
                f"{len(self.points)} sharing."
            )
        return active

    def to_bytes(self) -> bytes:
        """Secret: seal these bytes at rest and never send them to anyone."""
        header = {"kind": self.kind, "params": self.params.to_dict()}
        if self.kind == SHAMIR:
            header.update(point=self.point, threshold=self.threshold, points=list(self.points))
        return _pack(SECRET_MAGIC, header, self._poly)

    @classmethod
    def from_bytes(cls, params: CKKSParams, data: bytes) -> SecretShare:
        header, poly = _unpack(
            data, SECRET_MAGIC, {ADDITIVE, SHAMIR}, params, "secret share", _key_shape(params)
        )
        try:
            if header["kind"] == ADDITIVE:
                return cls(params, poly)
            return cls(
                params,
                poly,
                kind=SHAMIR,
                point=int(header["point"]),
                threshold=int(header["threshold"]),
                points=tuple(int(p) for p in header["points"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ShareError(f"secret share header is malformed: {err}") from err


def common_random(params: CKKSParams, seed: bytes, label: str) -> np.ndarray:
    """The common reference polynomial for (seed, label): uniform, NTT form, key level; every
    holder who knows the public seed derives the same one (SHAKE-256)."""
    if not isinstance(seed, bytes) or len(seed) < 16:
        raise ParameterError("the common seed must be at least 16 bytes (agreed per job).")
    return _ring.ring(params).uniform(seed, f"fedhe/mhe/{label}")


# -- collective public key (CKG) ----------------------------------------------------------------


def public_key_share(
    share: SecretShare, seed: bytes, *, active_points: Sequence[int] | None = None
) -> bytes:
    """p_i = −a·s_i + e_i for the common a of `seed`."""
    ring = _ring.ring(share.params)
    a = common_random(share.params, seed, _CKG_LABEL)
    p = ring.sub(ring.small_ntt(ring.noise()[0]), ring.mul(a, share.secret(active_points)))
    return _keygen_message("ckg-share", share, p, crs=_crs_id(seed))


def combine_public_key(params: CKKSParams, shares: Sequence[bytes], seed: bytes) -> bytes:
    """The collective public key (Σ p_i, a) as SEAL PublicKey bytes."""
    ring = _ring.ring(params)
    parts = _gather(params, shares, "ckg-share", _crs_id(seed), _key_shape(params))
    key = np.stack([ring.sum(p for _, p in parts), common_random(params, seed, _CKG_LABEL)])
    return ring.public_key_bytes(key)


# -- relinearization key (RKG, two rounds) ------------------------------------------------------


def relin_round1(
    share: SecretShare, seed: bytes, *, active_points: Sequence[int] | None = None
) -> tuple[bytes, bytes]:
    """(public round-1 share, ephemeral secret). For each data prime j, with a_j common:
    h0_j = −u_i·a_j + P·s_i·[j] + e, h1_j = s_i·a_j + e'. Keep the ephemeral u_i secret and
    sealed until round 2; discard it afterwards."""
    ring = _ring.ring(share.params)
    s = share.secret(active_points)
    u = ring.small_ntt(ring.ternary())
    a = _digit_randoms(share.params, seed, "rkg")
    noise = ring.small_ntt(ring.noise(2 * ring.data_primes))
    h0 = ring.with_gadget(ring.sub(noise[0::2], ring.mul(a, u)), s)
    h1 = ring.add(ring.mul(a, s), noise[1::2])
    public = _keygen_message("rkg1-share", share, np.stack([h0, h1]), crs=_crs_id(seed))
    header = {
        "kind": "rkg-ephemeral",
        "params": share.params.to_dict(),
        "crs": _crs_id(seed),
        "holder": share.holder_id,
    }
    return public, _pack(SECRET_MAGIC, header, u)


def combine_relin_round1(params: CKKSParams, shares: Sequence[bytes]) -> bytes:
    """Σ of the round-1 shares (h0, h1): what every holder needs for round 2."""
    parts = _gather(params, shares, "rkg1-share", None, (2, *_digits_shape(params)))
    crs = {h.get("crs") for h, _ in parts}
    if len(crs) != 1:
        raise ShareError("round-1 relinearization shares come from different seeds.")
    ring = _ring.ring(params)
    total = ring.sum(p for _, p in parts)
    header = {"kind": "rkg1", "params": params.to_dict(), "crs": crs.pop()}
    return _pack(KEYGEN_MAGIC, header, total)


def relin_round2(
    share: SecretShare,
    ephemeral: bytes,
    combined_round1: bytes,
    *,
    active_points: Sequence[int] | None = None,
) -> bytes:
    """h'_j = s_i·h0_j + (u_i − s_i)·h1_j + e (the two halves of Lattigo's round-2 share,
    already added: only their sum enters the key)."""
    params = share.params
    ring = _ring.ring(params)
    head, u = _unpack(
        ephemeral, SECRET_MAGIC, {"rkg-ephemeral"}, params, "ephemeral", _key_shape(params)
    )
    round1_header, round1 = _unpack(
        combined_round1, KEYGEN_MAGIC, {"rkg1"}, params, "round 1", (2, *_digits_shape(params))
    )
    if head.get("holder") != share.holder_id:
        raise ShareError("this relinearization ephemeral belongs to another holder's share.")
    if head.get("crs") != round1_header.get("crs"):
        raise ShareError("the ephemeral and the round-1 aggregate come from different seeds.")
    s = share.secret(active_points)
    h0, h1 = round1[0], round1[1]
    noise = ring.small_ntt(ring.noise(2 * ring.data_primes))
    value = ring.add(ring.mul(h0, s), ring.mul(h1, ring.sub(u, s)))
    value = ring.add(value, ring.add(noise[0::2], noise[1::2]))
    return _keygen_message(
        "rkg2-share",
        share,
        value,
        crs=round1_header.get("crs"),
        round1=_digest(combined_round1),
    )


def combine_relin(
    params: CKKSParams, round2_shares: Sequence[bytes], combined_round1: bytes
) -> bytes:
    """The relinearization key (Σ h'_j, h1_j) per data prime, as SEAL RelinKeys bytes."""
    ring = _ring.ring(params)
    _, round1 = _unpack(
        combined_round1, KEYGEN_MAGIC, {"rkg1"}, params, "round 1", (2, *_digits_shape(params))
    )
    parts = _gather(params, round2_shares, "rkg2-share", None, _digits_shape(params))
    if {h.get("round1") for h, _ in parts} != {_digest(combined_round1)}:
        raise ShareError("round-2 shares were made from another round-1 aggregate.")
    b = ring.sum(p for _, p in parts)
    return ring.relin_keys_bytes([np.stack([b[j], round1[1][j]]) for j in range(ring.data_primes)])


# -- Galois keys (RTG) --------------------------------------------------------------------------


def galois_elements_for(params: CKKSParams, keys: KeyRequest) -> tuple[int, ...]:
    """Exactly the Galois elements `keys` needs: 3^step mod 2N per rotation step (as
    `_seal.create_rotation_keys`), 2N − 1 to conjugate, and with `galois` TenSEAL's set
    (SEAL's default: 3^(±2^i) for every power of two below N/2, and 2N − 1)."""
    return tuple(
        sorted(set(_explicit_elements(params, keys)) | set(_tenseal_elements(params, keys)))
    )


def rotation_share(
    share: SecretShare,
    galois_elements: Iterable[int],
    seed: bytes,
    *,
    active_points: Sequence[int] | None = None,
) -> bytes:
    """For each element g and data prime j: −a_gj·s_i + P·π_g(s_i)·[j] + e."""
    params = share.params
    ring = _ring.ring(params)
    elements = _checked_elements(params, galois_elements)
    s = share.secret(active_points)
    noise = ring.small_ntt(ring.noise(len(elements) * ring.data_primes))
    noise = noise.reshape(len(elements), ring.data_primes, ring.key_primes, ring.n)
    out = np.empty_like(noise)
    for index, element in enumerate(elements):
        a = _digit_randoms(params, seed, f"rtg/{element}")
        rotated = s[:, ring.galois_permutation(element)]
        out[index] = ring.with_gadget(ring.sub(noise[index], ring.mul(a, s)), rotated)
    return _keygen_message("rtg-share", share, out, crs=_crs_id(seed), elements=list(elements))


def combine_rotations(
    params: CKKSParams, shares: Sequence[bytes], galois_elements: Iterable[int], seed: bytes
) -> bytes:
    """The Galois keys for `galois_elements`, as SEAL GaloisKeys bytes."""
    ring = _ring.ring(params)
    elements = _checked_elements(params, galois_elements)
    parts = _gather(
        params, shares, "rtg-share", _crs_id(seed), (len(elements), *_digits_shape(params))
    )
    if any(h.get("elements") != list(elements) for h, _ in parts):
        raise ShareError(f"rotation shares are not all for the Galois elements {list(elements)}.")
    total = ring.sum(p for _, p in parts)
    keys = {}
    for index, element in enumerate(elements):
        a = _digit_randoms(params, seed, f"rtg/{element}")
        keys[element] = [np.stack([total[index][j], a[j]]) for j in range(ring.data_primes)]
    return ring.galois_keys_bytes(keys)


# -- the collective context ---------------------------------------------------------------------


def collective_public_context(
    params: CKKSParams,
    keys: KeyRequest,
    public_key: bytes,
    relin_key: bytes | None = None,
    rotation_keys: bytes | None = None,
) -> PublicContext:
    """A fedhe `PublicContext` under the collective keys: its encryptor uses the collective
    public key; it holds the relinearization key when `keys.relin`, TenSEAL's Galois keys when
    `keys.galois` and `rotation_key_bytes` for `keys.rotations`/`keys.conjugate`, all taken
    from `rotation_keys` (GaloisKeys bytes holding at least `galois_elements_for(keys)`).
    Everyone who builds it from the same keys gets the same fingerprint."""
    ring = _ring.ring(params)
    _ring.load(sealapi.PublicKey(), ring.seal, public_key)  # SEAL checks it before TenSEAL
    if keys.relin != (relin_key is not None):
        raise ParameterError(
            f"the key request says relin={keys.relin}, but a relinearization key was "
            f"{'not ' if relin_key is None else ''}given."
        )
    needed = galois_elements_for(params, keys)
    if bool(needed) != (rotation_keys is not None):
        raise ParameterError(
            f"the key request needs Galois elements {list(needed)}, but rotation keys were "
            f"{'not ' if rotation_keys is None else ''}given."
        )
    tenseal_galois = b""
    explicit = b""
    if rotation_keys is not None:
        if keys.galois:
            tenseal_galois = _ring.galois_keys_subset(
                rotation_keys, _tenseal_elements(params, keys), ring.n
            )
        if keys.galois_elements:
            explicit = _ring.galois_keys_subset(
                rotation_keys, _explicit_elements(params, keys), ring.n
            )
    proto = _tenseal_context_proto(
        ring, public_key, relin_key or b"", tenseal_galois, 2.0**params.scale_bits
    )
    try:
        raw = ts.context_from(proto)
    except Exception as err:  # TenSEAL raises ValueError, RuntimeError or TypeError
        raise ParameterError(f"the collective keys do not load into TenSEAL: {err}") from err
    check_real_params(raw, params, what="collective context")
    return PublicContext(raw, params, keys, explicit)


def _tenseal_context_proto(
    ring: _ring.Ring, public_key: bytes, relin: bytes, galois: bytes, scale: float
) -> bytes:
    """TenSEAL's TenSEALContextProto of a public-key context holding exactly these keys."""
    public = (
        _proto_bytes(1, public_key)
        + _proto_varint(2, _TENSEAL_AUTO_FLAGS)
        + bytes([3 << 3 | 1])
        + np.float64(scale).astype("<f8").tobytes()
        + (_proto_bytes(4, relin) if relin else b"")
        + (_proto_bytes(5, galois) if galois else b"")
    )
    # field 4, encryption_type, stays at its default 0: asymmetric (public-key) encryption
    return _proto_bytes(1, ring.encryption_parameters) + _proto_bytes(2, public)


def _proto_bytes(field: int, value: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(value)) + value


def _proto_varint(field: int, value: int) -> bytes:
    return varint(field << 3) + varint(value)


# -- threshold: Shamir over every RNS prime -----------------------------------------------------


def deal(share: SecretShare, threshold: int, points: Sequence[int]) -> dict[int, bytes]:
    """Shamir-share this holder's additive s_i: f(x) = s_i + r_1·x + … + r_{t−1}·x^{t−1}
    with uniform secret r_k (per prime), evaluated at every point. Each piece is secret and
    goes to the holder of that point over a private channel."""
    if share.kind != ADDITIVE:
        raise ParameterError("only an additive share is dealt (thresholdize before dealing).")
    chosen = _check_points(points, threshold)
    ring = _ring.ring(share.params)
    coefficients = [ring.private_uniform() for _ in range(threshold - 1)]
    header = {
        "kind": "dealt",
        "params": share.params.to_dict(),
        "threshold": threshold,
        "points": list(chosen),
        "dealer": share.holder_id,
    }
    pieces = {}
    for point in chosen:
        value = np.zeros_like(share.secret())
        x = ring.scalar([point % q for q in ring.primes])
        for coefficient in reversed(coefficients):  # Horner
            value = ring.add(ring.mul(value, x), coefficient)
        value = ring.add(ring.mul(value, x), share.secret())
        pieces[point] = _pack(SECRET_MAGIC, {**header, "point": point}, value)
    return pieces


def combine_dealt(params: CKKSParams, point: int, dealt: Sequence[bytes]) -> SecretShare:
    """This holder's Shamir share: the sum of the pieces every holder dealt to `point`."""
    parts = [
        _unpack(d, SECRET_MAGIC, {"dealt"}, params, f"dealt piece {i}", _key_shape(params))
        for i, d in enumerate(dealt)
    ]
    if not parts:
        raise ShareError("no dealt pieces to combine.")
    first = parts[0][0]
    for index, (header, _) in enumerate(parts):
        same = all(header.get(k) == first.get(k) for k in ("threshold", "points"))
        if header.get("point") != point or not same:
            raise ShareError(
                f"dealt piece {index} is for point {header.get('point')} of a "
                f"{header.get('threshold')}-of-{header.get('points')} sharing, not point {point} "
                f"of {first.get('threshold')}-of-{first.get('points')}."
            )
    try:
        points = _check_points(first.get("points") or (), first.get("threshold"))
    except (ParameterError, TypeError, ValueError) as err:
        raise ShareError(f"dealt pieces announce an invalid sharing: {err}") from err
    dealers = [h.get("dealer") for h, _ in parts]
    if len(set(dealers)) != len(dealers) or len(parts) != len(points):
        raise ShareError(
            f"need one piece from each of the {len(points)} holders, got {len(parts)} from "
            f"{len(set(dealers))} distinct dealers."
        )
    ring = _ring.ring(params)
    return SecretShare(
        params,
        ring.sum(p for _, p in parts),
        kind=SHAMIR,
        point=point,
        threshold=int(first["threshold"]),
        points=points,
    )


def lagrange_at_zero(
    params: CKKSParams, point: int, active_points: Sequence[int]
) -> tuple[int, ...]:
    """λ = Π_{y ≠ x} y / (y − x) modulo each key-level prime: Σ λ_x·f(x) = f(0) over the
    active set."""
    active = [int(p) for p in active_points]
    if point not in active or len(set(active)) != len(active):
        raise ParameterError(f"point {point} must be one of the distinct points {active}.")
    out = []
    for q in _ring.ring(params).primes:
        numerator, denominator = 1, 1
        for y in active:
            if y != point:
                numerator = numerator * y % q
                denominator = denominator * (y - point) % q
        out.append(numerator * pow(denominator, -1, q) % q)
    return tuple(out)


def _check_points(points: Sequence[int], threshold: int | None) -> tuple[int, ...]:
    chosen = tuple(int(p) for p in points)
    if not chosen or len(set(chosen)) != len(chosen) or not all(0 < p < _MAX_POINT for p in chosen):
        raise ParameterError(f"Shamir points must be distinct integers in 1..{_MAX_POINT - 1}.")
    if threshold is None or not 1 <= threshold <= len(chosen):
        raise ParameterError(f"threshold {threshold} must be between 1 and {len(chosen)}.")
    return chosen


# -- decryption ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    """One ciphertext of a tensor: residues (2, primes, N), scale and slots in use."""

    polys: np.ndarray
    scale: float
    size: int

    @property
    def level(self) -> int:
        return self.polys.shape[1]


def decryption_share(
    share: SecretShare,
    tensor: EncryptedTensor,
    *,
    active_points: Sequence[int] | None = None,
    smudging_sigma: float = DEFAULT_SMUDGING_SIGMA,
) -> bytes:
    """h = c1·(λ·)s + e for every ciphertext of `tensor`, e rounded Gaussian of deviation
    `smudging_sigma` (coefficient units). Only answer for ciphertexts you have checked: a
    share is a noisy function of your key (see the module docstring)."""
    params = tensor.context.params
    if share.params != params:
        raise ParameterError("this share is for other CKKS parameters than the tensor.")
    ring = _ring.ring(params)
    active = None if share.kind == ADDITIVE else share.check_active(active_points)
    secret = share.secret(active_points)
    chunks = _read_chunks(tensor)
    noise = _smudging(ring, smudging_sigma, [c.level for c in chunks])
    values = [
        ring.add(ring.mul(c.polys[1], secret[: c.level]), e)
        for c, e in zip(chunks, noise, strict=True)
    ]
    header = {
        **_binding(tensor, chunks),
        "holder": share.holder_id,
        "point": share.point,
        "active": None if active is None else sorted(active),
        "sigma": float(smudging_sigma),
    }
    return frame(DECRYPTION_MAGIC, _VERSION, header, b"".join(v.tobytes() for v in values))


def combine_decryption(tensor: EncryptedTensor, shares: Sequence[bytes]) -> np.ndarray:
    """The tensor's values from every active holder's decryption share: c0 + Σ h, decoded
    and unpacked as `fedhe.crypto.decrypt` does. Refuses, naming it, any share made for
    another ciphertext, context or active set, and a repeated holder. Whether every additive
    holder contributed it cannot tell: without one, the values come out as garbage."""
    ring = _ring.ring(tensor.context.params)
    chunks = _read_chunks(tensor)
    binding = _binding(tensor, chunks)
    if not shares:
        raise ShareError("no decryption shares to combine.")
    headers, values = [], []
    for index, data in enumerate(shares):
        header, polys = _parse_decryption_share(ring, data, binding, chunks, index)
        headers.append(header)
        values.append(polys)
    _check_holders(headers)
    _check_quantized_noise(tensor, chunks, headers)
    slots = []
    for index, chunk in enumerate(chunks):
        total = ring.sum([chunk.polys[0], *(v[index] for v in values)])
        slots.append(ring.decode(total, chunk.scale)[: chunk.size])
    return values_from_slots(tensor, slots)


def smudging_deviation(
    params: CKKSParams, scale: float, holders: int, sigma: float = DEFAULT_SMUDGING_SIGMA
) -> float:
    """Deviation of the error smudging adds to each decoded value (real or imaginary part):
    `holders` shares of deviation σ per coefficient give σ·√(holders·N/2)/scale."""
    return sigma * math.sqrt(holders * params.poly_modulus_degree / 2) / scale


def _read_chunks(tensor: EncryptedTensor) -> list[_Chunk]:
    """The tensor's ciphertexts as residues; refuses any that is not two polynomials at a
    level of the tensor's parameters."""
    ring = _ring.ring(tensor.context.params)
    if isinstance(tensor, SealTensor):
        pairs = list(zip(tensor.seal_ciphers, tensor.sizes, strict=True))
    else:
        pairs = [(chunk.ciphertext()[0], chunk.size()) for chunk in tensor.chunks]
    chunks = []
    for index, (ct, size) in enumerate(pairs):
        if ct.size() != 2 or not ct.is_ntt_form():
            raise InvalidCiphertextError(
                f"ciphertext {index} has {ct.size()} polynomials: only a relinearized "
                "(two-polynomial) ciphertext in NTT form can be decrypted by shares."
            )
        try:
            level = ring.level_of(ct.parms_id())
        except ParameterError as err:
            raise InvalidCiphertextError(f"ciphertext {index}: {err}") from err
        polys = _ring.read_ciphertext(ct)
        if polys.shape != (2, level, ring.n):
            raise InvalidCiphertextError(f"ciphertext {index} does not parse as its level.")
        chunks.append(_Chunk(polys, float(ct.scale), int(size)))
    return chunks


def _binding(tensor: EncryptedTensor, chunks: Sequence[_Chunk]) -> dict[str, Any]:
    """What a decryption share is for: context, ciphertext count, levels, digest of the c1."""
    digest = hashlib.sha256(b"fedhe/mhe/c1\x00")
    for chunk in chunks:
        digest.update(chunk.polys[1].tobytes())
    return {
        "fingerprint": tensor.fingerprint,
        "chunks": len(chunks),
        "levels": [c.level for c in chunks],
        "c1_sha256": digest.hexdigest(),
    }


def _smudging(ring: _ring.Ring, sigma: float, levels: Sequence[int]) -> list[np.ndarray]:
    """One smudging polynomial (NTT form) per ciphertext level; batched through one NTT per
    level."""
    coefficients = ring.gaussian(sigma, len(levels))
    out: list[np.ndarray | None] = [None] * len(levels)
    for level in sorted(set(levels)):
        indexes = [i for i, lv in enumerate(levels) if lv == level]
        transformed = ring.small_ntt(coefficients[indexes], level)
        for i, poly in zip(indexes, transformed, strict=True):
            out[i] = poly
    return out  # type: ignore[return-value]


def _parse_decryption_share(
    ring: _ring.Ring, data: bytes, binding: dict[str, Any], chunks: Sequence[_Chunk], index: int
) -> tuple[dict[str, Any], list[np.ndarray]]:
    header, body = unframe(
        data,
        magic=DECRYPTION_MAGIC,
        version=_VERSION,
        what=f"decryption share {index}",
        error=ShareError,
    )
    for key in ("fingerprint", "chunks", "levels"):
        if header.get(key) != binding[key]:
            raise ShareError(
                f"decryption share {index} is for another tensor or context ({key} "
                f"{header.get(key)!r}, this tensor has {binding[key]!r})."
            )
    if header.get("c1_sha256") != binding["c1_sha256"]:
        raise ShareError(
            f"decryption share {index} was made for other ciphertexts than this tensor's "
            "(digest of c1 differs): ask its holder for a share of this tensor."
        )
    expected = sum(8 * c.level * ring.n for c in chunks)
    if len(body) != expected:
        raise ShareError(f"decryption share {index} has {len(body)} bytes, expected {expected}.")
    polys, offset = [], 0
    for chunk in chunks:
        count = chunk.level * ring.n
        poly = np.frombuffer(body, dtype="<u8", count=count, offset=offset).reshape(
            chunk.level, ring.n
        )
        if np.any(poly >= ring.moduli[: chunk.level]):
            raise ShareError(f"decryption share {index} has residues out of range.")
        polys.append(poly.astype(np.uint64))
        offset += 8 * count
    return header, polys


def _check_holders(headers: Sequence[dict[str, Any]]) -> None:
    """One share per holder; all additive, or all Shamir shares of exactly the active set
    they were made for."""
    holders = [h.get("holder") for h in headers]
    duplicate = next((i for i, h in enumerate(holders) if holders.index(h) != i), None)
    if duplicate is not None:
        raise ShareError(f"decryption share {duplicate} repeats another holder's share.")
    actives = {json.dumps(h.get("active")) for h in headers}
    if len(actives) != 1:
        raise ShareError(
            f"decryption shares were made for different active sets {sorted(actives)}: every "
            "active holder must make its share for the same set."
        )
    active = headers[0].get("active")
    points = [h.get("point") for h in headers]
    if active is None:
        if any(p is not None for p in points):
            raise ShareError("Shamir decryption shares must name their active set.")
        return
    if sorted(p for p in points if isinstance(p, int)) != sorted(active):
        raise ShareError(
            f"decryption shares come from points {points}, but were made for the active set "
            f"{active}: every holder of that set, and only those, must contribute."
        )


def _check_quantized_noise(
    tensor: EncryptedTensor, chunks: Sequence[_Chunk], headers: Sequence[dict[str, Any]]
) -> None:
    """Quantized lanes round each slot to integers; smudging noise beyond their guard bits
    would round wrongly (silently, where it does not exceed MAX_RESIDUAL). Refuse it."""
    if tensor.packing != QUANTIZED:
        return
    sigmas = [h.get("sigma") for h in headers]
    if not all(isinstance(s, int | float) and math.isfinite(s) and s >= 0 for s in sigmas):
        raise ShareError(f"decryption shares announce invalid smudging deviations {sigmas}.")
    total = math.sqrt(sum(float(s) ** 2 for s in sigmas))
    deviation = smudging_deviation(tensor.context.params, chunks[0].scale, 1, total)
    if 6 * deviation > _QUANTIZED_SLACK:
        raise ParameterError(
            f"smudging adds noise of deviation {deviation:.3g} lane units to quantized values "
            f"(at most {_QUANTIZED_SLACK / 6:.3g} rounds safely with their "
            f"{math.log2(chunks[0].scale):g} guard bits): quantized packing cannot be "
            "decrypted by shares; encrypt with COMPLEX packing for threshold decryption."
        )


# -- framing helpers ----------------------------------------------------------------------------


def _pack(magic: bytes, header: dict[str, Any], array: np.ndarray) -> bytes:
    body = np.ascontiguousarray(array, dtype="<u8").tobytes()
    return frame(magic, _VERSION, {**header, "shape": list(array.shape)}, body)


def _unpack(
    data: bytes,
    magic: bytes,
    kinds: set[str],
    params: CKKSParams,
    what: str,
    shape: tuple[int, ...] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """(header, residues) of a framed share, checked: kind, parameters, shape, range."""
    header, body = unframe(data, magic=magic, version=_VERSION, what=what, error=ShareError)
    if header.get("kind") not in kinds:
        raise ShareError(f"{what} bytes hold a {header.get('kind')!r}, expected {sorted(kinds)}.")
    if header.get("params") != params.to_dict():
        raise ShareError(f"{what} is for parameters {header.get('params')}, not {params}.")
    ring = _ring.ring(params)
    got = header.get("shape")
    if shape is not None and got != list(shape):
        raise ShareError(f"{what} has shape {got}, expected {list(shape)}.")
    if (
        not isinstance(got, list)
        or len(got) < 2
        or not all(isinstance(d, int) and d > 0 for d in got)
        or got[-1] != ring.n
        or got[-2] > ring.key_primes
    ):
        raise ShareError(f"{what} has an implausible shape {got}.")
    if len(body) != 8 * math.prod(got):
        raise ShareError(
            f"{what} has {len(body)} bytes, its shape {got} needs {8 * math.prod(got)}."
        )
    array = np.frombuffer(body, dtype="<u8").reshape(got).astype(np.uint64)
    if np.any(array >= ring.moduli[: got[-2]]):
        raise ShareError(f"{what} has residues out of range for these parameters.")
    return header, array


def _keygen_message(kind: str, share: SecretShare, array: np.ndarray, **fields: Any) -> bytes:
    header = {"kind": kind, "params": share.params.to_dict(), "holder": share.holder_id, **fields}
    return _pack(KEYGEN_MAGIC, header, array)


def _gather(
    params: CKKSParams,
    shares: Sequence[bytes],
    kind: str,
    crs: str | None,
    shape: tuple[int, ...],
) -> list[tuple[dict[str, Any], np.ndarray]]:
    """Every share parsed and checked: one kind, one seed, one share per holder."""
    if not shares:
        raise ShareError(f"no {kind} shares to combine.")
    parts = [
        _unpack(data, KEYGEN_MAGIC, {kind}, params, f"{kind} {index}", shape)
        for index, data in enumerate(shares)
    ]
    for index, (header, _) in enumerate(parts):
        if crs is not None and header.get("crs") != crs:
            raise ShareError(f"{kind} {index} was made from another common seed.")
    holders = [h.get("holder") for h, _ in parts]
    if len(set(holders)) != len(holders):
        raise ShareError(f"two {kind}s come from the same holder: one share per holder.")
    return parts


def _key_shape(params: CKKSParams) -> tuple[int, int]:
    ring = _ring.ring(params)
    return ring.key_primes, ring.n


def _digits_shape(params: CKKSParams) -> tuple[int, int, int]:
    return _ring.ring(params).data_primes, *_key_shape(params)


def _crs_id(seed: bytes) -> str:
    return hashlib.sha256(b"fedhe/mhe/crs\x00" + seed).hexdigest()[:32]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _digit_randoms(params: CKKSParams, seed: bytes, label: str) -> np.ndarray:
    """One common random polynomial per data prime (key digit): (L, key primes, N)."""
    digits = _ring.ring(params).data_primes
    return np.stack([common_random(params, seed, f"{label}/{j}") for j in range(digits)])


def _explicit_elements(params: CKKSParams, keys: KeyRequest) -> list[int]:
    two_n = 2 * params.poly_modulus_degree
    elements = [pow(3, step % params.slots, two_n) for step in keys.rotations]
    return sorted(set(elements) | ({two_n - 1} if keys.conjugate else set()))


def _tenseal_elements(params: CKKSParams, keys: KeyRequest) -> list[int]:
    """SEAL's GaloisTool::get_elts_all, what TenSEAL's generate_galois_keys() asks for."""
    if not keys.galois:
        return []
    two_n = 2 * params.poly_modulus_degree
    elements = {two_n - 1}
    for i in range(params.poly_modulus_degree.bit_length() - 2):
        elements.add(pow(3, 1 << i, two_n))
        elements.add(pow(3, -(1 << i), two_n))
    return sorted(elements)


def _checked_elements(params: CKKSParams, elements: Iterable[int]) -> tuple[int, ...]:
    chosen = tuple(sorted({int(g) for g in elements}))
    two_n = 2 * params.poly_modulus_degree
    if not chosen or not all(g % 2 == 1 and 0 < g < two_n for g in chosen):
        raise ParameterError(f"Galois elements must be odd integers in 1..{two_n - 1}: {chosen}.")
    return chosen
