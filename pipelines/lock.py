"""One run per output at a time: the `_LOCK` file.

The holder rewrites its heartbeat every `ttl / 4` seconds. A lock whose
heartbeat is older than `ttl`, or whose holder process is gone (same host),
was left by a killed run and is taken over. Local files are created with
O_EXCL; object stores have no exclusive create, so there the lock is written
and read back (best effort, documented in the README).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import pyarrow.fs as pafs

from pipelines.errors import LockHeldError
from pipelines.storage import Location, delete_file, read_bytes, write_bytes_atomic

LOCK = "_LOCK"
DEFAULT_TTL = 60.0


class OutputLock:
    """Context manager holding the output's lock for the length of a run.

    Example:
        >>> with OutputLock(resolve("preds/")):  # doctest: +SKIP
        ...     ...  # plan, run, commit
    """

    def __init__(self, output: Location, *, ttl: float = DEFAULT_TTL) -> None:
        self.output = output
        self.path = output.join(LOCK)
        self.ttl = ttl
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        fs = self.output.fs
        if self.output.is_local:
            fs.create_dir(self.output.path, recursive=True)
        for _ in range(3):
            if self._try_create():
                break
            holder = self._read()
            if holder is None:
                continue  # released between our attempt and the read
            if not self._is_stale(holder):
                raise LockHeldError(
                    f"another run holds the lock on {self.output.uri!r} (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('started')}); wait for it to finish. "
                    f"A lock left by a killed run expires {self.ttl:.0f} s after its last heartbeat."
                )
            delete_file(fs, self.path)  # stale: take it over
        else:
            raise LockHeldError(f"could not take the lock on {self.output.uri!r}: it keeps changing hands")
        self._thread = threading.Thread(target=self._heartbeat, name="batch-infer-lock", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise LockHeldError when this run no longer holds the lock."""
        holder = self._read()
        if holder is None or holder.get("token") != self.token:
            raise LockHeldError(f"this run lost the lock on {self.output.uri!r}; it stops without writing more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            delete_file(self.output.fs, self.path)

    def _record(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": getattr(self, "_started", None) or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "heartbeat": time.time(),
        }

    def _try_create(self) -> bool:
        self._started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        data = json.dumps(self._record()).encode()
        if isinstance(self.output.fs, pafs.LocalFileSystem):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return True
        if self._read() is not None:
            return False
        write_bytes_atomic(self.output.fs, self.path, data)
        holder = self._read()
        return holder is not None and holder.get("token") == self.token

    def _read(self) -> dict[str, Any] | None:
        data = read_bytes(self.output.fs, self.path)
        if data is None:
            return None
        try:
            return dict(json.loads(data))
        except ValueError:
            return {"heartbeat": 0.0}  # a torn or foreign lock file: treat as stale

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        if time.time() - float(holder.get("heartbeat", 0.0)) > self.ttl:
            return True
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not _pid_alive(holder["pid"])
        return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            holder = self._read()
            if holder is None or holder.get("token") != self.token:
                return  # taken over (we were presumed dead); stop touching it
            write_bytes_atomic(self.output.fs, self.path, json.dumps(self._record()).encode())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
