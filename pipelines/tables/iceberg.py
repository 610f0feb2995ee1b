"""An Iceberg table (PyIceberg): the data files of its current snapshot, from the table's own scan plan."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from basis.errors import ConfigError, InputError
from basis.storage import redact, resolve
from pipelines.tables import DataFile, Source
from pipelines.tables.stores import iceberg_location, iceberg_uri


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

    def record(self) -> dict[str, Any]:
        return {"format": "iceberg", "table": self.name,
                "snapshot_id": self.snapshot.snapshot_id if self.snapshot else None}

    def files(self, *, avoid: str | None = None) -> tuple[str, list[DataFile]]:
        if self.snapshot is None:
            raise InputError(f"Iceberg table {self.name!r} has no snapshot (no rows yet)")
        where = f"Iceberg table {self.name!r} (snapshot {self.snapshot.snapshot_id})"
        root = self.location.path.rstrip("/")
        files = []
        for task in self.table.scan().plan_files():
            data = task.file
            shown = data.file_path
            for delete in task.delete_files:
                kind = getattr(delete.content, "name", str(delete.content))
                if kind == "EQUALITY_DELETES":
                    why = ("equality deletes cannot be applied as a per-file row mask; rewrite the table's "
                           "deletes (e.g. Spark rewrite_position_delete_files / rewrite_data_files)")
                else:
                    why = ("position deletes (merge-on-read) are not applied yet, and scoring the file whole "
                           "would score deleted rows; compact the table (rewrite_data_files) first")
                raise InputError(f"{where}: data file {shown} has {kind.lower().replace('_', ' ')} in "
                                 f"{delete.file_path}: {why}; nothing was scored")
            if getattr(data.file_format, "name", str(data.file_format)) != "PARQUET":
                raise InputError(f"{where}: data file {shown} is {data.file_format}, not Parquet; not supported")
            if not shown.startswith(self.uri + "/"):
                raise InputError(f"{where}: data file {shown} lies outside the table location {self.uri}; "
                                 f"not supported")
            rel = shown[len(self.uri) + 1:]
            files.append(DataFile(f"{root}/{rel}", rel, f"size={data.file_size_in_bytes}", data.record_count))
        if not files:
            raise InputError(f"{where} has no data files")
        files.sort(key=lambda f: f.rel)
        return root, files
