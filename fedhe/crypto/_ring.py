"""The thin dangerous layer of multiparty CKKS: raw RNS polynomials in and out of SEAL.

Only `fedhe.crypto` imports this module. It knows SEAL's serialization (compression off) well
enough to write plaintexts, public keys, relinearization and Galois keys that SEAL's own `load`
then validates, and to read ciphertexts and secret keys back as numpy arrays; it does modular
arithmetic on those arrays and samples the small and uniform polynomials the protocols need.

Conventions. A polynomial is a uint64 array of shape (primes, N) holding its residues modulo
the first `primes` primes of the key level [q0 … q_{L-1}, P] (P: SEAL's special prime), almost
always in SEAL's NTT form, where a product is pointwise. The NTT is SEAL's own: a second SEAL
context whose chain is the key level plus one extra prime makes the key level an ordinary data
level there, so SEAL's evaluator transforms key-level polynomials too (a ciphertext at the key
level itself does not load). That is ~20× faster than the same transform written in numpy.

Randomness is the operating system's CSPRNG (secrets, noise) or SHAKE-256 of a public seed
(the common reference polynomials every holder must derive identically).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterable, Mapping, Sequence
from functools import cache, cached_property
from typing import Any

import numpy as np
import tenseal.sealapi as sealapi
import zstandard

from fedhe.crypto import _seal
from fedhe.crypto.params import CKKSParams
from fedhe.errors import InvalidCiphertextError, ParameterError

U64 = np.uint64
SEAL_MAGIC = 0xA15E
_BATCH = 15  # polynomials per SEAL ciphertext (SEAL_CIPHERTEXT_SIZE_MAX 16, one a sentinel)
_CBD_BITS = 21  # SEAL's centered binomial noise: 21 + 21 coin flips, σ = √10.5 ≈ 3.24
_CIPHERTEXT_MEMBERS = _seal._CIPHERTEXT_MEMBERS  # parms_id, NTT flag, size, N, primes, scale, cf
_PLAINTEXT_MEMBERS = struct.Struct("<4QQd")  # parms_id, coefficient count, scale
_DYNARRAY_PREFIX = _seal._SEAL_HEADER.size + 8  # a DynArray's own SEAL header, then its count
_LONG_DOUBLE_EXACT = np.finfo(np.longdouble).nmant >= 63  # x86-64: 80-bit extended precision


class Ring:
    """R_Q = Z_Q[X]/(X^N + 1) for one parameter set: its primes, SEAL contexts and levels.

    Get one with `ring(params)` (cached: building the contexts costs milliseconds)."""

    def __init__(self, params: CKKSParams) -> None:
        self.params = params
        self.n = params.poly_modulus_degree
        moduli = sealapi.CoeffModulus.Create(self.n, list(params.coeff_mod_bit_sizes))
        self.primes: tuple[int, ...] = tuple(m.value() for m in moduli)
        self.moduli = np.array(self.primes, dtype=U64).reshape(-1, 1)
        self.data_primes = len(self.primes) - 1  # L: levels of a ciphertext, digits of a key
        self.special_prime = self.primes[-1]
        self.seal = _seal_context(self.n, moduli, sealapi.SEC_LEVEL_TYPE.TC128)
        self._wide = _seal_context(self.n, [*moduli, _extra_prime(self.n, self.primes)], None)
        self._evaluator = sealapi.Evaluator(self._wide)
        self._encoder_lock = threading.Lock()

    @property
    def key_primes(self) -> int:
        return len(self.primes)

    # -- levels --------------------------------------------------------------------------------

    def parms_id(self, primes: int) -> list[int]:
        """SEAL's parms_id of the level keeping the first `primes` primes (the key level when
        `primes` counts the special prime too)."""
        if primes == self.key_primes:
            return self.seal.key_parms_id()
        return _parms_id_with(self.seal, primes)

    def level_of(self, parms_id: Sequence[int]) -> int:
        """Primes kept at `parms_id`; ParameterError when it is no data level of this ring."""
        data = self.seal.get_context_data(list(parms_id))
        if data is None or list(parms_id) == self.seal.key_parms_id():
            raise ParameterError("a ciphertext is at a level these parameters do not have.")
        return len(data.parms().coeff_modulus())

    @cached_property
    def encoder(self) -> sealapi.CKKSEncoder:
        return sealapi.CKKSEncoder(self.seal)

    @cached_property
    def encryption_parameters(self) -> bytes:
        """SEAL's serialization of these encryption parameters (for a TenSEAL context)."""
        parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(self.n)
        parms.set_coeff_modulus(
            sealapi.CoeffModulus.Create(self.n, list(self.params.coeff_mod_bit_sizes))
        )
        return _seal._save(parms)

    # -- arithmetic modulo each prime ------------------------------------------------------------

    def _q(self, a: np.ndarray) -> np.ndarray:
        if a.ndim < 2 or not 1 <= a.shape[-2] <= self.key_primes or a.shape[-1] != self.n:
            raise ParameterError(f"array of shape {a.shape} is no polynomial of this ring.")
        return self.moduli[: a.shape[-2]]

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        q = self._q(a)
        total = a + b  # < 2q < 2^62: no wrap-around
        return np.where(total >= q, total - q, total)

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        q = self._q(a)
        return np.where(a >= b, a - b, a + (q - b))

    def neg(self, a: np.ndarray) -> np.ndarray:
        q = self._q(a)
        return np.where(a == 0, a, q - a)

    def mul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a·b modulo each prime (pointwise: a product of polynomials in NTT form)."""
        return mulmod(a, b, self._q(a))

    def sum(self, polys: Iterable[np.ndarray]) -> np.ndarray:
        items = list(polys)
        if not items:
            raise ParameterError("a sum of polynomials needs at least one term.")
        total = items[0]
        for poly in items[1:]:
            total = self.add(total, poly)
        return total

    def scalar(self, values: Sequence[int]) -> np.ndarray:
        """Per-prime constants as a column that broadcasts against (primes, N)."""
        return np.array(values, dtype=U64).reshape(-1, 1)

    def with_gadget(self, h: np.ndarray, key: np.ndarray) -> np.ndarray:
        """h + P·key on digit j's own prime q_j, for each digit j of h (L, primes, N): SEAL's
        RNS gadget, which makes h an encryption of `key` that key switching can use."""
        out = h.copy()
        for j in range(self.data_primes):
            q = self.moduli[j]
            term = mulmod(key[j], U64(self.special_prime % self.primes[j]), q)
            total = out[j, j] + term
            out[j, j] = np.where(total >= q, total - q, total)
        return out

    # -- NTT (SEAL's transform, through SEAL) --------------------------------------------------

    def ntt(self, a: np.ndarray) -> np.ndarray:
        """Coefficients → SEAL's NTT form, for any leading shape (…, primes, N)."""
        return self._transform(a, forward=True)

    def intt(self, a: np.ndarray) -> np.ndarray:
        """SEAL's NTT form → coefficients."""
        return self._transform(a, forward=False)

    def _transform(self, a: np.ndarray, *, forward: bool) -> np.ndarray:
        self._q(a)
        shape = a.shape
        polys = np.ascontiguousarray(a, dtype=U64).reshape(-1, shape[-2], self.n)
        parms_id = _parms_id_with(self._wide, shape[-2])
        out = [
            self._transform_batch(polys[i : i + _BATCH], parms_id, forward)
            for i in range(0, polys.shape[0], _BATCH)
        ]
        return np.concatenate(out).reshape(shape)

    def _transform_batch(self, polys: np.ndarray, parms_id: list[int], forward: bool) -> np.ndarray:
        # One nonzero polynomial rides along: SEAL refuses to return a "transparent" ciphertext
        # (all polynomials after the first zero), which a batch of zero polynomials would be.
        count = polys.shape[0]
        sentinel = np.ones((1, *polys.shape[1:]), dtype=U64)
        blob = ciphertext_parts(np.concatenate([polys, sentinel]), parms_id, ntt=not forward)
        ct = load(sealapi.Ciphertext(), self._wide, blob)
        if forward:
            self._evaluator.transform_to_ntt_inplace(ct)
        else:
            self._evaluator.transform_from_ntt_inplace(ct)
        return read_ciphertext(ct)[:count]

    # -- sampling --------------------------------------------------------------------------------

    def to_rns(self, small: np.ndarray, primes: int | None = None) -> np.ndarray:
        """Signed integer coefficients (…, N) → residues (…, primes, N) (default: key level)."""
        count = self.key_primes if primes is None else primes
        signed = np.asarray(small, dtype=np.int64)[..., None, :]
        q = self.moduli[:count].astype(np.int64)
        return np.mod(signed, q).astype(U64)

    def small_ntt(self, small: np.ndarray, primes: int | None = None) -> np.ndarray:
        """A small polynomial (…, N) of signed coefficients in NTT form."""
        return self.ntt(self.to_rns(small, primes))

    def ternary(self) -> np.ndarray:
        """Uniform coefficients in {−1, 0, 1} (the secret distribution)."""
        return sample_ternary(self.n)

    def noise(self, count: int = 1) -> np.ndarray:
        """`count` polynomials of SEAL's key noise: centered binomial, σ ≈ 3.24."""
        return sample_cbd(count * self.n).reshape(count, self.n)

    def gaussian(self, sigma: float, count: int = 1) -> np.ndarray:
        """`count` polynomials of rounded Gaussian coefficients of deviation `sigma`."""
        return sample_gaussian(count * self.n, sigma).reshape(count, self.n)

    def uniform(self, seed: bytes, label: str, primes: int | None = None) -> np.ndarray:
        """A uniform polynomial derived from (seed, label) by SHAKE-256: everyone who knows the
        seed gets the same one. Read as NTT form (uniform there as well)."""
        count = self.key_primes if primes is None else primes
        return np.stack(
            [
                _uniform_mod(q, self.n, seed, label, index)
                for index, q in enumerate(self.primes[:count])
            ]
        )

    def private_uniform(self, primes: int | None = None) -> np.ndarray:
        """A uniform polynomial nobody else can derive (a fresh os.urandom seed)."""
        return self.uniform(os.urandom(32), "private", primes)

    # -- Galois automorphisms --------------------------------------------------------------------

    def galois_permutation(self, element: int) -> np.ndarray:
        """Index map of X → X^element in NTT form: π(a) = a[..., perm]."""
        return _galois_permutation(self.n, element)

    # -- SEAL objects ----------------------------------------------------------------------------

    def plaintext(self, poly: np.ndarray, scale: float) -> sealapi.Plaintext:
        """A CKKS plaintext (NTT form) at the level of `poly`'s primes, loaded and checked."""
        blob = plaintext_parts(poly, self.parms_id(poly.shape[0]), scale)
        return load(sealapi.Plaintext(), self.seal, blob)

    def decode(self, poly: np.ndarray, scale: float) -> np.ndarray:
        """The complex slots of an NTT-form plaintext polynomial."""
        plain = self.plaintext(poly, scale)
        with self._encoder_lock:
            return np.asarray(self.encoder.decode_complex(plain), dtype=np.complex128)

    def public_key_bytes(self, key: np.ndarray) -> bytes:
        """SEAL PublicKey serialization of (b, a) at the key level, b = −a·s + e."""
        if key.shape != (2, self.key_primes, self.n):
            raise ParameterError(f"a public key has shape (2, primes, N), got {key.shape}.")
        return ciphertext_bytes(key, self.seal.key_parms_id())

    def relin_keys_bytes(self, keys: Sequence[np.ndarray]) -> bytes:
        """SEAL RelinKeys serialization: one key-switching key (L key-level pairs) for s²."""
        return kswitch_bytes(self.seal.key_parms_id(), 1, {0: self._checked_digits(keys)})

    def galois_keys_bytes(self, keys: Mapping[int, Sequence[np.ndarray]]) -> bytes:
        """SEAL GaloisKeys serialization: one key-switching key per Galois element."""
        indexed = {galois_index(g, self.n): self._checked_digits(v) for g, v in keys.items()}
        return kswitch_bytes(self.seal.key_parms_id(), self.n, indexed)

    def _checked_digits(self, keys: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(keys) != self.data_primes or any(
            k.shape != (2, self.key_primes, self.n) for k in keys
        ):
            raise ParameterError(
                f"a key-switching key has {self.data_primes} pairs of shape "
                f"(2, {self.key_primes}, {self.n})."
            )
        return list(keys)


@cache
def ring(params: CKKSParams) -> Ring:
    """The ring of `params` (one per parameter set and process)."""
    return Ring(params)


# -- modular multiplication ---------------------------------------------------------------------


def mulmod(a: np.ndarray, b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(a·b) mod q, exactly, for uint64 arrays below q < 2^62 (broadcasting).

    The quotient a·b/q is estimated in 80-bit long double, as a·b times 1/q: three roundings
    of relative error 2^-64 each keep the estimate within 0.75 of the truth, so once truncated
    it is ⌊a·b/q⌋ or one off. a·b − estimate·q, computed with uint64 wrap-around, is then the
    remainder up to one q either way (it fits int64), and two branch-free corrections make it
    exact. Where long double has fewer than 64 mantissa bits (Windows, some ARM), Python
    integers do it instead."""
    if not _LONG_DOUBLE_EXACT:
        return mulmod_exact(a, b, q)
    a, b, q = np.asarray(a, U64), np.asarray(b, U64), np.asarray(q, U64)
    estimate = np.multiply(a, b, dtype=np.longdouble)
    estimate *= 1 / q.astype(np.longdouble)
    remainder = (a * b - estimate.astype(U64) * q).view(np.int64)
    signed_q = q.view(np.int64)
    remainder += signed_q & (remainder >> 63)  # [−q, 2q) → [0, 2q)
    remainder -= signed_q  # → [−q, q)
    remainder += signed_q & (remainder >> 63)  # → [0, q)
    return remainder.view(U64)


def mulmod_exact(a: np.ndarray, b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(a·b) mod q with Python integers: slower, portable, obviously right."""
    a, b, q = np.broadcast_arrays(np.asarray(a, U64), np.asarray(b, U64), np.asarray(q, U64))
    product = (a.astype(object) * b.astype(object)) % q.astype(object)
    return product.astype(U64)


# -- sampling -----------------------------------------------------------------------------------


def sample_ternary(count: int) -> np.ndarray:
    """Uniform in {−1, 0, 1}: bytes below 255 taken modulo 3 (255 = 3·85 keeps it exact)."""
    out = np.empty(0, dtype=np.int64)
    while out.size < count:
        raw = np.frombuffer(os.urandom(count + count // 64 + 16), dtype=np.uint8)
        out = np.concatenate([out, (raw[raw < 255] % 3).astype(np.int64) - 1])
    return out[:count]


def sample_cbd(count: int) -> np.ndarray:
    """SEAL's default key noise: popcount of 21 random bits minus popcount of 21 more."""
    raw = np.frombuffer(os.urandom(6 * count), dtype=np.uint8).reshape(count, 6)
    bits = np.unpackbits(raw, axis=1)
    return bits[:, :_CBD_BITS].sum(axis=1, dtype=np.int64) - bits[:, _CBD_BITS : 2 * _CBD_BITS].sum(
        axis=1, dtype=np.int64
    )


def sample_gaussian(count: int, sigma: float) -> np.ndarray:
    """Rounded Gaussian of deviation `sigma` from os.urandom; zeros when `sigma` is 0.

    Box–Muller on 53-bit uniforms, both outputs of each pair used (half the random bytes)."""
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ParameterError(f"noise deviation must be finite and non-negative, got {sigma}.")
    if sigma == 0:
        return np.zeros(count, dtype=np.int64)
    pairs = (count + 1) // 2
    words = np.frombuffer(os.urandom(16 * pairs), dtype="<u8") >> U64(11)
    uniform = words.astype(np.float64) * 2.0**-53  # [0, 1)
    radius = sigma * np.sqrt(-2.0 * np.log1p(-uniform[:pairs]))  # 1 − u ∈ (0, 1]
    angle = 2.0 * np.pi * uniform[pairs:]
    values = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
    return np.rint(values[:count]).astype(np.int64)


def _uniform_mod(q: int, n: int, seed: bytes, label: str, index: int) -> np.ndarray:
    """n values uniform below q: SHAKE-256 words masked to q's bit length, rejection sampled."""
    xof = hashlib.shake_256()
    for part in (b"fedhe/ring/uniform", seed, label.encode(), struct.pack("<Q", index)):
        xof.update(struct.pack("<Q", len(part)) + part)
    mask = U64((1 << q.bit_length()) - 1)
    words = n + n // 8 + 64  # q > 2^(bits−1): under half the words are ever rejected
    while True:
        raw = np.frombuffer(xof.digest(8 * words), dtype="<u8") & mask
        accepted = raw[raw < U64(q)]
        if accepted.size >= n:  # a longer digest extends the shorter one: deterministic
            return accepted[:n].astype(U64)
        words *= 2


# -- Galois elements ----------------------------------------------------------------------------


def galois_index(element: int, n: int) -> int:
    """SEAL's slot for a Galois element in GaloisKeys (GaloisTool::GetIndexFromElt)."""
    if element % 2 == 0 or not 1 <= element < 2 * n:
        raise ParameterError(f"{element} is not a Galois element for N={n} (odd, below 2N).")
    return (element - 1) >> 1


@cache
def _galois_permutation(n: int, element: int) -> np.ndarray:
    galois_index(element, n)
    log_n = n.bit_length() - 1
    # SEAL's NTT puts a(ψ^(2·bitrev(j)+1)) at index j; X → X^g maps that root's exponent by g
    exponents = 2 * _bit_reverse(np.arange(n), log_n) + 1
    position = np.empty(2 * n, dtype=np.int64)
    position[exponents] = np.arange(n)
    return position[(exponents * element) % (2 * n)]


def _bit_reverse(values: np.ndarray, bits: int) -> np.ndarray:
    out = np.zeros_like(values)
    for bit in range(bits):
        out |= ((values >> bit) & 1) << (bits - 1 - bit)
    return out


# -- SEAL serialization -------------------------------------------------------------------------


@cache
def seal_version() -> tuple[int, int]:
    """(major, minor) SEAL writes in its headers; SEAL refuses data of another version."""
    header = _seal._SEAL_HEADER.unpack_from(_seal._save(sealapi.Plaintext()))
    return header[2], header[3]


def _header(body_size: int) -> bytes:
    major, minor = seal_version()
    size = _seal._SEAL_HEADER.size
    return _seal._SEAL_HEADER.pack(SEAL_MAGIC, size, major, minor, 0, 0, size + body_size)


def _wrap(body: bytes) -> bytes:
    return _header(len(body)) + body


Parts = list[bytes | memoryview]


def _object_parts(members: bytes, array: np.ndarray) -> Parts:
    """A SEAL object whose members end in one DynArray of uint64: header, members, the array
    (its own header, count, data). The residues are written from numpy's buffer, not copied."""
    data = memoryview(np.ascontiguousarray(array, dtype="<u8")).cast("B")
    inner = _header(8 + data.nbytes)
    body_size = len(members) + len(inner) + 8 + data.nbytes
    return [_header(body_size), members, inner, struct.pack("<Q", data.nbytes // 8), data]


def ciphertext_parts(
    polys: np.ndarray, parms_id: Sequence[int], *, scale: float = 1.0, ntt: bool = True
) -> Parts:
    """SEAL Ciphertext serialization (also PublicKey's) of (size, primes, N) residues."""
    size, primes, n = polys.shape
    members = _CIPHERTEXT_MEMBERS.pack(*parms_id, int(ntt), size, n, primes, scale, 1)
    return _object_parts(members, polys)


def ciphertext_bytes(
    polys: np.ndarray, parms_id: Sequence[int], *, scale: float = 1.0, ntt: bool = True
) -> bytes:
    return b"".join(ciphertext_parts(polys, parms_id, scale=scale, ntt=ntt))


def plaintext_parts(poly: np.ndarray, parms_id: Sequence[int], scale: float) -> Parts:
    """SEAL Plaintext serialization of an NTT-form CKKS plaintext (primes, N)."""
    return _object_parts(_PLAINTEXT_MEMBERS.pack(*parms_id, poly.size, scale), poly)


def kswitch_bytes(
    parms_id: Sequence[int], slots: int, keys: Mapping[int, Sequence[np.ndarray]]
) -> bytes:
    """SEAL KSwitchKeys serialization (RelinKeys, GaloisKeys): `slots` lists of PublicKeys,
    `keys` filling some of them."""
    parts = [struct.pack("<4QQ", *parms_id, slots)]
    for index in range(slots):
        listed = keys.get(index, ())
        parts.append(struct.pack("<Q", len(listed)))
        parts.extend(ciphertext_bytes(key, parms_id) for key in listed)
    return _wrap(b"".join(parts))


def galois_keys_subset(data: bytes, elements: Iterable[int], n: int) -> bytes:
    """The GaloisKeys serialization holding only `elements` (each must be in `data`)."""
    parms_id, slots, entries = _split_kswitch(data)
    wanted = {galois_index(g, n): g for g in elements}
    missing = sorted(g for index, g in wanted.items() if not entries.get(index))
    if missing:
        raise ParameterError(f"the Galois keys have no key for elements {missing}.")
    parts = [struct.pack("<4QQ", *parms_id, slots)]
    for index in range(slots):
        listed = entries[index] if index in wanted else []
        parts.append(struct.pack("<Q", len(listed)) + b"".join(listed))
    return _wrap(b"".join(parts))


def galois_elements_in(data: bytes) -> list[int]:
    """The Galois elements a GaloisKeys serialization has keys for."""
    _, _, entries = _split_kswitch(data)
    return sorted(2 * index + 1 for index, listed in entries.items() if listed)


def _split_kswitch(data: bytes) -> tuple[tuple[int, ...], int, dict[int, list[bytes]]]:
    """(parms_id, slots, {index: serialized keys}) of a KSwitchKeys serialization."""
    body = seal_body(data)
    try:
        *parms_id, slots = struct.unpack_from("<4QQ", body)
        offset, entries = 40, {}
        for index in range(slots):
            (count,) = struct.unpack_from("<Q", body, offset)
            offset += 8
            listed = []
            for _ in range(count):
                size = _seal._SEAL_HEADER.unpack_from(body, offset)[-1]
                listed.append(body[offset : offset + size])
                offset += size
            if listed:
                entries[index] = listed
    except struct.error as err:
        raise ParameterError(f"key-switching keys do not parse: {err}") from err
    return tuple(parms_id), slots, entries


def seal_body(data: bytes) -> bytes:
    """The members of a SEAL serialization, decompressed, after its 16-byte header."""
    try:
        magic, header_size, _, _, compression, _, total = _seal._SEAL_HEADER.unpack_from(data)
    except struct.error as err:
        raise InvalidCiphertextError(f"SEAL data is truncated: {err}") from err
    if magic != SEAL_MAGIC or header_size != _seal._SEAL_HEADER.size or total != len(data):
        raise InvalidCiphertextError("bytes are not one complete SEAL object.")
    body = data[header_size:]
    if compression == _seal._COMPRESSION_ZSTD:
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    if compression == _seal._COMPRESSION_ZLIB:
        return zlib.decompress(body)
    return body


def read_ciphertext(ct: Any) -> np.ndarray:
    """A SEAL (or TenSEAL) ciphertext's residues as (size, primes, N), one save and a parse."""
    body = seal_body(_seal._save(ct))
    *_, size, n, primes, _, _ = _CIPHERTEXT_MEMBERS.unpack_from(body)
    offset = _CIPHERTEXT_MEMBERS.size + _DYNARRAY_PREFIX
    count = size * primes * n
    return np.frombuffer(body, dtype="<u8", count=count, offset=offset).reshape(size, primes, n)


def read_plaintext(plain: Any, n: int) -> np.ndarray:
    """An NTT-form plaintext's residues (primes, N), one save and a parse."""
    body = seal_body(_seal._save(plain))
    *_, coefficients, _ = _PLAINTEXT_MEMBERS.unpack_from(body)
    offset = _PLAINTEXT_MEMBERS.size + _DYNARRAY_PREFIX
    array = np.frombuffer(body, dtype="<u8", count=coefficients, offset=offset)
    return array.reshape(-1, n).copy()


def read_secret_key(key: Any, n: int) -> np.ndarray:
    """A SEAL SecretKey's polynomial (SEAL saves it as a plaintext): NTT form, key level."""
    return read_plaintext(key, n)


def load(obj: Any, context: sealapi.SEALContext, data: bytes | Parts) -> Any:
    """`obj.load` from bytes (SEAL loads only from a path): SEAL validates what it reads."""
    fd, path = tempfile.mkstemp(prefix="fedhe-ring-", dir=_seal._tmp_dir())
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.writelines([data] if isinstance(data, bytes) else data)
        obj.load(context, path)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ParameterError(f"SEAL refuses the {type(obj).__name__}: {err}") from err
    finally:
        os.unlink(path)
    return obj


# -- contexts -----------------------------------------------------------------------------------


def _seal_context(
    n: int, moduli: Sequence[sealapi.Modulus], security: Any | None
) -> sealapi.SEALContext:
    parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(n)
    parms.set_coeff_modulus(list(moduli))
    level = sealapi.SEC_LEVEL_TYPE.NONE if security is None else security
    context = sealapi.SEALContext(parms, True, level)
    if not context.parameters_set():
        raise ParameterError(f"SEAL refuses the parameters: {context.parameters_error_message()}")
    return context


def _extra_prime(n: int, primes: Sequence[int]) -> sealapi.Modulus:
    """An NTT-friendly prime outside `primes` (the wide context's throwaway special prime)."""
    candidates = sealapi.CoeffModulus.Create(n, [60] * (len(primes) + 1))
    return next(m for m in candidates if m.value() not in primes)


def _parms_id_with(context: sealapi.SEALContext, primes: int) -> list[int]:
    data = context.first_context_data()
    while data is not None and len(data.parms().coeff_modulus()) > primes:
        data = data.next_context_data()
    if data is None or len(data.parms().coeff_modulus()) != primes:
        raise ParameterError(f"no level keeps exactly {primes} primes.")
    return data.parms_id()
