"""Key generation and the two sides of a CKKS context: secret (key holder) and public (everyone).

`SecretContext` never serializes into anything another role accepts: `PublicContext.from_bytes`
refuses a context that holds a secret key, and `PublicContext` cannot be built around one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property

import tenseal as ts
import tenseal.sealapi  # registers seal::Modulus, which coeff_modulus() returns

from fedhe.crypto import _seal
from fedhe.crypto.framing import frame, unframe
from fedhe.crypto.params import CKKSParams, check_security
from fedhe.errors import ContextMismatchError, ParameterError, SecretKeyLeakError

CONTEXT_MAGIC = b"FHEC"
CONTEXT_VERSION = 1


@dataclass(frozen=True)
class KeyRequest:
    """The evaluation keys a job needs; none by default (addition needs no key at all).

    `galois` asks for TenSEAL's keys for every power-of-two rotation (~34 MB at N=8192);
    `rotations` for the keys of exactly these rotation steps (one key per step); `conjugate`
    for the key that conjugates every slot (real part of a complex product: z + z̄)."""

    relin: bool = False
    galois: bool = False
    rotations: tuple[int, ...] = ()
    conjugate: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "rotations", tuple(sorted({int(r) for r in self.rotations})))

    @property
    def galois_elements(self) -> bool:
        """Whether this request needs keys made apart from TenSEAL's (rotations, conjugation)."""
        return bool(self.rotations) or self.conjugate

    def to_dict(self) -> dict[str, object]:
        return {
            "relin": self.relin,
            "galois": self.galois,
            "rotations": list(self.rotations),
            "conjugate": self.conjugate,
        }

    @classmethod
    def from_dict(cls, data: dict) -> KeyRequest:
        try:
            return cls(
                bool(data.get("relin", False)),  # pragma: no mutate  # bool(None) is False too
                bool(data.get("galois", False)),  # pragma: no mutate  # bool(None) is False too
                tuple(int(r) for r in data.get("rotations", ())),
                bool(data.get("conjugate", False)),  # pragma: no mutate  # bool(None) is False too
            )
        except (TypeError, ValueError, AttributeError) as err:
            raise ParameterError(f"malformed key request {data!r}: {err}") from err


class _ContextBase:
    def __init__(
        self, raw: ts.Context, params: CKKSParams, keys: KeyRequest, rotation_keys: bytes = b""
    ) -> None:
        self._raw = raw
        self.params = params
        self.keys = keys
        self.rotation_key_bytes = rotation_keys
        if keys.galois_elements != bool(rotation_keys):
            raise ParameterError(
                f"key request for rotations {list(keys.rotations)} does not match the "
                f"{len(rotation_keys)} bytes of rotation keys."
            )

    @cached_property
    def rotation_keys(self) -> _seal.RotationKeys:
        """Keys for the rotation steps the job asked for (thin layer: fedhe.crypto only)."""
        if not self.keys.galois_elements:
            raise ParameterError(
                "this context has no rotation keys: declare the job with "
                "KeyRequest(rotations=(…)) naming the steps it rotates by."
            )
        return _seal.RotationKeys.load(
            self._raw, self.rotation_key_bytes, self.keys.rotations, self.keys.conjugate
        )

    @property
    def raw(self) -> ts.Context:
        """The TenSEAL context (thin layer; prefer the fedhe tensor API)."""
        return self._raw

    @cached_property
    def fingerprint(self) -> str:
        """Identifies this key pair and parameter set; both sides of one key pair agree on it."""
        public_key = self._raw.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        digest = hashlib.sha256(json.dumps(self.params.to_dict(), sort_keys=True).encode())
        digest.update(public_key)
        return digest.hexdigest()[:32]

    def check_same(self, fingerprint: str, what: str = "ciphertext") -> None:
        if fingerprint != self.fingerprint:
            raise ContextMismatchError(
                f"{what} was made under context {fingerprint[:12]}…, not this job's "
                f"{self.fingerprint[:12]}…: it comes from another key pair or parameter set. "
                "Fetch the job's public context again and re-encrypt."
            )


