"""Encryptions of zero made ahead of time: same ciphertexts as direct ones, each used once."""

import time

import numpy as np

from fedhe.crypto import _seal, decrypt, encrypt, pause_precompute
from fedhe.crypto.tensor import COMPLEX

VALUES = np.linspace(-3, 3, 5000)


def _pool(public, key=None):
    level, _ = public.params.encoding_for(100.0)
    return _seal.zero_pool(public.raw, key or public.fingerprint, level)


def _encrypt(public):
    return encrypt(public, VALUES, sum_bound=100.0, packing=COMPLEX, precompute=True)


def test_precomputed_encryptions_decrypt_exactly_like_direct_ones(secret, public):
    pool = _pool(public)
    pool.refill(4)
    pool.wait()
    before = len(pool)
    with pause_precompute():  # no refill in between: count what the encryptions took
        first, second = _encrypt(public), _encrypt(public)
        assert len(pool) == before - len(first.chunks) - len(second.chunks)
    for tensor in (first, second):
        np.testing.assert_allclose(decrypt(secret, tensor), VALUES, atol=1e-4)
    # Fresh randomness per ciphertext: the same values never encrypt to the same bytes.
    assert first.chunks[0].serialize() != second.chunks[0].serialize()


def test_each_encryption_of_zero_is_handed_out_once(public):
    pool = _pool(public, key="handed-out-once")
    pool.refill(6)
    pool.wait()
    taken = [pool.take() for _ in range(len(pool))]
    assert pool.take() is None
    blobs = {_seal._save(ct) for ct in taken}
    assert len(blobs) == len(taken)


def test_the_pool_fills_only_while_no_message_is_handled(public):
    pool = _pool(public, key="paused")
    while pool.take() is not None:
        pass
    with pause_precompute():
        pool.refill(3)
        time.sleep(10 * _seal.IDLE_SETTLE_S)
        assert len(pool) == 0  # a message is being handled: no background work
    pool.wait()
    assert len(pool) == 3  # what this process used while busy


def test_an_empty_pool_means_encrypting_directly(secret, public):
    pool = _pool(public)
    while pool.take() is not None:
        pass
    with pause_precompute():  # keep the pool empty during the encryption
        tensor = _encrypt(public)
    np.testing.assert_allclose(decrypt(secret, tensor), VALUES, atol=1e-4)


def test_a_long_lived_process_keeps_pools_for_a_few_keys_only(public):
    for index in range(_seal.MAX_POOLS + 3):
        _seal.zero_pool(public.raw, f"key-{index}", 1)
    assert len(_seal._POOLS) == _seal.MAX_POOLS
    assert ("key-0", 1) not in _seal._POOLS


def test_an_empty_pool_is_still_the_same_pool(public):
    pool = _seal.zero_pool(public.raw, "drained", 1)
    while pool.take() is not None:
        pass
    assert _seal.zero_pool(public.raw, "drained", 1) is pool
