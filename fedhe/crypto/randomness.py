"""Randomness for masks: every value drawn from the operating system's CSPRNG (os.urandom).

numpy's default generator (PCG64) is fast and well seeded but predictable once its 128-bit
state is known; a mask that hides a model, a query answer or a distance should not be.
`SecureRandom` offers the few `numpy.random.Generator` methods the masks use, with the same
signatures, so mask code takes either (tests pass a seeded numpy generator).
"""

from __future__ import annotations

import math
import os

import numpy as np

_MANTISSA_BITS = 53


class SecureRandom:
    """uniform, normal and permutation from os.urandom (53 random bits per float)."""

    def random(self, size: int | tuple[int, ...] | None = None) -> np.ndarray | float:
        shape = () if size is None else ((size,) if isinstance(size, int) else tuple(size))
        count = math.prod(shape)
        raw = np.frombuffer(os.urandom(8 * count), dtype="<u8") >> np.uint64(64 - _MANTISSA_BITS)
        values = raw.astype(np.float64) * 2.0**-_MANTISSA_BITS  # uniform on [0, 1)
        return float(values[0]) if size is None else values.reshape(shape)

    def uniform(
        self, low: float = 0.0, high: float = 1.0, size: int | tuple[int, ...] | None = None
    ) -> np.ndarray | float:
        return low + (high - low) * self.random(size)

    def normal(
        self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] | None = None
    ) -> np.ndarray | float:
        """Box–Muller on two independent uniforms."""
        u1 = 1.0 - np.asarray(self.random(size))  # (0, 1]: log is finite
        u2 = np.asarray(self.random(size))
        values = loc + scale * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        return float(values) if size is None else values

    def standard_normal(self, size: int | tuple[int, ...] | None = None) -> np.ndarray | float:
        return self.normal(0.0, 1.0, size)

    def permutation(self, n: int) -> np.ndarray:
        return np.argsort(self.random(n), kind="stable")


def secure_random() -> SecureRandom:
    return SecureRandom()
