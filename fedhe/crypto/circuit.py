"""Ciphertext arithmetic for circuits (MLP layers): lazy rescaling, exact scales, rotations.

TenSEAL's `CKKSVector` rescales after every product and then resets the scale to the nominal
one, which costs time (one rescale per term of a dot product) and leaves a small bias per
level. A `Circuit` works on SEAL ciphertexts directly: a product's plaintext is encoded at the
scale that makes the rescaled result land *exactly* on the requested scale, sums of products
are rescaled (and relinearized) once, and rotations use only the job's own rotation keys.

`Cipher` handles come from and go back to `EncryptedTensor`s (one per ciphertext), so what
travels keeps the validated wire format. The tensor-level operations built on these kernels
(`weighted_sum`, `sum_of_products`, `rotations`) live in `fedhe.crypto.tensor`.
"""

from __future__ import annotations

import operator
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import tenseal.sealapi as sealapi

from fedhe.crypto.context import PublicContext, SecretContext
from fedhe.errors import ParameterError

if TYPE_CHECKING:
    from fedhe.crypto.tensor import EncryptedTensor

Context = PublicContext | SecretContext

# How a rotation is done (Circuit._route): not at all, with the job's own key for the step,
# with TenSEAL's power-of-two keys, or not possible in this context.
_WHOLE_TURN, _OWN_KEY, _POWERS_OF_TWO, _NO_KEY = "whole turn", "own key", "powers of two", "none"


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
    """Arithmetic on `Cipher`s under one context (public: no decryption here).

    Cheap to make: the SEAL evaluator and encoder are shared by every circuit of one context
    (both are stateless and safe to use from several threads)."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self._seal = context.raw.seal_context().data
        self._evaluator, self._encoder = _engine(context)
        self._relin = context.raw.relin_keys().data if context.keys.relin else None

    # -- conversions ---------------------------------------------------------------------------

    def ciphers(self, tensor: EncryptedTensor) -> list[Cipher]:
        """The tensor's ciphertexts: copies out of TenSEAL vectors, or a `SealTensor`'s own
        (shared: circuit operations write only to new ciphertexts)."""
        from fedhe.crypto.tensor import SealTensor  # tensor.py builds on this module

        self.context.check_same(tensor.fingerprint)
        if isinstance(tensor, SealTensor):
            return [
                Cipher(ct, size) for ct, size in zip(tensor.seal_ciphers, tensor.sizes, strict=True)
            ]
        return [Cipher(chunk.ciphertext()[0], chunk.size()) for chunk in tensor.chunks]

    def tensor(self, ciphers: Sequence[Cipher], shape: tuple[int, ...]) -> EncryptedTensor:
        """A tensor of these ciphertexts, still in SEAL form (converted to TenSEAL on use)."""
        from fedhe.crypto.tensor import SealTensor

        return SealTensor([c.raw for c in ciphers], [c.size for c in ciphers], shape, self.context)

    # -- arithmetic ------------------------------------------------------------------------------

    def multiply_sum(
        self, terms: Sequence[tuple[Cipher, float | np.ndarray]], scale: float
    ) -> Cipher:
        """Σ cipherᵢ ⊙ plainᵢ, rescaled once to exactly `scale` (all ciphers at one level and
        one scale). A plain operand is a number or a vector of one value per slot.

        Each plaintext is encoded at scale·prime/sᵢₙ (a number as a constant: no FFT), so the
        rescaled sum lands on `scale` with no bias. Terms whose plaintext encodes to zero are
        skipped (SEAL refuses a product that is exactly zero); an all-zero sum is a fresh
        encryption of zero at the next level."""
        if not terms:
            raise ParameterError("a product sum needs at least one term.")
        first = terms[0][0]
        self.check_rescalable(first, "a product")
        prime = self._last_prime(first.raw)
        plain_scale = scale * prime / first.scale
        total = None
        for cipher, operand in terms:
            self._check_like(cipher, first)
            plain = self._encode(operand, first.raw, plain_scale)
            if plain.is_zero():
                continue
            product = sealapi.Ciphertext(self._seal)
            self._evaluator.multiply_plain(cipher.raw, plain, product)
            total = product if total is None else self._add_into(total, product)
        return Cipher(self._rescaled(total, first.raw, scale), first.size)

    def product_sum(self, pairs: Sequence[tuple[Cipher, Cipher]]) -> Cipher:
        """Σ aᵢ ⊙ bᵢ (ciphertext × ciphertext), relinearized once and rescaled once: the
        products stay three-polynomial ciphertexts while they are added up. All ciphers at one
        level and one scale s; the result's scale is s²/prime, kept exact (as `square`)."""
        if self._relin is None:
            raise ParameterError(
                "multiplying two ciphertexts needs the relinearization key: declare the job "
                "with KeyRequest(relin=True)."
            )
        if not pairs:
            raise ParameterError("a product sum needs at least one term.")
        first = pairs[0][0]
        self.check_rescalable(first, "a ciphertext product")
        total = self._product(*pairs[0], first)
        for a, b in pairs[1:]:
            total = self._add_into(total, self._product(a, b, first))
        if total.is_transparent():  # the products cancelled exactly
            return Cipher(
                self._zero_below(first.raw, first.scale**2 / self._last_prime(first.raw)),
                first.size,
            )
        self._evaluator.relinearize_inplace(total, self._relin)
        self._evaluator.rescale_to_next_inplace(total)
        return Cipher(total, first.size)

    def _product(self, a: Cipher, b: Cipher, first: Cipher) -> sealapi.Ciphertext:
        """a ⊙ b, not relinearized (three polynomials), both checked to sit like `first`."""
        self._check_like(a, first)
        self._check_like(b, first)
        product = sealapi.Ciphertext(self._seal)
        if a.raw is b.raw:
            self._evaluator.square(a.raw, product)
        else:
            self._evaluator.multiply(a.raw, b.raw, product)
        return product

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
        recorded = b_raw.scale  # b may belong to a tensor: give its scale back afterwards
        b_raw.scale = a_raw.scale
        out = sealapi.Ciphertext(self._seal)
        try:
            self._evaluator.add(a_raw, b_raw, out)
        finally:
            b_raw.scale = recorded
        return Cipher(out, a.size)

    def add_plain(self, cipher: Cipher, operand: float | np.ndarray) -> Cipher:
        out = sealapi.Ciphertext(self._seal)
        plain = self._encode(operand, cipher.raw, cipher.scale)
        self._evaluator.add_plain(cipher.raw, plain, out)
        return Cipher(out, cipher.size)

    def rotate(self, cipher: Cipher, step: int) -> Cipher:
        """The slots moved left by `step`, cyclically over all N/2 slots (slot i gets slot
        i + step); a negative step moves right. Level and scale are unchanged.

        Uses the job's key for that step (`KeyRequest(rotations=…)`), else TenSEAL's
        power-of-two keys (`KeyRequest(galois=True)`: several key switches for other steps)."""
        keys, shift = self._galois(step)
        out = sealapi.Ciphertext(self._seal)
        if keys is None:  # a whole turn: a copy
            self._evaluator.mod_switch_to(cipher.raw, cipher.raw.parms_id(), out)
        else:
            self._evaluator.rotate_vector(cipher.raw, shift, keys, out)
        return Cipher(out, cipher.size)

    def conjugate(self, cipher: Cipher) -> Cipher:
        """Every slot's complex conjugate (one key switch): z + z̄ is twice the real part."""
        if not self.context.keys.conjugate:
            raise ParameterError(
                "conjugating needs the conjugation key: declare the job with "
                "KeyRequest(conjugate=True)."
            )
        out = sealapi.Ciphertext(self._seal)
        self._evaluator.complex_conjugate(cipher.raw, self.context.rotation_keys.keys, out)
        return Cipher(out, cipher.size)

    def rotate_sum(self, cipher: Cipher, steps: Sequence[int]) -> Cipher:
        """c + rot(c, s₁), then the same with s₂, …: with steps 1, 2, 4, … each slot i ends up
        holding the sum of slots i … i + 2^len − 1."""
        self.check_rotations(steps)
        total = cipher
        for step in steps:
            rotated = self.rotate(total, step)
            summed = sealapi.Ciphertext(self._seal)
            self._evaluator.add(total.raw, rotated.raw, summed)
            total = Cipher(summed, cipher.size)
        return total

    def check_rotations(self, steps: Sequence[int]) -> None:
        """Raise ParameterError, naming every missing step, unless this context can rotate by
        each of `steps`."""
        missing = [operator.index(s) for s in steps if self._route(s)[0] == _NO_KEY]
        if missing:
            raise ParameterError(
                f"no rotation keys for steps {sorted(set(missing))} in this context (it has "
                f"keys for steps {list(self.context.keys.rotations)}"
                f"{' and all powers of two' if self.context.keys.galois else ''}): declare "
                "the job with KeyRequest(rotations=(…)) naming every step it rotates by."
            )

    # -- helpers -----------------------------------------------------------------------------

    def _galois(self, step: int) -> tuple[sealapi.GaloisKeys | None, int]:
        """The keys to rotate by `step` and the step SEAL gets (None: a whole turn)."""
        route, shift = self._route(step)
        if route == _NO_KEY:
            raise ParameterError(
                f"no rotation keys for step {step}: declare the job with "
                "KeyRequest(rotations=(…)) naming every step it rotates by."
            )
        if route == _OWN_KEY:
            return self.context.rotation_keys.keys, shift
        if route == _POWERS_OF_TWO:
            return self.context.raw.galois_keys().data, shift
        return None, 0

    def _route(self, step: int) -> tuple[str, int]:
        """Which keys rotate by `step`, and the step SEAL gets; looks at the key request only
        (loading the keys, which may fail on corrupt bytes, is left to `_galois`)."""
        slots = self.context.params.slots
        shift = operator.index(step) % slots
        if shift == 0:
            return _WHOLE_TURN, 0
        if shift in {s % slots for s in self.context.keys.rotations}:
            return _OWN_KEY, shift
        if self.context.keys.galois:  # the shorter way round: fewer power-of-two rotations
            return _POWERS_OF_TWO, shift if shift <= slots // 2 else shift - slots
        return _NO_KEY, shift

    def check_rescalable(self, cipher: Cipher, what: str) -> None:
        """Raise ParameterError unless `cipher` keeps a prime to rescale a product by."""
        if cipher.level < 2:
            raise ParameterError(
                f"{what} needs a prime to rescale by, but the ciphertext keeps only its last "
                "one: encrypt with room for one more multiplication "
                "(encrypt_for_compute(…, multiplications=…)) or decrypt and re-encrypt first."
            )

    @staticmethod
    def _check_like(cipher: Cipher, first: Cipher) -> None:
        if cipher.raw.parms_id() != first.raw.parms_id() or cipher.scale != first.scale:
            raise ParameterError(
                f"terms of one product sum must share level and scale: got {cipher.level} "
                f"primes at scale {cipher.scale:g} and {first.level} at {first.scale:g}; bring "
                "them to one level first (EncryptedTensor.mod_switch_to)."
            )

    def _add_into(self, total: sealapi.Ciphertext, term: sealapi.Ciphertext) -> sealapi.Ciphertext:
        try:
            self._evaluator.add_inplace(total, term)
        except RuntimeError as err:  # exact cancellation: SEAL adds, then refuses the result
            if "transparent" not in str(err):
                raise
        return total

    def _rescaled(
        self, total: sealapi.Ciphertext | None, like: sealapi.Ciphertext, scale: float
    ) -> sealapi.Ciphertext:
        if total is None or total.is_transparent():
            return self._zero_below(like, scale)
        self._evaluator.rescale_to_next_inplace(total)
        total.scale = scale  # exact by construction: (scale·prime/s)·s / prime
        return total

    def _zero_below(self, like: sealapi.Ciphertext, scale: float) -> sealapi.Ciphertext:
        """A fresh encryption of zero one level below `like` (what TenSEAL does, too, when a
        product is exactly zero)."""
        parms_id = self._seal.get_context_data(like.parms_id()).next_context_data().parms_id()
        zero = sealapi.Ciphertext(self._seal)
        encryptor = sealapi.Encryptor(self._seal, self.context.raw.public_key().data)
        encryptor.encrypt_zero(parms_id, zero)
        zero.scale = scale
        return zero

    def _last_prime(self, raw: sealapi.Ciphertext) -> int:
        data = self._seal.get_context_data(raw.parms_id())
        return data.parms().coeff_modulus()[-1].value()

    def _encode(
        self, operand: float | np.ndarray, like: sealapi.Ciphertext, scale: float
    ) -> sealapi.Plaintext:
        plain = sealapi.Plaintext()
        if np.ndim(operand) == 0:
            # a number is encoded as a constant: the same value in every slot, no FFT
            self._encoder.encode(float(operand), like.parms_id(), scale, plain)
        else:
            flat = np.asarray(operand).ravel()
            kind = complex if np.iscomplexobj(flat) else float
            values = np.zeros(self.context.params.slots, dtype=kind)
            values[: flat.size] = flat
            self._encoder.encode(values.tolist(), like.parms_id(), scale, plain)
        return plain


# One evaluator and encoder per context (an encoder costs ~0.3 ms to build at N=8192). Weak
# keys: the engine does not keep the context, whose keys can weigh tens of MB, alive.
_ENGINES: weakref.WeakKeyDictionary[Context, tuple[sealapi.Evaluator, sealapi.CKKSEncoder]] = (
    weakref.WeakKeyDictionary()
)
_ENGINES_LOCK = threading.Lock()


def _engine(context: Context) -> tuple[sealapi.Evaluator, sealapi.CKKSEncoder]:
    with _ENGINES_LOCK:
        engine = _ENGINES.get(context)
        if engine is None:
            seal = context.raw.seal_context().data
            engine = (sealapi.Evaluator(seal), sealapi.CKKSEncoder(seal))
            _ENGINES[context] = engine
        return engine
