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
    def depth(self) -> int:
        """Number of multiplications (rescales) a fresh ciphertext can take."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def max_abs_value(self) -> float:
        """Largest |value| a ciphertext at its last level decrypts correctly (worst case)."""
        return 2.0 ** (self.coeff_mod_bit_sizes[0] - self.scale_bits - 2)

    def abs_error_bound(self, n_terms: int = 1) -> float:
        """A conservative bound of the absolute slot error of a sum of `n_terms` fresh ciphertexts."""
        return n_terms * 2.0 ** (FRESH_NOISE_BITS - self.scale_bits)

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


def params_for_sum(
    max_abs_sum: float, *, precision_bits: int = 20, poly_modulus_degree: int = 4096
) -> CKKSParams:
    """The smallest single-level parameters whose sums up to `max_abs_sum` keep `precision_bits`.

    Addition-only jobs need no rescale, so one data prime plus the special prime suffice:
    each ciphertext travels at its only level, the cheapest on the wire.
    """
    if not math.isfinite(max_abs_sum) or max_abs_sum <= 0:
        raise ParameterError(f"max_abs_sum must be a positive finite number, got {max_abs_sum!r}.")
    scale_bits = max(FRESH_NOISE_BITS + precision_bits, 20)
    data_bits = scale_bits + math.ceil(math.log2(max_abs_sum)) + 2
    limit = MAX_LOG_Q_128.get(poly_modulus_degree, 0)
    special_bits = min(MAX_PRIME_BITS, limit - data_bits)
    if data_bits > MAX_PRIME_BITS or special_bits < data_bits:
        raise ParameterError(
            f"sums up to {max_abs_sum:g} with {precision_bits} bits of precision need a "
            f"{data_bits}-bit data prime, which does not fit N={poly_modulus_degree} under "
            "the 128-bit table: lower precision_bits or the bound (clip or rescale values)."
        )
    return CKKSParams(poly_modulus_degree, (data_bits, special_bits), scale_bits)


# The default for secure aggregation: sums up to 2^20 in magnitude at 2^-17 absolute error,
# 2048 values per 54-bit ciphertext (~27 bytes per value on the wire).
AGGREGATION_PARAMS = CKKSParams(4096, (54, 55), 32)
