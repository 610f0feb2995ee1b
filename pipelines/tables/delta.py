"""A Delta Lake table (delta-rs): the data files of its latest version, from the log's add actions.

Deletion vectors are applied as a row mask: delta-rs gives each file's selection vector
(`DeltaTable.deletion_vectors()`), its deleted positions travel on the shard task and the
replicas' reader drops them. The commits since the last run are read from the log's
`_delta_log/<version>.json` files (their add and remove actions, `dataChange`).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from basis import masks
from basis.errors import InputError
from basis.storage import Location, read_bytes, redact
from pipelines.tables import Commit, DataFile, DataFiles, Source
from pipelines.tables.stores import delta_storage_options, delta_table_uri

# Reader features whose files read correctly as plain Parquet by column name (deletion vectors are
# applied as row masks). Anything else (columnMapping: the files' columns have physical names) is refused.
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

    def snapshot_record(self) -> dict[str, Any]:
        return {"format": "delta", "version": self.version}

    def record(self) -> dict[str, Any]:
        return self._with_coverage(self.snapshot_record())

    def files(self, *, avoid: str | None = None) -> tuple[str, DataFiles]:
        root = self.location.path.rstrip("/")
        recorded = self._manifest_files(root)
        if recorded is not None:
            return root, recorded
        where = f"Delta table {self.location.uri!r} (version {self.version})"
        protocol = self.table.protocol()
        features = set(protocol.reader_features or ())
        if protocol.min_reader_version == 2 or (features - _READABLE):
            what = sorted(features - _READABLE) or ["columnMapping"]
            raise InputError(f"{where}: reader feature(s) {', '.join(what)} not supported (its data files "
                             f"cannot be read as plain Parquet by column name); nothing was scored")
        deleted = self._deletion_vectors(where) if "deletionVectors" in features else {}
        actions = self.table.get_add_actions(flatten=True)
        columns = {name: actions.column(name).to_pylist() for name in ("path", "size_bytes", "num_records")}
        files = []
        for path, size, rows in zip(columns["path"], columns["size_bytes"], columns["num_records"]):
            rel = unquote(path)
            if "://" in rel or rel.startswith("/"):  # a shallow clone's absolute path
                raise InputError(f"{where}: data file {rel!r} lies outside the table; not supported")
            mask = deleted.pop(rel, None)
            fingerprint = f"size={size}"
            if mask is not None:  # a new deletion vector on a file is a new fingerprint: its rows changed
                fingerprint += f";deleted={mask[1]}:{masks.digest(mask[0])}"
            files.append(DataFile(posixpath.join(root, rel), rel, fingerprint, rows,
                                  None if mask is None else mask[0]))
        if deleted:  # a vector whose file was not matched: never ignored
            raise InputError(f"{where}: deletion vector(s) for {sorted(deleted)[:3]} match no data file of the "
                             f"table; nothing was scored")
        if not files:
            raise InputError(f"{where} has no data files")
        files.sort(key=lambda f: f.rel)
        return root, self._live(root, files)

    def _deletion_vectors(self, where: str) -> dict[str, tuple[bytes, int]]:
        """Per data file (relative to the table) whose vector deletes rows: its deleted positions
        (`basis.masks`) and how many."""
        import numpy as np
        import pyarrow as pa

        base = unquote(self.table.table_uri).rstrip("/") + "/"
        deleted: dict[str, tuple[bytes, int]] = {}
        try:
            vectors = [pa.record_batch(batch) for batch in self.table.deletion_vectors()]
        except Exception as exc:  # a vector delta-rs cannot read (a missing DV file, a bad checksum)
            raise InputError(f"{where}: its deletion vectors cannot be read ({redact(str(exc))}); scoring the "
                             f"files whole would score deleted rows; nothing was scored") from exc
        for batch in vectors:
            for uri, keep in zip(batch.column("filepath").to_pylist(), batch.column("selection_vector").to_pylist()):
                positions = np.flatnonzero(~np.asarray(keep, dtype=bool))
                if positions.size:
                    uri = unquote(uri)
                    rel = uri[len(base):] if uri.startswith(base) else uri
                    deleted[rel] = (masks.encode(positions), int(positions.size))
        return deleted

    def commits_since(self, recorded: Mapping[str, Any]) -> list[Commit] | None:
        first = recorded.get("version")
        if not isinstance(first, int) or first > self.version:
            return None  # another table under the same path (recreated), or none recorded
        commits = []
        for version in range(first + 1, self.version + 1):
            data = read_bytes(self.location.fs, self.location.join(f"_delta_log/{version:020d}.json"))
            if data is None:
                return None  # cleaned up (checkpoints and log retention): cannot be followed
            operation, removed, added = "?", [], []
            for line in data.decode().splitlines():
                if not line.strip():
                    continue
                action = json.loads(line)
                if "commitInfo" in action:
                    operation = action["commitInfo"].get("operation") or "?"
                for kind, into in (("remove", removed), ("add", added)):
                    if kind in action:
                        into.append((unquote(action[kind]["path"]), bool(action[kind].get("dataChange", True))))
            commits.append(Commit(f"version {version} ({operation})", tuple(removed), tuple(added)))
        return commits
