"""Deterministic kills of the mutants of fedhe.crypto.context's load and validation paths that
the crypto and hardening tests let through (issue 18): key requests read from a header, the
header's context size and rotation keys, secret-key refusal, the real SEAL parameters checked
against the 128-bit table and against the header, and the errors (class and wording) each
defect raises."""

from __future__ import annotations

import re

import pytest
import tenseal as ts

from fedhe.crypto import CKKSParams, KeyRequest, PublicContext, SecretContext, generate_keys
from fedhe.crypto.context import CONTEXT_MAGIC, CONTEXT_VERSION, SealParams, check_real_params
from fedhe.crypto.framing import frame, unframe
from fedhe.errors import ContextMismatchError, ParameterError, SecretKeyLeakError
from tests.conftest import SMALL_PARAMS

PUBLIC_FIX = "fetch the job's public context from the key holder again"
KEY_FILE_FIX = "restore the key file from a backup or declare the job under a new id"
EVAL_KEYS = KeyRequest(relin=True, rotations=(2, 1), conjugate=True)


@pytest.fixture(scope="module")
def evaluating():
    """A key pair with every kind of evaluation key, rotation keys included (N=4096: fast)."""
    return generate_keys(SMALL_PARAMS, EVAL_KEYS)


def _split(data: bytes) -> tuple[dict, bytes]:
    return unframe(
        data, magic=CONTEXT_MAGIC, version=CONTEXT_VERSION, what="t", error=ParameterError
    )


def _reframe(data: bytes, *, drop: tuple[str, ...] = (), payload: bytes | None = None, **set_):
    """The same context with header entries dropped or replaced, or another payload."""
    header, body = _split(data)
    header = {k: v for k, v in header.items() if k not in drop} | set_
    return frame(CONTEXT_MAGIC, CONTEXT_VERSION, header, body if payload is None else payload)


def _exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


# --- KeyRequest ------------------------------------------------------------------------------


def test_a_key_request_keeps_its_rotation_steps_sorted_unique_and_integral():
    assert KeyRequest(rotations=[3, 1, 3, "2"]).rotations == (1, 2, 3)  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, KeyRequest()),
        ({"relin": True}, KeyRequest(relin=True)),
        ({"galois": True}, KeyRequest(galois=True)),
        ({"rotations": [5, -1]}, KeyRequest(rotations=(-1, 5))),
        ({"conjugate": True}, KeyRequest(conjugate=True)),
        (EVAL_KEYS.to_dict(), EVAL_KEYS),
    ],
)
def test_a_key_request_reads_each_field_and_defaults_the_missing_ones_to_none(data, expected):
    assert KeyRequest.from_dict(data) == expected


def test_a_malformed_key_request_names_itself():
    with pytest.raises(ParameterError, match=r"^malformed key request \{'rotations': \['x'\]\}: "):
        KeyRequest.from_dict({"rotations": ["x"]})


# --- check_same --------------------------------------------------------------------------------


def test_a_foreign_fingerprint_is_refused_naming_both_fingerprints_and_the_fix(public):
    mine = public.fingerprint
    message = (
        f"ciphertext was made under context abcdefabcdef…, not this job's {mine[:12]}…: it "
        "comes from another key pair or parameter set. Fetch the job's public context again "
        "and re-encrypt."
    )
    with pytest.raises(ContextMismatchError, match=_exactly(message)):
        public.check_same("abcdef" * 5)
    public.check_same(mine)


# --- round trips: keys, rotation keys, scale ---------------------------------------------------


def test_a_public_context_keeps_its_evaluation_keys_rotation_keys_and_scale(evaluating):
    data = evaluating.public().to_bytes()
    loaded = PublicContext.from_bytes(data)
    assert loaded.keys == EVAL_KEYS
    assert loaded.rotation_key_bytes == evaluating.rotation_key_bytes != b""
    assert loaded.fingerprint == evaluating.fingerprint
    assert loaded.raw.global_scale == 2.0**SMALL_PARAMS.scale_bits
    assert loaded.rotation_keys is not None  # they load for the steps the header names


def test_a_secret_context_keeps_its_evaluation_keys_rotation_keys_and_scale(evaluating):
    loaded = SecretContext.from_secret_bytes(evaluating.to_secret_bytes())
    assert loaded.keys == EVAL_KEYS
    assert loaded.rotation_key_bytes == evaluating.rotation_key_bytes != b""
    assert loaded.fingerprint == evaluating.fingerprint
    assert loaded.raw.global_scale == 2.0**SMALL_PARAMS.scale_bits


