"""Deterministic kills of mutants of the tensor loader that only the fuzz test caught."""

import hashlib
import math
import re

import numpy as np
import pytest

from fedhe.crypto import encrypt, load_tensor
from fedhe.crypto.framing import frame, unframe
from fedhe.crypto.tensor import digest
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


def _plain(shape, body=None):
    header = {"kind": "plain", "shape": shape}
    return frame(b"FHET", 1, header, bytes(8) if body is None else body)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([2, -1], "tensor header has no valid shape: [2, -1]."),
        ([2, 1.0], "tensor header has no valid shape: [2, 1.0]."),
        ((1,), "tensor header has no valid shape: [1]."),  # JSON has no tuples: a list, valid
        ("1", "tensor header has no valid shape: '1'."),
        ([1 << 16, (1 << 16) + 1], "tensor shape [65536, 65537] is implausibly large."),
    ],
)
def test_a_header_shape_must_be_a_list_of_counts_of_plausible_size(shape, message):
    if shape == (1,):
        assert load_tensor(_plain(shape), None).shape == (1,)
        return
    with pytest.raises(InvalidCiphertextError, match=f"^{re.escape(message)}$"):
        load_tensor(_plain(shape), None)


def test_the_largest_plausible_shape_is_checked_against_its_bytes_not_refused_as_large():
    message = f"plaintext tensor of shape (65536, 65536) needs {8 << 32} bytes, got 8."
    with pytest.raises(InvalidCiphertextError, match=f"^{re.escape(message)}$"):
        load_tensor(_plain([1 << 16, 1 << 16]), None)
    message = "plaintext tensor of shape (0,) needs 0 bytes, got 8."
    with pytest.raises(InvalidCiphertextError, match=f"^{re.escape(message)}$"):
        load_tensor(_plain([0]), None)


def test_plaintext_values_are_little_endian_float64():
    assert load_tensor(_plain([1], np.array([1.5], dtype="<f8").tobytes()), None).values[0] == 1.5


def test_the_audit_digest_is_32_hex_digits():
    assert len(digest(b"")) == 32 and digest(b"x") == hashlib.sha256(b"x").hexdigest()[:32]


def _reframed(public, change):
    header, body = _split(encrypt(public, np.arange(10.0)).to_bytes())
    change(header)
    return frame(b"FHET", 1, header, body)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h: h.update(extra=1), "ciphertext header has unknown fields ['extra']."),
        (lambda h: h.pop("fingerprint"), "ciphertext header has no context fingerprint."),
        (lambda h: h.update(packing="odd"), "unknown packing 'odd'; expected one of"),
        (lambda h: h.update(chunk_bytes=[0]), "shape (10,) needs 1 ciphertexts, the header"),
        (lambda h: h.update(chunk_bytes=[1.5]), "shape (10,) needs 1 ciphertexts, the header"),
        (lambda h: h.update(chunk_bytes=[1, 1]), "shape (10,) needs 1 ciphertexts, the header"),
        (lambda h: h.update(chunk_bytes=1), "shape (10,) needs 1 ciphertexts, the header"),
        (lambda h: h.update(chunk_bytes=[1]), "ciphertext body has "),
    ],
    ids=["unknown", "no-fingerprint", "packing", "zero", "float", "count", "not-list", "sum"],
)
def test_a_ciphertext_header_that_lies_is_refused_by_name(public, change, message):
    with pytest.raises(InvalidCiphertextError, match=f"^{re.escape(message)}"):
        load_tensor(_reframed(public, change), public)


def test_a_length_mismatch_says_truncated_or_padded(public):
    header, body = _split(encrypt(public, np.arange(10.0)).to_bytes())
    message = (
        f"ciphertext body has {len(body) - 1} bytes, the header announces {len(body)}: "
        "truncated or padded in transit."
    )
    with pytest.raises(InvalidCiphertextError, match=f"^{re.escape(message)}$"):
        load_tensor(frame(b"FHET", 1, header, body[:-1]), public)


def test_plaintext_where_a_ciphertext_is_expected_names_the_disagreement(public):
    message = (
        "expected a ckks tensor, got kind 'plain': sender and receiver disagree on whether this "
        "job is encrypted."
    )
    with pytest.raises(InvalidCiphertextError, match=f"^{re.escape(message)}$"):
        load_tensor(_plain([1]), public)


def test_a_ciphertext_at_another_level_than_a_step_needs_says_how_to_encrypt(public):
    data = encrypt(public, np.arange(10.0)).to_bytes()
    loaded = load_tensor(data, public)
    assert load_tensor(data, public, level=loaded.level).level == loaded.level  # its own level
    needed = loaded.level + 1
    message = (
        f"ciphertexts keep {loaded.level} primes at scale 2^{math.log2(loaded.scale):g}; this "
        f"step needs {needed} primes at 2^{public.params.scale_bits}: encrypt with room for "
        f"{needed - 1} multiplications."
    )
    with pytest.raises(InvalidCiphertextError, match=f"^{re.escape(message)}$"):
        load_tensor(data, public, level=needed)
