"""The thin dangerous layer: raw SEAL ciphertext operations TenSEAL's CKKSVector does not expose.

Only `fedhe.crypto` imports this module. It works on one `tenseal.CKKSVector` at a time and
never sees a secret key.
"""

from __future__ import annotations

import os
import struct
import tempfile

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi


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
        raise ValueError(
            f"ciphertext keeps {ct.coeff_modulus_size()} primes, cannot raise to {level}."
        )
    if ct.coeff_modulus_size() == level:
        return vector
    evaluator = sealapi.Evaluator(context.seal_context().data)
    while ct.coeff_modulus_size() > level:
        evaluator.mod_switch_to_next_inplace(ct)
    return ts.ckks_vector_from(context, _vector_proto(vector.size(), _save(ct), ct.scale))


def vector_from(context: ts.Context, ct: sealapi.Ciphertext, size: int) -> ts.CKKSVector:
    """Wrap a SEAL ciphertext as a TenSEAL vector of `size` values (a copy)."""
    return ts.ckks_vector_from(context, _vector_proto(size, _save(ct), ct.scale))


class LevelEncryptor:
    """Encrypts straight at a chosen level: about twice as fast as encrypting at the top level
    and switching down, and the ciphertext is identical in form (SEAL encrypts at any level)."""

    def __init__(self, context: ts.Context, level: int, scale: float) -> None:
        self._context = context
        self._seal_context = context.seal_context().data
        data = self._seal_context.first_context_data()
        while len(data.parms().coeff_modulus()) > level:
            data = data.next_context_data()
            if data is None:
                raise ValueError(f"level {level} does not exist in this context.")
        self._parms_id = data.parms_id()
        self._scale = scale
        self._encoder = sealapi.CKKSEncoder(self._seal_context)
        self._encryptor = sealapi.Encryptor(self._seal_context, context.public_key().data)

    def encrypt(self, values: list[float]) -> ts.CKKSVector:
        return self._encrypt(values)

    def encrypt_complex(self, values: list[complex]) -> ts.CKKSVector:
        """Two real values per slot (real and imaginary part): a vector of len(values) slots."""
        return self._encrypt(values)

    def _encrypt(self, values: list) -> ts.CKKSVector:
        plain = sealapi.Plaintext()
        self._encoder.encode(values, self._parms_id, self._scale, plain)
        ct = sealapi.Ciphertext(self._seal_context)
        self._encryptor.encrypt(plain, ct)
        return ts.ckks_vector_from(self._context, _vector_proto(len(values), _save(ct), ct.scale))


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


def _vector_proto(size: int, ciphertext: bytes, scale: float) -> bytes:
    """Encode TenSEAL's CKKSVectorProto.

    ``{repeated uint32 sizes = 1; repeated bytes ciphertexts = 2; double scale = 3}``
    """
    sizes = _varint(size)
    return (
        b"\x0a"
        + _varint(len(sizes))
        + sizes
        + b"\x12"
        + _varint(len(ciphertext))
        + ciphertext
        + b"\x19"
        + struct.pack("<d", scale)
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _galois_elements(context: ts.Context, steps: tuple[int, ...]) -> list[int]:
    """SEAL's Galois element of each left-rotation step: 3^step mod 2N (negative: inverse)."""
    n = context.seal_context().data.key_context_data().parms().poly_modulus_degree()
    slots = n // 2
    return [pow(3, step % slots, 2 * n) for step in steps]


def create_rotation_keys(context: ts.Context, steps: tuple[int, ...]) -> bytes:
    """Galois keys for exactly `steps` (needs the secret key): one key per step."""
    seal_context = context.seal_context().data
    generator = sealapi.KeyGenerator(seal_context, context.secret_key().data)
    keys = sealapi.GaloisKeys()
    generator.create_galois_keys(_galois_elements(context, steps), keys)
    return _save(keys)


class RotationKeys:
    """Loaded Galois keys for a fixed set of steps."""

    def __init__(self, keys: sealapi.GaloisKeys, steps: tuple[int, ...]) -> None:
        self.keys = keys
        self.steps = steps

    @classmethod
    def load(cls, context: ts.Context, data: bytes, steps: tuple[int, ...]) -> RotationKeys:
        keys = sealapi.GaloisKeys()
        fd, path = tempfile.mkstemp(prefix="fedhe-gk-", dir=_tmp_dir())
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            keys.load(context.seal_context().data, path)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"rotation keys do not load: {err}") from err
        finally:
            os.unlink(path)
        return cls(keys, steps)
