"""One module per job kind, each with its party, aggregator and key-holder steps side by side."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedhe.keyholder import DecryptionRequest, KeyHolder
from fedhe.tasks import aggregate, linreg

KeyholderStep = Callable[[KeyHolder, DecryptionRequest], np.ndarray]

# What the key holder releases per output kind: the decrypted sum unless a task says otherwise
# (the masked normal equations are solved there, and only the coefficients leave).
KEYHOLDER_STEPS: dict[str, KeyholderStep] = {linreg.MASKED_OUTPUT: linreg.keyholder_solve}


def keyholder_release(keyholder: KeyHolder, request: DecryptionRequest) -> np.ndarray:
    step = KEYHOLDER_STEPS.get(request.output_kind, aggregate.keyholder_decrypt_sum)
    return step(keyholder, request)
