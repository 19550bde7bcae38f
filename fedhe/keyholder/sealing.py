"""Passphrase protection of the key holder's secret keys at rest (scrypt + AES-256-GCM).

A sealed file is ``FHEK1 | salt (16) | nonce (12) | AES-GCM(key, nonce, secret, aad)``, where the
key is scrypt(passphrase, salt) and the associated data names what the file belongs to (the
job id): a sealed file copied over another job's file does not open as that job's key. Without
the passphrase a copied state folder yields no key, and with a passphrase configured an
unsealed file (one anybody with write access could have put there) is refused.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fedhe.errors import PolicyError

MAGIC = b"FHEK1"
_AAD = b"fedhe key holder secret context\x00"
_SALT, _NONCE, _TAG = 16, 12, 16


def seal(passphrase: bytes, secret: bytes, *, binding: str) -> bytes:
    """`secret` sealed under `passphrase`, opening only with the same `binding` (the job id)."""
    salt, nonce = os.urandom(_SALT), os.urandom(_NONCE)
    key = _derive(passphrase, salt)
    return MAGIC + salt + nonce + AESGCM(key).encrypt(nonce, secret, _aad(binding))


def unseal(passphrase: bytes | None, data: bytes, what: str, *, binding: str) -> bytes:
    """The secret bytes of a file sealed with `binding`; an unsealed file only while no
    passphrase is configured."""
    if not data.startswith(MAGIC):
        return _unsealed(passphrase, data, what)
    if not passphrase:
        raise PolicyError(
            f"{what} is passphrase-protected: start the key holder with its passphrase "
            "(node config passphrase-file=…)."
        )
    if len(data) < len(MAGIC) + _SALT + _NONCE + _TAG:
        raise PolicyError(
            f"{what} is truncated ({len(data)} bytes): restore the job's sealed file from a "
            "backup or declare the job again under a new job id."
        )
    salt = data[len(MAGIC) : len(MAGIC) + _SALT]
    nonce = data[len(MAGIC) + _SALT : len(MAGIC) + _SALT + _NONCE]
    body = data[len(MAGIC) + _SALT + _NONCE :]
    try:
        return AESGCM(_derive(passphrase, salt)).decrypt(nonce, body, _aad(binding))
    except InvalidTag as err:
        raise PolicyError(
            f"{what}: wrong passphrase, or the file was altered, belongs to another job than "
            f"{binding!r} or was sealed before fedhe bound keys to their job; restore the job's "
            "own sealed file or declare the job again under a new job id."
        ) from err


def _unsealed(passphrase: bytes | None, data: bytes, what: str) -> bytes:
    if passphrase:
        raise PolicyError(
            f"{what} is not sealed although this key holder has a passphrase: it was not "
            "written by this key holder (or was written before the passphrase was set) and may "
            "have been replaced. Restore the sealed file, or declare the job again under a new "
            "job id."
        )
    return data


def _aad(binding: str) -> bytes:
    if not binding:
        raise PolicyError("a sealed secret needs a binding (the job id); got an empty one.")
    return _AAD + binding.encode()


def _derive(passphrase: bytes, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=2**15, r=8, p=1).derive(passphrase)
