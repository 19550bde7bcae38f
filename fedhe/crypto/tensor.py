"""Tensors that travel between roles: encrypted (CKKS) and their plaintext twin.

Both kinds share one interface (`shape`, `+`, `to_bytes`, `load_tensor`), so a job runs the
same code path with encryption on or off. An `EncryptedTensor` knows its logical shape and packs
values larger than one ciphertext across several, `slots` values each.

Wire format: ``FHET | version | header length | JSON header | body``. The header names the kind,
the shape, the context fingerprint and the byte length of every ciphertext; `load_tensor`
checks all of them before it trusts a byte.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import tenseal as ts

from fedhe.crypto import _seal, _zero_pool
from fedhe.crypto.circuit import Cipher, Circuit
from fedhe.crypto.context import PublicContext, SecretContext
from fedhe.crypto.framing import frame, unframe
from fedhe.crypto.lanes import VALUES_PER_SLOT, Lanes
from fedhe.crypto.params import MAX_PRIME_BITS
from fedhe.crypto.validation import FIX_BOUND, check_range
from fedhe.errors import (
    InvalidCiphertextError,
    ParameterError,
    ShapeError,
    TensorKindError,
    ValueRangeError,
)

TENSOR_MAGIC = b"FHET"
TENSOR_VERSION = 1
MIN_SCALE_BITS = 12  # quantized lanes use small scales (their guard bits); anything lower is junk

CKKS_KIND = "ckks"
PLAIN_KIND = "plain"

# How values sit in slots. "real": one value per slot (any arithmetic). "complex": two values
# per slot, as the real and imaginary part of one complex number (CKKS encodes complex vectors
# natively): half the ciphertexts, bytes and encryption time, for tensors that are only added
# (secure sums). Products with plaintexts would mix the two halves, so they are refused.
# "quantized": four values per slot in integer lanes (`fedhe.crypto.lanes`), half the
# ciphertexts again, at the cost of rounding each value to a step; also for sums only.
REAL = "real"
COMPLEX = "complex"
QUANTIZED = "quantized"
PACKINGS = (REAL, COMPLEX, QUANTIZED)
_VALUES_PER_SLOT = {REAL: 1, COMPLEX: 2, QUANTIZED: VALUES_PER_SLOT}

Shape = tuple[int, ...]
Context = PublicContext | SecretContext


class PlainTensor:
    """The plaintext twin of `EncryptedTensor`: same interface, values in the clear."""

    kind = PLAIN_KIND

    def __init__(self, values: np.ndarray) -> None:
        self.values = np.asarray(values, dtype=np.float64)

    @property
    def shape(self) -> Shape:
        return tuple(self.values.shape)

    def __add__(self, other: PlainTensor) -> PlainTensor:
        _check_same_kind(self, other)
        _check_same_shape(self.shape, other.shape)
        return PlainTensor(self.values + other.values)

    def __sub__(self, other: PlainTensor) -> PlainTensor:
        _check_same_kind(self, other)
        _check_same_shape(self.shape, other.shape)
        return PlainTensor(self.values - other.values)

    def add_plain(self, values: np.ndarray) -> PlainTensor:
        return PlainTensor(self.values + _plain_operand(values, self.shape))

    def mul_plain(self, values: np.ndarray) -> PlainTensor:
        return PlainTensor(self.values * _plain_operand(values, self.shape))

    def mul_scalar(self, value: float) -> PlainTensor:
        return PlainTensor(self.values * _scalar(value))

    def __mul__(self, other: PlainTensor) -> PlainTensor:
        _check_same_kind(self, other)
        _check_same_shape(self.shape, other.shape)
        return PlainTensor(self.values * other.values)

    def to_bytes(self) -> bytes:
        body = self.values.astype("<f8").tobytes()
        return frame(
            TENSOR_MAGIC, TENSOR_VERSION, {"kind": PLAIN_KIND, "shape": list(self.shape)}, body
        )


class EncryptedTensor:
    """CKKS ciphertexts holding one logical array, `context.params.slots` values per ciphertext."""

    kind = CKKS_KIND

    def __init__(
        self,
        chunks: Sequence[ts.CKKSVector],
        shape: Shape,
        context: Context,
        packing: str = REAL,
        lanes: Lanes | None = None,
    ) -> None:
        self.chunks = tuple(chunks)
        self.shape = tuple(int(s) for s in shape)
        self.context = context
        if packing not in PACKINGS:
            raise InvalidCiphertextError(f"unknown packing {packing!r}; expected {PACKINGS}.")
        if (packing == QUANTIZED) != (lanes is not None):
            raise InvalidCiphertextError("quantized packing needs lanes, and only it has them.")
        if lanes is not None and lanes.size != math.prod(self.shape):
            raise ShapeError(f"lanes for {lanes.size} values, tensor of shape {self.shape}.")
        self.packing = packing
        self.lanes = lanes
        expected = n_ciphertexts(math.prod(self.shape), self.values_per_ciphertext)
        if len(self.chunks) != expected:
            raise ShapeError(
                f"shape {self.shape} needs {expected} ciphertexts of "
                f"{self.values_per_ciphertext} values, got {len(self.chunks)}."
            )

    @property
    def values_per_ciphertext(self) -> int:
        return self.context.params.slots * _VALUES_PER_SLOT[self.packing]

    @property
    def fingerprint(self) -> str:
        return self.context.fingerprint

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __add__(self, other: EncryptedTensor) -> EncryptedTensor:
        self._check_compatible(other)
        return EncryptedTensor(
            [a + b for a, b in zip(self.chunks, other.chunks, strict=True)],
            self.shape,
            self.context,
            self.packing,
            self.lanes,
        )

    def __sub__(self, other: EncryptedTensor) -> EncryptedTensor:
        self._check_compatible(other)
        chunks = [a - b for a, b in zip(self.chunks, other.chunks, strict=True)]
        return EncryptedTensor(chunks, self.shape, self.context, self.packing, self.lanes)

    def _check_compatible(self, other: EncryptedTensor) -> None:
        _check_same_kind(self, other)
        _check_same_shape(self.shape, other.shape)
        self.context.check_same(other.fingerprint)
        if self.packing != other.packing:
            raise ShapeError(f"cannot add {self.packing}- and {other.packing}-packed tensors.")
        if self.lanes != other.lanes:
            raise ShapeError("cannot add tensors quantized with different lanes or steps.")

    def _require_real(self, operation: str) -> None:
        if self.packing != REAL:
            raise ShapeError(
                f"{operation} is not defined on a {self.packing}-packed tensor (it would mix "
                "the values of a slot): that packing is for sums; use encrypt_for_compute."
            )

    def add_plain(self, values: np.ndarray) -> EncryptedTensor:
        return self._with_plain(values, lambda chunk, part: chunk + part)

    def mul_plain(self, values: np.ndarray) -> EncryptedTensor:
        """Slot-wise product with plaintext values; consumes one level (rescale)."""
        return self._with_plain(values, lambda chunk, part: chunk * part)

    def mul_scalar(self, value: float) -> EncryptedTensor:
        """Product with one plaintext number: half the cost of `mul_plain`; one level."""
        self._require_real("mul_scalar")
        factor = _scalar(value)
        return EncryptedTensor([c * factor for c in self.chunks], self.shape, self.context)

    def __mul__(self, other: EncryptedTensor) -> EncryptedTensor:
        """Slot-wise ciphertext × ciphertext product (relinearized, rescaled): one level.

        Needs the relinearization key in the context (`KeyRequest(relin=True)`)."""
        self._check_compatible(other)
        self._require_real("a ciphertext product")
        self._require_relin()
        chunks = [a * b for a, b in zip(self.chunks, other.chunks, strict=True)]
        return EncryptedTensor(chunks, self.shape, self.context)

    def _require_relin(self) -> None:
        if not self.context.keys.relin:
            raise ParameterError(
                "multiplying two ciphertexts needs the relinearization key: declare the job "
                "with KeyRequest(relin=True)."
            )

    def _with_plain(self, values: np.ndarray, op) -> EncryptedTensor:
        self._require_real("a plaintext operation")
        flat = _plain_operand(values, self.shape).ravel()
        slots = self.context.params.slots
        chunks = [
            op(chunk, flat[i * slots : i * slots + chunk.size()].tolist())
            for i, chunk in enumerate(self.chunks)
        ]
        return EncryptedTensor(chunks, self.shape, self.context)

    @property
    def level(self) -> int:
        """Primes each ciphertext keeps (1: the lowest level)."""
        return _seal.ciphertext_info(self.chunks[0])[1]

    @property
    def scale(self) -> float:
        return _seal.ciphertext_info(self.chunks[0])[2]

    def mod_switch_to(self, level: int) -> EncryptedTensor:
        """Keep only the first `level` primes before the tensor travels (exact, no noise)."""
        chunks = [_seal.mod_switch_to(c, self.context.raw, level) for c in self.chunks]
        return EncryptedTensor(chunks, self.shape, self.context, self.packing, self.lanes)

    def to_bytes(self) -> bytes:
        return _encrypted_frame(self, [chunk.serialize() for chunk in self.chunks])


class SealTensor(EncryptedTensor):
    """An `EncryptedTensor` still held as SEAL ciphertexts, as `Circuit` computes them.

    Turning a SEAL ciphertext into a TenSEAL vector costs ~3 ms (a save and a load); a result
    that only travels never needs it: `to_bytes` writes TenSEAL's wire format straight from the
    SEAL ciphertexts, and `Circuit.ciphers` takes them back without a conversion. `chunks`
    converts (once) when some TenSEAL operation needs them."""

    def __init__(
        self, ciphers: Sequence[Any], sizes: Sequence[int], shape: Shape, context: Context
    ) -> None:
        self.seal_ciphers = tuple(ciphers)
        self.sizes = tuple(int(size) for size in sizes)
        self._chunks: tuple[ts.CKKSVector, ...] | None = None
        self.shape = tuple(int(s) for s in shape)
        self.context = context
        self.packing = REAL
        self.lanes = None
        expected = n_ciphertexts(math.prod(self.shape), self.values_per_ciphertext)
        if len(self.seal_ciphers) != expected or len(self.sizes) != expected:
            raise ShapeError(
                f"shape {self.shape} needs {expected} ciphertexts of "
                f"{self.values_per_ciphertext} values, got {len(self.seal_ciphers)}."
            )

    @property  # type: ignore[override]
    def chunks(self) -> tuple[ts.CKKSVector, ...]:
        if self._chunks is None:
            raw = self.context.raw
            self._chunks = tuple(
                _seal.vector_from(raw, ct, size)
                for ct, size in zip(self.seal_ciphers, self.sizes, strict=True)
            )
        return self._chunks

    @property
    def level(self) -> int:
        return self.seal_ciphers[0].coeff_modulus_size()

    @property
    def scale(self) -> float:
        return self.seal_ciphers[0].scale

    def to_bytes(self) -> bytes:
        blobs = [
            _seal.vector_bytes(ct, size)
            for ct, size in zip(self.seal_ciphers, self.sizes, strict=True)
        ]
        return _encrypted_frame(self, blobs)


Tensor = EncryptedTensor | PlainTensor


def _encrypted_frame(tensor: EncryptedTensor, blobs: list[bytes]) -> bytes:
    body = b"".join(blobs)
    header = {
        "kind": CKKS_KIND,
        "shape": list(tensor.shape),
        "packing": tensor.packing,
        **({"lanes": tensor.lanes.to_dict()} if tensor.lanes else {}),
        "fingerprint": tensor.fingerprint,
        "chunk_bytes": [len(b) for b in blobs],
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    return frame(TENSOR_MAGIC, TENSOR_VERSION, header, body)


def stack(tensors: Sequence[Tensor]) -> Tensor:
    """Stack same-shaped tensors along a new first axis (ciphertexts are not touched).

    Encrypted tensors must each fill whole ciphertexts (size a multiple of the slots), so that
    the stacked tensor packs exactly the same ciphertexts."""
    if not tensors:
        raise ShapeError("nothing to stack.")
    first = tensors[0]
    for other in tensors[1:]:
        _check_same_kind(first, other)
        _check_same_shape(first.shape, other.shape)
    shape = (len(tensors), *first.shape)
    if isinstance(first, PlainTensor):
        return PlainTensor(np.stack([t.values for t in tensors]))  # type: ignore[union-attr]
    _check_whole_ciphertexts(first)
    for other in tensors[1:]:
        first.context.check_same(other.fingerprint)  # type: ignore[union-attr]
    if all(isinstance(t, SealTensor) for t in tensors):  # no conversion to TenSEAL
        ciphers = [c for t in tensors for c in t.seal_ciphers]  # type: ignore[union-attr]
        sizes = [n for t in tensors for n in t.sizes]  # type: ignore[union-attr]
        return SealTensor(ciphers, sizes, shape, first.context)
    packing = _rows_packing(tensors)
    chunks = [c for t in tensors for c in t.chunks]  # type: ignore[union-attr]
    return EncryptedTensor(chunks, shape, first.context, packing)


def unstack(tensor: Tensor) -> list[Tensor]:
    """The rows of a tensor along its first axis: the inverse of `stack`."""
    if len(tensor.shape) < 2:
        raise ShapeError(f"a tensor of shape {tensor.shape} has no rows to unstack.")
    row_shape = tensor.shape[1:]
    if isinstance(tensor, PlainTensor):
        return [PlainTensor(row) for row in tensor.values]
    per_row = math.prod(row_shape)
    per_ciphertext = tensor.values_per_ciphertext
    if per_row % per_ciphertext:
        raise ShapeError(
            f"rows of {per_row} values do not fill whole ciphertexts of "
            f"{per_ciphertext} values: they cannot be split without rotations."
        )
    n = per_row // per_ciphertext
    packing = _rows_packing([tensor])
    if isinstance(tensor, SealTensor):
        return [
            SealTensor(
                tensor.seal_ciphers[i * n : (i + 1) * n],
                tensor.sizes[i * n : (i + 1) * n],
                row_shape,
                tensor.context,
            )
            for i in range(tensor.shape[0])
        ]
    return [
        EncryptedTensor(tensor.chunks[i * n : (i + 1) * n], row_shape, tensor.context, packing)
        for i in range(tensor.shape[0])
    ]


def _rows_packing(tensors: Sequence[Tensor]) -> str:
    """The one packing of tensors stacked or split by rows (quantized lanes cannot be)."""
    packings = {t.packing for t in tensors}  # type: ignore[union-attr]
    if len(packings) > 1 or QUANTIZED in packings:
        raise ShapeError(f"cannot stack or split tensors packed {sorted(packings)}.")
    return packings.pop()


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ wᵢ·tᵢ over same-shaped tensors: one level, like one `mul_scalar`, for a fraction of
    the cost of len(tensors) of them.

    Each ciphertext is multiplied by its weight, encoded as a constant at the ciphertext's
    level, the products are added and the sum is rescaled once. The weights are encoded at
    the scale that makes the result land exactly on the inputs' scale, so there is no
    rescaling bias (`mul_scalar` leaves a factor s/prime: 1 + 1.3e-7 from three primes,
    1 + 6.7e-7 from two at MODEL_PARAMS). Weights that encode to zero (|w|·2^40 < 0.5) are
    skipped; an all-zero sum is a fresh encryption of zero. Inputs must share context,
    level (at least two primes) and scale, and be real-packed."""
    factors = [_scalar(w) for w in weights]
    first = _check_terms(tensors, "weighted_sum")
    if len(factors) != len(tensors):
        raise ShapeError(
            f"weighted_sum got {len(tensors)} tensors and {len(factors)} weights: pass one "
            "weight per tensor."
        )
    if isinstance(first, PlainTensor):
        total = np.zeros(first.shape)
        for tensor, factor in zip(tensors, factors, strict=True):
            total += factor * tensor.values  # type: ignore[union-attr]
        return PlainTensor(total)
    circuit = Circuit(first.context)
    rows = _ciphers(circuit, tensors, "weighted_sum")
    scale = rows[0][0].scale
    ciphers = [
        circuit.multiply_sum(list(zip(column, factors, strict=True)), scale)
        for column in zip(*rows, strict=True)
    ]
    return circuit.tensor(ciphers, first.shape)


