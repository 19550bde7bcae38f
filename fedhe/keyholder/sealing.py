"""Passphrase protection of the key holder's secret keys at rest (scrypt + AES-256-GCM).

A sealed file is ``FHEK1 | salt (16) | nonce (12) | AES-GCM(key, nonce, secret)``, where the
key is scrypt(passphrase, salt). Without the passphrase a copied state folder yields no key.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fedhe.errors import PolicyError

MAGIC = b"FHEK1"
_AAD = b"fedhe key holder secret context"
_SALT, _NONCE = 16, 12


def seal(passphrase: bytes, secret: bytes) -> bytes:
    salt, nonce = os.urandom(_SALT), os.urandom(_NONCE)
    return MAGIC + salt + nonce + AESGCM(_derive(passphrase, salt)).encrypt(nonce, secret, _AAD)


def unseal(passphrase: bytes | None, data: bytes, what: str) -> bytes:
    """The secret bytes of a sealed file (or of an unsealed one, returned as is)."""
    if not data.startswith(MAGIC):
        return data
    if not passphrase:
        raise PolicyError(
            f"{what} is passphrase-protected: start the key holder with its passphrase "
            "(node config passphrase-file=…)."
        )
    salt = data[len(MAGIC) : len(MAGIC) + _SALT]
    nonce = data[len(MAGIC) + _SALT : len(MAGIC) + _SALT + _NONCE]
    body = data[len(MAGIC) + _SALT + _NONCE :]
    try:
        return AESGCM(_derive(passphrase, salt)).decrypt(nonce, body, _AAD)
    except InvalidTag as err:
        raise PolicyError(f"{what}: wrong passphrase (or the file was altered).") from err


def _derive(passphrase: bytes, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=2**15, r=8, p=1).derive(passphrase)
