"""Encryptions of zero made ahead of time, in a background thread, while the process is idle.

Public-key encryption is Enc(m) = Enc(0) + encode(m): the costly half (sampling and NTTs,
~1.9 ms per ciphertext at N=8192) does not depend on the message. `ZeroPool` makes a party's
next contribution's Enc(0)s while it waits for the next round; `pause_precompute` marks the
spells in which a message is being handled, so that filling never slows down a round's work.

Public material only: the pool encrypts with the public key. Only `fedhe.crypto` imports
this module.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import tenseal as ts
import tenseal.sealapi as sealapi

from fedhe.crypto._seal import parms_id_at


class ZeroPool:
    """Encryptions of zero at one level, made ahead of time by a background thread.

    A party makes its next contribution's Enc(0)s while it waits for the next round, so
    encrypting in the round costs an encoding and an addition (~0.3 ms). Each Enc(0) is handed
    out once (fresh randomness per ciphertext, as in a direct encryption); an empty pool only
    means encrypting directly.
    """

    CAPACITY = 64  # ciphertexts: 8 MB at level 1, N=8192

    def __init__(self, context: ts.Context, level: int) -> None:
        self._seal_context = context.seal_context().data
        self._parms_id = parms_id_at(self._seal_context, level)
        self._encryptor = sealapi.Encryptor(self._seal_context, context.public_key().data)
        self._ready: deque[sealapi.Ciphertext] = deque()
        self._lock = threading.Lock()
        self._wanted = 0  # what the last busy spell of this process used
        self._demand = 0  # what the current one has used so far
        self._worker: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._ready)

    @property
    def parms_id(self) -> list[int]:
        return self._parms_id

    def take(self) -> sealapi.Ciphertext | None:
        with self._lock:
            return self._ready.popleft() if self._ready else None

    def refill(self, used: int) -> None:
        """Note that `used` ciphertexts were just encrypted; once this process is idle, make as
        many as it encrypted in its last busy spell (one party: one round's tensor)."""
        with self._lock:
            self._demand += used
            if self._worker is None:
                self._worker = threading.Thread(target=self._fill, name="fedhe-zeros", daemon=True)
                self._worker.start()

    def wait(self) -> None:
        """Block until the background thread has filled the pool (tests, benchmarks)."""
        worker = self._worker
        if worker is not None:
            worker.join()

    def _fill(self) -> None:
        while True:
            settled_at = _wait_until_settled()
            with self._lock:
                if self._demand:
                    self._wanted, self._demand = min(self._demand, self.CAPACITY), 0
            while _still_idle(settled_at):
                with self._lock:
                    if len(self._ready) >= self._wanted:
                        self._worker = None
                        return
                ct = sealapi.Ciphertext(self._seal_context)
                self._encryptor.encrypt_zero(self._parms_id, ct)
                with self._lock:
                    self._ready.append(ct)


# Set while no message is being handled in this process: pools fill only then, and only after
# IDLE_SETTLE_S without a new message, so that making the next round's Enc(0)s does not slow
# down this round's work (several simulated nodes share one process, messages back to back).
_IDLE = threading.Event()
_IDLE.set()
_BUSY_COUNT = 0
_MESSAGES = 0  # messages begun in this process, so a fill can tell whether one came meanwhile
_BUSY_LOCK = threading.Lock()
IDLE_SETTLE_S = 0.02


@contextmanager
def pause_precompute() -> Iterator[None]:
    """Pause the background filling of every pool while the block runs."""
    global _BUSY_COUNT, _MESSAGES
    with _BUSY_LOCK:
        _BUSY_COUNT += 1
        _MESSAGES += 1
        _IDLE.clear()
    try:
        yield
    finally:
        with _BUSY_LOCK:
            _BUSY_COUNT -= 1
            if _BUSY_COUNT == 0:
                _IDLE.set()


def wait_for_precompute() -> None:
    """Block until every pool of this process is filled (benchmarks, tests)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
    for pool in pools:
        pool.wait()


def _wait_until_settled() -> int:
    """Wait until no message has been handled for IDLE_SETTLE_S; the message count then."""
    while True:
        _IDLE.wait()
        seen = _MESSAGES
        time.sleep(IDLE_SETTLE_S)
        if _still_idle(seen):
            return seen


def _still_idle(seen: int) -> bool:
    return _IDLE.is_set() and seen == _MESSAGES


_POOLS: dict[tuple[str, int], ZeroPool] = {}  # most recently used last
_POOLS_LOCK = threading.Lock()
MAX_POOLS = 4  # a long-lived process serves job after job: older keys' pools are dropped


def zero_pool(context: ts.Context, key: str, level: int) -> ZeroPool:
    """This process's pool for the public key named `key` (its fingerprint) at `level`."""
    with _POOLS_LOCK:
        pool = _POOLS.pop((key, level), None)
        if pool is None:  # not `or`: an empty pool is falsy (it has a length)
            pool = ZeroPool(context, level)
        _POOLS[(key, level)] = pool
        while len(_POOLS) > MAX_POOLS:
            _POOLS.pop(next(iter(_POOLS)))
        return pool