def test_a_header_without_keys_or_context_size_loads_as_an_older_plain_context(secret, public):
    """Older contexts had neither entry: no evaluation keys, the whole payload is the context."""
    for drop in (("keys",), ("context_bytes",)):
        loaded = PublicContext.from_bytes(_reframe(public.to_bytes(), drop=drop))
        assert loaded.keys == KeyRequest() and loaded.fingerprint == public.fingerprint
        kept = SecretContext.from_secret_bytes(_reframe(secret.to_secret_bytes(), drop=drop))
        assert kept.keys == KeyRequest() and kept.fingerprint == secret.fingerprint


def test_a_header_without_params_is_a_malformed_parameter_record(secret, public):
    with pytest.raises(ParameterError, match=r"^malformed CKKS parameter record \{\}: "):
        PublicContext.from_bytes(_reframe(public.to_bytes(), drop=("params",)))
    with pytest.raises(ParameterError, match=r"^malformed CKKS parameter record \{\}: "):
        SecretContext.from_secret_bytes(_reframe(secret.to_secret_bytes(), drop=("params",)))


def test_a_header_without_fingerprint_is_refused_as_another_context(public):
    message = (
        f"public context was made under context …, not this job's {public.fingerprint[:12]}…: "
        "it comes from another key pair or parameter set. Fetch the job's public context "
        "again and re-encrypt."
    )
    with pytest.raises(ContextMismatchError, match=_exactly(message)):
        PublicContext.from_bytes(_reframe(public.to_bytes(), drop=("fingerprint",)))


# --- the header's context size and the rotation keys after it ----------------------------------


@pytest.mark.parametrize("size", [0, True, "10", None, -1, "past the end"])
def test_a_context_size_that_is_no_count_inside_the_payload_is_refused(public, size):
    data = public.to_bytes()
    payload = _split(data)[1]
    size = len(payload) + 1 if size == "past the end" else size
    message = (
        f"public context header announces {size!r} bytes of context, the file holds "
        f"{len(payload)}: it is truncated or corrupt; {PUBLIC_FIX}."
    )
    with pytest.raises(ParameterError, match=_exactly(message)):
        PublicContext.from_bytes(_reframe(data, context_bytes=size))


def test_a_one_byte_context_is_within_the_payload_and_fails_to_load(public):
    """1 is the smallest size the header may announce: a one-byte payload of that size reaches
    TenSEAL, which refuses it."""
    message = (
        r"^public context bytes do not load \(.+\): they are corrupt or truncated; "
        + re.escape(f"{PUBLIC_FIX}.")
        + "$"
    )
    with pytest.raises(ParameterError, match=message):
        PublicContext.from_bytes(_reframe(public.to_bytes(), context_bytes=1, payload=b"\x5e"))


def test_a_key_file_with_a_bad_context_size_names_the_key_file_and_its_fix(secret):
    data = secret.to_secret_bytes()
    held = len(_split(data)[1])
    message = (
        f"key.bin header announces 0 bytes of context, the file holds {held}: it is "
        f"truncated or corrupt; {KEY_FILE_FIX}."
    )
    with pytest.raises(ParameterError, match=_exactly(message)):
        SecretContext.from_secret_bytes(_reframe(data, context_bytes=0), what="key.bin")


def _truncated_rotation_keys(data: bytes) -> tuple[bytes, int, int]:
    header, payload = _split(data)
    tail = len(payload) - header["context_bytes"]
    return _reframe(data, payload=payload[:-1]), tail - 1, tail


def test_truncated_rotation_keys_of_a_public_context_are_refused_at_load(evaluating):
    data, held, announced = _truncated_rotation_keys(evaluating.public().to_bytes())
    message = (
        f"the rotation keys of public context are not one complete SEAL object ({held} bytes, "
        f"the header announces {announced}): they are truncated or corrupt; {PUBLIC_FIX}."
    )
    with pytest.raises(ParameterError, match=_exactly(message)):
        PublicContext.from_bytes(data)


def test_truncated_rotation_keys_of_a_key_file_are_refused_at_load(evaluating):
    data, held, announced = _truncated_rotation_keys(evaluating.to_secret_bytes())
    message = (
        f"the rotation keys of key.bin are not one complete SEAL object ({held} bytes, "
        f"the header announces {announced}): they are truncated or corrupt; {KEY_FILE_FIX}."
    )
    with pytest.raises(ParameterError, match=_exactly(message)):
        SecretContext.from_secret_bytes(data, what="key.bin")


# --- the frame ----------------------------------------------------------------------------------


