"""An Iceberg table (PyIceberg): the data files of its current snapshot, from the table's own scan plan.

Position deletes (merge-on-read) are applied as a row mask: each delete file of a scan task
is read once, its (file_path, pos) rows for the task's data file become the file's deleted
positions, and the replicas' reader drops them. Equality deletes and deletion vectors
(Iceberg v3, Puffin) are refused. The snapshots since the last run are followed through
the current snapshot's ancestry (`operation`, and the manifests each one added).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from basis import masks
from basis.errors import ConfigError, InputError
from basis.storage import redact, resolve
from pipelines.tables import Commit, DataFile, DataFiles, Source
from pipelines.tables.stores import iceberg_location, iceberg_uri

_POS_FILE_PATH, _POS_POS = "file_path", "pos"  # field ids 2147483546 and 2147483545 in the spec


class IcebergSource(Source):
    """`input: namespace.table` through the `catalog` properties (unset: PyIceberg's own configuration)."""

    format = "iceberg"

    def __init__(self, name: str, catalog: Mapping[str, str] | None) -> None:
        from pyiceberg.catalog import load_catalog

        self.name = name
        props = dict(catalog or {})
        catalog_name = props.pop("name", "default")
        try:
            self.catalog = load_catalog(catalog_name, **props)
        except Exception as exc:  # pyiceberg raises ValueError, NotInstalledError, ... for a bad configuration
            raise ConfigError(f"cannot load the Iceberg catalog {catalog_name!r} for input {name!r} "
                              f"(config key 'catalog'): {redact(str(exc))}") from exc
        try:
            self.table = self.catalog.load_table(name)
        except Exception as exc:  # NoSuchTableError, NoSuchNamespaceError, ValueError for a bad identifier
            raise InputError(f"cannot load the Iceberg table {name!r} from catalog {catalog_name!r}: "
                             f"{redact(str(exc)) or type(exc).__name__}") from exc
        self.snapshot = self.table.current_snapshot()
        self.uri = self.table.location().rstrip("/")
        self._replica_uri = iceberg_uri(self.uri, self.table.io.properties)  # the FileIO's endpoint, region, keys
        self.location = iceberg_location(self.uri, self.table.io.properties)

    @property
    def replica_uri(self) -> str:
        return self._replica_uri

    def snapshot_record(self) -> dict[str, Any]:
        return {"format": "iceberg", "table": self.name,
                "snapshot_id": self.snapshot.snapshot_id if self.snapshot else None}

    def record(self) -> dict[str, Any]:
        return self._with_coverage(self.snapshot_record())

    def files(self, *, avoid: str | None = None) -> tuple[str, DataFiles]:
        root = self.location.path.rstrip("/")
        recorded = self._manifest_files(root)
        if recorded is not None:
            return root, recorded
        if self.snapshot is None:
            raise InputError(f"Iceberg table {self.name!r} has no snapshot (no rows yet)")
        where = f"Iceberg table {self.name!r} (snapshot {self.snapshot.snapshot_id})"
        files = []
        positions: dict[str, Any] = {}  # delete file path -> its (file_path, pos) table, read once
        try:
            tasks = list(self.table.scan().plan_files())
        except ValueError as exc:  # PyIceberg refuses to plan a table with equality deletes
            found = self._equality_deletes()
            if not found:
                raise
            raise InputError(f"{where}: data files have equality deletes in {found[0]}"
                             f"{f' and {len(found) - 1} more file(s)' if len(found) > 1 else ''}: equality deletes "
                             f"cannot be applied as a per-file row mask; rewrite the table's deletes (e.g. Spark "
                             f"rewrite_data_files); nothing was scored") from exc
        for task in tasks:
            data = task.file
            shown = data.file_path
            if getattr(data.file_format, "name", str(data.file_format)) != "PARQUET":
                raise InputError(f"{where}: data file {shown} is {data.file_format}, not Parquet; not supported")
            if not shown.startswith(self.uri + "/"):
                raise InputError(f"{where}: data file {shown} lies outside the table location {self.uri}; "
                                 f"not supported")
            mask = self._position_deletes(where, shown, task.delete_files, positions)
            rel = shown[len(self.uri) + 1:]
            fingerprint = f"size={data.file_size_in_bytes}"
            if mask is not None:  # a new delete file on a data file is a new fingerprint: its rows changed
                fingerprint += f";deleted={mask[1]}:{masks.digest(mask[0])}"
            files.append(DataFile(f"{root}/{rel}", rel, fingerprint, data.record_count,
                                  None if mask is None else mask[0]))
        if not files:
            raise InputError(f"{where} has no data files")
        files.sort(key=lambda f: f.rel)
        return root, self._live(root, files)

    def _position_deletes(self, where: str, shown: str, deletes: Any,
                          cache: dict[str, Any]) -> tuple[bytes, int] | None:
        """The data file's deleted positions from its position delete files (None: no row deleted);
        anything that cannot be applied as a row mask is refused."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        found = []
        for delete in deletes:
            kind = getattr(delete.content, "name", str(delete.content))
            fmt = getattr(delete.file_format, "name", str(delete.file_format))
            if kind == "EQUALITY_DELETES":
                why = ("equality deletes cannot be applied as a per-file row mask; rewrite the table's deletes "
                       "(e.g. Spark rewrite_position_delete_files / rewrite_data_files)")
            elif kind != "POSITION_DELETES" or fmt != "PARQUET":
                why = (f"{kind.lower().replace('_', ' ')} stored as {fmt} (e.g. Iceberg v3 deletion vectors) cannot "
                       f"be read; compact the table (rewrite_data_files) first")
            else:
                why = None
            if why is not None:
                raise InputError(f"{where}: data file {shown} has {kind.lower().replace('_', ' ')} in "
                                 f"{delete.file_path}: {why}; nothing was scored")
            table = cache.get(delete.file_path)
            if table is None:
                try:
                    import pyarrow.parquet as pq

                    if delete.file_path.startswith(self.uri + "/"):  # the table's own filesystem (its credentials)
                        fs, path = self.location.fs, self.location.join(delete.file_path[len(self.uri) + 1:])
                    else:
                        other = resolve(delete.file_path)
                        fs, path = other.fs, other.path
                    with fs.open_input_file(path) as handle:
                        table = pq.read_table(handle, columns=[_POS_FILE_PATH, _POS_POS])
                except Exception as exc:
                    raise InputError(f"{where}: the position delete file {delete.file_path} of data file {shown} "
                                     f"cannot be read ({redact(str(exc))}); nothing was scored") from exc
                cache[delete.file_path] = table
            mine = table.filter(pc.equal(table.column(_POS_FILE_PATH), pa.scalar(shown, table.schema.field(
                _POS_FILE_PATH).type)))
            found.append(np.asarray(mine.column(_POS_POS).to_numpy(), dtype=np.int64))
        if not found:
            return None
        positions = np.unique(np.concatenate(found))
        if not positions.size:
            return None
        return masks.encode(positions), int(positions.size)

    def _equality_deletes(self) -> list[str]:
        """The equality-delete files of the current snapshot."""
        io, found = self.table.io, []
        for manifest in self.snapshot.manifests(io):
            if getattr(manifest.content, "name", "") != "DELETES":
                continue
            for entry in manifest.fetch_manifest_entry(io):
                if getattr(entry.data_file.content, "name", "") == "EQUALITY_DELETES":
                    found.append(entry.data_file.file_path)
        return sorted(found)

    def commits_since(self, recorded: Mapping[str, Any]) -> list[Commit] | None:
        first = recorded.get("snapshot_id")
        if recorded.get("table") != self.name or first is None or self.snapshot is None:
            return None
        chain = []
        snapshot = self.snapshot
        while snapshot is not None and snapshot.snapshot_id != first:
            chain.append(snapshot)
            parent = snapshot.parent_snapshot_id
            snapshot = self.table.metadata.snapshot_by_id(parent) if parent is not None else None
        if snapshot is None:
            return None  # not an ancestor (a rollback), or expired
        return [self._commit(s) for s in reversed(chain)]

    def _commit(self, snapshot: Any) -> Commit:
        """What one snapshot did to the data files (an append's added files are not needed: they are new)."""
        summary = snapshot.summary
        operation = getattr(summary.operation, "value", str(summary.operation)) if summary else "?"
        name = f"snapshot {snapshot.snapshot_id} ({operation})"
        if operation == "append":
            return Commit(name)
        change = operation != "replace"
        removed, added, row_deletes = [], [], False
        io = self.table.io
        for manifest in snapshot.manifests(io):
            if manifest.added_snapshot_id != snapshot.snapshot_id:
                continue
            for entry in manifest.fetch_manifest_entry(io, discard_deleted=False):
                if entry.snapshot_id != snapshot.snapshot_id:
                    continue
                status = getattr(entry.status, "name", str(entry.status))
                content = getattr(entry.data_file.content, "name", str(entry.data_file.content))
                path = entry.data_file.file_path
                rel = path[len(self.uri) + 1:] if path.startswith(self.uri + "/") else path
                if content != "DATA":
                    row_deletes = row_deletes or status == "ADDED"
                elif status == "ADDED":
                    added.append((rel, change))
                elif status == "DELETED":
                    removed.append((rel, change))
        return Commit(name, tuple(removed), tuple(added), row_deletes=row_deletes)
