"""Deterministic kills of mutants of the tensor loader that only the fuzz test caught."""

import hashlib
import itertools
import math
import re

import numpy as np
import pytest
import tenseal as ts

from fedhe.crypto import encrypt, load_tensor
from fedhe.crypto.framing import frame, unframe
from fedhe.crypto.lanes import Lanes
from fedhe.crypto.tensor import QUANTIZED, check_values, digest, stack
from fedhe.crypto.validation import FIX_BOUND
from fedhe.errors import InvalidCiphertextError, ShapeError, ValueRangeError
from tests.conftest import SMALL_PARAMS


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


def _exactly(message):
    return f"^{re.escape(message)}$"


def _with_chunks(context, size, blobs):
    """A REAL-packed tensor of `size` values whose ciphertexts are `blobs`, digest recomputed:
    only the per-ciphertext checks stand between these bytes and a loaded tensor."""
    header, _ = _split(encrypt(context, np.zeros(size)).to_bytes())
    body = b"".join(blobs)
    header.update(chunk_bytes=[len(b) for b in blobs], body_sha256=hashlib.sha256(body).hexdigest())
    return frame(b"FHET", 1, header, body)


def _blobs(data):
    header, body = _split(data)
    offsets = np.cumsum([0, *header["chunk_bytes"]])
    return [body[a:b] for a, b in itertools.pairwise(offsets)]


def test_bytes_that_are_no_tensor_frame_say_so():
    message = "these bytes are not a fedhe tensor (bad magic b'XXXX')."
    with pytest.raises(InvalidCiphertextError, match=_exactly(message)):
        load_tensor(b"XXXX" + _plain([1])[4:], None)


def test_an_altered_body_is_refused_with_the_digest_message_exactly(public):
    header, body = _split(encrypt(public, np.arange(3.0)).to_bytes())
    message = "ciphertext bytes do not match their digest: corrupted in transit."
    with pytest.raises(InvalidCiphertextError, match=_exactly(message)):
        load_tensor(frame(b"FHET", 1, header, bytes(len(body))), public)


def test_a_ciphertext_that_does_not_load_is_named_by_its_index(public):
    size = SMALL_PARAMS.slots + 1
    first = _blobs(encrypt(public, np.zeros(size)).to_bytes())[0]
    with pytest.raises(InvalidCiphertextError, match=r"^ciphertext 1 does not load: .+\.$"):
        load_tensor(_with_chunks(public, size, [first, bytes(64)]), public)


def test_a_ciphertext_holding_another_count_than_the_shape_needs_is_refused(public):
    (blob,) = _blobs(encrypt(public, np.arange(10.0)).to_bytes())
    message = "ciphertext 0 holds 10 values, expected 5."
    with pytest.raises(InvalidCiphertextError, match=_exactly(message)):
        load_tensor(_with_chunks(public, 5, [blob]), public)


def test_an_unrelinearized_product_is_refused_as_three_polynomials(agg_public):
    params = agg_public.params  # other keys, the same primes: the ciphertext loads under these
    raw = ts.context(
        ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree, -1, params.coeff_mod_bit_sizes
    )
    raw.auto_relin = False
    raw.auto_rescale = False
    vector = ts.ckks_vector(raw, [1.0, 2.0], scale=2.0**30)
    product = vector * vector
    message = "ciphertext 0 has 3 polynomials, expected 2."
    with pytest.raises(InvalidCiphertextError, match=_exactly(message)):
        load_tensor(_with_chunks(agg_public, 2, [product.serialize()]), agg_public)


@pytest.mark.parametrize(
    ("scale_bits", "refused"),
    [(11, "2048"), (12, None), (60, None), (61, "2.30584e+18")],
    ids=["below", "lowest", "highest", "above"],
)
def test_a_ciphertext_scale_must_lie_within_2_to_12_and_2_to_60(agg_public, scale_bits, refused):
    blob = ts.ckks_vector(agg_public.raw, [1.0, 2.0], scale=2.0**scale_bits).serialize()
    data = _with_chunks(agg_public, 2, [blob])
    if refused is None:
        assert load_tensor(data, agg_public).scale == 2.0**scale_bits
        return
    message = f"ciphertext 0 has an implausible scale {refused}."
    with pytest.raises(InvalidCiphertextError, match=_exactly(message)):
        load_tensor(data, agg_public)


