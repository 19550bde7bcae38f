"""CKKS parameters, keys, public/secret contexts and encrypted tensors (over TenSEAL)."""

from fedhe.crypto._zero_pool import pause_precompute, wait_for_precompute
from fedhe.crypto.context import KeyRequest, PublicContext, SecretContext, generate_keys
from fedhe.crypto.params import AGGREGATION_PARAMS, MAX_LOG_Q_128, MODEL_PARAMS, CKKSParams
from fedhe.crypto.tensor import (
    EncryptedTensor,
    PlainTensor,
    Tensor,
    check_values,
    decrypt,
    digest,
    encrypt,
    encrypt_for_compute,
    load_tensor,
    rotate,
    rotations,
    stack,
    sum_of_products,
    unstack,
    weighted_sum,
)

__all__ = [
    "AGGREGATION_PARAMS",
    "MAX_LOG_Q_128",
    "MODEL_PARAMS",
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
    "encrypt_for_compute",
    "generate_keys",
    "load_tensor",
    "pause_precompute",
    "rotate",
    "rotations",
    "stack",
    "sum_of_products",
    "unstack",
    "wait_for_precompute",
    "weighted_sum",
]
