"""Paths and URIs through `pyarrow.fs`, so `s3://...` behaves like a local path.

Used by the driver (manifest, lock; listing is `basis.listing`) and by replicas
(reading shards, committing output files). Nothing here imports Ray or torch.

Object stores fail transiently (throttling, 5xx, resets, timeouts). Every
operation here retries those (`basis.retry`) and raises `StorageError`
when they outlast the retries, so a flaky store is never mistaken for bad data.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from basis.errors import ConfigError, OutputAccessError
from basis.retry import RETRY_ATTEMPTS, RETRY_BASE_DELAY, BrokenStream, is_transient, retry_transient

GLOB_CHARS = "*?["
URI_GLOB_CHARS = "*["  # in URIs a '?' starts the filesystem options (see `resolve`)


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

    @property
    def glob_chars(self) -> str:
        """Characters that make `path` a glob: `*?[` for local paths, `*[` in URIs."""
        return URI_GLOB_CHARS if self.scheme else GLOB_CHARS

    def join(self, relative: str) -> str:
        """The filesystem path of `relative` under this location."""
        return posixpath.join(self.path, relative) if relative else self.path

    def display(self, path: str) -> str:
        """A filesystem path shown the way the user would write it (with its scheme)."""
        return f"{self.scheme}://{path}" if self.scheme and self.scheme != "file" else path


REDACTED = "REDACTED"
# Query options and URI passwords that hold secrets: never persisted, logged or printed.
_SECRET_OPTION = re.compile(r"(?i)\b([a-z0-9_.-]*(?:key|secret|token|password|passwd|credential|signature)"
                            r"[a-z0-9_.-]*)=([^&\s'\"\]),;]*)")
# `scheme://user:password@`: for S3 the access key id and the secret key (pyarrow's way to give them).
_URI_USERINFO = re.compile(r"://[^/@:\s'\"?#]+:[^@\s'\"?#]*@")
_REDACTED_USERINFO = f"{REDACTED}:{REDACTED}@"


def redact(text: str) -> str:
    """`text` (a URI, or a message holding URIs) with every secret replaced by `REDACTED`.

    Secrets are the user and password of `scheme://user:password@` (for `s3://` the access
    key id and secret key), and the values of options whose name says key, secret, token,
    password, credential or signature (`access_key=`, `secret_key=`, `session_token=`,
    ...). Everything else is kept, so a redacted URI still resolves (`resolve` drops what
    was redacted: credentials then come from the environment, as everywhere else).

    Example:
        >>> redact("s3://AKIA1:s3cr3t@bucket/in/?endpoint_override=h:9000")
        's3://REDACTED:REDACTED@bucket/in/?endpoint_override=h:9000'
        >>> redact("s3://b/in/?region=eu-west-1&secret_key=SK")
        's3://b/in/?region=eu-west-1&secret_key=REDACTED'
    """
    return _URI_USERINFO.sub("://" + _REDACTED_USERINFO, _SECRET_OPTION.sub(rf"\1={REDACTED}", text))


def resolve(uri: str) -> Location:
    """Resolve a local path or URI (`s3://`, `gs://`, `hdfs://`, `file://`).

    The location's `uri` is the one given with its secrets redacted (`redact`): it is
    what messages, the manifest and metrics show.

    Example:
        >>> resolve("/tmp/x").path
        '/tmp/x'
    """
    if "://" not in uri:
        path = os.path.abspath(os.path.expanduser(uri))
        return Location(pafs.LocalFileSystem(), path, uri, "")
    scheme = uri.split("://", 1)[0].lower()
    uri = uri.replace("://" + _REDACTED_USERINFO, "://", 1)  # a URI as the manifest records it
    # A trailing "?key=value&..." holds filesystem options (endpoint_override=...),
    # so in URIs only '*' and '[' act as glob characters.
    main, query = uri, ""
    if "?" in uri and "=" in uri.rsplit("?", 1)[1]:
        main, query = uri.rsplit("?", 1)
        query = "&".join(option for option in query.split("&") if not option.endswith("=" + REDACTED))
    head, tail = main, ""
    glob_at = min((main.index(ch) for ch in URI_GLOB_CHARS if ch in main), default=-1)
    if glob_at > 0:
        head = main[:glob_at].rsplit("/", 1)[0]
        tail = main[len(head) :]
    try:
        fs, path = pafs.FileSystem.from_uri(head + (f"?{query}" if query else ""))
    except (pa.ArrowInvalid, ValueError, OSError) as exc:
        raise ConfigError(redact(f"cannot open {uri!r}: {exc}")) from exc
    path = path.rstrip("/") + tail
    return Location(fs, path.rstrip("/") or "/", redact(uri), scheme)


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


# --- storage that refuses --------------------------------------------------------------------

_REFUSALS = (  # (errno, words in the message of stores that give no errno, what it means)
    (errno.ENOTDIR, (), "a file is where a directory is needed"),
    (errno.EEXIST, (), "a file is where a directory is needed"),
    (errno.EACCES, ("ACCESS_DENIED", "AccessDenied", "HTTP status 403"), "permission denied"),
    (errno.EPERM, (), "permission denied"),
    (errno.EROFS, (), "read-only file system"),
    (errno.ENOSPC, (), "no space left on the device"),
    (errno.EDQUOT, (), "disk quota exceeded"),
    (None, ("NO_SUCH_BUCKET", "NoSuchBucket"), "the bucket does not exist"),
)


def refusal(exc: BaseException) -> str | None:
    """What a storage error means when it is the storage refusing (not a transient fault), else None.

    Example:
        >>> refusal(OSError(30, "Read-only file system"))
        'read-only file system'
    """
    if not isinstance(exc, OSError) or is_transient(exc):
        return None
    code, text = exc.errno, str(exc)
    for number, words, meaning in _REFUSALS:
        if (number is not None and code == number) or any(word in text for word in words):
            return meaning
    return None


def output_refused(exc: OSError, output: Location, *, started: bool) -> OutputAccessError:
    """The typed error for an output the storage refuses, naming the path (exit 2, or 1 once a shard ran)."""
    meaning = refusal(exc) or "storage error"
    if isinstance(exc.filename, str) and exc.filename.rstrip("/") != output.path:
        meaning += f" at {output.display(exc.filename)}"
    then = ("committed shards are kept; fix it and rerun the same command to resume" if started
            else "nothing was processed; fix it, or choose another output, and rerun")
    message = redact(f"cannot use the output {output.uri}: {meaning} ({exc}); {then}")
    return OutputAccessError(message, exit_code=1 if started else 2)


def check_output_path(output: Location) -> None:
    """Refuse (exit 2) a local output that is a file, or lies under one."""
    if not output.is_local:
        return  # object stores have no directories to be in the way
    path = output.path
    while True:
        if os.path.lexists(path):
            if not os.path.isdir(path):
                what = "is a file" if path == output.path else f"lies under {path}, which is a file"
                raise OutputAccessError(f"the output {output.uri} {what}; the output must be a directory: "
                                        f"choose another output")
            return
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


# --- staged output --------------------------------------------------------------------------

TEMP_SUFFIX = ".tmp"
# Stores whose move is a server-side copy that replaces the destination in one step.
_COPY_STORES = tuple(getattr(pafs, name) for name in ("S3FileSystem", "GcsFileSystem") if hasattr(pafs, name))


class _Unique:
    """Names no other process or host makes: 16 random hex digits drawn once per process (again in a
    forked child) and a counter; one `getrandom` per process, not one per name as `uuid4` costs."""

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self.prefix, self.counter = os.urandom(8).hex(), itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):08x}"


unique_suffix = _Unique()


def temp_name(path: str) -> str:
    """A hidden, unique temporary name next to `path` (`.name.<hex>.tmp`)."""
    parent, name = posixpath.split(path)
    return posixpath.join(parent, f".{name}.{unique_suffix()}{TEMP_SUFFIX}")


def is_temp(path: str) -> bool:
    """Whether a path is one of our temporary files (left behind only by a killed attempt)."""
    name = posixpath.basename(path)
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


class _Hashing:
    """A write-only file object that hashes (sha256) and counts what passes through it."""

    def __init__(self, sink: pa.NativeFile, what: str, path: str) -> None:
        self.sink = sink
        self.what = what
        self.path = path
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        try:
            self.sink.write(view)
        except OSError as exc:
            if is_transient(exc):
                raise BrokenStream(f"{self.what}: {exc}") from exc
            if exc.errno:  # no space, read-only, ...: say where
                raise OSError(exc.errno, os.strerror(exc.errno), self.path) from exc
            raise OSError(f"{self.what}: {exc}") from exc
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
    file's size and sha256 before the file becomes visible. Local files publish
    by rename. Object stores stream the temporary object as a multipart upload
    (pyarrow sends each part as it fills, so memory stays bounded) and publish
    with a server-side copy; nothing ever appears under the final name until
    then. A staged file that is discarded, or whose writer is killed, leaves at
    most a hidden `.tmp` name behind, which readers skip and `basis.listing.sweep_temps` removes.

    Opening and publishing retry transient errors (`StorageError` when they
    persist); a transient error while streaming breaks the file and raises a
    `StorageError` at once: the caller redoes the file (after `discard()`).

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
            with contextlib.suppress(OSError):  # object stores need no directories
                fs.create_dir(parent, recursive=True)
        raw = retry_transient(lambda: fs.open_output_stream(self.tmp), what=f"creating {self.tmp}")
        self._raw: pa.NativeFile | None = raw  # None: made by `of_bytes`, already complete
        self._hashing = _Hashing(raw, f"writing {self.tmp}", self.tmp)
        self.stream = pa.PythonFile(self._hashing, mode="w")
        self.size = 0
        self.sha256 = ""

    @classmethod
    def of_bytes(cls, fs: pafs.FileSystem, path: str, data: bytes | memoryview | pa.Buffer) -> StagedFile:
        """`data` staged whole, already finished (size and sha256 known): `publish()` puts it in place.

        For a small file made in memory (a tiny shard's output, a journal record). A local file is
        one `open`, `write`, `close` of the OS: ~3x less CPU than a stream (a pyarrow file object,
        a hashing wrapper, a Python file around it, its directory made every time); its directory
        is made only when the first open says it is missing.
        """
        if not isinstance(fs, pafs.LocalFileSystem):
            staged = cls(fs, path)
            try:
                staged.stream.write(data)
                staged.finish()
            except BaseException:
                staged.discard()
                raise
            return staged
        staged = cls.__new__(cls)
        staged.fs, staged.path, staged.tmp, staged._raw = fs, path, temp_name(path), None
        view = memoryview(data)
        _write_new_local(staged.tmp, view)
        staged.size, staged.sha256 = view.nbytes, hashlib.sha256(view).hexdigest()
        return staged

    def finish(self) -> tuple[int, str]:
        """Complete the temporary file; returns (size in bytes, sha256 hex)."""
        if self._raw is None:  # made by `of_bytes`: already complete
            return self.size, self.sha256
        self.stream.close()
        try:
            self._raw.close()  # on object stores: waits for the last parts, completes the upload
        except OSError as exc:
            if is_transient(exc):
                raise BrokenStream(f"completing {self.tmp}: {exc}") from exc
            raise
        self.size, self.sha256 = self._hashing.size, self._hashing.sha256.hexdigest()
        return self.size, self.sha256

    def publish(self) -> None:
        """Move the finished temporary file to its final path (replacing what was there)."""
        fs = self.fs
        if isinstance(fs, pafs.LocalFileSystem):
            os.replace(self.tmp, self.path)
            return
        tries = 0

        def move() -> None:
            nonlocal tries
            tries += 1
            if tries > 1 and fs.get_file_info(self.tmp).type == pafs.FileType.NotFound:
                return  # an earlier try moved it but its answer was lost (S3 copies, then deletes the source)
            if not isinstance(fs, _COPY_STORES) and self._already_published():
                fs.delete_file(self.tmp)
                return
            fs.move(self.tmp, self.path)

        retry_transient(move, what=f"publishing {self.path}")

    def _already_published(self) -> bool:
        """Whether the final path already holds exactly these bytes (a duplicate attempt).

        Filesystems that publish by rename (HDFS) replace an existing file by deleting it
        first (pyarrow's HadoopFileSystem.move), leaving the name briefly empty; a
        duplicate attempt that wrote the same bytes leaves the published file alone.
        """
        info = self.fs.get_file_info(self.path)
        if info.type != pafs.FileType.File or info.size != self.size:
            return False
        digest = hashlib.sha256()
        with self.fs.open_input_stream(self.path) as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest() == self.sha256

    def discard(self) -> None:
        """Drop the temporary file (after a failure); never raises.

        pyarrow cannot abort an S3 multipart upload (closing a stream completes it), so
        the partial temporary object is completed under its hidden name, then deleted.
        """
        with contextlib.suppress(Exception):
            if self._raw is not None and not self._raw.closed:
                self._raw.close()
        with contextlib.suppress(Exception):
            delete_file(self.fs, self.tmp)


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


def open_new_local(path: str, *, append: bool = False) -> int:
    """A descriptor of a new local file at `path` (it must not exist; its directory is made when missing)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_APPEND if append else 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o666)
    except FileNotFoundError:
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        return os.open(path, flags, 0o666)


def write_all(fd: int, data: memoryview, path: str) -> None:
    """All of `data` to `fd` (what a short write left is written again); an error without a file name
    (no space, read-only, ...) is raised again naming `path`."""
    try:
        written = 0
        while written < data.nbytes:
            written += os.write(fd, data[written:])
    except OSError as exc:
        if (named := _where(exc, path)) is not exc:
            raise named from exc
        raise


def _where(exc: OSError, path: str) -> OSError:
    """`exc`, or when it names no file (no space, read-only, ...) the same error naming `path`."""
    return OSError(exc.errno, os.strerror(exc.errno), path) if exc.errno and not exc.filename else exc


def _write_new_local(path: str, data: memoryview) -> None:
    """A new local file holding `data` (its directory made when missing); nothing is left on an error."""
    fd = open_new_local(path)
    try:
        try:
            write_all(fd, data, path)
        finally:
            os.close(fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        if isinstance(exc, OSError) and (named := _where(exc, path)) is not exc:  # a close that failed
            raise named from exc
        raise


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a small file whole or not at all, redoing it on transient errors."""

    def attempt() -> None:
        staged = StagedFile.of_bytes(fs, path, data)
        try:
            staged.publish()
        except BaseException:
            staged.discard()
            raise

    retry_transient(attempt, what=f"writing {path}")


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
    """The whole file, or None when it does not exist."""

    def attempt() -> bytes | None:
        try:
            with fs.open_input_stream(path) as stream:
                return bytes(stream.read())
        except FileNotFoundError:
            return None
        except OSError as exc:
            if not is_transient(exc) and fs.get_file_info(path).type == pafs.FileType.NotFound:
                return None
            raise

    return retry_transient(attempt, what=f"reading {path}")


def delete_file(fs: pafs.FileSystem, path: str) -> None:
    """Delete a file; a file that is already gone is fine."""

    def attempt() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(path)

    retry_transient(attempt, what=f"deleting {path}")


def read_parquet_footer(fs: pafs.FileSystem, path: str, *, attempts: int = RETRY_ATTEMPTS,
                        base_delay: float = RETRY_BASE_DELAY) -> pq.FileMetaData:
    """A Parquet file's footer, retrying transient errors (`StorageError` when they persist).

    A file that is not valid Parquet raises pyarrow's own error (ArrowInvalid, OSError).

    Example:
        >>> read_parquet_footer(location.fs, "bucket/in/part-0.parquet").num_row_groups  # doctest: +SKIP
        4
    """

    def attempt() -> pq.FileMetaData:
        with fs.open_input_file(path) as handle:
            return pq.read_metadata(handle)

    return retry_transient(attempt, what=f"reading the Parquet footer of {path}", attempts=attempts,
                           base_delay=base_delay)
