"""One module per job kind, each with its party, aggregator and key-holder steps side by side."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedhe.keyholder import DecryptionRequest, KeyHolder
from fedhe.tasks import aggregate, encrypted_model, linreg

Release = np.ndarray | dict[str, bytes]
KeyholderStep = Callable[[KeyHolder, DecryptionRequest], Release]

# What the key holder releases per output kind: the decrypted values unless a task says
# otherwise: the masked normal equations are solved there and only the coefficients leave; a
# masked encrypted model comes back re-encrypted, never in the clear.
KEYHOLDER_STEPS: dict[str, KeyholderStep] = {
    linreg.MASKED_OUTPUT: linreg.keyholder_solve,
    encrypted_model.REFRESH_OUTPUT: encrypted_model.keyholder_refresh,
}


def keyholder_release(keyholder: KeyHolder, request: DecryptionRequest) -> Release:
    step = KEYHOLDER_STEPS.get(request.output_kind, aggregate.keyholder_decrypt_sum)
    return step(keyholder, request)
