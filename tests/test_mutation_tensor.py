"""Deterministic kills of mutants of the tensor loader that only the fuzz test caught."""

import numpy as np
import pytest

from fedhe.crypto import encrypt, load_tensor
from fedhe.crypto.framing import frame, unframe
from fedhe.errors import InvalidCiphertextError


def _split(data):
    return unframe(data, magic=b"FHET", version=1, what="t", error=InvalidCiphertextError)


@pytest.mark.parametrize("where", [0.25, 0.5, 0.75])
def test_altered_body_bytes_in_an_intact_frame_are_refused_by_the_digest(public, where):
    """One ciphertext byte changed, the header (sizes, digest) and the length untouched: only
    the body digest can tell, and the refusal names it."""
    data = encrypt(public, np.arange(10.0)).to_bytes()
    header, body = _split(data)
    position = int(len(body) * where)
    altered = body[:position] + bytes([body[position] ^ 0x01]) + body[position + 1 :]
    forged = frame(b"FHET", 1, header, altered)
    assert len(forged) == len(data) and _split(forged)[0] == header
    with pytest.raises(InvalidCiphertextError, match="do not match their digest"):
        load_tensor(forged, public)
    assert load_tensor(data, public).size == 10  # the intact bytes load
