"""A driver lane replica in a process of its own (`pipelines.lane_processes`): one core, no Ray.

A run of many tiny shards is bound by one interpreter's lock (the read, the
numpy forward and the write of a 100-row file are mostly Python), so the lane
runs such a run on one of these per CPU. Started by the driver as
``python -m workers.lane_child FD PARENT_PID`` with one end of a socket pair (in `environment`);
it builds a `Replica` from the first message and then, per bundle, commits each
shard as any replica does (journal record, then publish) and sends the
shards' results in lists (`_Outbox`: none held back more than `send_every`
seconds). It dies with the driver (PR_SET_PDEATHSIG), so a
killed or stalled run leaves nothing that could commit behind it.

Messages (pickled, `multiprocessing.connection`): driver -> child
``("start", index, job, numpy_forward, send_every)``, ``("bundle", epoch, tasks)``, ``("close",)``;
child -> driver ``("ready",)`` once its imports are done, ``("results", [result, ...])`` (every result of a
bundle once, in order, in one or more lists), ``("done", stats)`` after a bundle, ``("error", exception, stats)``
when a bundle raised, ``("dropped", stats)`` for a bundle of the epoch of one that raised (queued behind it
before the driver knew: never started), ``("closed", stats)``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Mapping
from multiprocessing.connection import Connection
from typing import Any

_PR_SET_PDEATHSIG = 1
# glibc's per-thread cache of freed small blocks, 7 a size by default: a tiny file's Parquet read and write
# allocate and free thousands of small C++ objects, and past 7 each went through the arenas' locked bins
# (malloc, free, malloc_consolidate were ~15% of a child's CPU). 1,000 a size keeps them in the cache:
# -20 us a Parquet read of a 100-row file, -50 us a file on the whole path (quiet 2-core box: see issue 15).
MALLOC_TUNABLES = "glibc.malloc.tcache_count=1000"


def environment(base: Mapping[str, str]) -> dict[str, str]:
    """The environment to start a child in: `base` with `MALLOC_TUNABLES` added (read by glibc at start-up;
    settings already in GLIBC_TUNABLES stay, and win)."""
    tunables = base.get("GLIBC_TUNABLES")
    return {**base, "GLIBC_TUNABLES": f"{MALLOC_TUNABLES}:{tunables}" if tunables else MALLOC_TUNABLES}


def _die_with(parent: int) -> None:
    """SIGKILL this process when the driver's thread that started it ends (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the driver ended before the call above
        os._exit(1)


def _sendable(exc: BaseException) -> BaseException:
    """The exception itself when it pickles and loads back, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class _Outbox:
    """The results of a bundle, sent in lists by a thread of their own: each goes out at most `every`
    seconds after it came, whatever the next shard does (a shard that hangs in a read holds back no
    result of the shards before it: the driver's clock charges the shard that stalled)."""

    def __init__(self, conn: Connection, every: float) -> None:
        self.conn, self.every = conn, every
        self._lock = threading.Lock()  # the connection and `_pending`
        self._pending: list[dict[str, Any]] = []
        self._wake = threading.Event()
        threading.Thread(target=self._loop, name="batch-infer-outbox", daemon=True).start()

    def add(self, results: list[dict[str, Any]]) -> None:
        with self._lock:
            self._pending.extend(results)
        if not self._wake.is_set():
            self._wake.set()

    def send(self, message: tuple[Any, ...]) -> None:
        """`message` after every result added before it."""
        with self._lock:
            self._flush()
            self.conn.send(message)

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self.every)
            self._wake.clear()  # a result added from here on sets it again
            try:
                with self._lock:
                    self._flush()
            except OSError:  # the driver is gone: the main thread meets it too
                return

    def _flush(self) -> None:
        if self._pending:
            results, self._pending = self._pending, []
            self.conn.send(("results", results))


def serve(conn: Connection) -> None:
    import pyarrow as pa

    from workers.cpu_forward import quiet_thread
    from workers.replica import Replica

    pa.set_cpu_count(1)  # one core per process: the lane runs one of these per CPU
    quiet_thread()  # its bundles run in this thread: the numpy forward needs no error-state context a batch
    _, index, job, numpy_forward, send_every = conn.recv()
    replica = Replica(index, job, in_driver=True, numpy_forward=numpy_forward)
    conn.send(("ready",))
    outbox = _Outbox(conn, send_every)
    failed = None  # the epoch of the last bundle that raised: the bundles queued behind it are dropped
    while True:
        message = conn.recv()
        if message[0] == "close":
            replica.close()
            outbox.send(("closed", replica.stats()))
            return
        _, epoch, tasks = message
        if epoch == failed:
            outbox.send(("dropped", replica.stats()))
            continue
        try:
            for results in replica.process_bundle(tasks):
                outbox.add(results)
        except Exception as exc:  # noqa: BLE001 - the driver decides (a storage error is retried)
            failed = epoch
            outbox.send(("error", _sendable(exc), replica.stats()))
        else:
            outbox.send(("done", replica.stats()))


def main(argv: list[str]) -> None:
    fd, parent = int(argv[0]), int(argv[1])
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it kills this process
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    conn = Connection(fd)
    try:
        serve(conn)
    except EOFError:  # the driver is gone
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
