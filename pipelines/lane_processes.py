"""The driver lane's replicas in processes of their own, for runs of many tiny shards (`workers.lane_child`).

The lane's replica in the driver process shares one interpreter lock with the
driver's own work (recording each commit): a run of 100-row files is bound by
it, so a second work thread gives nothing (10,000 files, busy 2-core box: 661
against 670 shards/s, 1.58 against 1.53 ms of CPU per file). Ray's replicas are
separate interpreters but take ~5-10 s to start and hold Ray's memory in the
driver. So for many tiny shards (`pipelines.startup.lane_processes`) the lane
starts one child process per CPU (a Python that imports pyarrow and numpy:
~0.3 s), each a `Replica` that commits its shards as every replica does; the
driver keeps the clock, the retries and the records, as for its own replica.

`ProcessReplica` stands for a child where `pipelines.lane` holds a `Replica`:
`send` queues a bundle in it and `receive` yields the shards' results as the
child sends them, `abandon` kills the child (a stalled shard can never commit
after it), `close` ends it and keeps its counters for the report.

The lane keeps a second bundle queued in the child (`send` it, then `receive` each bundle's results
in the order sent): the child starts it the moment the first is done, instead of waiting for the
driver to record the first one's last results and send another (3-10 ms a bundle of ~45 ms: 12% of
each child's time at 100,000 tiny files). A bundle that raises in the child ends its `epoch`: the
child drops every bundle of that epoch still queued behind it (the driver puts their shards back),
and the driver's bundles after the error carry the next epoch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from workers.lane_child import environment
from workers.replica_job import ReplicaJob, State


class ReplicaStartError(RuntimeError):
    """A child replica did not start (its imports failed, or it never answered)."""


class ReplicaDied(RuntimeError):
    """A child replica's process ended in the middle of a bundle (killed: the OOM killer, a signal)."""

# A child sends its results at most this long after each came, in one message (`workers.lane_child._Outbox`):
# one message per ~40 tiny shards instead of one each (a message costs CPU in both processes, and the
# driver's threads contend for its interpreter lock meanwhile). The driver's clock is late by as much.
SEND_EVERY = 0.05
_CLOSE_SECONDS = 30.0  # how long `close` waits for a child's last counters
START_SECONDS = 120.0  # how long a child may take to import what it needs (a busy machine: seconds)


class ProcessReplica:
    """A lane replica in a child process (module doc); the parts of `workers.replica.Replica` the lane uses."""

    def __init__(self, index: int, job: ReplicaJob, *, numpy_forward: bool) -> None:
        self.index = index
        mine, theirs = socket.socketpair()
        path = os.pathsep.join(filter(None, (_ROOT, os.environ.get("PYTHONPATH"))))
        env = environment({**os.environ, "PYTHONPATH": path})  # with glibc's malloc tuned for tiny files
        # Started from the caller's thread: the child dies when that thread ends (PR_SET_PDEATHSIG), so the lane
        # starts its replicas from the thread that runs it to the end (`pipelines.lane.run_in_driver`).
        self.process = subprocess.Popen([sys.executable, "-m", "workers.lane_child", str(theirs.fileno()),
                                         str(os.getpid())], pass_fds=(theirs.fileno(),), env=env,
                                        stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(mine.detach())
        self.conn.send(("start", index, job, numpy_forward, SEND_EVERY))
        self.state = State.READY
        self._stats: dict[str, Any] = {"node": "driver", "device": "cpu", "pid": self.process.pid, "shards": 0,
                                       "rows": 0, "busy_seconds": 0.0, "peak_rss_bytes": 0}
        self._lock = threading.Lock()  # one reader at a time; `close` waits for it
        self._ready = False
        self._epoch = 0  # of the bundles sent from now on: a bundle that raised ends its epoch (module doc)

    def wait_ready(self) -> None:
        """Waits for the child's imports (not a shard's time: the lane's clock starts after this); raises
        `ReplicaDied` when a signal killed it meanwhile (the OOM killer), `ReplicaStartError` when it did not
        start within `START_SECONDS` (or exited: its imports failed)."""
        if self._ready:
            return
        if not self.conn.poll(START_SECONDS):
            raise ReplicaStartError(f"the driver lane's child replica {self.index} (pid {self.process.pid}) did not "
                                    f"start within {START_SECONDS:g} s")
        try:
            if self.conn.recv() == ("ready",):
                self._ready = True
                return
        except (EOFError, OSError):
            pass
        code = self._exit_code()  # its end of the socket closed: it has exited, or is exiting
        if code is not None and code < 0:
            raise ReplicaDied(f"the driver lane's child replica {self.index} (pid {self.process.pid}) was killed by "
                              f"signal {-code} before it was ready")
        raise ReplicaStartError(f"the driver lane's child replica {self.index} (pid {self.process.pid}) ended "
                                f"before it was ready ({'still running' if code is None else f'exit {code}'})")

    def send(self, tasks: list[dict[str, Any]]) -> None:
        """Queue a bundle in the child, behind those sent before it; `receive` gives its results in turn."""
        try:
            self.conn.send(("bundle", self._epoch, tasks))
        except OSError as exc:
            raise self._died() from exc

    def receive(self) -> Iterator[list[dict[str, Any]]]:
        """The results of the oldest bundle sent and not received yet, a list at a time; raises what it raised
        in the child, which then drops the bundles queued behind it (their shards are the caller's to put back)."""
        with self._lock:
            while True:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError) as exc:
                    raise self._died() from exc
                if message[0] == "results":
                    yield message[1]
                    continue
                self._stats = message[-1]
                if message[0] == "dropped":  # a bundle queued behind one that raised: already given back
                    continue
                if message[0] == "error":
                    self._epoch += 1
                    raise message[1]
                return

    def _died(self) -> ReplicaDied:
        code = self._exit_code()
        how = "still running" if code is None else f"killed by signal {-code}" if code < 0 else f"exit {code}"
        return ReplicaDied(f"the driver lane's child replica {self.index} (pid {self.process.pid}) ended in the "
                           f"middle of a bundle ({how})")

    def _exit_code(self) -> int | None:
        """The child's exit status once its socket has closed; None if it is still running 5 s later. Waited
        for, not polled: a killed process's files close before the kernel reports its exit (ci49: a child
        killed as it started was polled "still running" and called one that never started, failing the run)."""
        try:
            return self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            return None

    def stats(self) -> dict[str, Any]:
        """The child's counters as it last sent them (after each bundle, and when it closed)."""
        return dict(self._stats)

    def close(self) -> None:
        """Ends the child after its bundle in hand, keeping its last counters."""
        if self.state is not State.READY:
            return
        self.state = State.CLOSED
        if self._lock.acquire(timeout=_CLOSE_SECONDS):
            try:
                self.conn.send(("close",))
                while self.conn.poll(_CLOSE_SECONDS):
                    message = self.conn.recv()  # ("ready",) first if it never ran a bundle
                    if message[0] == "closed":
                        self._stats = message[1]
                        break
            except (EOFError, OSError):
                pass
            finally:
                self._lock.release()
        self._end()

    def abandon(self) -> None:
        """Given up (it stalled, or the run was interrupted): the child is killed, so the shard in hand never
        commits (a shard killed between its journal record and its publish is as on a Ray replica)."""
        self.state = State.CLOSED
        self._end(close=False)  # a thread may be reading from it: it meets the end of the stream

    def _end(self, close: bool = True) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if close:
            self.conn.close()


_ROOT = str(Path(__file__).resolve().parent.parent)  # where `workers` is, for the child's imports
