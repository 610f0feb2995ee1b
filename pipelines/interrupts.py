"""Ctrl-C and SIGTERM that stay caught: the signal is remembered as well as raised.

Python raises a signal's `KeyboardInterrupt` in whatever Python code the main thread runs next.
When that is a finalizer, the interpreter prints "Exception ignored in" and the interrupt is gone:
Ray runs `ObjectRefGenerator.__del__` on the driver's main thread each time the scheduler drops a
finished call's stream, and about 1 signal in 75 sent to a driver dropping many of them was lost
that way (Ray 2.60), so the run went on and wrote `_SUCCESS`. The handler here also sets a flag,
and the driver's loops and its last commit raise again from it (`check`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_received: int | None = None


def interrupt(signum: int, frame: object) -> None:
    """The handler: remember the signal, then unwind like Ctrl-C."""
    global _received
    _received = signum
    raise KeyboardInterrupt(f"signal {signum}")


def terminate(signum: int, frame: object) -> None:
    """The CLI's SIGTERM handler: `interrupt`, once the alarm of Ray's fatal-signal handler is off.

    Where SIGTERM came to the process while Ray's handler (absl's) was still in front of this one
    (`pipelines.startup._restore_sigterm`), that handler armed a SIGALRM that aborts the process
    3 s later (exit -6, the lock left): the unwind takes longer than that on a busy machine. The
    CLI uses no alarm of its own.
    """
    signal.alarm(0)
    interrupt(signum, frame)


def check() -> None:
    """Raise `KeyboardInterrupt` again if a signal came whose own was swallowed on its way."""
    if _received is not None:
        raise KeyboardInterrupt(f"signal {_received}")


@contextlib.contextmanager
def remembered() -> Iterator[None]:
    """A run's scope: SIGINT at Python's default (`KeyboardInterrupt`) goes through `interrupt` until
    it ends. A handler of the caller's own, or SIGINT ignored (a job started in the background), is
    left as it is; so is every handler off the main thread, where none can be set."""
    global _received
    _received = None
    main = threading.current_thread() is threading.main_thread()
    default = main and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if default:
        signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        if default:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        _received = None
