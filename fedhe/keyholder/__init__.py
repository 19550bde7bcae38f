"""The key-holder role: decryption policy, audit log, and the only secret key."""

from fedhe.keyholder.audit import AuditLog
from fedhe.keyholder.keyholder import DEFAULT_FLOODING_BITS, Decryption, KeyHolder
from fedhe.keyholder.policy import DecryptionPolicy, DecryptionRequest, JobDeclaration, OutputSpec

__all__ = [
    "DEFAULT_FLOODING_BITS",
    "AuditLog",
    "Decryption",
    "DecryptionPolicy",
    "DecryptionRequest",
    "JobDeclaration",
    "KeyHolder",
    "OutputSpec",
]
