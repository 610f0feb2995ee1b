"""A Delta Lake table (delta-rs): the data files of its latest version, from the log's add actions."""

from __future__ import annotations

import posixpath
from typing import Any
from urllib.parse import unquote

from basis.errors import InputError
from basis.storage import Location, redact
from pipelines.tables import DataFile, Source
from pipelines.tables.stores import delta_storage_options, delta_table_uri

# Reader features whose files read correctly as plain Parquet by column name (deletion vectors are
# checked per file below). Anything else (columnMapping: the files' columns have physical names) is refused.
_READABLE = {"deletionVectors", "timestampNtz", "v2Checkpoint", "vacuumProtocolCheck", "typeWidening",
             "typeWidening-preview", "variantType", "variantType-preview"}


class DeltaSource(Source):
    """The add actions of the table's latest version: removed files (left on disk until vacuum) are never read."""

    format = "delta"

    def __init__(self, location: Location, uri: str) -> None:
        from deltalake import DeltaTable

        self.location, self.uri, self.name = location, uri, location.uri
        try:
            self.table = DeltaTable(delta_table_uri(location), storage_options=delta_storage_options(location) or None)
        except Exception as exc:  # deltalake raises TableNotFoundError, DeltaError, OSError, ...
            raise InputError(f"cannot open the Delta table {location.uri!r}: {redact(str(exc))}") from exc
        self.version = self.table.version()

    def record(self) -> dict[str, Any]:
        return {"format": "delta", "version": self.version}

    def files(self, *, avoid: str | None = None) -> tuple[str, list[DataFile]]:
        where = f"Delta table {self.location.uri!r} (version {self.version})"
        protocol = self.table.protocol()
        features = set(protocol.reader_features or ())
        if protocol.min_reader_version == 2 or (features - _READABLE):
            what = sorted(features - _READABLE) or ["columnMapping"]
            raise InputError(f"{where}: reader feature(s) {', '.join(what)} not supported (its data files "
                             f"cannot be read as plain Parquet by column name); nothing was scored")
        deleted = self._deletion_vectors() if "deletionVectors" in features else {}
        actions = self.table.get_add_actions(flatten=True)
        columns = {name: actions.column(name).to_pylist() for name in ("path", "size_bytes", "num_records")}
        root = self.location.path.rstrip("/")
        files = []
        for path, size, rows in zip(columns["path"], columns["size_bytes"], columns["num_records"]):
            rel = unquote(path)
            if "://" in rel or rel.startswith("/"):  # a shallow clone's absolute path
                raise InputError(f"{where}: data file {rel!r} lies outside the table; not supported")
            full = posixpath.join(root, rel)
            count = deleted.pop(rel, 0)
            if count:
                raise InputError(
                    f"{where}: data file {rel!r} has a deletion vector ({count} deleted row(s)); applying "
                    f"deletion vectors is not supported yet, and scoring the file whole would score deleted "
                    f"rows. Rewrite the table without them (e.g. OPTIMIZE/REORG TABLE ... APPLY (PURGE)); "
                    f"nothing was scored")
            files.append(DataFile(full, rel, f"size={size}", rows))
        if deleted:  # a vector whose file was not matched: never ignored
            raise InputError(f"{where}: deletion vector(s) for {sorted(deleted)[:3]} match no data file of the "
                             f"table; nothing was scored")
        if not files:
            raise InputError(f"{where} has no data files")
        files.sort(key=lambda f: f.rel)
        return root, files

    def _deletion_vectors(self) -> dict[str, int]:
        """Deleted rows per data file (relative to the table; files whose vector deletes nothing left out)."""
        base = unquote(self.table.table_uri).rstrip("/") + "/"
        deleted: dict[str, int] = {}
        for batch in self.table.deletion_vectors():
            for uri, keep in zip(batch.column("filepath").to_pylist(), batch.column("selection_vector").to_pylist()):
                count = sum(1 for k in keep if not k)
                if count:
                    uri = unquote(uri)
                    deleted[uri[len(base):] if uri.startswith(base) else uri] = count
        return deleted