def test_ciphertexts_of_one_tensor_at_mixed_scales_are_refused(public):
    size = SMALL_PARAMS.slots + 1
    nominal = encrypt(public, np.zeros(size))
    fine = encrypt(public, np.zeros(size), sum_bound=1.0)
    assert nominal.scale != fine.scale
    blobs = [_blobs(nominal.to_bytes())[0], _blobs(fine.to_bytes())[1]]
    infos = sorted({(nominal.level, nominal.scale), (fine.level, fine.scale)})
    message = f"ciphertexts of one tensor sit at mixed levels and scales {infos}."
    with pytest.raises(InvalidCiphertextError, match=_exactly(message)):
        load_tensor(_with_chunks(public, size, blobs), public)


def _quantized_10(public, bound):
    lanes = Lanes.plan(SMALL_PARAMS.coeff_mod_bit_sizes[0], [(10, bound)], 2)
    return lanes, encrypt(public, np.ones(10), sum_bound=bound, packing=QUANTIZED, lanes=lanes)


def test_a_tensor_quantized_with_other_lanes_names_the_likely_cause(public):
    _, tensor = _quantized_10(public, 10.0)
    other, _ = _quantized_10(public, 20.0)
    message = (
        "tensor is quantized with other lanes or steps than this step expects: the sender used "
        "another sum bound or number of parties."
    )
    with pytest.raises(InvalidCiphertextError, match=_exactly(message)):
        load_tensor(tensor.to_bytes(), public, lanes=other)


def test_lanes_for_another_count_than_the_header_shape_are_refused(public):
    """Ten values in lanes, a header shape of nine: the same three slots, but not one tensor."""
    _, tensor = _quantized_10(public, 10.0)
    header, body = _split(tensor.to_bytes())
    header["shape"] = [9]
    message = "lanes for 10 values, tensor of shape (9,)."
    with pytest.raises(InvalidCiphertextError, match=_exactly(message)):
        load_tensor(frame(b"FHET", 1, header, body), public)


def test_a_sum_bound_check_honours_the_minimum_scale_and_names_the_mismatch(agg_public):
    """At N=8192 sums up to 2^20 use level 2 at 2^60, or level 1 at 2^33 when 30 bits of
    scale are enough: the receiver must apply the same minimum as the sender."""
    data = encrypt(agg_public, np.ones(3), sum_bound=2.0**20, min_scale_bits=30).to_bytes()
    loaded = load_tensor(data, agg_public, sum_bound=2.0**20, min_scale_bits=30)
    assert (loaded.level, loaded.scale) == (1, 2.0**33)
    message = (
        "ciphertexts keep 1 primes at scale 2^33; sums bounded by 1.04858e+06 use level 2 at "
        "2^60: the sender used another bound, and adding them would overflow or lose precision."
    )
    with pytest.raises(InvalidCiphertextError, match=_exactly(message)):
        load_tensor(data, agg_public, sum_bound=2.0**20)


def test_values_past_the_bound_are_refused_with_the_parameters_fix():
    message = (
        "largest |value| 3 exceeds the bound 2: these CKKS parameters keep values exact only "
        f"within it; {FIX_BOUND}."
    )
    with pytest.raises(ValueRangeError, match=_exactly(message)):
        check_values(np.array([1.0, -3.0]), 2.0)


def test_only_tensors_filling_whole_ciphertexts_stack(public):
    slots = SMALL_PARAMS.slots
    whole = [encrypt(public, np.full(slots, float(i))) for i in range(2)]
    assert stack(whole).shape == (2, slots)
    message = (
        f"tensors of 10 values do not fill whole ciphertexts of {slots} values: pad them to a "
        "multiple before stacking."
    )
    with pytest.raises(ShapeError, match=_exactly(message)):
        stack([encrypt(public, np.zeros(10)), encrypt(public, np.zeros(10))])