def test_bytes_that_are_no_context_frame_name_what_and_the_fix(secret, public):
    forged = b"XXXX" + public.to_bytes()[4:]
    message = (
        "public context: these bytes are not a fedhe context (bad magic b'XXXX'). "
        f"To recover: {PUBLIC_FIX}."
    )
    with pytest.raises(ParameterError, match=_exactly(message)):
        PublicContext.from_bytes(forged)
    message = (
        "secret context: these bytes are not a fedhe context (bad magic b'XXXX'). "
        f"To recover: {KEY_FILE_FIX}."
    )
    with pytest.raises(ParameterError, match=_exactly(message)):
        SecretContext.from_secret_bytes(b"XXXX" + secret.to_secret_bytes()[4:])


def test_a_context_body_that_does_not_load_names_what_and_the_fix(public):
    data = public.to_bytes()
    payload = _split(data)[1]
    corrupt = _reframe(data, payload=bytes(len(payload)))
    message = (
        r"^public context bytes do not load \(.+\): they are corrupt or truncated; "
        + re.escape(f"{PUBLIC_FIX}.")
        + "$"
    )
    with pytest.raises(ParameterError, match=message):
        PublicContext.from_bytes(corrupt)


# --- secret keys ---------------------------------------------------------------------------------


def test_a_context_holding_the_secret_key_is_refused_as_public_with_the_fix(secret):
    message = (
        "received a context that holds a secret key: only the key holder may have it. "
        "Discard these bytes and ask the key holder for its public context."
    )
    with pytest.raises(SecretKeyLeakError, match=_exactly(message)):
        PublicContext.from_bytes(secret.to_secret_bytes())


# --- the real SEAL parameters --------------------------------------------------------------------


def _public_frame(raw: ts.Context, params: CKKSParams = SMALL_PARAMS) -> bytes:
    body = raw.serialize(save_public_key=True, save_secret_key=False)
    header = {"params": params.to_dict(), "keys": {}, "context_bytes": len(body)}
    return frame(CONTEXT_MAGIC, CONTEXT_VERSION, header, body)


def test_a_bfv_context_is_refused_as_not_ckks_whatever_its_header_says():
    """BFV with prime moduli inside the table: only the scheme check refuses it."""
    raw = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=4096, plain_modulus=1032193)
    raw.make_context_public()
    message = (
        "public context holds BFV N=4096 primes of [36, 36, 37] bits, scale None (prime "
        "moduli: True), not a CKKS context: discard these bytes and ask the key holder for "
        "its context again."
    )
    with pytest.raises(ParameterError, match=_exactly(message)):
        PublicContext.from_bytes(_public_frame(raw))


def test_a_ring_below_the_128_bit_table_is_refused_whatever_its_header_says():
    raw = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=2048, coeff_mod_bit_sizes=[27, 27])
    raw.global_scale = 2.0**20
    raw.make_context_public()
    message = (
        "public context really holds CKKS N=2048 primes of [27, 27] bits, scale 1048576.0, "
        "whatever its header says: poly_modulus_degree=2048 is not supported; use one of "
        "[4096, 8192, 16384, 32768] (128-bit security table). Discard these bytes; they do "
        "not come from a fedhe key holder."
    )
    with pytest.raises(ParameterError, match=_exactly(message)):
        PublicContext.from_bytes(_public_frame(raw))


def _claimed_scale_33(what: str) -> str:
    return (
        f"{what} header claims N=4096, primes of [54, 55] bits, scale 2^33, but the context "
        "inside holds CKKS N=4096 primes of [54, 55] bits, scale 4294967296.0: the bytes were "
        "altered or forged. Discard them and fetch the job's context from the key holder again."
    )


def test_a_header_that_lies_about_the_scale_is_refused_naming_both(secret, public):
    lying = CKKSParams(4096, (54, 55), 33).to_dict()
    with pytest.raises(ContextMismatchError, match=_exactly(_claimed_scale_33("public context"))):
        PublicContext.from_bytes(_reframe(public.to_bytes(), params=lying))
    with pytest.raises(ContextMismatchError, match=_exactly(_claimed_scale_33("key.bin"))):
        SecretContext.from_secret_bytes(
            _reframe(secret.to_secret_bytes(), params=lying), what="key.bin"
        )
    with pytest.raises(ContextMismatchError, match=_exactly(_claimed_scale_33("context"))):
        check_real_params(public.raw, CKKSParams(4096, (54, 55), 33))


def test_a_context_without_a_global_scale_reads_as_none():
    raw = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=4096, coeff_mod_bit_sizes=[54, 55])
    real = SealParams.of(raw)
    assert real.scale is None
    assert real.describe() == "CKKS N=4096 primes of [54, 55] bits, scale None"
