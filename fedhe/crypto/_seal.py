"""The thin dangerous layer: raw SEAL ciphertext operations TenSEAL's CKKSVector does not expose.

Only `fedhe.crypto` imports this module. It works on one `tenseal.CKKSVector` at a time and
never sees a secret key.
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi
import zstandard


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
    return ts.ckks_vector_from(context, vector_bytes(ct, size))


def vector_bytes(ct: sealapi.Ciphertext, size: int) -> bytes:
    """What TenSEAL's `CKKSVector.serialize` writes for a vector of `size` values held in `ct`."""
    return _vector_proto(size, _save(ct), ct.scale)


def _parms_id_at(seal_context: sealapi.SEALContext, level: int) -> list[int]:
    data = seal_context.first_context_data()
    while len(data.parms().coeff_modulus()) > level:
        data = data.next_context_data()
        if data is None:
            raise ValueError(f"level {level} does not exist in this context.")
    return data.parms_id()


class ZeroPool:
    """Encryptions of zero at one level, made ahead of time by a background thread.

    Public-key encryption is Enc(m) = Enc(0) + encode(m): the costly half (sampling and NTTs,
    ~1.9 ms per ciphertext at N=8192) does not depend on the message. A party makes its next
    contribution's Enc(0)s while it waits for the next round, so encrypting in the round costs
    an encoding and an addition (~0.3 ms). Each Enc(0) is handed out once (fresh randomness per
    ciphertext, as in a direct encryption); an empty pool only means encrypting directly.
    """

    CAPACITY = 64  # ciphertexts: 8 MB at level 1, N=8192

    def __init__(self, context: ts.Context, level: int) -> None:
        self._seal_context = context.seal_context().data
        self._parms_id = _parms_id_at(self._seal_context, level)
        self._encryptor = sealapi.Encryptor(self._seal_context, context.public_key().data)
        self._ready: deque[sealapi.Ciphertext] = deque()
        self._lock = threading.Lock()
        self._wanted = 0  # what the last busy spell of this process used
        self._demand = 0  # what the current one has used so far
        self._worker: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._ready)

    @property
    def parms_id(self) -> list[int]:
        return self._parms_id

    def take(self) -> sealapi.Ciphertext | None:
        with self._lock:
            return self._ready.popleft() if self._ready else None

    def refill(self, used: int) -> None:
        """Note that `used` ciphertexts were just encrypted; once this process is idle, make as
        many as it encrypted in its last busy spell (one party: one round's tensor)."""
        with self._lock:
            self._demand += used
            if self._worker is None:
                self._worker = threading.Thread(target=self._fill, name="fedhe-zeros", daemon=True)
                self._worker.start()

    def wait(self) -> None:
        """Block until the background thread has filled the pool (tests, benchmarks)."""
        worker = self._worker
        if worker is not None:
            worker.join()

    def _fill(self) -> None:
        while True:
            settled_at = _wait_until_settled()
            with self._lock:
                if self._demand:
                    self._wanted, self._demand = min(self._demand, self.CAPACITY), 0
            while _still_idle(settled_at):
                with self._lock:
                    if len(self._ready) >= self._wanted:
                        self._worker = None
                        return
                ct = sealapi.Ciphertext(self._seal_context)
                self._encryptor.encrypt_zero(self._parms_id, ct)
                with self._lock:
                    self._ready.append(ct)


# Set while no message is being handled in this process: pools fill only then, and only after
# IDLE_SETTLE_S without a new message, so that making the next round's Enc(0)s does not slow
# down this round's work (several simulated nodes share one process, messages back to back).
_IDLE = threading.Event()
_IDLE.set()
_BUSY_COUNT = 0
_MESSAGES = 0  # messages begun in this process, so a fill can tell whether one came meanwhile
_BUSY_LOCK = threading.Lock()
IDLE_SETTLE_S = 0.02


@contextmanager
def pause_precompute() -> Iterator[None]:
    """Pause the background filling of every pool while the block runs."""
    global _BUSY_COUNT, _MESSAGES
    with _BUSY_LOCK:
        _BUSY_COUNT += 1
        _MESSAGES += 1
        _IDLE.clear()
    try:
        yield
    finally:
        with _BUSY_LOCK:
            _BUSY_COUNT -= 1
            if _BUSY_COUNT == 0:
                _IDLE.set()


def wait_for_precompute() -> None:
    """Block until every pool of this process is filled (benchmarks, tests)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
    for pool in pools:
        pool.wait()


def _wait_until_settled() -> int:
    """Wait until no message has been handled for IDLE_SETTLE_S; the message count then."""
    while True:
        _IDLE.wait()
        seen = _MESSAGES
        time.sleep(IDLE_SETTLE_S)
        if _still_idle(seen):
            return seen


def _still_idle(seen: int) -> bool:
    return _IDLE.is_set() and seen == _MESSAGES


_POOLS: dict[tuple[str, int], ZeroPool] = {}  # most recently used last
_POOLS_LOCK = threading.Lock()
MAX_POOLS = 4  # a long-lived process serves job after job: older keys' pools are dropped


def zero_pool(context: ts.Context, key: str, level: int) -> ZeroPool:
    """This process's pool for the public key named `key` (its fingerprint) at `level`."""
    with _POOLS_LOCK:
        pool = _POOLS.pop((key, level), None)
        if pool is None:  # not `or`: an empty pool is falsy (it has a length)
            pool = ZeroPool(context, level)
        _POOLS[(key, level)] = pool
        while len(_POOLS) > MAX_POOLS:
            _POOLS.pop(next(iter(_POOLS)))
        return pool


class LevelEncryptor:
    """Encrypts straight at a chosen level: about twice as fast as encrypting at the top level
    and switching down, and the ciphertext is identical in form (SEAL encrypts at any level).
    With `zeros`, it starts from the pool's precomputed encryptions of zero while any last."""

    def __init__(
        self, context: ts.Context, level: int, scale: float, zeros: ZeroPool | None = None
    ) -> None:
        self._context = context
        self._seal_context = context.seal_context().data
        self._parms_id = _parms_id_at(self._seal_context, level)
        self._scale = scale
        self._encoder = sealapi.CKKSEncoder(self._seal_context)
        self._encryptor = sealapi.Encryptor(self._seal_context, context.public_key().data)
        if zeros is not None and zeros.parms_id != self._parms_id:
            raise ValueError("the pool of encryptions of zero is for another level.")
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
            raise ValueError(f"rotation keys do not load: {err}") from err
        finally:
            os.unlink(path)
        return cls(keys, steps, conjugate)


# SEAL's serialization header: magic, header size, version, compression mode, reserved, size.
_SEAL_HEADER = struct.Struct("<HBBBBHQ")
_COMPRESSION_NONE, _COMPRESSION_ZLIB, _COMPRESSION_ZSTD = 0, 1, 2
# Ciphertext members after the header: parms_id (4 u64), NTT flag (u8), size, degree and
# prime count (3 u64), scale (f64), correction factor (u64); then its DynArray of residues.
_CIPHERTEXT_MEMBERS = struct.Struct("<4QB3QdQ")


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
        raise ValueError(f"ciphertext does not parse as SEAL data: {err}") from err
    data_context = context.seal_context().data.get_context_data(ct.parms_id())
    if data_context is None:
        raise ValueError("ciphertext is at a level this context does not have.")
    primes = tuple(m.value() for m in data_context.parms().coeff_modulus())
    if len(primes) != n_primes:
        raise ValueError(f"ciphertext has {n_primes} primes, its level has {len(primes)}.")
    return array.reshape(size, n_primes, degree).astype(np.uint64), primes
