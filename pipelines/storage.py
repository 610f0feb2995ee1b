"""Paths and URIs through `pyarrow.fs`, so `s3://...` behaves like a local path.

Used by the driver (listing, manifest, lock) and by replicas (reading shards,
committing output files). Nothing here imports Ray or torch.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.errors import ConfigError

_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Location:
    """A resolved path: the filesystem, the path inside it, and how the user wrote it."""

    fs: pafs.FileSystem
    path: str  # filesystem path, no scheme; '/'-separated
    uri: str  # as the user gave it (for messages)
    scheme: str  # "" for local paths

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, relative: str) -> str:
        """The filesystem path of `relative` under this location."""
        return posixpath.join(self.path, relative) if relative else self.path

    def display(self, path: str) -> str:
        """A filesystem path shown the way the user would write it (with its scheme)."""
        return f"{self.scheme}://{path}" if self.scheme and self.scheme != "file" else path


def resolve(uri: str) -> Location:
    """Resolve a local path or URI (`s3://`, `gs://`, `hdfs://`, `file://`).

    Example:
        >>> resolve("/tmp/x").path
        '/tmp/x'
    """
    if "://" not in uri:
        path = os.path.abspath(os.path.expanduser(uri))
        return Location(pafs.LocalFileSystem(), path, uri, "")
    scheme = uri.split("://", 1)[0].lower()
    # A trailing "?key=value&..." holds filesystem options (endpoint_override=...),
    # so in URIs only '*' and '[' act as glob characters.
    main, query = uri, ""
    if "?" in uri and "=" in uri.rsplit("?", 1)[1]:
        main, query = uri.rsplit("?", 1)
    head, tail = main, ""
    glob_at = min((main.index(ch) for ch in "*[" if ch in main), default=-1)
    if glob_at > 0:
        head = main[:glob_at].rsplit("/", 1)[0]
        tail = main[len(head) :]
    try:
        fs, path = pafs.FileSystem.from_uri(head + (f"?{query}" if query else ""))
    except (pa.ArrowInvalid, ValueError, OSError) as exc:
        raise ConfigError(f"cannot open {uri!r}: {exc}") from exc
    path = path.rstrip("/") + tail
    return Location(fs, path.rstrip("/") or "/", uri, scheme)


def absolute(uri: str) -> str:
    """A local path made absolute against this process's working directory (URIs unchanged).

    Paths are resolved once, on the driver: replicas run elsewhere, in another directory.

    Example:
        >>> absolute("s3://bucket/x")
        's3://bucket/x'
    """
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def has_glob(path: str) -> bool:
    return any(ch in path for ch in _GLOB_CHARS)


def static_prefix(path: str) -> str:
    """The directory part of a glob before its first wildcard (the path itself without one).

    Example:
        >>> static_prefix("/data/day=*/part-*.parquet")
        '/data'
    """
    if not has_glob(path):
        return path
    prefix = path[: min(path.index(ch) for ch in _GLOB_CHARS if ch in path)]
    return prefix.rsplit("/", 1)[0] if "/" in prefix else ""


def is_hidden(relative: str) -> bool:
    """Names starting with `_` or `.` are skipped, as pyarrow datasets do."""
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def list_files(location: Location) -> tuple[str, list[pafs.FileInfo]]:
    """The input files under a file, directory (recursive) or glob, in path order.

    Returns the base directory that relative output paths mirror, and the files.
    Hidden names (`_SUCCESS`, `.crc`, ...) are skipped.
    """
    fs, path = location.fs, location.path
    if has_glob(path):
        base = static_prefix(path)
        infos = _walk(fs, base)
        files = [info for info in infos if fnmatch.fnmatchcase(info.path, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return posixpath.dirname(path), [info]
        if info.type != pafs.FileType.Directory:
            return path, []
        base = path
        files = _walk(fs, base)
    files = [info for info in files if not is_hidden(relative_to(base, info.path))]
    return base, sorted(files, key=lambda info: info.path)


def _walk(fs: pafs.FileSystem, base: str) -> list[pafs.FileInfo]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [info for info in infos if info.type == pafs.FileType.File]


def relative_to(base: str, path: str) -> str:
    if not base:
        return path.lstrip("/")
    prefix = base.rstrip("/") + "/"
    if path.startswith(prefix):  # the common case, and 10x cheaper than relpath on 100k paths
        return path[len(prefix):]
    return posixpath.relpath(path, base)


def overlaps(a: str, b: str) -> bool:
    """Whether one of two filesystem paths contains the other (or they are equal)."""
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def existing_infos(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    """Every file under `root` with its size (one listing)."""
    return _walk(fs, root)


def existing_files(fs: pafs.FileSystem, root: str) -> set[str]:
    """Paths of all files under `root` (one listing, not one request per file)."""
    return {info.path for info in _walk(fs, root)}


TEMP_SUFFIX = ".tmp"


def temp_name(path: str) -> str:
    """A hidden, unique temporary name next to `path` (`.name.<hex>.tmp`)."""
    parent, name = posixpath.split(path)
    return posixpath.join(parent, f".{name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")


def is_temp(path: str) -> bool:
    """Whether a path is one of our temporary files (left behind only by a killed attempt)."""
    name = posixpath.basename(path)
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


class _Hashing:
    """A write-only file object that hashes (sha256) and counts what passes through it."""

    def __init__(self, sink: pa.NativeFile) -> None:
        self.sink = sink
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.sink.write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


class StagedFile:
    """A file written under a hidden temporary name, then published under its final path whole.

    Every byte is hashed on the way out, so the commit record can carry the
    file's size and sha256 before the file becomes visible. Local files and
    HDFS publish by rename; object stores stream a (multipart) upload to the
    temporary key and publish with a server-side move. A staged file that is
    discarded, or whose writer is killed, leaves only a hidden `.tmp` name
    behind, which readers skip and a complete run sweeps away.

    Example:
        >>> staged = StagedFile(fs, "/out/part-0-00000.parquet")  # doctest: +SKIP
        >>> staged.stream.write(b"...")
        >>> size, sha256 = staged.finish()
        >>> staged.publish()
    """

    def __init__(self, fs: pafs.FileSystem, path: str) -> None:
        self.fs = fs
        self.path = path
        self.tmp = temp_name(path)
        parent = posixpath.dirname(path)
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(parent, exist_ok=True)
        else:
            with contextlib.suppress(OSError):
                fs.create_dir(parent, recursive=True)
        self._raw = fs.open_output_stream(self.tmp)
        self._hashing = _Hashing(self._raw)
        self.stream = pa.PythonFile(self._hashing, mode="w")
        self.size = 0
        self.sha256 = ""

    def finish(self) -> tuple[int, str]:
        """Complete the temporary file; returns (size in bytes, sha256 hex)."""
        self.stream.close()
        self._raw.close()
        self.size, self.sha256 = self._hashing.size, self._hashing.sha256.hexdigest()
        return self.size, self.sha256

    def publish(self) -> None:
        """Move the finished temporary file to its final path (replacing what was there)."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            os.replace(self.tmp, self.path)
        else:
            self.fs.move(self.tmp, self.path)

    def discard(self) -> None:
        """Drop the temporary file (after a failure); never raises."""
        with contextlib.suppress(Exception):
            if not self._raw.closed:
                self._raw.close()
        with contextlib.suppress(Exception):
            self.fs.delete_file(self.tmp)


@contextlib.contextmanager
def atomic_sink(fs: pafs.FileSystem, path: str) -> Iterator[pa.NativeFile]:
    """A stream whose content appears at `path` whole, or not at all (see `StagedFile`)."""
    staged = StagedFile(fs, path)
    try:
        yield staged.stream
        staged.finish()
        staged.publish()
    except BaseException:
        staged.discard()
        raise


def sweep_temps(fs: pafs.FileSystem, root: str) -> int:
    """Delete every temporary file under `root` (left by killed attempts); returns how many."""
    temps = [info.path for info in _walk(fs, root) if is_temp(info.path)]
    for path in temps:
        delete_file(fs, path)
    return len(temps)


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with atomic_sink(fs, path) as sink:
        sink.write(data)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
    """The whole file, or None when it does not exist."""
    try:
        with fs.open_input_stream(path) as stream:
            return bytes(stream.read())
    except FileNotFoundError:
        return None
    except OSError as exc:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise exc


def delete_file(fs: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)
