"""Which files under a directory tree a process opens, seen from outside it (Linux inotify).

The table-scale case uses it to check that a tick over unchanged input reads no
Parquet footer: it watches every input directory for ``IN_OPEN`` while the tick
runs. Nothing in the process under test changes; inotify only reports events.

    >>> with OpenWatch(Path("features")) as watch:  # doctest: +SKIP
    ...     subprocess.run(["cat", "features/a.parquet"])
    >>> watch.files
    {'a.parquet'}

Opens of directories (listings) are not counted. Where inotify is unavailable
(another OS, too few watches), ``files`` is None: unknown, never a false 0.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import threading
from pathlib import Path

_IN_OPEN = 0x00000020
_IN_Q_OVERFLOW = 0x00004000
_IN_ISDIR = 0x40000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of NUL-padded name


class OpenWatch:
    """Context manager: the set of files (relative to ``root``) opened while it is active."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: set[str] | None = None
        self.overflowed = False
        self._dirs: dict[int, str] = {}  # watch descriptor -> directory relative to root
        self._fd = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OpenWatch:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self._fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if self._fd < 0:
                return self
            for directory in [Path(top) for top, _, _ in os.walk(self.root)]:
                wd = libc.inotify_add_watch(self._fd, os.fsencode(directory), _IN_OPEN)
                if wd < 0:
                    raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
                self._dirs[wd] = str(directory.relative_to(self.root))
        except (OSError, AttributeError):  # no inotify here, or the watch limit: report "unknown"
            self._close()
            return self
        self.files = set()
        self._thread = threading.Thread(target=self._drain, name="open-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._close()
        if self.overflowed:
            self.files = None  # events were lost: the count would be a lower bound

    def _drain(self) -> None:
        while True:
            stopping = self._stop.is_set()
            ready, _, _ = select.select([self._fd], [], [], 0 if stopping else 0.05)
            if ready:
                self._parse(os.read(self._fd, 1 << 16))
            elif stopping:
                return

    def _parse(self, data: bytes) -> None:
        offset = 0
        while offset < len(data):
            wd, mask, _, size = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + size].rstrip(b"\0").decode()
            offset += _EVENT.size + size
            if mask & _IN_Q_OVERFLOW:
                self.overflowed = True
            elif mask & _IN_OPEN and not mask & _IN_ISDIR and name and self.files is not None:
                self.files.add(os.path.normpath(os.path.join(self._dirs.get(wd, "?"), name)))

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
