"""Where the input rows come from: a Parquet directory, a Delta Lake table or an Iceberg table.

Each format is one small class with the same methods (`Source`), chosen once
from the config by `open_source`; the planner calls it and never asks which
format it holds:

    Source                       the input, as the planner sees it
    ├── ParquetSource            files, a directory or a glob      (parquet.py)
    ├── DeltaSource              a Delta table's latest version    (delta.py)
    └── IcebergSource            an Iceberg table's current snapshot (iceberg.py)

`files()` lists the live data files (a table's own file list, never a
directory listing, so files a table has removed are not read) with their
fingerprints and deleted rows (a row mask the replicas apply, `basis.masks`);
deletes that cannot be masked per file are refused there (`InputError`, exit 2),
before any work. `record()` is what the manifest's header keeps about the input
(a table's format, the snapshot scored and the compactions that scored nothing).
Before `files()`, the driver hands a table the last run's record (`since`): the
table follows its commits from there (`pipelines.tables.history`), or, when the
snapshot is the recorded one and the output complete, answers from the manifest
(`from_manifest`: no file list, no footer).
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import JobConfig
from basis.errors import ConfigError
from basis.storage import Location, absolute, redact, resolve
from pipelines.tables.history import Changes, Commit, Group, follow, settle

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DataFile:
    """One live data file of the input."""

    path: str  # filesystem path under `Source.location.fs`
    rel: str  # relative to the input's base; output names mirror it
    fingerprint: str  # changes when the file is rewritten
    rows: int | None = None  # as the table records it (checked against the footer); None: not known
    deleted: bytes | None = None  # deleted row positions (`basis.masks`), dropped by the replicas' reader


def position(index: int, length: int) -> int:
    """`index` into a sequence of `length` items as a non-negative position (negative counts from the end),
    or IndexError, as a list does."""
    at = index + length if index < 0 else index
    if not 0 <= at < length:
        raise IndexError(index)
    return at


class DataFiles(Sequence[DataFile]):
    """The live data files of the input as columns (a `DataFile` is made only for the file asked for):
    a million files are a few Arrow arrays, not a million objects. Where every path is `prefix` + rel
    (a directory's files, a table's), no path is kept: each is made when asked for.

        >>> files = DataFiles.of([DataFile("/in/a", "a", "v1"), DataFile("/in/b", "b", "v2", rows=3)])
        >>> len(files), files[1]
        (2, DataFile(path='/in/b', rel='b', fingerprint='v2', rows=3, deleted=None))
        >>> files.rel.to_pylist(), files.rows.to_pylist(), files.prefix
        (['a', 'b'], [None, 3], '/in/')
    """

    def __init__(self, path: pa.Array | None, rel: pa.Array, fingerprint: pa.Array, rows: pa.Array | None = None,
                 deleted: pa.Array | None = None, *, prefix: str = "", sizes: pa.Array | None = None) -> None:
        self.rel, self.fingerprint = _string(rel), _string(fingerprint)
        self.sizes = sizes  # int64 bytes per file, where the listing knows them (a Parquet directory's); None: not
        self.prefix = prefix  # with `paths` None: each file's path is `prefix` + its rel
        self.paths = None if path is None else _string(path)
        self.rows = rows if rows is not None and rows.null_count < len(rows) else None  # int64; None: none known
        self.deleted = deleted if deleted is not None and deleted.null_count < len(deleted) else None  # binary

    @classmethod
    def of(cls, files: Iterable[DataFile]) -> DataFiles:
        files = list(files)
        rels = pa.array([f.rel for f in files], pa.string())
        paths: pa.Array | None = pa.array([f.path for f in files], pa.string())
        prefix = files[0].path[: len(files[0].path) - len(files[0].rel)] if files else ""
        if files and all(f.path == prefix + f.rel for f in files):
            paths = None
        return cls(paths, rels, pa.array([f.fingerprint for f in files], pa.string()),
                   pa.array([f.rows for f in files], pa.int64()), pa.array([f.deleted for f in files], pa.binary()),
                   prefix=prefix)

    @property
    def path(self) -> pa.Array:
        """Every file's filesystem path."""
        return self.paths if self.paths is not None else self.path_of(None)

    def path_of(self, at: pa.Array | None) -> pa.Array:
        """The paths of the files at `at` (None: all)."""
        if self.paths is not None:
            return self.paths if at is None else self.paths.take(at)
        rels = self.rel if at is None else self.rel.take(at)
        return pc.binary_join_element_wise(self.prefix, rels, "") if self.prefix else rels

    def __len__(self) -> int:
        return len(self.rel)

    @overload
    def __getitem__(self, index: int) -> DataFile: ...
    @overload
    def __getitem__(self, index: slice) -> list[DataFile]: ...

    def __getitem__(self, index: int | slice) -> DataFile | list[DataFile]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = position(index, len(self))
        rel = self.rel[index].as_py()
        path = self.prefix + rel if self.paths is None else self.paths[index].as_py()
        return DataFile(path, rel, self.fingerprint[index].as_py(), self.rows_at(index), self.deleted_at(index))

    def __iter__(self) -> Iterator[DataFile]:
        for start in range(0, len(self), _BATCH):
            part = self.take(np.arange(start, min(start + _BATCH, len(self))))
            rows = part.rows.to_pylist() if part.rows is not None else [None] * len(part)
            deleted = part.deleted.to_pylist() if part.deleted is not None else [None] * len(part)
            yield from map(DataFile, part.path.to_pylist(), part.rel.to_pylist(), part.fingerprint.to_pylist(),
                           rows, deleted)

    def rows_at(self, index: int) -> int | None:
        return None if self.rows is None else self.rows[index].as_py()

    def deleted_at(self, index: int) -> bytes | None:
        return None if self.deleted is None else self.deleted[index].as_py()

    def take(self, indices: np.ndarray) -> DataFiles:
        at = pa.array(indices, pa.int64())
        return DataFiles(None if self.paths is None else self.paths.take(at), self.rel.take(at),
                         self.fingerprint.take(at), None if self.rows is None else self.rows.take(at),
                         None if self.deleted is None else self.deleted.take(at), prefix=self.prefix,
                         sizes=None if self.sizes is None else self.sizes.take(at))

    def mapping(self) -> dict[str, str]:
        """rel -> fingerprint of every file (a dict: for the few callers that need one)."""
        return dict(zip(self.rel.to_pylist(), self.fingerprint.to_pylist()))


