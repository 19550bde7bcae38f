"""Ciphertext arithmetic for circuits (MLP layers): lazy rescaling, exact scales, rotations.

TenSEAL's `CKKSVector` rescales after every product and then resets the scale to the nominal
one, which costs time (one rescale per term of a dot product) and leaves a small bias per
level. A `Circuit` works on SEAL ciphertexts directly: a product's plaintext is encoded at the
scale that makes the rescaled result land *exactly* on the requested scale, sums of products
are rescaled once, and rotations use only the job's own rotation keys.

`Cipher` handles come from and go back to `EncryptedTensor`s (one per ciphertext), so what
travels keeps the validated wire format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tenseal.sealapi as sealapi

from fedhe.crypto import _seal
from fedhe.crypto.context import PublicContext, SecretContext
from fedhe.crypto.tensor import EncryptedTensor
from fedhe.errors import ParameterError

Context = PublicContext | SecretContext


@dataclass
class Cipher:
    """One SEAL ciphertext and how many of its slots carry values (the rest are padding)."""

    raw: sealapi.Ciphertext
    size: int

    @property
    def scale(self) -> float:
        return self.raw.scale

    @property
    def level(self) -> int:
        return self.raw.coeff_modulus_size()


class Circuit:
    """Arithmetic on `Cipher`s under one context (public: no decryption here)."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self._seal = context.raw.seal_context().data
        self._evaluator = sealapi.Evaluator(self._seal)
        self._encoder = sealapi.CKKSEncoder(self._seal)
        self._relin = context.raw.relin_keys().data if context.keys.relin else None

    # -- conversions ---------------------------------------------------------------------------

    def ciphers(self, tensor: EncryptedTensor) -> list[Cipher]:
        self.context.check_same(tensor.fingerprint)
        return [Cipher(chunk.ciphertext()[0], chunk.size()) for chunk in tensor.chunks]

    def tensor(self, ciphers: Sequence[Cipher], shape: tuple[int, ...]) -> EncryptedTensor:
        chunks = [_seal.vector_from(self.context.raw, c.raw, c.size) for c in ciphers]
        return EncryptedTensor(chunks, shape, self.context)

    # -- arithmetic ------------------------------------------------------------------------------

    def multiply_sum(
        self, terms: Sequence[tuple[Cipher, float | np.ndarray]], scale: float
    ) -> Cipher:
        """Σ cipherᵢ ⊙ plainᵢ, rescaled once to exactly `scale` (all ciphers at one level and
        one scale). A plain operand is a number or a vector of one value per slot."""
        first = terms[0][0]
        prime = self._last_prime(first.raw)
        plain_scale = scale * prime / first.scale
        total = None
        for cipher, operand in terms:
            if cipher.raw.parms_id() != first.raw.parms_id() or cipher.scale != first.scale:
                raise ParameterError("terms of one product sum must share level and scale.")
            product = sealapi.Ciphertext(self._seal)
            plain = self._encode(operand, first.raw, plain_scale)
            self._evaluator.multiply_plain(cipher.raw, plain, product)
            if total is None:
                total = product
            else:
                self._evaluator.add_inplace(total, product)
        assert total is not None
        self._evaluator.rescale_to_next_inplace(total)
        total.scale = scale  # exact by construction: (scale·prime/s)·s / prime
        return Cipher(total, first.size)

    def square(self, cipher: Cipher) -> Cipher:
        """cipher², relinearized and rescaled (its scale becomes s²/prime, kept exact)."""
        if self._relin is None:
            raise ParameterError("squaring needs the relinearization key: KeyRequest(relin=True).")
        out = sealapi.Ciphertext(self._seal)
        self._evaluator.square(cipher.raw, out)
        self._evaluator.relinearize_inplace(out, self._relin)
        self._evaluator.rescale_to_next_inplace(out)
        return Cipher(out, cipher.size)

    def add(self, a: Cipher, b: Cipher) -> Cipher:
        """a + b; the one higher in the chain is switched down first (exact)."""
        a_raw, b_raw = a.raw, b.raw
        if a.level != b.level:
            low = a_raw if a.level < b.level else b_raw
            high = sealapi.Ciphertext(self._seal)
            self._evaluator.mod_switch_to(b_raw if low is a_raw else a_raw, low.parms_id(), high)
            a_raw, b_raw = (low, high) if low is a_raw else (high, low)
        if not np.isclose(a_raw.scale, b_raw.scale, rtol=1e-12):
            raise ParameterError(f"cannot add scales {a_raw.scale:g} and {b_raw.scale:g}.")
        b_raw.scale = a_raw.scale
        out = sealapi.Ciphertext(self._seal)
        self._evaluator.add(a_raw, b_raw, out)
        return Cipher(out, a.size)

    def add_plain(self, cipher: Cipher, operand: float | np.ndarray) -> Cipher:
        out = sealapi.Ciphertext(self._seal)
        plain = self._encode(operand, cipher.raw, cipher.scale)
        self._evaluator.add_plain(cipher.raw, plain, out)
        return Cipher(out, cipher.size)

    def rotate_sum(self, cipher: Cipher, steps: Sequence[int]) -> Cipher:
        """c + rot(c, s₁), then the same with s₂, …: with steps 1, 2, 4, … each slot i ends up
        holding the sum of slots i … i + 2^len − 1."""
        keys = self.context.rotation_keys
        missing = sorted(set(steps) - set(keys.steps))
        if missing:
            raise ParameterError(f"no rotation keys for steps {missing} in this context.")
        total = cipher.raw
        for step in steps:
            rotated = sealapi.Ciphertext(self._seal)
            self._evaluator.rotate_vector(total, step, keys.keys, rotated)
            summed = sealapi.Ciphertext(self._seal)
            self._evaluator.add(total, rotated, summed)
            total = summed
        return Cipher(total, cipher.size)

    # -- helpers -----------------------------------------------------------------------------

    def _last_prime(self, raw: sealapi.Ciphertext) -> int:
        data = self._seal.get_context_data(raw.parms_id())
        return data.parms().coeff_modulus()[-1].value()

    def _encode(
        self, operand: float | np.ndarray, like: sealapi.Ciphertext, scale: float
    ) -> sealapi.Plaintext:
        plain = sealapi.Plaintext()
        if np.ndim(operand) == 0:
            self._encoder.encode(float(operand), like.parms_id(), scale, plain)
        else:
            values = np.zeros(self.context.params.slots)
            flat = np.asarray(operand, dtype=float).ravel()
            values[: flat.size] = flat
            self._encoder.encode(values.tolist(), like.parms_id(), scale, plain)
        return plain