def sum_of_products(left: Sequence[Tensor], right: Sequence[Tensor]) -> Tensor:
    """Σ lᵢ ⊙ rᵢ (slot-wise ciphertext products): one level, like one `*`, but relinearized
    and rescaled once for the whole sum (the products are added as three-polynomial
    ciphertexts). Needs the relinearization key (`KeyRequest(relin=True)`).

    Same numbers as Σ lᵢ * rᵢ: the result is recorded at the inputs' scale s, as TenSEAL's
    product records it, although the rescaled scale is s²/prime (values come out multiplied by
    s/prime: 1 + 1.3e-7 from three primes, 1 + 6.7e-7 from two at MODEL_PARAMS). All tensors
    must share shape, context, level (at least two primes) and scale, and be real-packed."""
    if len(left) != len(right):
        raise ShapeError(
            f"sum_of_products got {len(left)} left and {len(right)} right tensors: pair "
            "every left tensor with one right tensor."
        )
    first = _check_terms([*left, *right], "sum_of_products")
    if isinstance(first, PlainTensor):
        total = np.zeros(first.shape)
        for a, b in zip(left, right, strict=True):
            total += a.values * b.values  # type: ignore[union-attr]
        return PlainTensor(total)
    first._require_relin()
    circuit = Circuit(first.context)
    rows = _ciphers(circuit, [*left, *right], "sum_of_products")
    circuit.check_rescalable(rows[0][0], "sum_of_products")
    if len(left) == 1:  # TenSEAL's product does exactly this, without the conversion back
        return left[0] * right[0]  # type: ignore[operator]
    scale = rows[0][0].scale
    pairs = list(zip(rows[: len(left)], rows[len(left) :], strict=True))
    ciphers = []
    for index in range(len(first.chunks)):
        product = circuit.product_sum([(a[index], b[index]) for a, b in pairs])
        product.raw.scale = scale  # what `__mul__` records (see above)
        ciphers.append(product)
    return circuit.tensor(ciphers, first.shape)


