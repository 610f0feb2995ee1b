"""Threads that outlive a shard: each call gets a thread of its own, an idle one when there is one.

A replica used to start its decoding threads and its writer thread for every shard. Arrow's
allocator (mimalloc) keeps its free memory per thread and returns a thread's pages to the
system when the thread ends, so every shard decoded into freshly faulted, zeroed memory
(2 MiB huge pages here: ~10% of a data-bound replica's CPU in `clear_page`). Threads kept
between shards keep their heaps warm. Each call still gets a thread of its own (one is
started when none is idle), so calls never wait on each other: a shard's decoding threads
block on their consumer, and sharing a bounded pool between two shards could deadlock.
Idle threads end after `IDLE_SECONDS`.

Example:
    >>> done = start("example", sum, [1, 2])
    >>> done.join()
    True
    >>> done.result
    3
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

IDLE_SECONDS = 60.0


class Call:
    """One call running on a reused thread: `join()` waits for it; `result` or `error` after that."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.result: Any = None
        self.error: BaseException | None = None
        self._done = threading.Event()

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:  # kept for the caller: a thread of its own has no one else to tell
            self.error = exc
        finally:
            self.fn = self.args = None  # type: ignore[assignment]  # nothing of the call outlives it

    def join(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def done(self) -> bool:
        return self._done.is_set()


class _Worker:
    def __init__(self, pool: _Pool, name: str) -> None:
        self._pool = pool
        self._ready = threading.Condition(pool.lock)
        self.call: Call | None = None
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _loop(self) -> None:
        _name_os_thread(self.thread.name)
        while True:
            with self._pool.lock:
                while self.call is None:
                    if not self._ready.wait(IDLE_SECONDS) and self.call is None:
                        self._pool.idle.remove(self)  # idle too long: this thread ends
                        return
                call, self.call = self.call, None
            call.run()
            with self._pool.lock:
                self._pool.idle.append(self)  # idle before the caller hears of it: its next call may take this one
            call._done.set()
            del call

    def give(self, call: Call) -> None:  # under the pool's lock
        self.call = call
        self._ready.notify()


class _Pool:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: list[_Worker] = []
        self.started = 0


_POOL = _Pool()


def cores(reserved: float) -> int:
    """Threads for a replica that reserved `reserved` CPUs: those CPUs, but no more than the cores this
    process may run on (`os.sched_getaffinity`: a container's or `taskset`'s limit), and at least one.

    Example:
        >>> cores(0.5)
        1
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        usable = os.cpu_count() or 1
    return max(1, min(int(reserved), usable))


def _name_os_thread(name: str) -> None:
    """The thread's name as the system shows it (top -H, py-spy, /proc/PID/task/*/comm): Linux only."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME, 15 bytes at most


def start(name: str, fn: Callable[..., Any], *args: Any) -> Call:
    """Run `fn(*args)` on an idle thread, or on a new one named `bi-{name}-N`; returns at once."""
    call = Call(fn, args)
    with _POOL.lock:
        if _POOL.idle:
            _POOL.idle.pop().give(call)
            return call
        _POOL.started += 1
        worker = _Worker(_POOL, f"bi-{name}-{_POOL.started}")
        worker.call = call
    worker.thread.start()
    return call


def started() -> int:
    """Threads this process has started for calls so far (tests: threads are reused)."""
    return _POOL.started
