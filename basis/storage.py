"""Paths and URIs through `pyarrow.fs`, so `s3://...` behaves like a local path.

Used by the driver (listing, manifest, lock) and by replicas (reading shards,
committing output files). Nothing here imports Ray or torch.

Object stores fail transiently (throttling, 5xx, resets, timeouts). Every
operation here retries those (`basis.retry`) and raises `StorageError`
when they outlast the retries, so a flaky store is never mistaken for bad data.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import hashlib
import itertools
import os
import posixpath
import re
import stat as statmod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from basis.errors import ConfigError, InputError, OutputAccessError, OutputConflictError
from basis.retry import RETRY_ATTEMPTS, RETRY_BASE_DELAY, BrokenStream, is_transient, retry_transient

_GLOB_CHARS = "*?["
_URI_GLOB_CHARS = "*["  # in URIs a '?' starts the filesystem options (see `resolve`)


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
        return _URI_GLOB_CHARS if self.scheme else _GLOB_CHARS

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
    glob_at = min((main.index(ch) for ch in _URI_GLOB_CHARS if ch in main), default=-1)
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


# --- listing ------------------------------------------------------------------------------

def has_glob(path: str, chars: str = _GLOB_CHARS) -> bool:
    return any(ch in path for ch in chars)


def static_prefix(path: str, chars: str = _GLOB_CHARS) -> str:
    """The directories of a glob before its first wildcard segment (the path itself without one).

    Example:
        >>> static_prefix("/data/day=*/part-*.parquet")
        '/data'
    """
    if not has_glob(path, chars):
        return path
    parts = path.split("/")
    first = next(i for i, part in enumerate(parts) if has_glob(part, chars))
    return "/".join(parts[:first]) or ("/" if path.startswith("/") else "")


def glob_matcher(pattern: str, chars: str = _GLOB_CHARS) -> Callable[[str], bool]:
    """A predicate on '/'-separated relative paths for a glob relative to its static prefix.

    `*` and `?` match within one path segment, `[...]` is a character class (`[!...]`
    negates; `[[]` is a literal '['), and `**` as a whole segment matches zero or more
    directories (at the end: every file below). A pattern that matches a directory takes
    every file below it, as Spark does. Only the characters in `chars` are wildcards.

    Example:
        >>> match = glob_matcher("day=*/**/part-*.parquet")
        >>> match("day=1/part-0.parquet"), match("day=1/a/b/part-0.parquet"), match("day=1/part-0.csv")
        (True, True, False)
        >>> glob_matcher("day=2024-*")("day=2024-01/part-0.parquet")
        True
    """
    segments: list[re.Pattern[str] | None] = []  # None stands for '**'
    for segment in pattern.strip("/").split("/"):
        if segment == "**" and "*" in chars:
            if not segments or segments[-1] is not None:
                segments.append(None)
            continue
        if "?" not in chars:
            segment = segment.replace("?", "[?]")
        if "[" not in chars:
            segment = segment.replace("[", "[[]")
        segments.append(re.compile(fnmatch.translate(segment)))

    def match(relative: str) -> bool:
        parts = relative.strip("/").split("/")

        @functools.cache
        def step(i: int, j: int) -> bool:  # pattern segments [i:] against path parts [j:]
            if i == len(segments):
                return True  # the file itself, or a directory above it
            segment = segments[i]
            if segment is None:
                if i == len(segments) - 1:  # a trailing '**' takes every file below
                    return j < len(parts)
                return step(i + 1, j) or (j < len(parts) - 1 and step(i, j + 1))  # no directory, or one more
            return j < len(parts) and segment.match(parts[j]) is not None and step(i + 1, j + 1)

        return step(0, 0)

    return match


def is_hidden(relative: str) -> bool:
    """Names starting with `_` or `.` are skipped, as pyarrow datasets do."""
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def list_files(location: Location, *, avoid: str | None = None) -> tuple[str, list[pafs.FileInfo]]:
    """The input files under a file, directory (recursive) or glob, in path order.

    Returns the base directory that relative output paths mirror (a glob's static
    prefix), and the files. A path that exists is taken literally, glob characters
    or not; a glob that matches a directory takes every file below it (as Spark
    does). Hidden names (`_SUCCESS`, `.crc`, ...) are skipped.

    Local symlinks are followed, each real directory and file once (a loop such as
    `in/loop -> .` adds nothing): a path that is no symlink wins, then the first in
    path order. `avoid` is a local real path (the output's): an input whose real
    path reaches it raises `OutputConflictError`.
    """
    fs, path = location.fs, location.path
    try:
        info = retry_transient(lambda: fs.get_file_info(path), what=f"looking up {location.uri}")
    except OSError as exc:
        raise InputError(f"cannot look up the input {location.uri!r}: {exc}") from exc
    if info.type == pafs.FileType.File:
        if avoid is not None and location.is_local:
            _refuse_overlap(os.path.realpath(path), avoid, location.uri)
        return posixpath.dirname(path), [info]
    if info.type == pafs.FileType.Directory:
        base, files = path, _walk_input(location, path, avoid)
    elif has_glob(path, location.glob_chars):
        base = static_prefix(path, location.glob_chars)
        match = glob_matcher(path[len(base):], location.glob_chars)
        files = [info for info in _walk_input(location, base, avoid) if match(relative_to(base, info.path))]
    else:
        return path, []
    files = [info for info in files if not is_hidden(relative_to(base, info.path))]
    return base, sorted(files, key=lambda info: info.path)


def _walk_input(location: Location, base: str, avoid: str | None) -> list[pafs.FileInfo]:
    """Every file under `base` (hidden names below it skipped); locally, through symlinks, each real
    directory and file once."""
    if not location.is_local:
        try:
            return _walk(location.fs, base)
        except OSError as exc:
            raise InputError(f"cannot list the input {location.display(base)}: {exc}") from exc
    files: list[pafs.FileInfo] = []
    seen: set[tuple[int, int]] = set()  # (device, inode) of every directory and file taken
    pending: list[tuple[str, str]] = []  # (path, real path) of directories to read, a stack
    links: list[str] = []  # symlinks met, followed once every plain path is taken
    plain: list[tuple[int, int]] = []  # (device, inode) of plain files taken, added to `seen` when a link is

    def take(path: str, real: str, stat: os.stat_result) -> bool:
        key = (stat.st_dev, stat.st_ino)
        if key in seen:
            return False
        seen.add(key)
        if avoid is not None:
            _refuse_overlap(real, avoid, location.display(path))
        return True

    try:
        root = os.stat(base)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise InputError(f"cannot list the input {base}: {exc}") from exc
    if take(base, os.path.realpath(base), root) and stat_is_dir(root):
        pending.append((base, os.path.realpath(base)))
    while pending or links:
        if not pending:
            seen.update(plain)  # what a link may lead to again
            plain.clear()
            link = links.pop(0)
            real = os.path.realpath(link)
            try:
                stat = os.stat(link)
            except OSError:
                continue  # a dangling link
            if not take(link, real, stat):
                continue
            if stat_is_dir(stat):
                pending.append((link, real))
            elif stat_is_file(stat):
                files.append(_file_info(link, stat))
            continue
        directory, real_dir = pending.pop()
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:  # permission denied, I/O error: the listing would be incomplete
            raise InputError(f"cannot list the input directory {directory}: {exc}") from exc
        below: list[tuple[str, str]] = []
        for entry in entries:
            if entry.name.startswith(("_", ".")):
                continue  # hidden, as `is_hidden` (and never followed)
            if entry.is_symlink():
                links.append(entry.path)
                continue
            real = posixpath.join(real_dir, entry.name)
            try:
                stat = entry.stat()
            except OSError:
                continue  # gone since the directory was read
            if stat_is_dir(stat):
                if take(entry.path, real, stat):
                    below.append((entry.path, real))
            elif stat_is_file(stat):  # a plain file in a directory taken once is taken once
                files.append(_file_info(entry.path, stat))
                plain.append((stat.st_dev, stat.st_ino))
        pending.extend(reversed(below))  # depth first, in name order
    return files


def stat_is_dir(stat: os.stat_result) -> bool:
    return statmod.S_ISDIR(stat.st_mode)


def stat_is_file(stat: os.stat_result) -> bool:
    return statmod.S_ISREG(stat.st_mode)


def _file_info(path: str, stat: os.stat_result) -> pafs.FileInfo:
    """The FileInfo pyarrow's LocalFileSystem gives for a regular file (same size and mtime_ns)."""
    return pafs.FileInfo(path, pafs.FileType.File, mtime_ns=stat.st_mtime_ns, size=stat.st_size)


def _refuse_overlap(real: str, avoid: str, shown: str) -> None:
    if overlaps(real, avoid):
        raise OutputConflictError(f"input {shown} leads to {real}, inside the output {avoid}; "
                                  f"remove the link or write predictions elsewhere")


def search_root(location: Location) -> str:
    """What the input is searched under: the path itself when it exists (glob characters and
    all), else its glob's static prefix. Used to refuse an output inside the input."""
    info = retry_transient(lambda: location.fs.get_file_info(location.path), what=f"looking up {location.uri}")
    if info.type != pafs.FileType.NotFound or not has_glob(location.path, location.glob_chars):
        return location.path
    return static_prefix(location.path, location.glob_chars)


def _walk(fs: pafs.FileSystem, base: str) -> list[pafs.FileInfo]:
    def listing() -> list[pafs.FileInfo]:
        try:
            return fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return []

    infos = retry_transient(listing, what=f"listing {base}")
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


def sweep_temps(fs: pafs.FileSystem, root: str) -> int:
    """Delete every temporary file (`is_temp`) under `root`; returns how many were deleted.

    Only safe when no attempt is writing under `root` any more (after a complete run).
    """
    if isinstance(fs, pafs.LocalFileSystem):  # a directory at a time: no record kept of every file (100,000: ~10 MiB)
        temps = [os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names
                 if name.startswith(".") and name.endswith(TEMP_SUFFIX)]
    else:
        temps = [info.path for info in _walk(fs, root) if is_temp(info.path)]
    for path in temps:
        delete_file(fs, path)
    return len(temps)


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
    most a hidden `.tmp` name behind, which readers skip and `sweep_temps` removes.

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
