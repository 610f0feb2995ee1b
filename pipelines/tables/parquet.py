"""Parquet files, a directory (recursive) or a glob: the input as batch-infer has always read it."""

from __future__ import annotations

from basis.errors import InputError
from basis.storage import Location, list_files, relative_to
from pipelines.tables import DataFile, Source


class ParquetSource(Source):
    """Every visible file under the input, listed; its fingerprint is size + modification time."""

    format = "parquet"
    removal_rewrites_rows = False  # a vanished file aged out: its predictions are kept unless prune

    def __init__(self, location: Location, uri: str) -> None:
        self.location, self.uri, self.name = location, uri, location.uri

    def files(self, *, avoid: str | None = None) -> tuple[str, list[DataFile]]:
        base, infos = list_files(self.location, avoid=avoid)
        if not infos:
            raise InputError(f"no input files found at {self.location.uri!r}")
        return base, [DataFile(i.path, relative_to(base, i.path), f"size={i.size};mtime_ns={i.mtime_ns}")
                      for i in infos]
