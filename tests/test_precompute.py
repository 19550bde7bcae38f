"""Encryptions of zero made ahead of time: same ciphertexts as direct ones, each used once."""

from __future__ import annotations

import queue
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

from fedhe.crypto import _seal, _zero_pool, decrypt, encrypt, pause_precompute
from fedhe.crypto.tensor import COMPLEX

VALUES = np.linspace(-3, 3, 5000)


def _pool(public, key=None):
    level, _ = public.params.encoding_for(100.0)
    return _zero_pool.zero_pool(public.raw, key or public.fingerprint, level)


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


class SettleGate:
    """Stands in for the pool module's `time`. The pool's own worker announces each settle (its
    sleep before it fills) and waits there until the test lets it go; other threads sleep."""

    GUARD_S = 60  # only a broken pool makes the test wait this long, and then it fails

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._settles: queue.Queue[bool] = queue.Queue()
        self._go = threading.Semaphore(0)
        self._open = False
        self.handling = False  # the test is inside pause_precompute

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if self._open or threading.current_thread() is not self._pool._worker:
            time.sleep(seconds)
            return
        self._settles.put(self.handling)
        self._go.acquire()

    def next_settle(self) -> bool:
        """Wait until the worker begins a settle; whether a message was being handled then."""
        try:
            return self._settles.get(timeout=self.GUARD_S)
        except queue.Empty:
            pytest.fail(f"the pool's worker began no settle within {self.GUARD_S} s")

    def release(self) -> None:
        self._go.release()

    def open(self) -> None:
        """Let the worker go for good (end of test, passed or not)."""
        self._open = True
        self._go.release()


def test_the_pool_fills_only_while_no_message_is_handled(public, monkeypatch):
    pool = _pool(public, key="paused")
    while pool.take() is not None:
        pass
    gate = SettleGate(pool)
    monkeypatch.setattr(sys.modules[type(pool).__module__], "time", gate)
    try:
        with pause_precompute():  # a message, whose encryption used 3 Enc(0)s
            gate.handling = True
            pool.refill(3)
            gate.handling = False
        assert gate.next_settle() is False  # the worker waited for the message to end
        with pause_precompute():  # the next message comes while the worker settles
            gate.handling = True
            gate.release()
            gate.handling = False
        assert gate.next_settle() is False  # it settles afresh once that one has ended,
        assert len(pool) == 0  # having made nothing while it was handled
        gate.release()
        pool.wait()
    finally:
        gate.open()
    assert len(pool) == 3  # what this process used while busy


def test_an_empty_pool_means_encrypting_directly(secret, public):
    pool = _pool(public)
    while pool.take() is not None:
        pass
    with pause_precompute():  # keep the pool empty during the encryption
        tensor = _encrypt(public)
    np.testing.assert_allclose(decrypt(secret, tensor), VALUES, atol=1e-4)


def test_a_long_lived_process_keeps_pools_for_a_few_keys_only(public):
    for index in range(_zero_pool.MAX_POOLS + 3):
        _zero_pool.zero_pool(public.raw, f"key-{index}", 1)
    assert len(_zero_pool._POOLS) == _zero_pool.MAX_POOLS
    assert ("key-0", 1) not in _zero_pool._POOLS


def test_an_empty_pool_is_still_the_same_pool(public):
    pool = _zero_pool.zero_pool(public.raw, "drained", 1)
    while pool.take() is not None:
        pass
    assert _zero_pool.zero_pool(public.raw, "drained", 1) is pool