def rotate(tensor: Tensor, step: int) -> Tensor:
    """`tensor` with its values moved `step` places to the left, cyclically (value i + step
    lands at i; a negative step moves right): see `rotations`."""
    return rotations(tensor, [step])[0]


def rotations(tensor: Tensor, steps: Sequence[int]) -> list[Tensor]:
    """`tensor` rotated left by each of `steps`, cyclically: ``np.roll(values, -step)``.

    An encrypted tensor must be exactly one ciphertext, shape (slots,) (rotations move the
    slots of one ciphertext; pad shorter vectors to the slot count, and the plaintext twin
    with them); level and scale are unchanged. The context needs a rotation key for every
    step (`KeyRequest(rotations=…)`, steps taken modulo the slot count) or TenSEAL's
    power-of-two keys (`KeyRequest(galois=True)`). A plaintext tensor must be 1-D."""
    shifts = [operator.index(step) for step in steps]
    if isinstance(tensor, PlainTensor):
        if tensor.values.ndim != 1:
            raise ShapeError(
                f"rotations move the values of a 1-D tensor, got shape {tensor.shape}: "
                "flatten it (and pad it to the slot count, as its encrypted twin must be)."
            )
        return [PlainTensor(np.roll(tensor.values, -shift)) for shift in shifts]
    if not isinstance(tensor, EncryptedTensor):
        raise TensorKindError(
            f"cannot rotate a {type(tensor).__name__}: pass an EncryptedTensor or a PlainTensor."
        )
    tensor._require_real("rotation")
    slots = tensor.context.params.slots
    if tensor.shape != (slots,):
        raise ShapeError(
            f"rotations move the slots of one ciphertext: the tensor must have shape "
            f"({slots},), got {tensor.shape}; pad the values to {slots} (or split them into "
            "rows of that many and rotate each)."
        )
    circuit = Circuit(tensor.context)
    circuit.check_rotations(shifts)
    (cipher,) = circuit.ciphers(tensor)
    return [circuit.tensor([circuit.rotate(cipher, shift)], tensor.shape) for shift in shifts]