_BATCH = 16_384


def _string(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    return array if array.type == pa.string() else array.cast(pa.string())


class Source(ABC):
    """The input of a job: where its data files live and which of them hold live rows."""

    format: str  # "parquet", "delta", "iceberg"
    # Whether a data file that leaves the input took its rows with it (a table's delete, update or compaction:
    # they are gone, or rewritten into other files), rather than aged out (a Parquet partition): then the kept
    # predictions of a removed file would stand beside those of its rewritten rows.
    removal_rewrites_rows: bool = True
    location: Location  # where the data files are read from (the planner's and the replicas' filesystem)
    uri: str  # what replicas resolve to read `DataFile.path` (a URI or absolute local path)
    name: str  # the input as the user named it (messages, the manifest)

    @abstractmethod
    def files(self, *, avoid: str | None = None) -> tuple[str, DataFiles]:
        """The base that output paths mirror, and the live data files in a stable order.

        Raises `InputError` (exit 2) for what cannot be scored exactly: deleted rows
        that cannot be masked, a file format or table feature not supported.
        `avoid`: the output's real local path, which no input may reach (Parquet
        directories: symlinks).
        """

    def record(self) -> dict[str, Any]:
        """What the manifest's header records about the input besides its URI (a table's snapshot)."""
        return {}

    @property
    def replica_uri(self) -> str:
        """What replicas resolve to read `DataFile.path`: `uri`, unless the table's own configuration says
        how to reach its store (an Iceberg catalog's `s3.endpoint`, keys: `stores.iceberg_uri`)."""
        return self.uri

    # --- incremental by snapshot (tables; a Parquet directory has no snapshots) -------------------------
    changes: Changes | None = None  # set by `since`
    covered: frozenset[str] = frozenset()  # rels whose kept predictions stand for live files' rows
    _recorded_files: list[tuple[str, str]] | None = None  # set by `from_manifest`

    def snapshot_record(self) -> dict[str, Any]:
        """`record()` without the coverage: which snapshot this is."""
        return {}

    def commits_since(self, recorded: Mapping[str, Any]) -> list[Commit] | None:
        """The commits after the `recorded` snapshot up to the current one, oldest first; None when they
        cannot be followed (no snapshot recorded, another table, expired snapshots, a cleaned-up log)."""
        return None

    def unchanged(self, recorded: Mapping[str, Any]) -> bool:
        """Whether the current snapshot is the one `recorded` (a table only)."""
        mine = self.snapshot_record()
        return bool(mine) and {k: recorded.get(k) for k in mine} == mine

    def since(self, recorded: Mapping[str, Any], scored: set[str], partial: set[str]) -> None:
        """Follow the commits since the last run's `recorded` snapshot (`history.follow`); `scored`: rels
        whose committed predictions cover the whole file, `partial`: some of it."""
        mine = self.snapshot_record()
        if not mine or recorded.get("format") != mine.get("format"):
            return
        groups = [Group.from_record(g) for g in recorded.get("covered") or ()]
        commits = self.commits_since(recorded)
        if commits is None:
            logger.info("%s: the commits since the recorded snapshot (%s) cannot be followed (expired snapshots "
                        "or a cleaned-up log); comparing file lists instead: a compaction since then is taken "
                        "for a rewrite", self.name, _snapshot_text(recorded, mine))
            self.changes = Changes(groups=groups, followed=False)
        else:
            self.changes = follow(commits, scored, groups, partial=partial)

    def from_manifest(self, recorded: Mapping[str, Any], files: Iterable[tuple[str, str]]) -> None:
        """The snapshot is the recorded one: `files()` answers with the manifest's (rel, fingerprint)
        pairs, all committed (no file list, no footer); the coverage recorded stays."""
        self._recorded_files = sorted(set(files))
        self.changes = Changes(groups=[Group.from_record(g) for g in recorded.get("covered") or ()])

    def _live(self, root: str, files: list[DataFile]) -> DataFiles:
        """The listed files less those a compaction group holds (their rows are scored already)."""
        if self.changes is None:
            return DataFiles.of(files)
        held, self.covered = settle(self.changes, {f.rel: f.fingerprint for f in files})
        self.covered = frozenset(self.covered)
        return DataFiles.of(f for f in files if f.rel not in held)

    def _manifest_files(self, root: str) -> DataFiles | None:
        if self._recorded_files is None:
            return None
        return DataFiles(None, pa.array([rel for rel, _ in self._recorded_files], pa.string()),
                         pa.array([fingerprint for _, fingerprint in self._recorded_files], pa.string()),
                         prefix=f"{root}/")

    def _with_coverage(self, record: dict[str, Any]) -> dict[str, Any]:
        if self.changes is not None and self.changes.groups:
            record["covered"] = [g.record() for g in sorted(self.changes.groups, key=lambda g: sorted(g.files))]
        return record


def _snapshot_text(recorded: Mapping[str, Any], mine: Mapping[str, Any]) -> str:
    keys = [k for k in mine if k != "format" and k != "table"]
    return ", ".join(f"{k} {recorded.get(k)} -> {mine[k]}" for k in keys)


def open_source(cfg: JobConfig) -> Source:
    """The source `cfg.input_format` names (`auto`: a path holding `_delta_log/` is Delta, else Parquet)."""
    fmt = cfg.input_format
    if fmt == "iceberg":
        from pipelines.tables.iceberg import IcebergSource

        return IcebergSource(cfg.input, cfg.catalog)
    if cfg.catalog is not None and cfg.output_format != "iceberg":
        raise ConfigError(f"'catalog' is set but neither the input {redact(cfg.input)!r} nor the output is an "
                          f"Iceberg table; set 'input_format: iceberg' (input: namespace.table) or "
                          f"'output_format: iceberg' (output: namespace.table), or remove 'catalog'")
    location = resolve(absolute(cfg.input))
    if fmt == "delta" or (fmt == "auto" and is_delta_table(location)):
        from pipelines.tables.delta import DeltaSource

        return DeltaSource(location, absolute(cfg.input))
    from pipelines.tables.parquet import ParquetSource

    return ParquetSource(location, absolute(cfg.input))


def is_delta_table(location: Location) -> bool:
    """Whether `location` holds a `_delta_log/` directory."""
    import pyarrow.fs as pafs

    try:
        info = location.fs.get_file_info(location.join("_delta_log"))
    except OSError:
        return False
    return info.type == pafs.FileType.Directory


_SECRET_PROPERTY = re.compile(r"(?i)(secret|password|passwd|token|credential|key)")


def catalog_record(catalog: Mapping[str, str] | None) -> dict[str, str] | None:
    """Catalog properties as the manifest may keep them: secrets replaced by REDACTED.

    Example:
        >>> catalog_record({"type": "rest", "token": "t0k", "s3.secret-access-key": "x", "uri": "http://h"})
        {'type': 'rest', 'token': 'REDACTED', 's3.secret-access-key': 'REDACTED', 'uri': 'http://h'}
    """
    if catalog is None:
        return None
    return {k: "REDACTED" if _SECRET_PROPERTY.search(k) else redact(v) for k, v in catalog.items()}