class PublicContext(_ContextBase):
    """Public key (and only the evaluation keys the job asked for): safe to send anywhere."""

    def __init__(
        self, raw: ts.Context, params: CKKSParams, keys: KeyRequest, rotation_keys: bytes = b""
    ) -> None:
        if raw.is_private() or raw.has_secret_key():
            raise SecretKeyLeakError(
                "refusing to wrap a context that holds a secret key as public; call "
                "SecretContext.public() to drop the secret key first."
            )
        super().__init__(raw, params, keys, rotation_keys)

    def encryption_only(self) -> PublicContext:
        """The same public key without evaluation keys: all a party that only encrypts needs
        (a fraction of the bytes when the job has relinearization or rotation keys)."""
        return PublicContext(self._raw, self.params, KeyRequest())

    def to_bytes(self) -> bytes:
        body = self._raw.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=self.keys.galois,
            save_relin_keys=self.keys.relin,
        )
        header = {
            "params": self.params.to_dict(),
            "keys": self.keys.to_dict(),
            "fingerprint": self.fingerprint,
            "context_bytes": len(body),
        }
        return frame(CONTEXT_MAGIC, CONTEXT_VERSION, header, body + self.rotation_key_bytes)

    @classmethod
    def from_bytes(cls, data: bytes, *, what: str = "public context") -> PublicContext:
        """Parse and check a public context; every defect raises a FedHEError naming `what`
        (say, the file it was read from)."""
        header, payload = _unframe_context(data, what)
        body, rotation_keys = _split_body(header, payload, what)
        try:
            raw = ts.context_from(body)
        except Exception as err:  # TenSEAL raises TypeError, ValueError or RuntimeError
            raise ParameterError(
                f"{what} bytes do not load ({err}): they are corrupt or truncated; fetch the "
                "job's public context from the key holder again."
            ) from err
        if raw.is_private() or raw.has_secret_key():  # pragma: no mutate  # same key: or == and
            raise SecretKeyLeakError(
                "received a context that holds a secret key: only the key holder may have "
                "it. Discard these bytes and ask the key holder for its public context."
            )
        params = CKKSParams.from_dict(header.get("params", {}))
        check_real_params(raw, params, what=what)
        keys = KeyRequest.from_dict(header.get("keys", {}))
        context = cls(raw, params, keys, rotation_keys)
        context.check_same(header.get("fingerprint", ""), what=what)
        raw.global_scale = 2.0**params.scale_bits
        return context


class SecretContext(_ContextBase):
    """The key holder's context. Never leaves the key holder except as an encrypted-at-rest file."""

    _public: PublicContext | None = None

    def public(self) -> PublicContext:
        """The public half (made once: copying the context costs ~30 ms at N=8192)."""
        if self._public is None:
            raw = self._raw.copy()
            raw.make_context_public()
            self._public = PublicContext(raw, self.params, self.keys, self.rotation_key_bytes)
        return self._public

    def to_secret_bytes(self) -> bytes:
        """For the key holder's own storage only: it holds the secret key."""
        body = self._raw.serialize(
            save_public_key=True,
            save_secret_key=True,
            save_galois_keys=self.keys.galois,
            save_relin_keys=self.keys.relin,
        )
        header = {
            "params": self.params.to_dict(),
            "keys": self.keys.to_dict(),
            "secret": True,
            "context_bytes": len(body),
        }
        return frame(CONTEXT_MAGIC, CONTEXT_VERSION, header, body + self.rotation_key_bytes)

    @classmethod
    def from_secret_bytes(cls, data: bytes, *, what: str = "secret context") -> SecretContext:
        """Parse and check the key holder's stored context; every defect raises a FedHEError
        naming `what` (the key file) and how to recover."""
        header, payload = _unframe_context(data, what, fix=_KEY_FILE_FIX)
        body, rotation_keys = _split_body(header, payload, what, fix=_KEY_FILE_FIX)
        try:
            raw = ts.context_from(body)
        except Exception as err:  # TenSEAL raises TypeError, ValueError or RuntimeError
            raise ParameterError(
                f"{what} does not load ({err}): the key file is corrupt or truncated; "
                f"{_KEY_FILE_FIX}."
            ) from err
        if not raw.has_secret_key():
            raise ParameterError(
                f"{what} holds no secret key (a public context in the key file's place); "
                f"{_KEY_FILE_FIX}."
            )
        params = CKKSParams.from_dict(header.get("params", {}))
        check_real_params(raw, params, what=what)
        raw.global_scale = 2.0**params.scale_bits
        return cls(raw, params, KeyRequest.from_dict(header.get("keys", {})), rotation_keys)


