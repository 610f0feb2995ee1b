"""Ctrl-C and SIGTERM that no library call can swallow.

The CLI's handler (`handle`) raises `KeyboardInterrupt` wherever the main thread
is, as Python's default SIGINT handler does, and also records the signal. A call
the run makes over and over (Ray's GCS client under `request_resources`, every
half second on an autoscaling cluster) may catch that exception inside and carry
on; the scheduler and the driver lane call `check()` between steps, which raises
it again, so an interrupted run always unwinds: manifest flushed, replicas
stopped, lock released, exit 130.

Example:
    >>> reset(); check()  # nothing recorded: returns
"""

from __future__ import annotations

import threading

_received = threading.Event()


def handle(signum: int, frame: object) -> None:
    """A signal handler: record the signal and raise `KeyboardInterrupt` in the main thread."""
    _received.set()
    raise KeyboardInterrupt(f"signal {signum}")


def check() -> None:
    """Raise `KeyboardInterrupt` if a signal was recorded (and, say, swallowed where it first landed)."""
    if _received.is_set():
        raise KeyboardInterrupt("interrupted")


def reset() -> None:
    """Forget earlier signals (a new run in the same process)."""
    _received.clear()