def _check_terms(tensors: Sequence[Tensor], what: str) -> Tensor:
    """The first of `tensors`, once all are of one kind and shape (and, encrypted, of one
    context and real-packed)."""
    if not tensors:
        raise ShapeError(f"{what} needs at least one tensor.")
    first = tensors[0]
    for other in tensors:
        _check_same_kind(first, other)
        if other.shape != first.shape:
            raise ShapeError(
                f"{what} needs tensors of one shape, got {first.shape} and {other.shape}."
            )
    if isinstance(first, EncryptedTensor):
        for other in tensors:
            encrypted = _as_encrypted(other, what)
            first.context.check_same(encrypted.fingerprint)
            encrypted._require_real(what)
    return first


def _as_encrypted(tensor: Tensor, what: str) -> EncryptedTensor:
    if not isinstance(tensor, EncryptedTensor):
        raise TensorKindError(
            f"{what} got a {type(tensor).__name__} among encrypted tensors: encrypt every term "
            "under the job's context, or pass plaintext tensors only."
        )
    return tensor


def _ciphers(circuit: Circuit, tensors: Sequence[Tensor], what: str) -> list[list[Cipher]]:
    """Each tensor's ciphertexts (copied once per distinct tensor: a copy costs ~0.05 ms),
    checked to sit at one level and scale."""
    copies: dict[int, list[Cipher]] = {}
    rows = []
    for tensor in tensors:
        if id(tensor) not in copies:
            copies[id(tensor)] = circuit.ciphers(tensor)  # type: ignore[arg-type]
        rows.append(copies[id(tensor)])
    first = rows[0][0]
    for row in rows:
        for cipher in row:
            if (cipher.level, cipher.scale) != (first.level, first.scale):
                raise ParameterError(
                    f"{what} needs tensors at one level and scale, got {cipher.level} primes "
                    f"at 2^{math.log2(cipher.scale):g} and {first.level} at "
                    f"2^{math.log2(first.scale):g}: bring them to the lower level with "
                    "mod_switch_to, or encrypt them with the same multiplications=…."
                )
    return rows