def generate_keys(params: CKKSParams, keys: KeyRequest = KeyRequest()) -> SecretContext:
    """Generate a fresh key pair and only the evaluation keys that `keys` asks for."""
    raw = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
    )
    raw.global_scale = 2.0**params.scale_bits
    if keys.galois:
        raw.generate_galois_keys()
    rotation_keys = (
        _seal.create_rotation_keys(raw, keys.rotations, conjugate=keys.conjugate)
        if keys.galois_elements
        else b""
    )
    return SecretContext(raw, params, keys, rotation_keys)


@dataclass(frozen=True)
class SealParams:
    """The parameters a deserialized context really holds (not what its header claims)."""

    scheme: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    all_prime: bool
    scale: float | None  # None: the context carries no global scale

    @classmethod
    def of(cls, raw: ts.Context) -> SealParams:
        parms = raw.seal_context().data.key_context_data().parms()  # the full chain
        moduli = parms.coeff_modulus()
        try:
            scale: float | None = raw.global_scale
        except ValueError:  # TenSEAL: "no global scale"
            scale = None
        return cls(
            parms.scheme().name,
            parms.poly_modulus_degree(),
            tuple(m.bit_count() for m in moduli),
            all(m.is_prime() for m in moduli),
            scale,
        )

    def describe(self) -> str:
        return (
            f"{self.scheme} N={self.poly_modulus_degree} primes of "
            f"{list(self.coeff_mod_bit_sizes)} bits, scale {self.scale}"
        )


def check_real_params(raw: ts.Context, params: CKKSParams, *, what: str = "context") -> None:
    """Refuse a context whose real SEAL parameters are outside the 128-bit table or differ from
    the header's `params` (a header is a claim: N=2048 behind a header of N=8192 breaks
    security). Microseconds: it reads parameters SEAL already parsed."""
    real = SealParams.of(raw)
    if real.scheme != "CKKS" or not real.all_prime:
        raise ParameterError(
            f"{what} holds {real.describe()} (prime moduli: {real.all_prime}), not a CKKS "
            "context: discard these bytes and ask the key holder for its context again."
        )
    try:
        check_security(real.poly_modulus_degree, real.coeff_mod_bit_sizes)
    except ParameterError as err:
        raise ParameterError(
            f"{what} really holds {real.describe()}, whatever its header says: {err} "
            "Discard these bytes; they do not come from a fedhe key holder."
        ) from err
    claimed = (params.poly_modulus_degree, params.coeff_mod_bit_sizes, params.scale)
    if (real.poly_modulus_degree, real.coeff_mod_bit_sizes, real.scale) != claimed:
        raise ContextMismatchError(
            f"{what} header claims N={params.poly_modulus_degree}, primes of "
            f"{list(params.coeff_mod_bit_sizes)} bits, scale 2^{params.scale_bits}, but the "
            f"context inside holds {real.describe()}: the bytes were altered or forged. "
            "Discard them and fetch the job's context from the key holder again."
        )


_KEY_FILE_FIX = "restore the key file from a backup or declare the job under a new id"
_PUBLIC_FIX = "fetch the job's public context from the key holder again"


def _split_body(
    header: dict, payload: bytes, what: str, *, fix: str = _PUBLIC_FIX
) -> tuple[bytes, bytes]:
    """The TenSEAL context and, after it, the rotation keys (absent in older contexts), checked
    to be whole: a truncated tail would otherwise load and fail only when a rotation needs it."""
    size = header.get("context_bytes", len(payload))
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= len(payload):
        raise ParameterError(
            f"{what} header announces {size!r} bytes of context, the file holds "
            f"{len(payload)}: it is truncated or corrupt; {fix}."
        )
    rotation_keys = payload[size:]
    if rotation_keys:
        _seal.check_whole(rotation_keys, f"the rotation keys of {what}", fix)
    return payload[:size], rotation_keys


def _unframe_context(data: bytes, what: str, *, fix: str = _PUBLIC_FIX) -> tuple[dict, bytes]:
    try:
        return unframe(
            data, magic=CONTEXT_MAGIC, version=CONTEXT_VERSION, what="context", error=ParameterError
        )
    except ParameterError as err:
        raise ParameterError(f"{what}: {err} To recover: {fix}.") from err
