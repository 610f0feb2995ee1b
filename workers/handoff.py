"""Batches a decoding thread offers to the others once its row group is decoded (`workers.decode.decode`).

A shard's row groups are dealt round-robin to its decoding threads, and each thread stacks and predicts
its own row group's batches. In a shard's last row group one thread did that alone while the other had
nothing left: 20-30 ms of a 220-300 ms shard (1M rows, four 250k-row row groups of four batches). Once a
row group is decoded whole its batches are only slices of it, so any thread may stack and predict one:
the owner `offer`s them, takes them back one by one in order (`claim`), and a thread with no row group of
its own left `steal`s from the other end. Each batch has a `Slot` the owner queues in order, so the
consumer still takes batches in file order, whichever thread filled them.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["Offers", "Slot"]

T = TypeVar("T")


class Slot(Generic[T]):
    """One batch's place in its owner's queue: filled (or failed) once, by whichever thread claimed it."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def fill(self, value: T) -> None:
        self._value = value
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def wait(self, stop: threading.Event) -> T:
        """The filled value (raises what failed it); waits while it is being stacked and predicted."""
        while not self._done.wait(0.1):
            if stop.is_set():
                raise RuntimeError("the decoder was closed while a batch was being predicted")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class Offers:
    """The slots of each thread's decoded row group that no thread has claimed yet.

    The owner claims its own from the front, in order; a thief takes from the back of another's. A thief
    takes one only when `ready()` gives it what it needs right away (a free stacking buffer): it never
    waits while holding a slot, so the owner's guarantees (`workers.decode._Buffers`) are unchanged, and
    the consumer's wait on a stolen slot always ends.
    """

    def __init__(self, threads: int) -> None:
        self._lock = threading.Condition()
        self._queues: list[collections.deque[Slot[Any]]] = [collections.deque() for _ in range(threads)]
        self._busy = threads  # threads with row groups of their own left

    def offer(self, owner: int, slots: Sequence[Slot[Any]]) -> None:
        with self._lock:
            self._queues[owner].extend(slots)
            self._lock.notify_all()

    def claim(self, owner: int, slot: Slot[Any]) -> bool:
        """True when `slot` (the owner's next, in order) is still the owner's to fill; False: stolen."""
        with self._lock:
            mine = self._queues[owner]
            if mine and mine[0] is slot:
                mine.popleft()
                return True
            return False

    def done(self, owner: int) -> None:
        """`owner` has no row group of its own left (finished, failed or stopped)."""
        with self._lock:
            self._busy -= 1
            self._queues[owner].clear()  # stopped or failed: the rest is never needed
            self._lock.notify_all()

    def steal(self, thief: int, ready: Callable[[], T | None],
              stop: threading.Event) -> tuple[Slot[Any], T] | None:
        """Another thread's last unclaimed slot and what `ready()` gave for it; None once every thread is done."""
        with self._lock:
            while not stop.is_set():
                victim = next((q for k, q in enumerate(self._queues) if k != thief and q), None)
                if victim is None and self._busy == 0:
                    return None
                if victim is not None:
                    got = ready()
                    if got is not None:
                        return victim.pop(), got
                self._lock.wait(0.02)
        return None