def _check_whole_ciphertexts(tensor: EncryptedTensor) -> None:
    if tensor.size % tensor.values_per_ciphertext:
        raise ShapeError(
            f"tensors of {tensor.size} values do not fill whole ciphertexts of "
            f"{tensor.values_per_ciphertext} values: pad them to a multiple before stacking."
        )


def n_ciphertexts(size: int, slots: int) -> int:
    return max(1, math.ceil(size / slots))


def check_values(values: np.ndarray, max_abs: float) -> np.ndarray:
    """Refuse NaN, infinity and magnitudes the parameters cannot hold (CKKS overflows silently)."""
    return check_range(
        values,
        max_abs,
        fix="these CKKS parameters keep values exact only within it; " + FIX_BOUND,
    )


def encrypt(
    context: PublicContext | SecretContext,
    values: np.ndarray,
    *,
    sum_bound: float | None = None,
    n_terms: int = 1,
    min_scale_bits: int | None = None,
    packing: str = REAL,
    lanes: Lanes | None = None,
    precompute: bool = False,
) -> EncryptedTensor:
    """Encrypt an array of any shape, at the lowest level that still holds `sum_bound`.

    `sum_bound` bounds |value| of the sum this tensor will join (default: what the lowest level
    holds); `n_terms` is how many such tensors that sum adds up, so each one must stay within
    `sum_bound / n_terms` (checked here: CKKS overflow is silent). `min_scale_bits` asks for
    more precision than the nominal scale, at the cost of more primes if needed. `packing`
    COMPLEX puts two values in each slot, QUANTIZED four (rounded as `lanes` says, which then
    fix the level and scale); both are for tensors that are only summed. `precompute` draws on
    this process's encryptions of zero made in the background (`_zero_pool.ZeroPool`) and tops them
    up for the next call: for a party that encrypts one such tensor per round.
    """
    params = context.params
    bound = params.max_abs_value if sum_bound is None else sum_bound
    array = check_values(values, bound / max(n_terms, 1))
    flat = array.ravel()
    if packing == QUANTIZED:
        if lanes is None:
            raise ParameterError("quantized packing needs lanes (fedhe.crypto.lanes.Lanes.plan).")
        slots = lanes.pack(flat)
        level, scale = 1, lanes.scale
    else:
        level, scale_bits = params.encoding_for(bound, min_scale_bits)
        scale = 2.0**scale_bits
        if packing == COMPLEX:
            paired = np.zeros(2 * math.ceil(max(flat.size, 1) / 2))
            paired[: flat.size] = flat
            slots = paired[0::2] + 1j * paired[1::2]
        else:
            slots = flat
    zeros = _zero_pool.zero_pool(context.raw, context.fingerprint, level) if precompute else None
    encryptor = _seal.LevelEncryptor(context.raw, level, scale, zeros)
    chunks = [
        encryptor.encrypt(slots[start : start + params.slots].tolist())
        for start in range(0, max(slots.size, 1), params.slots)
    ]
    if zeros is not None:
        zeros.refill(len(chunks))
    return EncryptedTensor(chunks, array.shape, context, packing, lanes)


