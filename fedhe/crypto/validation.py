"""The one check of values before they are encoded: finite, and within what CKKS keeps exact.

CKKS overflows silently (a value past the bound decrypts to garbage without any error), so
every encoder checks its input here first: tensors (`check_values`), KNN points, targets and
queries, MLP inputs.
"""

from __future__ import annotations

import numpy as np

from fedhe.errors import ValueRangeError

FIX_DATA = "check the data or the local training for divergence"
FIX_BOUND = "clip or rescale the values, or use parameters with more headroom"


def check_range(
    values: np.ndarray,
    bound: float,
    *,
    what: str = "value",
    fix: str = FIX_BOUND,
    nonfinite_fix: str = FIX_DATA,
) -> np.ndarray:
    """`values` as float64, once every one is finite and |value| ≤ `bound` (np.inf: finite only).

    Raises ValueRangeError naming `what`, the offending value and the bound, and ending with
    the fix: `nonfinite_fix` for NaN or infinity, `fix` for a magnitude past the bound."""
    array = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(array)
    if not np.all(finite):
        bad = int(np.flatnonzero(~finite.ravel())[0])
        raise ValueRangeError(
            f"{what} at flat index {bad} is {array.ravel()[bad]}: NaN and infinity cannot be "
            f"encrypted; {nonfinite_fix}."
        )
    peak = float(np.max(np.abs(array))) if array.size else 0.0
    if peak > bound:
        raise ValueRangeError(f"largest |{what}| {peak:.6g} exceeds the bound {bound:.6g}: {fix}.")
    return array
