"""Four quantized values per CKKS slot, for tensors that are only summed (BatchCrypt-style).

A slot holds a complex number; its real and imaginary part each hold two signed integers,
``hi·2^lane + lo``, encoded at scale ``2^guard``. Values are quantized to integers with a
power-of-two step per segment (`Lanes.steps`), so integers such as sample counts stay exact
while the step is at most 1. Sums of up to `terms` such tensors decode exactly: the guard bits
keep the CKKS noise (measured: at most 2^13.6 over 4096 fresh slots, N=8192, level 1, growing
as √terms) below a quarter unit, and each lane keeps room for the sum of `terms` rounded shares.

Exact decoding means the key holder releases a function of the plaintext sum alone, not of the
ciphertext noise (the value rounded away), so no flooding noise is needed on these outputs.
The price is quantization: each party's value is off by at most half a step, and the step is
the segment's sum bound over 2^(lane−1) (about 2^-17 of the bound for 10 parties).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedhe.errors import InvalidCiphertextError, ParameterError, ValueRangeError

NOISE_BITS = 14  # fresh encryption noise at level 1: max 2^13.0–2^13.6 per ciphertext, measured
MARGIN_BITS = 2  # noise at most ~¼ unit after the guard; rounding fails only beyond ½
MAX_RESIDUAL = 0.375  # decrypted parts farther than this from an integer: noise too large
MIN_ROOM = 2**12  # fewer quantization levels than this is too coarse to be worth it
VALUES_PER_SLOT = 4


@dataclass(frozen=True)
class Lanes:
    """How values sit in lanes: guard bits, lane width, and (stop, log2 step) per segment."""

    guard_bits: int
    lane_bits: int
    steps: tuple[tuple[int, int], ...]

    @classmethod
    def plan(cls, prime_bits: int, segments: Sequence[tuple[int, float]], terms: int) -> Lanes:
        """Lanes for sums of `terms` tensors on one `prime_bits` prime (the lowest level).

        `segments` lists (stop, bound) in order: values before `stop` (and after the previous
        stop) have sums bounded by `bound` in absolute value.
        """
        if terms < 1:
            raise ParameterError(f"a sum needs at least one term, got {terms}.")
        guard = min_guard_bits(terms)
        lane = (prime_bits - 1 - guard) // 2  # |hi·2^lane + lo|·2^guard < 2^(prime_bits − 2)
        room = 2 ** (lane - 1) - terms  # rounding adds at most ½ per term to a lane's sum
        if room < MIN_ROOM:
            raise ParameterError(
                f"a {prime_bits}-bit prime leaves {max(room, 0)} quantization levels for sums "
                f"of {terms} terms; use complex packing for this many parties."
            )
        steps, start = [], 0
        for stop, bound in segments:
            if not stop > start or not (bound > 0 and math.isfinite(bound)):
                raise ParameterError(f"bad lane segment (stop={stop}, bound={bound}).")
            steps.append((int(stop), math.ceil(math.log2(bound / room))))
            start = stop
        return cls(guard, lane, tuple(steps))

    @property
    def size(self) -> int:
        return self.steps[-1][0]

    @property
    def scale(self) -> float:
        return 2.0**self.guard_bits

    def step_of_each(self) -> np.ndarray:
        """The quantization step of every value."""
        out = np.empty(self.size)
        start = 0  # pragma: no mutate (equivalent: out[None:stop] is out[0:stop])
        for stop, log2_step in self.steps:
            out[start:stop] = math.ldexp(1.0, log2_step)
            start = stop
        return out

    def pack(self, values: np.ndarray) -> np.ndarray:
        """Quantize (round to the nearest step) and pack: one complex slot per four values."""
        # no mutate: equivalent (dtype: the same array for numbers; reshape takes any -n)
        flat = np.asarray(values, dtype=np.float64).ravel()  # pragma: no mutate
        if flat.size != self.size:
            raise ValueRangeError(f"lanes hold {self.size} values, got {flat.size}.")
        quantized = np.rint(flat / self.step_of_each())
        # Equivalent mutants survive here: initial=None or none (size >= 1: never empty).
        if np.max(np.abs(quantized), initial=0) >= 2 ** (self.lane_bits - 1):
            raise ValueRangeError("a value exceeds its lane: it is larger than the sum bound.")
        # An equivalent mutant survives here: max(size, 2) pads the same (size >= 1).
        padded = np.zeros(VALUES_PER_SLOT * math.ceil(max(flat.size, 1) / VALUES_PER_SLOT))
        padded[: flat.size] = quantized
        q = padded.reshape(-1, VALUES_PER_SLOT)  # pragma: no mutate
        shift = 2.0**self.lane_bits
        return (q[:, 0] * shift + q[:, 1]) + 1j * (q[:, 2] * shift + q[:, 3])

    def unpack(self, slots: np.ndarray) -> np.ndarray:
        """Round decrypted slots to integers, split the lanes, and scale back by each step."""
        slots = np.asarray(slots, dtype=np.complex128)  # pragma: no mutate (equivalent)
        if slots.size * VALUES_PER_SLOT < self.size:
            raise InvalidCiphertextError(
                f"{slots.size} slots cannot hold the {self.size} values these lanes announce."
            )
        real, imag = _split(slots.real, self.lane_bits), _split(slots.imag, self.lane_bits)
        return np.column_stack([real, imag]).ravel()[: self.size] * self.step_of_each()

    def to_dict(self) -> dict[str, object]:
        return {
            "guard_bits": self.guard_bits,
            "lane_bits": self.lane_bits,
            "steps": [list(s) for s in self.steps],
        }

    @classmethod
    def from_dict(cls, data: object) -> Lanes:
        try:
            lanes = cls(
                int(data["guard_bits"]),  # type: ignore[index]
                int(data["lane_bits"]),  # type: ignore[index]
                tuple((int(stop), int(k)) for stop, k in data["steps"]),  # type: ignore[index]
            )
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidCiphertextError(f"malformed lane record {data!r}: {err}") from err
        if not lanes.steps or not 0 < lanes.lane_bits < 32 or not 0 < lanes.guard_bits < 40:
            raise InvalidCiphertextError(f"implausible lane record {data!r}.")
        return lanes


def min_guard_bits(terms: int) -> int:
    """Guard bits that keep the noise of a sum of `terms` fresh ciphertexts near ¼ unit."""
    return math.ceil(NOISE_BITS + math.log2(max(terms, 1)) / 2) + MARGIN_BITS


def _split(parts: np.ndarray, lane_bits: int) -> np.ndarray:
    """Two signed lanes of each rounded part: (hi, lo) with parts = hi·2^lane + lo.

    Refuses parts far from an integer: noise that large (a ciphertext with amplified noise, or
    a sum of more terms than planned) would make the rounding wrong and leak the noise."""
    rounded = np.rint(parts)
    # Equivalent mutants survive here: initial=None or none (unpack never passes no slots).
    residual = float(np.max(np.abs(parts - rounded), initial=0.0))
    if residual > MAX_RESIDUAL:
        raise InvalidCiphertextError(
            f"decrypted lanes are {residual:.3f} from an integer (at most {MAX_RESIDUAL}): the "
            "ciphertext noise exceeds what the lanes' guard bits absorb."
        )
    total = rounded.astype(np.int64)
    half = 1 << (lane_bits - 1)
    # An equivalent mutant survives here: total − half (they differ by 2^lane, masked away).
    lo = ((total + half) & ((1 << lane_bits) - 1)) - half
    hi = (total - lo) >> lane_bits
    return np.column_stack([hi, lo]).astype(np.float64)  # pragma: no mutate (None: float64)
