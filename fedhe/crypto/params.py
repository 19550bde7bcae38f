"""CKKS parameter sets, checked against the 128-bit security table before any key exists."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from fedhe.errors import ParameterError

# HomomorphicEncryption.org standard, 128-bit classical security, ternary secrets:
# the largest total coefficient modulus (bits) for each ring degree N.
MAX_LOG_Q_128: dict[int, int] = {4096: 109, 8192: 218, 16384: 438, 32768: 881}

# Coefficient-domain noise of a fresh public-key encryption, measured at N=4096..16384
# (about 2^13); kept as a conservative bound for tolerances and noise flooding.
FRESH_NOISE_BITS = 15

MIN_PRIME_BITS = 20
MAX_PRIME_BITS = 60


@dataclass(frozen=True)
class CKKSParams:
    """A CKKS parameter set: ring degree, modulus chain and scale.

    The last prime of `coeff_mod_bit_sizes` is SEAL's special (key-switching) prime; the
    others are data primes, consumed one per rescale. A ciphertext at its lowest level keeps
    only the first prime, so `|value| * 2**scale_bits` must stay below half of it.
    """

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes)
        )
        check_security(self.poly_modulus_degree, self.coeff_mod_bit_sizes)
        if not 20 <= self.scale_bits <= MAX_PRIME_BITS:
            raise ParameterError(
                f"scale_bits={self.scale_bits} is outside [20, 60]: scales below 2^20 lose "
                "precision (see TENSEAL-NOTES), above 2^60 do not fit a prime; pick 30-50."
            )
        if self.scale_bits >= self.coeff_mod_bit_sizes[0]:
            raise ParameterError(
                f"scale 2^{self.scale_bits} leaves no room for values below the first prime "
                f"(2^{self.coeff_mod_bit_sizes[0]}): raise the first prime or lower scale_bits."
            )

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return 2.0**self.scale_bits

    @property
    def depth(self) -> int:
        """Number of multiplications (rescales) a fresh ciphertext can take."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def max_abs_value(self) -> float:
        """Largest |value| a ciphertext at its lowest level decrypts correctly (worst case)."""
        return self.max_abs_at(1)

    def max_abs_at(self, level: int) -> float:
        """Largest |value| a ciphertext keeping the first `level` primes decrypts correctly.

        Decoding is exact while |value|·scale stays below a quarter of the remaining modulus
        (half for the sign, half as margin for noise and for slots that add up in one
        coefficient).
        """
        if not 1 <= level <= self.depth + 1:
            raise ParameterError(f"level {level} is outside 1..{self.depth + 1} for {self}.")
        return 2.0 ** (sum(self.coeff_mod_bit_sizes[:level]) - self.scale_bits - 2)

    def level_for(self, max_abs: float) -> int:
        """The fewest primes that hold values up to `max_abs`: the cheapest level to send."""
        for level in range(1, self.depth + 2):
            if max_abs <= self.max_abs_at(level):
                return level
        raise ParameterError(
            f"values up to {max_abs:.6g} exceed the largest bound "
            f"{self.max_abs_at(self.depth + 1):.6g} these parameters hold; scale the values "
            "down or choose a larger modulus."
        )

    def abs_error_bound(self, n_terms: int = 1) -> float:
        """A conservative bound of the absolute error of a sum of `n_terms` fresh ciphertexts."""
        return n_terms * 2.0 ** (FRESH_NOISE_BITS - self.scale_bits)

    def encoding_for(self, sum_bound: float, min_scale_bits: int | None = None) -> tuple[int, int]:
        """(level, scale_bits) for sums up to `sum_bound`.

        The fewest primes that hold the bound at `min_scale_bits` (default: the nominal scale),
        the fewest bytes; then the largest scale those primes leave room for (at most 60
        bits): more precision at no cost in size.
        """
        wanted = self.scale_bits if min_scale_bits is None else min_scale_bits
        magnitude_bits = max(0, math.ceil(math.log2(sum_bound))) if sum_bound > 0 else 0
        for level in range(1, self.depth + 2):
            room = sum(self.coeff_mod_bit_sizes[:level]) - 2 - magnitude_bits
            if room >= wanted:
                return level, min(room, MAX_PRIME_BITS)
        raise ParameterError(
            f"sums up to {sum_bound:.6g} at scale 2^{wanted} exceed what these parameters "
            f"hold ({sum(self.coeff_mod_bit_sizes[:-1])} bits of modulus); lower the bound or "
            "the precision, or choose a larger modulus."
        )

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> CKKSParams:
        try:
            return cls(
                poly_modulus_degree=int(data["poly_modulus_degree"]),  # type: ignore[arg-type]
                coeff_mod_bit_sizes=tuple(data["coeff_mod_bit_sizes"]),  # type: ignore[arg-type]
                scale_bits=int(data["scale_bits"]),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ParameterError(f"malformed CKKS parameter record {data!r}: {err}") from err


def check_security(poly_modulus_degree: int, coeff_mod_bit_sizes: tuple[int, ...]) -> None:
    """Refuse any (N, modulus chain) outside the 128-bit table."""
    if poly_modulus_degree not in MAX_LOG_Q_128:
        raise ParameterError(
            f"poly_modulus_degree={poly_modulus_degree} is not supported; use one of "
            f"{sorted(MAX_LOG_Q_128)} (128-bit security table)."
        )
    if len(coeff_mod_bit_sizes) < 2:
        raise ParameterError(
            f"coeff_mod_bit_sizes={list(coeff_mod_bit_sizes)} needs at least two primes: "
            "one data prime and SEAL's special prime."
        )
    bad = [b for b in coeff_mod_bit_sizes if not MIN_PRIME_BITS <= b <= MAX_PRIME_BITS]
    if bad:
        raise ParameterError(
            f"prime sizes {bad} are outside [{MIN_PRIME_BITS}, {MAX_PRIME_BITS}] bits."
        )
    log_q = sum(coeff_mod_bit_sizes)
    limit = MAX_LOG_Q_128[poly_modulus_degree]
    if log_q > limit:
        raise ParameterError(
            f"total modulus of {log_q} bits exceeds the 128-bit limit of {limit} bits for "
            f"N={poly_modulus_degree}; drop a prime, shrink primes or double N."
        )


# The default for secure aggregation, N=8192, scale 2^35. A ciphertext keeps only the primes its
# sum needs (`level_for`): sums up to 2^18 travel on the 55-bit first prime alone (~30 bytes per
# value), up to 2^68 on two primes, up to 2^121 on three. Absolute error of a fresh value ~2^-20.
AGGREGATION_PARAMS = CKKSParams(8192, (55, 50, 53, 60), 35)


# For jobs that multiply (the encrypted model of linreg/logreg): primes sized to the scale, so
# each ciphertext × plaintext product rescales back to 2^40; two multiplications before a
# refresh, values up to 2^18 at the last level.
MODEL_PARAMS = CKKSParams(8192, (60, 40, 40, 60), 40)
