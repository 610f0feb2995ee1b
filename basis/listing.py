"""Listing inputs and outputs (`basis.storage`'s locations): globs, hidden names, walks, stray temporaries.

A local input is walked with `os.scandir`, through symlinks, each real directory and file once; an
object store and an output are listed through `pyarrow.fs`, retrying transient errors. Nothing here
imports Ray or torch.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import posixpath
import re
import stat as statmod
from collections.abc import Callable

import pyarrow.fs as pafs

from basis.errors import InputError, OutputConflictError
from basis.retry import retry_transient
from basis.storage import GLOB_CHARS, TEMP_SUFFIX, Location, delete_file, is_temp


def has_glob(path: str, chars: str = GLOB_CHARS) -> bool:
    return any(ch in path for ch in chars)


def static_prefix(path: str, chars: str = GLOB_CHARS) -> str:
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


def glob_matcher(pattern: str, chars: str = GLOB_CHARS) -> Callable[[str], bool]:
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
