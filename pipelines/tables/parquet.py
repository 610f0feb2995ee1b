"""Parquet files, a directory (recursive) or a glob: the input as batch-infer has always read it."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from basis.errors import InputError
from basis.storage import Location
from basis.listing import list_files, relative_to
from pipelines.tables import DataFiles, Source


class ParquetSource(Source):
    """Every visible file under the input, listed; its fingerprint is size + modification time."""

    format = "parquet"
    removal_rewrites_rows = False  # a vanished file aged out: its predictions are kept unless prune

    def __init__(self, location: Location, uri: str) -> None:
        self.location, self.uri, self.name = location, uri, location.uri

    def files(self, *, avoid: str | None = None) -> tuple[str, DataFiles]:
        base, infos = list_files(self.location, avoid=avoid)
        if not infos:
            raise InputError(f"no input files found at {self.location.uri!r}")
        paths = pa.array([i.path for i in infos], pa.string())
        sizes = pa.array([i.size for i in infos], pa.int64())
        mtimes = pa.array([i.mtime_ns for i in infos], pa.int64())
        del infos
        prefix = under(base, paths)
        if prefix is not None:  # every path is prefix + rel: the paths need not be kept
            return base, DataFiles(None, pc.utf8_slice_codeunits(paths, len(prefix)), fingerprints(sizes, mtimes),
                                   prefix=prefix, sizes=sizes)
        return base, DataFiles(paths, relatives(base, paths), fingerprints(sizes, mtimes), sizes=sizes)


def fingerprints(sizes: pa.Array, mtimes: pa.Array) -> pa.Array:
    """`size=<bytes>;mtime_ns=<ns>` per file, as columns.

        >>> fingerprints(pa.array([3]), pa.array([17])).to_pylist()
        ['size=3;mtime_ns=17']
    """
    return pc.binary_join_element_wise("size=", sizes.cast(pa.string()), ";mtime_ns=", mtimes.cast(pa.string()), "")


def relatives(base: str, paths: pa.Array) -> pa.Array:
    """`relative_to(base, path)` of every path, in one pass where they all lie under `base`.

        >>> relatives("/in", pa.array(["/in/a.parquet", "/in/d/b.parquet"])).to_pylist()
        ['a.parquet', 'd/b.parquet']
    """
    prefix = under(base, paths)
    if prefix is not None:
        return pc.utf8_slice_codeunits(paths, len(prefix))  # code points, as Python counts them
    return pa.array([relative_to(base, path) for path in paths.to_pylist()], pa.string())


def under(base: str, paths: pa.Array) -> str | None:
    """The prefix `base/` when every path starts with it (then `relative_to` cuts it off), else None."""
    prefix = base.rstrip("/") + "/" if base else ""
    if prefix and len(paths) and pc.all(pc.starts_with(paths, prefix)).as_py():
        return prefix
    return None
