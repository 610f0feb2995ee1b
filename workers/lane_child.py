"""A driver lane replica in a process of its own (`pipelines.lane_processes`): one core, no Ray.

A run of many tiny shards is bound by one interpreter's lock (the read, the
numpy forward and the write of a 100-row file are mostly Python), so the lane
runs such a run on one of these per CPU. Started by the driver as
``python -m workers.lane_child FD PARENT_PID`` with one end of a socket pair;
it builds a `Replica` from the first message and then, per bundle, commits each
shard as any replica does (journal record, then publish) and sends each
shard's result as it comes. It dies with the driver (PR_SET_PDEATHSIG), so a
killed or stalled run leaves nothing that could commit behind it.

Messages (pickled, `multiprocessing.connection`): driver -> child
``("start", index, job, numpy_forward)``, ``("bundle", tasks)``, ``("close",)``;
child -> driver ``("ready",)`` once its imports are done, ``("results", [result, ...])``, ``("done", stats)`` after a
bundle, ``("error", exception, stats)`` when a bundle raised, ``("closed", stats)``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

_PR_SET_PDEATHSIG = 1


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


def serve(conn: Connection) -> None:
    import pyarrow as pa

    from workers.replica import Replica

    pa.set_cpu_count(1)  # one core per process: the lane runs one of these per CPU
    _, index, job, numpy_forward = conn.recv()
    replica = Replica(index, job, in_driver=True, numpy_forward=numpy_forward)
    conn.send(("ready",))
    while True:
        message = conn.recv()
        if message[0] == "close":
            replica.close()
            conn.send(("closed", replica.stats()))
            return
        try:
            for results in replica.process_bundle(message[1]):
                conn.send(("results", results))
        except Exception as exc:  # noqa: BLE001 - the driver decides (a storage error is retried)
            conn.send(("error", _sendable(exc), replica.stats()))
        else:
            conn.send(("done", replica.stats()))


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
