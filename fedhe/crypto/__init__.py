"""CKKS parameters, keys, public/secret contexts and encrypted tensors (over TenSEAL)."""

from fedhe.crypto.context import KeyRequest, PublicContext, SecretContext, generate_keys
from fedhe.crypto.params import AGGREGATION_PARAMS, MAX_LOG_Q_128, CKKSParams
from fedhe.crypto.tensor import (
    EncryptedTensor,
    PlainTensor,
    Tensor,
    check_values,
    decrypt,
    digest,
    encrypt,
    load_tensor,
)

__all__ = [
    "AGGREGATION_PARAMS",
    "MAX_LOG_Q_128",
    "CKKSParams",
    "EncryptedTensor",
    "KeyRequest",
    "PlainTensor",
    "PublicContext",
    "SecretContext",
    "Tensor",
    "check_values",
    "decrypt",
    "digest",
    "encrypt",
    "generate_keys",
    "load_tensor",
]