def encrypt_for_compute(
    context: Context | None,
    values: np.ndarray,
    *,
    multiplications: int | None = None,
    packing: str = REAL,
) -> Tensor:
    """Encrypt at the nominal scale with room for `multiplications` ciphertext × plaintext
    products (default: as many as the parameters allow), for jobs that multiply; the plaintext
    twin's tensor when `context` is None. Values must stay within what the last level holds.

    `packing` COMPLEX makes each pair of values one complex slot (real, imaginary): for
    circuits that compute on complex numbers at the SEAL level (`Circuit`), not for the
    tensor operations, which refuse it."""
    if context is None:
        return PlainTensor(check_values(values, np.inf))
    if packing not in (REAL, COMPLEX):
        raise ParameterError(f"encrypt_for_compute packs REAL or COMPLEX, not {packing!r}.")
    params = context.params
    depth = params.depth if multiplications is None else multiplications
    if not 0 <= depth <= params.depth:
        raise ValueRangeError(f"{depth} multiplications do not fit depth {params.depth}.")
    array = check_values(values, params.max_abs_value)
    flat = array.ravel()
    if packing == COMPLEX:
        paired = np.zeros(2 * math.ceil(max(flat.size, 1) / 2))
        paired[: flat.size] = flat
        flat = paired[0::2] + 1j * paired[1::2]
    encryptor = _seal.LevelEncryptor(context.raw, depth + 1, 2.0**params.scale_bits)
    chunks = [
        encryptor.encrypt(flat[start : start + params.slots].tolist())
        for start in range(0, max(flat.size, 1), params.slots)
    ]
    return EncryptedTensor(chunks, array.shape, context, packing)


def decrypt(context: SecretContext, tensor: EncryptedTensor) -> np.ndarray:
    """Decrypt to the tensor's shape. Key-holder side: the caller has checked the policy."""
    context.check_same(tensor.fingerprint)
    if tensor.packing == REAL:
        secret_key = context.raw.secret_key()
        slots = [np.asarray(c.decrypt(secret_key), dtype=np.float64) for c in tensor.chunks]
    else:
        slots = [_seal.decrypt_complex(context.raw, c) for c in tensor.chunks]
    return values_from_slots(tensor, slots)


def values_from_slots(tensor: EncryptedTensor, slots: Sequence[np.ndarray]) -> np.ndarray:
    """The tensor's values, in its shape, from each chunk's decrypted slots (the first
    `chunk.size()` of them; complex, or real for a real-packed tensor): the unpacking every
    decryption shares, with one key or with shares of it (`fedhe.crypto.multiparty`)."""
    flat = np.concatenate(slots)
    if tensor.packing == QUANTIZED:
        if tensor.lanes is None:
            raise InvalidCiphertextError("a quantized tensor without lanes cannot be unpacked.")
        return tensor.lanes.unpack(flat).reshape(tensor.shape)
    if tensor.packing == COMPLEX:
        flat = np.column_stack([flat.real, flat.imag]).ravel()
    else:
        flat = np.real(flat).astype(np.float64, copy=False)
    return flat[: tensor.size].reshape(tensor.shape)


