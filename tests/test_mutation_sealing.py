"""Secret keys sealed at rest: the file layout and KDF a stored file depends on, and every
refusal word for word (mutation testing of fedhe/keyholder/sealing.py)."""

import hashlib
import re

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedhe.errors import PolicyError
from fedhe.keyholder.sealing import MAGIC, seal, unseal

PASSPHRASE = b"correct horse"
SECRET = b"the secret context bytes"
WRONG = (
    "key of job 'j': wrong passphrase, or the file was altered, belongs to another job than 'j' "
    "or was sealed before fedhe bound keys to their job; restore the job's own sealed file or "
    "declare the job again under a new job id."
)


def _by_hand(binding: str) -> bytes:
    """A sealed file built from the documented layout: FHEK1 | salt | nonce | AES-GCM, with the
    key scrypt(passphrase, salt; n=2^15, r=8, p=1) and the job bound in the associated data."""
    salt, nonce = bytes(range(16)), bytes(range(12))
    key = hashlib.scrypt(PASSPHRASE, salt=salt, n=2**15, r=8, p=1, dklen=32, maxmem=2**26)
    aad = b"fedhe key holder secret context\x00" + binding.encode()
    return MAGIC + salt + nonce + AESGCM(key).encrypt(nonce, SECRET, aad)


def test_a_file_sealed_by_the_documented_layout_opens_and_seal_writes_that_layout():
    assert unseal(PASSPHRASE, _by_hand("j"), "key of job 'j'", binding="j") == SECRET
    sealed = seal(PASSPHRASE, SECRET, binding="j")
    assert sealed.startswith(MAGIC) and len(sealed) == len(MAGIC) + 16 + 12 + len(SECRET) + 16
    assert seal(PASSPHRASE, SECRET, binding="j")[5:33] != sealed[5:33]  # fresh salt and nonce
    assert unseal(PASSPHRASE, sealed, "key of job 'j'", binding="j") == SECRET


@pytest.mark.parametrize(
    "change",
    ["passphrase", "binding", "body", "salt", "nonce"],
)
def test_a_wrong_passphrase_job_or_byte_does_not_open(change):
    sealed = bytearray(_by_hand("j"))
    passphrase, binding = PASSPHRASE, "j"
    if change == "passphrase":
        passphrase = b"wrong"
    elif change == "binding":
        binding = "k"
    else:
        sealed[{"salt": 5, "nonce": 21, "body": 40}[change]] ^= 1
    message = WRONG.replace("than 'j'", f"than {binding!r}")
    with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
        unseal(passphrase, bytes(sealed), "key of job 'j'", binding=binding)


def test_a_sealed_file_without_a_passphrase_and_a_truncated_one_are_refused():
    message = (
        "key is passphrase-protected: start the key holder with its passphrase "
        "(node config passphrase-file=…)."
    )
    for passphrase in (None, b""):
        with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
            unseal(passphrase, _by_hand("j"), "key", binding="j")
    shortest = MAGIC + bytes(16 + 12 + 16)  # as long as a sealed empty secret: opened, and wrong
    with pytest.raises(PolicyError, match=re.escape("wrong passphrase")):
        unseal(PASSPHRASE, shortest, "key of job 'j'", binding="j")
    message = (
        "key is truncated (48 bytes): restore the job's sealed file from a backup or declare the "
        "job again under a new job id."
    )
    with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
        unseal(PASSPHRASE, shortest[:-1], "key", binding="j")


def test_an_unsealed_file_opens_only_without_a_passphrase():
    assert unseal(None, SECRET, "key", binding="j") == SECRET
    assert unseal(b"", SECRET, "key", binding="j") == SECRET
    message = (
        "key is not sealed although this key holder has a passphrase: it was not written by "
        "this key holder (or was written before the passphrase was set) and may have been "
        "replaced. Restore the sealed file, or declare the job again under a new job id."
    )
    with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
        unseal(PASSPHRASE, SECRET, "key", binding="j")


def test_a_seal_needs_a_binding():
    message = "a sealed secret needs a binding (the job id); got an empty one."
    with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
        seal(PASSPHRASE, SECRET, binding="")
    with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
        unseal(PASSPHRASE, _by_hand("j"), "key", binding="")
