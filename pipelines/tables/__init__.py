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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pipelines.config import JobConfig
from basis.errors import ConfigError
from basis.storage import Location, absolute, redact, resolve
from pipelines.tables.history import Changes, Commit, Group, follow, settle

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)  # a million of them plan an unchanged tick
class DataFile:
    """One live data file of the input."""

    path: str  # filesystem path under `Source.location.fs`
    rel: str  # relative to the input's base; output names mirror it
    fingerprint: str  # changes when the file is rewritten
    rows: int | None = None  # as the table records it (checked against the footer); None: not known
    deleted: bytes | None = None  # deleted row positions (`basis.masks`), dropped by the replicas' reader


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
    def files(self, *, avoid: str | None = None) -> tuple[str, list[DataFile]]:
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

    def _live(self, root: str, files: list[DataFile]) -> list[DataFile]:
        """The listed files less those a compaction group holds (their rows are scored already)."""
        if self.changes is None:
            return files
        held, self.covered = settle(self.changes, {f.rel: f.fingerprint for f in files})
        self.covered = frozenset(self.covered)
        return [f for f in files if f.rel not in held]

    def _manifest_files(self, root: str) -> list[DataFile] | None:
        if self._recorded_files is None:
            return None
        return [DataFile(f"{root}/{rel}", rel, fingerprint) for rel, fingerprint in self._recorded_files]

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
