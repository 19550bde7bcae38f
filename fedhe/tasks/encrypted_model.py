"""Gradient descent with the model kept encrypted at the aggregator for the whole training.

The aggregator never sees the model until the key holder decrypts the final one; the key
holder only ever sees the model plus a fresh random mask.

Each round (model w, d+1 coefficients on standardized features, intercept first):

- aggregator → parties: w in *broadcast layout*, d+1 ciphertexts where ciphertext j holds w_j
  in every slot. A party computes ``Σⱼ Wⱼ ⊙ (step·Aᵢ[:, j]) − step·bᵢ = step·(Aᵢw − bᵢ)`` with
  plaintext multiplications only (no rotation, no Galois or relinearization key), one level.
- aggregator: sums the contributions and updates the encrypted model (vector layout)
  ``w ← w − Σᵢ step·(Aᵢw − bᵢ)``.
- refresh (masked re-encryption): the aggregator adds a fresh uniform mask r, |r| ≤ 2^16, and
  sends Enc(w + r) to the key holder, which decrypts (output kind `model_refresh`, one per
  round, audited) and returns Enc(w + r) fresh, in vector and broadcast layout; the aggregator
  subtracts r. The key holder learns w + r: nothing about w while |w| ≪ 2^16.
- at the end the key holder decrypts the model itself (output kind `model`, budget 1).

Statistics per party, standardized features Z with a column of ones, sums over its samples:
linreg ``A = ZᵀZ + α·n·I'``, ``b = Zᵀy`` (the gradient of ½‖Zw − y‖²); logreg uses the
first-order surrogate σ(t) ≈ ½ + t/4 of the logistic link, whose gradient is linear in w:
``A = ZᵀZ/4 + α·n·I'``, ``b = Zᵀ(y − ½)``. step = lr / Σnᵢ (known from the moments sum).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedhe.crypto import PublicContext, Tensor, encrypt_for_compute, load_tensor
from fedhe.crypto.randomness import secure_random
from fedhe.errors import ProtocolError
from fedhe.keyholder import DecryptionRequest, KeyHolder
from fedhe.tasks.aggregate import sum_valid
from fedhe.tasks.linreg import design

# A round uses one ciphertext × plaintext product: ciphertexts travel with one level to spare
# (two primes instead of three: a third fewer bytes).
MULTIPLICATIONS = 1
REFRESH_OUTPUT = "model_refresh"
MODEL_OUTPUT = "model"
MASK_BOUND = 2.0**16


def party_statistics(
    Z: np.ndarray, y: np.ndarray, *, logistic: bool, l2: float
) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) of this party's data, so that its gradient sum at w is A·w − b."""
    Za = design(Z)
    penalty = np.eye(Za.shape[1])
    penalty[0, 0] = 0.0
    if logistic:
        return Za.T @ Za / 4 + l2 * len(Za) * penalty, Za.T @ (y - 0.5)
    return Za.T @ Za + l2 * len(Za) * penalty, Za.T @ y


def broadcast(context: PublicContext | None, w: np.ndarray) -> list[Tensor]:
    """Ciphertext j holds w_j in each of len(w) slots."""
    return [
        encrypt_for_compute(context, np.full(len(w), value), multiplications=MULTIPLICATIONS)
        for value in w
    ]


def encrypt_model(context: PublicContext | None, w: np.ndarray) -> Tensor:
    """The model in vector layout, at the level the round's update leaves it."""
    return encrypt_for_compute(context, w, multiplications=MULTIPLICATIONS)


def party_step(
    broadcast_model: Sequence[Tensor], A: np.ndarray, b: np.ndarray, step: float
) -> Tensor:
    """Enc(step·(A·w − b)) from the broadcast model, with plaintext products only."""
    if len(broadcast_model) != len(b) or A.shape != (len(b), len(b)):
        raise ProtocolError(
            f"model has {len(broadcast_model)} coefficients, this party's statistics {len(b)}."
        )
    total = None
    for j, column in enumerate(broadcast_model):
        term = column.mul_plain(step * A[:, j])
        total = term if total is None else total + term
    return total.add_plain(-step * b)


def load_broadcast(blobs: Sequence[bytes], context: PublicContext | None, dim: int) -> list[Tensor]:
    return [load_tensor(blob, context, shape=(dim,)) for blob in blobs]


def aggregator_update(
    model: Tensor,
    contributions: Mapping[str, bytes],
    context: PublicContext | None,
    *,
    min_parties: int,
) -> tuple[Tensor, tuple[str, ...], dict[str, str]]:
    """w ← w − Σ contributions, over the contributions that validate (the others are logged)."""
    total, accepted, rejected = sum_valid(
        contributions,
        lambda data: load_tensor(data, context, shape=model.shape),
        min_parties=min_parties,
    )
    return model - total, accepted, rejected


def aggregator_mask(model: Tensor) -> tuple[Tensor, np.ndarray]:
    """Enc(w + r) for a fresh uniform mask r drawn from the OS's CSPRNG."""
    mask = secure_random().uniform(-MASK_BOUND, MASK_BOUND, model.shape)
    return model.add_plain(mask), mask


def aggregator_unmask(
    vector: Tensor, broadcast_model: Sequence[Tensor], mask: np.ndarray
) -> tuple[Tensor, list[Tensor]]:
    columns = [w.add_plain(-m) for w, m in zip(broadcast_model, mask, strict=True)]
    return vector.add_plain(-mask), columns


def keyholder_refresh(keyholder: KeyHolder, request: DecryptionRequest) -> dict[str, bytes]:
    """Decrypt the masked model under policy and return it freshly encrypted, both layouts
    (unverified: the masked model is no sum of contributions, so nothing leaves in the clear)."""
    values = keyholder.decrypt_unverified(request).values
    public = keyholder.public_context(request.job_id)
    limit = MASK_BOUND * 4
    if not np.all(np.abs(values) <= limit):
        raise ProtocolError(
            f"the masked model leaves ±{limit:g}: the model is diverging (|w| ≫ 1 on "
            "standardized features); lower the learning rate."
        )
    fresh = {"vector": encrypt_model(public, values).to_bytes()}
    for j, column in enumerate(broadcast(public, values)):
        fresh[f"broadcast-{j}"] = column.to_bytes()
    return fresh


def keyholder_model(keyholder: KeyHolder, request: DecryptionRequest) -> dict[str, bytes]:
    """The final model goes to the job's parties only, sealed to each: the chain of refreshes
    and encrypted steps that made it is no sum the key holder can verify, so the aggregator
    (which could have put any ciphertext there) gets no decrypted value."""
    return keyholder.release_to_parties(request, keyholder.decrypt_unverified(request).values)


def unpack_refresh(
    payload: Mapping[str, bytes], context: PublicContext | None, dim: int
) -> tuple[Tensor, list[Tensor]]:
    vector = load_tensor(payload["vector"], context, shape=(dim,))
    return vector, load_broadcast([payload[f"broadcast-{j}"] for j in range(dim)], context, dim)
