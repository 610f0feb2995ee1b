"""Processes that contend for one output's lock, started by `tests/test_lock.py`.

Kept apart from the tests so that a spawned contender imports only the lock
(pyarrow), not torch: ten of them start in well under a second each.
"""

from __future__ import annotations

import time
from typing import Any

from basis.errors import LockHeldError
from pipelines.lock import OutputLock
from basis.storage import resolve

BARRIER_TIMEOUT = 60.0


def take_over_rounds(output: str, rounds: int, barrier: Any, results: Any) -> None:
    """Each round: wait for the test to plant a stale lock, race for it, report whether we won.

    Winners hold the lock until every contender has reported, so "exactly one
    won" can't be blurred by a late contender taking a lock already released.
    """
    for round_ in range(rounds):
        barrier.wait(BARRIER_TIMEOUT)  # the stale lock is planted: go
        lock = OutputLock(resolve(output))
        try:
            lock.acquire()
        except LockHeldError:
            won = False
        else:
            won = True
        results.put((round_, won))
        barrier.wait(BARRIER_TIMEOUT)  # every contender has decided
        if won:
            lock.release()
        barrier.wait(BARRIER_TIMEOUT)  # released: the test checks and plants the next one


def churn(output: str, seconds: float, ttl: float, hold: float, barrier: Any, acquired: Any) -> None:
    """Acquire, hold `hold` seconds, release, for `seconds`; counts acquisitions in `acquired`."""
    barrier.wait(BARRIER_TIMEOUT)
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        lock = OutputLock(resolve(output), ttl=ttl)
        try:
            lock.acquire()
        except LockHeldError:
            continue
        with acquired.get_lock():
            acquired.value += 1
        time.sleep(hold)
        lock.release()