def load_tensor(
    data: bytes,
    context: Context | None,
    *,
    shape: Shape | None = None,
    sum_bound: float | None = None,
    min_scale_bits: int | None = None,
    level: int | None = None,
    packing: str | None = None,
    lanes: Lanes | None = None,
) -> Tensor:
    """Parse and validate tensor bytes: encrypted when `context` is given, plaintext otherwise.

    With `sum_bound`, the ciphertexts must sit at the level and scale `encrypt` uses for that
    bound, so that every term of a sum agrees. With `level`, they must keep that many primes at
    the nominal scale, as `encrypt_for_compute` makes them. With `lanes`, the tensor must be
    quantized with exactly those lanes (they fix its level and scale). Raises
    InvalidCiphertextError (malformed, truncated, garbage, other level or scale, other `packing`
    or lanes than asked), ContextMismatchError (made under other keys) or ShapeError (not the
    shape the job expects).
    """
    header, body = unframe(
        data,
        magic=TENSOR_MAGIC,
        version=TENSOR_VERSION,
        what="tensor",
        error=InvalidCiphertextError,
    )
    kind = header.get("kind")
    expected_kind = PLAIN_KIND if context is None else CKKS_KIND
    if kind != expected_kind:
        raise InvalidCiphertextError(
            f"expected a {expected_kind} tensor, got kind {kind!r}: sender and receiver disagree "
            "on whether this job is encrypted."
        )
    tensor_shape = _header_shape(header)
    if shape is not None and tuple(shape) != tensor_shape:
        raise ShapeError(f"tensor has shape {tensor_shape}, the job expects {tuple(shape)}.")
    if context is None:
        return _load_plain(body, tensor_shape)
    tensor = _load_encrypted(header, body, tensor_shape, context)
    if packing is not None and tensor.packing != packing:
        raise InvalidCiphertextError(
            f"tensor is {tensor.packing}-packed, this step expects {packing} packing."
        )
    if lanes is not None:  # they fix level and scale
        if tensor.lanes != lanes:
            raise InvalidCiphertextError(
                "tensor is quantized with other lanes or steps than this step expects: the "
                "sender used another sum bound or number of parties."
            )
        return tensor
    if sum_bound is not None:
        sum_level, scale_bits = context.params.encoding_for(sum_bound, min_scale_bits)
        if (tensor.level, tensor.scale) != (sum_level, 2.0**scale_bits):
            raise InvalidCiphertextError(
                f"ciphertexts keep {tensor.level} primes at scale 2^{math.log2(tensor.scale):g}; "
                f"sums bounded by {sum_bound:g} use level {sum_level} at 2^{scale_bits}: the "
                "sender "
                "used another bound, and adding them would overflow or lose precision."
            )
    if level is not None and (tensor.level, tensor.scale) != (level, context.params.scale):
        raise InvalidCiphertextError(
            f"ciphertexts keep {tensor.level} primes at scale 2^{math.log2(tensor.scale):g}; "
            f"this step needs {level} primes at 2^{context.params.scale_bits}: encrypt with "
            f"room for {level - 1} multiplications."
        )
    return tensor


def digest(data: bytes) -> str:
    """Short content digest used in audit logs."""
    return hashlib.sha256(data).hexdigest()[:32]


def _load_plain(body: bytes, shape: Shape) -> PlainTensor:
    if len(body) != 8 * math.prod(shape):
        raise InvalidCiphertextError(
            f"plaintext tensor of shape {shape} needs {8 * math.prod(shape)} bytes, "
            f"got {len(body)}."
        )
    # dtype None (native float64) is "<f8" on the little-endian hosts fedhe supports:
    values = np.frombuffer(body, dtype="<f8").reshape(shape)  # pragma: no mutate
    check_values(values, np.inf)
    return PlainTensor(values.copy())


_ENCRYPTED_HEADER_KEYS = frozenset(
    {"kind", "shape", "packing", "lanes", "fingerprint", "chunk_bytes", "body_sha256"}
)


