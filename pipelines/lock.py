"""One run per output at a time: the `_LOCK` file.

The output is the sink's location (`pipelines.tables.sink`): a Parquet
directory, a Delta table's root (beside its data and `_delta_log/`; Delta
readers and VACUUM skip names starting with `_`) or an Iceberg table's location
(beside `metadata/` and `data/`; orphan-file removal skips `_` names), so one
run per output table holds whichever catalog or path names it.

The lock is a small JSON record (token, pid, host, started, heartbeat). The
holder rewrites its heartbeat every `ttl / 4` seconds. A lock whose heartbeat
is older than `ttl`, whose holder process is gone (same host), or that can't
be parsed was left by a killed run and is taken over.

Local filesystems (and NFS): the lock never exists half-written. It is created
by writing the whole record to a hidden temporary file and hard-linking that to
`_LOCK`, which fails if a lock is there. Every later change to `_LOCK` (stale
takeover, heartbeat, release) takes `flock` on the inode `_LOCK` names,
re-reads the record under it, and then renames a new file over it or unlinks
it. So of many runs taking over one stale lock exactly one wins; the others
were waiting on the old inode, find `_LOCK` replaced, and see a live lock. A
heartbeat or release never touches a lock that someone else took over. The
flock is held only for those few system calls, never for the run, so no lock
descriptor is left open for child processes to inherit.

Object stores (`s3://`, `gs://`, ...): `pyarrow.fs` has no conditional create,
so the lock is written and read back. That is best effort: two runs starting
within moments of each other can both believe they hold it.

`OutputLock.check()` raises `LockHeldError` once the lock is lost (taken
over, replaced or deleted by someone else, or the heartbeat failed), so a run
can stop before it writes its manifest or `_SUCCESS`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from basis.errors import LockHeldError
from basis.storage import Location, delete_file, read_bytes, temp_name, write_bytes_atomic

LOCK = "_LOCK"
DEFAULT_TTL = 60.0
_ATTEMPTS = 10  # a lock that changes hands more often than this while we look is "held"

logger = logging.getLogger(__name__)

Record = dict[str, Any]


class OutputLock:
    """Context manager holding the output's lock for the length of a run.

    Example:
        >>> with OutputLock(resolve("preds/")) as lock:  # doctest: +SKIP
        ...     ...  # plan, run
        ...     lock.check()  # raises LockHeldError if another run took the lock
        ...     ...  # write the manifest, _SUCCESS
    """

    def __init__(self, output: Location, *, ttl: float = DEFAULT_TTL) -> None:
        self.output = output
        self.path = output.join(LOCK)
        self.ttl = ttl
        self.token = uuid.uuid4().hex
        self._file: _LocalLockFile | _ObjectLockFile = (
            _LocalLockFile(self.path) if output.is_local else _ObjectLockFile(output, self.path))
        self._started = ""
        self._created_dirs: list[str] = []  # directories acquire() made, deepest first
        self._acquired = False
        self._last_beat = 0.0  # time.monotonic() of the last heartbeat written
        self._lost: str | None = None  # why the heartbeat thread stopped, if it did on its own
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OutputLock:
        try:
            self.acquire()
        except BaseException:
            # Ctrl-C or SIGTERM (KeyboardInterrupt) after the lock file was written and before `with` holds
            # it: `__exit__` never runs, so the file is removed here if it is ours (the history machine's
            # SIGTERM right as a run took its lock left it behind).
            self._stop.set()
            with contextlib.suppress(Exception):
                self._file.replace(self.token, None)
            self._acquired = False
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.release(refused=exc_type is not None)

    @property
    def held(self) -> bool:
        """Whether this run still holds the lock (`check()` without the exception)."""
        try:
            self.check()
        except (LockHeldError, OSError):
            return False
        return True

    def acquire(self) -> None:
        """Take the lock, or raise `LockHeldError` if a live run holds it; starts the heartbeat."""
        if self.output.is_local:
            self._created_dirs = _make_dirs(self.output.path)
        self._started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        try:
            holder = self._file.create(self.token, self._data(), self._is_stale)
        except BaseException:
            self._remove_created_dirs()
            raise
        if holder is not None:
            self._remove_created_dirs()  # a refused run leaves nothing behind
            raise LockHeldError(self._held_message(holder))
        self._acquired = True
        self._last_beat = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="batch-infer-lock", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise `LockHeldError` unless this run still holds the lock.

        Call it right before writing what only the lock holder may write
        (the manifest, `_SUCCESS`). An error reading the lock file itself
        propagates as `OSError`.

        Example:
            >>> lock.check()  # doctest: +SKIP
            >>> manifest.flush()
        """
        where = self.output.uri
        if not self._acquired:
            raise LockHeldError(f"this run does not hold the lock on {where!r}")
        if self._lost is not None:
            raise LockHeldError(f"this run lost the lock on {where!r}: {self._lost}; {_RERUN}")
        if self._thread is None or not self._thread.is_alive():
            raise LockHeldError(f"this run lost the lock on {where!r}: its heartbeat thread stopped; {_RERUN}")
        overdue = time.monotonic() - self._last_beat
        if overdue > self.ttl:
            raise LockHeldError(f"this run lost the lock on {where!r}: its last heartbeat was {overdue:.1f} s ago "
                                f"(TTL {self.ttl:g} s), so another run may have taken it over; {_RERUN}")
        holder = self._file.read()
        if holder is None:
            raise LockHeldError(f"this run lost the lock on {where!r}: {self.path} was deleted; {_RERUN}")
        if holder.get("token") != self.token:
            raise LockHeldError(f"this run lost the lock on {where!r}: it was taken over or replaced "
                                f"({_describe(holder)}); {_RERUN}")

    def release(self, *, refused: bool = False) -> None:
        """Stop the heartbeat and delete the lock if it is still ours; never raises for a lost lock.

        Args:
            refused: the run stopped with an error (as `with` passes it): also remove the
                output directory if `acquire()` made it and it is empty again, so a refused
                run leaves nothing behind. A run that ends normally keeps its directory.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._acquired:
            self._acquired = False
            if not self._file.replace(self.token, None):
                logger.warning("the lock on %s was no longer ours at release; left it in place", self.output.uri)
        if refused:
            self._remove_created_dirs()
        self._created_dirs = []  # a run that ended normally keeps its directory

    def _data(self) -> bytes:
        record = {"token": self.token, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": self._started, "heartbeat": time.time()}
        return json.dumps(record).encode()

    def _is_stale(self, holder: Record) -> bool:
        try:
            age = time.time() - float(holder.get("heartbeat", 0.0))
        except (TypeError, ValueError):
            return True  # a foreign or damaged record
        if age > self.ttl:
            return True
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not _pid_alive(holder["pid"])
        return False

    def _held_message(self, holder: Record) -> str:
        return (f"another run holds the lock on {self.output.uri!r} ({_describe(holder)}); wait for it to finish. "
                f"A lock left by a killed run expires {self.ttl:.0f} s after its last heartbeat.")

    def _heartbeat(self) -> None:
        # Any failure here ends the heartbeat: check() then reports the lock as lost, because
        # without heartbeats another run will take the lock over after `ttl`.
        try:
            while not self._stop.wait(self.ttl / 4):
                if not self._file.replace(self.token, self._data()):
                    self._lost = "it was taken over, replaced or deleted by someone else"
                    return
                self._last_beat = time.monotonic()
        except Exception as exc:  # recorded for check(), never dropped
            self._lost = f"its heartbeat failed ({type(exc).__name__}: {exc})"
            logger.warning("lock heartbeat on %s failed: %s", self.output.uri, exc)

    def _remove_created_dirs(self) -> None:
        # Only directories this lock made, deepest first, and only while empty (rmdir refuses otherwise).
        for path in self._created_dirs:
            try:
                os.rmdir(path)
            except OSError:
                break
        self._created_dirs = []


_RERUN = "stopped before writing the manifest or _SUCCESS; rerun to resume once the other run is done"


class _LocalLockFile:
    """`_LOCK` on a local or NFS filesystem: exclusive create by hard link, changes by rename under flock."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> Record | None:
        # Every version of the file was complete before it got this name, so a plain read is never torn.
        try:
            with open(self.path, "rb") as handle:
                return _parse(handle.read())
        except FileNotFoundError:
            return None

    def create(self, token: str, data: bytes, is_stale: Callable[[Record], bool]) -> Record | None:
        """Make `data` the lock if there is none or it is stale; None on success, else the live holder."""
        tmp = self._write_temp(data)
        try:
            for _ in range(_ATTEMPTS):
                try:
                    os.link(tmp, self.path)  # exclusive create of a complete file (EEXIST when held)
                    return None
                except FileExistsError:
                    pass
                with _flocked(self.path) as content:
                    if content is None:
                        continue  # released meanwhile: try to create it again
                    holder = _parse(content)
                    if holder.get("token") == token:
                        return None  # our link did happen (NFS can report EEXIST for a retried link)
                    if not is_stale(holder):
                        return holder
                    os.replace(tmp, self.path)  # take over; rivals waiting on the old inode will see ours
                    return None
            return {}
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def replace(self, token: str, data: bytes | None) -> bool:
        """Replace the lock with `data` (delete it for None) if it still holds `token`; False if not."""
        tmp = self._write_temp(data) if data is not None else None
        try:
            with _flocked(self.path) as content:
                if content is None or _parse(content).get("token") != token:
                    return False
                if tmp is None:
                    os.unlink(self.path)
                else:
                    os.replace(tmp, self.path)
                return True
        finally:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def _write_temp(self, data: bytes) -> str:
        tmp = temp_name(self.path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return tmp


@contextlib.contextmanager
def _flocked(path: str) -> Iterator[bytes | None]:
    """Hold `flock` on the inode `path` names; yields its content, or None when there is no file.

    Whoever changes `_LOCK` does so inside this block, so while we hold it the
    name keeps pointing at the inode we locked. If the name was moved to
    another inode while we waited for the flock, lock that one instead.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)  # non-inheritable (PEP 446): child processes never get it
        except FileNotFoundError:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_inode(fd, path):
                yield _read_all(fd)
                return
        finally:
            os.close(fd)  # also drops the flock


def _same_inode(fd: int, path: str) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


class _ObjectLockFile:
    """`_LOCK` on an object store: write, then read back. Best effort (no conditional create)."""

    def __init__(self, output: Location, path: str) -> None:
        self.fs = output.fs
        self.path = path

    def read(self) -> Record | None:
        data = read_bytes(self.fs, self.path)
        return None if data is None else _parse(data)

    def create(self, token: str, data: bytes, is_stale: Callable[[Record], bool]) -> Record | None:
        for _ in range(_ATTEMPTS):
            holder = self.read()
            if holder is not None:
                if not is_stale(holder):
                    return holder
                delete_file(self.fs, self.path)
            write_bytes_atomic(self.fs, self.path, data)
            holder = self.read()
            if holder is not None and holder.get("token") == token:
                return None
        return {}

    def replace(self, token: str, data: bytes | None) -> bool:
        holder = self.read()
        if holder is None or holder.get("token") != token:
            return False
        if data is None:
            delete_file(self.fs, self.path)
        else:
            write_bytes_atomic(self.fs, self.path, data)
        return True


def _parse(data: bytes) -> Record:
    """A lock record; a torn, empty or foreign file reads as a record that is stale."""
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    return record if isinstance(record, dict) else {"heartbeat": 0.0}


def _describe(holder: Record) -> str:
    if "pid" not in holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"


def _make_dirs(path: str) -> list[str]:
    """Create `path` and its missing parents; returns the directories this call made, deepest first.

    Example:
        >>> _make_dirs("/tmp/new/out")  # doctest: +SKIP
        ['/tmp/new/out', '/tmp/new']
    """
    missing = []
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    made = []
    for directory in reversed(missing):  # top down
        try:
            os.mkdir(directory)
        except FileExistsError:
            continue  # a concurrent run made it: not ours to remove
        made.append(directory)
    return made[::-1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
