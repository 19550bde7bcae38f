"""The thin dangerous layer: raw SEAL operations that TenSEAL's CKKSVector does not expose.

Only `fedhe.crypto` imports this module. It saves and loads SEAL objects (SEAL reads and writes
only files: private temporary files, in memory where /dev/shm exists), switches ciphertexts
down the modulus chain, encrypts straight at a level, and reads a ciphertext's raw residues.

DANGER: two functions use the context's SECRET KEY and belong to the key holder alone:
`decrypt_complex` (decryption) and `create_rotation_keys` (key generation). Everything else
here needs public material only. The pool of precomputed encryptions of zero lives in
`_zero_pool`, TenSEAL's hand-written wire format in `_tenseal_proto`.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from typing import TYPE_CHECKING

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi
import zstandard

from fedhe.crypto._tenseal_proto import vector_proto
from fedhe.errors import InvalidCiphertextError, ParameterError

if TYPE_CHECKING:
    from fedhe.crypto._zero_pool import ZeroPool


def ciphertext_info(vector: ts.CKKSVector) -> tuple[int, int, float]:
    """(polynomial count, remaining primes, scale) of the vector's one ciphertext."""
    (ct,) = vector.ciphertext()
    return ct.size(), ct.coeff_modulus_size(), ct.scale


def mod_switch_to(vector: ts.CKKSVector, context: ts.Context, level: int) -> ts.CKKSVector:
    """Keep only the first `level` primes: exact, adds no noise, smaller on the wire.

    Fewer primes mean fewer multiplications left and a smaller bound on the values; callers
    choose `level` from the bound (CKKSParams.level_for).
    """
    (ct,) = vector.ciphertext()
    if ct.coeff_modulus_size() < level:
        raise ParameterError(
            f"ciphertext keeps {ct.coeff_modulus_size()} primes, cannot raise to {level}: "
            "switching only drops primes; encrypt at the higher level instead."
        )
    if ct.coeff_modulus_size() == level:
        return vector
    evaluator = sealapi.Evaluator(context.seal_context().data)
    while ct.coeff_modulus_size() > level:
        evaluator.mod_switch_to_next_inplace(ct)
    return ts.ckks_vector_from(context, vector_proto(vector.size(), _save(ct), ct.scale))


def vector_from(context: ts.Context, ct: sealapi.Ciphertext, size: int) -> ts.CKKSVector:
    """Wrap a SEAL ciphertext as a TenSEAL vector of `size` values (a copy)."""
    return ts.ckks_vector_from(context, vector_bytes(ct, size))


def vector_bytes(ct: sealapi.Ciphertext, size: int) -> bytes:
    """What TenSEAL's `CKKSVector.serialize` writes for a vector of `size` values held in `ct`."""
    return vector_proto(size, _save(ct), ct.scale)


def parms_id_at(seal_context: sealapi.SEALContext, level: int) -> list[int]:
    """SEAL's parms_id of the level that keeps the first `level` primes."""
    data = seal_context.first_context_data()
    while len(data.parms().coeff_modulus()) > level:
        data = data.next_context_data()
        if data is None:
            raise ParameterError(
                f"level {level} does not exist in this context: levels keep 1 to "
                f"{len(seal_context.first_context_data().parms().coeff_modulus())} primes."
            )
    return data.parms_id()


class LevelEncryptor:
    """Encrypts straight at a chosen level: about twice as fast as encrypting at the top level
    and switching down, and the ciphertext is identical in form (SEAL encrypts at any level).
    With `zeros`, it starts from the pool's precomputed encryptions of zero while any last."""

    def __init__(
        self, context: ts.Context, level: int, scale: float, zeros: ZeroPool | None = None
    ) -> None:
        self._context = context
        self._seal_context = context.seal_context().data
        self._parms_id = parms_id_at(self._seal_context, level)
        self._scale = scale
        self._encoder = sealapi.CKKSEncoder(self._seal_context)
        self._encryptor = sealapi.Encryptor(self._seal_context, context.public_key().data)
        if zeros is not None and zeros.parms_id != self._parms_id:
            raise ParameterError(
                "the pool of encryptions of zero is for another level: take the pool of this "
                "level (zero_pool(context, key, level))."
            )
        self._zeros = zeros
        self._evaluator = sealapi.Evaluator(self._seal_context) if zeros is not None else None

    def encrypt(self, values: list[float] | list[complex]) -> ts.CKKSVector:
        """One value per slot; complex values carry two reals (real and imaginary part)."""
        plain = sealapi.Plaintext()
        self._encoder.encode(values, self._parms_id, self._scale, plain)
        ct = self._zeros.take() if self._zeros is not None else None
        if ct is None:
            ct = sealapi.Ciphertext(self._seal_context)
            self._encryptor.encrypt(plain, ct)
        else:  # what SEAL's encrypt does after its own encrypt_zero
            ct.scale = self._scale
            self._evaluator.add_plain_inplace(ct, plain)
        return ts.ckks_vector_from(self._context, vector_proto(len(values), _save(ct), ct.scale))


def decrypt_complex(context: ts.Context, vector: ts.CKKSVector) -> np.ndarray:
    """The complex slots of a vector (needs the context's secret key; key holder only)."""
    seal_context = context.seal_context().data
    (ct,) = vector.ciphertext()
    plain = sealapi.Plaintext()
    sealapi.Decryptor(seal_context, context.secret_key().data).decrypt(ct, plain)
    values = sealapi.CKKSEncoder(seal_context).decode_complex(plain)
    return np.asarray(values[: vector.size()], dtype=np.complex128)