def _load_encrypted(
    header: dict[str, Any], body: bytes, shape: Shape, context: Context
) -> EncryptedTensor:
    unknown = sorted(set(header) - _ENCRYPTED_HEADER_KEYS)
    if unknown:
        raise InvalidCiphertextError(f"ciphertext header has unknown fields {unknown}.")
    fingerprint = header.get("fingerprint")
    if not isinstance(fingerprint, str):
        raise InvalidCiphertextError("ciphertext header has no context fingerprint.")
    context.check_same(fingerprint)
    sizes = header.get("chunk_bytes")
    packing = header.get("packing")  # required: a default would read a damaged header wrongly
    if packing not in PACKINGS:
        raise InvalidCiphertextError(f"unknown packing {packing!r}; expected one of {PACKINGS}.")
    lanes = Lanes.from_dict(header["lanes"]) if "lanes" in header else None
    per_slot = _VALUES_PER_SLOT[packing]
    per_chunk = context.params.slots * per_slot
    size = math.prod(shape)
    expected_chunks = n_ciphertexts(size, per_chunk)
    if (
        not isinstance(sizes, list)
        or len(sizes) != expected_chunks
        or not all(isinstance(s, int) and s > 0 for s in sizes)
    ):
        raise InvalidCiphertextError(
            f"shape {shape} needs {expected_chunks} ciphertexts, the header lists {sizes!r}."
        )
    if sum(sizes) != len(body):
        raise InvalidCiphertextError(
            f"ciphertext body has {len(body)} bytes, the header announces {sum(sizes)}: truncated "
            "or padded in transit."
        )
    # A digest, not a MAC: it catches corruption (a flipped bit in a ciphertext otherwise
    # decrypts to a silently wrong value); transport integrity against an attacker is TLS's job.
    if header.get("body_sha256") != hashlib.sha256(body).hexdigest():
        raise InvalidCiphertextError(
            "ciphertext bytes do not match their digest: corrupted in transit."
        )
    chunks, offset = [], 0
    for index, n_bytes in enumerate(sizes):
        values = min(per_chunk, size - index * per_chunk)
        expected_len = math.ceil(values / per_slot)
        chunks.append(_load_chunk(body[offset : offset + n_bytes], context, index, expected_len))
        offset += n_bytes
    infos = {_seal.ciphertext_info(c)[1:] for c in chunks}
    if len(infos) > 1:
        raise InvalidCiphertextError(
            f"ciphertexts of one tensor sit at mixed levels and scales {sorted(infos)}."
        )
    if lanes is not None and infos != {(1, lanes.scale)}:
        raise InvalidCiphertextError(
            f"quantized ciphertexts must keep 1 prime at scale 2^{lanes.guard_bits}, got {infos}."
        )
    try:
        return EncryptedTensor(chunks, shape, context, packing, lanes)
    except ShapeError as err:
        raise InvalidCiphertextError(str(err)) from err


def _load_chunk(blob: bytes, context: Context, index: int, expected_len: int) -> ts.CKKSVector:
    try:
        vector = ts.ckks_vector_from(context.raw, blob)
        polys, _, scale = _seal.ciphertext_info(vector)
    except (ValueError, RuntimeError, TypeError) as err:
        raise InvalidCiphertextError(f"ciphertext {index} does not load: {err}.") from err
    if vector.size() != expected_len:
        raise InvalidCiphertextError(
            f"ciphertext {index} holds {vector.size()} values, expected {expected_len}."
        )
    if polys != 2:
        raise InvalidCiphertextError(f"ciphertext {index} has {polys} polynomials, expected 2.")
    if not 2.0**MIN_SCALE_BITS <= scale <= 2.0**MAX_PRIME_BITS:
        raise InvalidCiphertextError(f"ciphertext {index} has an implausible scale {scale:g}.")
    return vector


def _scalar(value: float) -> float:
    factor = float(value)
    if not math.isfinite(factor):
        raise ValueRangeError(f"cannot multiply by {factor}: the factor must be finite.")
    return factor


def _plain_operand(values: np.ndarray, shape: Shape) -> np.ndarray:
    operand = np.broadcast_to(np.asarray(values, dtype=np.float64), shape)
    return check_values(operand, np.inf)


def _check_same_kind(a: Tensor, b: Tensor) -> None:
    if _kind(a) != _kind(b):
        raise TensorKindError(
            f"cannot add {type(a).__name__} and {type(b).__name__}: both must be encrypted "
            "under the job's context, or both plaintext (the twin)."
        )


def _kind(tensor: Tensor) -> str:
    if not isinstance(tensor, EncryptedTensor | PlainTensor):
        raise TensorKindError(
            f"{type(tensor).__name__} is not a fedhe tensor: pass an EncryptedTensor or a "
            "PlainTensor (load received bytes with load_tensor)."
        )
    return tensor.kind


def _check_same_shape(a: Shape, b: Shape) -> None:
    if a != b:
        raise ShapeError(f"cannot add tensors of shapes {a} and {b}.")


def _header_shape(header: dict[str, Any]) -> Shape:
    shape = header.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise InvalidCiphertextError(f"tensor header has no valid shape: {shape!r}.")
    if math.prod(shape) > 1 << 32:
        raise InvalidCiphertextError(f"tensor shape {shape} is implausibly large.")
    return tuple(shape)