def _save(ct: sealapi.Ciphertext) -> bytes:
    # TenSEAL's sealapi saves only to a path; a private temporary file keeps it off shared disk.
    fd, path = tempfile.mkstemp(prefix="fedhe-ct-", dir=_tmp_dir())
    os.close(fd)
    try:
        ct.save(path)
        with open(path, "rb") as handle:
            return handle.read()
    finally:
        os.unlink(path)


def _tmp_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _galois_elements(context: ts.Context, steps: tuple[int, ...]) -> list[int]:
    """SEAL's Galois element of each left-rotation step: 3^step mod 2N (negative: inverse)."""
    n = context.seal_context().data.key_context_data().parms().poly_modulus_degree()
    slots = n // 2
    return [pow(3, step % slots, 2 * n) for step in steps]


def create_rotation_keys(
    context: ts.Context, steps: tuple[int, ...], *, conjugate: bool = False
) -> bytes:
    """Galois keys for exactly `steps` (needs the secret key): one key per step, and the
    conjugation key (Galois element 2N − 1) when asked."""
    seal_context = context.seal_context().data
    generator = sealapi.KeyGenerator(seal_context, context.secret_key().data)
    keys = sealapi.GaloisKeys()
    elements = _galois_elements(context, steps)
    if conjugate:
        n = seal_context.key_context_data().parms().poly_modulus_degree()
        elements.append(2 * n - 1)
    generator.create_galois_keys(elements, keys)
    return _save(keys)


class RotationKeys:
    """Loaded Galois keys for a fixed set of steps."""

    def __init__(
        self, keys: sealapi.GaloisKeys, steps: tuple[int, ...], conjugate: bool = False
    ) -> None:
        self.keys = keys
        self.steps = steps
        self.conjugate = conjugate

    @classmethod
    def load(
        cls, context: ts.Context, data: bytes, steps: tuple[int, ...], conjugate: bool = False
    ) -> RotationKeys:
        keys = sealapi.GaloisKeys()
        fd, path = tempfile.mkstemp(prefix="fedhe-gk-", dir=_tmp_dir())
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            keys.load(context.seal_context().data, path)
        except (RuntimeError, ValueError) as err:
            raise ParameterError(
                f"rotation keys do not load ({err}): the context's rotation keys are corrupt or "
                "truncated; fetch the job's context from the key holder again."
            ) from err
        finally:
            os.unlink(path)
        return cls(keys, steps, conjugate)


# SEAL's serialization header: magic, header size, version, compression mode, reserved, size.
_SEAL_HEADER = struct.Struct("<HBBBBHQ")
_SEAL_MAGIC = 0xA15E
_COMPRESSION_NONE, _COMPRESSION_ZLIB, _COMPRESSION_ZSTD = 0, 1, 2
# Ciphertext members after the header: parms_id (4 u64), NTT flag (u8), size, degree and
# prime count (3 u64), scale (f64), correction factor (u64); then its DynArray of residues.
_CIPHERTEXT_MEMBERS = struct.Struct("<4QB3QdQ")


def check_whole(data: bytes, what: str, fix: str) -> None:
    """Raise ParameterError unless `data` starts with SEAL's header and is exactly as long as
    it announces: truncation is caught before SEAL (or a later use) trips over it."""
    try:
        magic, header_size, *_, total = _SEAL_HEADER.unpack_from(data)
    except struct.error:
        magic, header_size, total = None, None, None
    if magic != _SEAL_MAGIC or header_size != _SEAL_HEADER.size or total != len(data):
        raise ParameterError(
            f"{what} are not one complete SEAL object ({len(data)} bytes, the header announces "
            f"{total}): they are truncated or corrupt; {fix}."
        )


def residues(vector: ts.CKKSVector, context: ts.Context) -> tuple[np.ndarray, tuple[int, ...]]:
    """The vector's ciphertext as raw RNS residues (polynomials, primes, N) and its primes.

    Addition of ciphertexts is addition of these arrays modulo each prime, which is what
    makes a linear MAC over them check a homomorphic sum.
    """
    (ct,) = vector.ciphertext()
    data = _save(ct)
    try:
        _, _, _, _, compression, _, total = _SEAL_HEADER.unpack_from(data)
        body = data[_SEAL_HEADER.size : total]
        if compression == _COMPRESSION_ZSTD:
            body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
        elif compression == _COMPRESSION_ZLIB:
            body = zlib.decompress(body)
        *_, size, degree, n_primes, _, _ = _CIPHERTEXT_MEMBERS.unpack_from(body)
        offset = _CIPHERTEXT_MEMBERS.size + _SEAL_HEADER.size + 8  # DynArray header and count
        count = size * degree * n_primes
        array = np.frombuffer(body, dtype="<u8", count=count, offset=offset)
    except (struct.error, ValueError) as err:
        raise InvalidCiphertextError(f"ciphertext does not parse as SEAL data: {err}") from err
    data_context = context.seal_context().data.get_context_data(ct.parms_id())
    if data_context is None:
        raise InvalidCiphertextError("ciphertext is at a level this context does not have.")
    primes = tuple(m.value() for m in data_context.parms().coeff_modulus())
    if len(primes) != n_primes:
        raise InvalidCiphertextError(
            f"ciphertext has {n_primes} primes, its level has {len(primes)}."
        )
    return array.reshape(size, n_primes, degree).astype(np.uint64), primes
