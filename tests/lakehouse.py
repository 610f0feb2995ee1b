"""Table changes the libraries cannot make themselves, written the way the formats define them.

delta-rs 1.6 deletes copy-on-write (it writes no deletion vector) and PyIceberg 0.12 writes no
position-delete file and has no rewrite_data_files. These helpers write them by the specs, with
the libraries' own readers checking the result:

- `add_deletion_vector`: a Delta commit that gives a data file an inline deletion vector
  (`storageType: "i"`: Z85 of the magic number and a RoaringBitmapArray), as Spark/Databricks
  write for small vectors. delta-rs reads it back (`deletion_vectors()`, `QueryBuilder`).
- `add_position_deletes`: an Iceberg `delete` snapshot with one position-delete file
  (file_path, pos), committed through PyIceberg's snapshot producer with a delete manifest.
- `compact_iceberg`: an Iceberg `replace` snapshot rewriting data files into one (what
  rewrite_data_files commits), through PyIceberg's overwrite producer.
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

_Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_DV_MAGIC = 1681511377


def z85(data: bytes) -> str:
    """ZeroMQ Base85 (Delta's inline DV encoding); padded with zero bytes to a multiple of 4."""
    data += b"\0" * (-len(data) % 4)
    out = []
    for i in range(0, len(data), 4):
        value = struct.unpack(">I", data[i:i + 4])[0]
        chunk = []
        for _ in range(5):
            value, digit = divmod(value, 85)
            chunk.append(_Z85[digit])
        out.append("".join(reversed(chunk)))
    return "".join(out)


def deletion_vector(positions: Iterable[int]) -> bytes:
    """The Delta protocol's serialised deletion vector: magic, then a portable RoaringBitmapArray."""
    from pyroaring import BitMap

    highs: dict[int, list[int]] = {}
    for p in sorted(set(positions)):
        highs.setdefault(p >> 32, []).append(p & 0xFFFFFFFF)
    body = struct.pack("<I", _DV_MAGIC) + struct.pack("<q", len(highs))
    for key in sorted(highs):
        body += struct.pack("<I", key) + BitMap(highs[key]).serialize()
    return body


def _log(table: Path) -> list[Path]:
    return sorted((table / "_delta_log").glob("*.json"))


def delta_files(table: Path) -> dict[str, dict[str, Any]]:
    """The live add actions of a Delta table by path (replaying its JSON log)."""
    live: dict[str, dict[str, Any]] = {}
    for commit in _log(table):
        for line in commit.read_text().splitlines():
            action = json.loads(line) if line.strip() else {}
            if "remove" in action:
                live.pop(action["remove"]["path"], None)
            if "add" in action:
                live[action["add"]["path"]] = action["add"]
    return live


def deleted_positions(table: Path, path: str) -> set[int]:
    """The rows a file's deletion vector deletes now (as delta-rs reads it)."""
    from deltalake import DeltaTable

    found: set[int] = set()
    for batch in DeltaTable(str(table)).deletion_vectors():
        batch = pa.record_batch(batch)
        for uri, keep in zip(batch.column("filepath").to_pylist(), batch.column("selection_vector").to_pylist()):
            if uri.endswith("/" + path):
                found |= {i for i, k in enumerate(keep) if not k}
    return found


def add_deletion_vector(table: Path, path: str, positions: Iterable[int], operation: str = "DELETE") -> int:
    """Commit a deletion vector on data file `path` deleting `positions` too (with the rows it deleted
    already). The table must have the deletionVectors feature. Returns the new version."""
    add = delta_files(table)[path]
    rows = deleted_positions(table, path) | set(positions)
    raw = deletion_vector(rows)
    version = int(_log(table)[-1].stem) + 1
    now = int(time.time() * 1000)
    actions = [
        {"commitInfo": {"timestamp": now, "operation": operation, "engineInfo": "batch-infer tests"}},
        {"remove": {"path": path, "dataChange": True, "deletionTimestamp": now, "size": add["size"],
                    "partitionValues": add.get("partitionValues") or {}, "extendedFileMetadata": True,
                    **({"deletionVector": add["deletionVector"]} if add.get("deletionVector") else {})}},
        {"add": {**add, "dataChange": True, "modificationTime": now,
                 "deletionVector": {"storageType": "i", "pathOrInlineDv": z85(raw), "sizeInBytes": len(raw),
                                    "cardinality": len(rows)}}},
    ]
    commit = table / "_delta_log" / f"{version:020d}.json"
    commit.write_text("\n".join(json.dumps(a) for a in actions) + "\n")
    return version


def delta_live(table: Path) -> pa.Table:
    """The table's live rows as delta-rs's query engine reads them (deletion vectors applied)."""
    from deltalake import DeltaTable, QueryBuilder

    reader = QueryBuilder().register("t", DeltaTable(str(table))).execute("select * from t")
    return pa.table(reader.read_all())


def _local(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def add_position_deletes(table: Any, data_path: str, positions: Sequence[int],
                         equality_ids: list[int] | None = None) -> Any:
    """Commit an Iceberg `delete` snapshot with one position-delete file deleting `positions` of the data
    file at `data_path` (its full URI, as the table records it). Returns the reloaded table.
    `equality_ids` (field ids): an equality-delete file instead, deleting the rows whose `id` is in `positions`."""
    from pyiceberg.manifest import DataFile, DataFileContent, FileFormat, ManifestContent, ManifestWriterV2
    from pyiceberg.table.snapshots import Operation
    from pyiceberg.typedef import Record

    if equality_ids is None:
        schema = pa.schema([pa.field("file_path", pa.string(), False, {b"PARQUET:field_id": b"2147483546"}),
                            pa.field("pos", pa.int64(), False, {b"PARQUET:field_id": b"2147483545"})])
        rows = pa.table({"file_path": [data_path] * len(positions), "pos": sorted(positions)}, schema=schema)
    else:
        schema = pa.schema([pa.field("id", pa.int64(), True, {b"PARQUET:field_id": b"1"})])
        rows = pa.table({"id": sorted(positions)}, schema=schema)
    path = f"{table.location().rstrip('/')}/data/deletes-{uuid.uuid4().hex}.parquet"
    pq.write_table(rows, _local(path))
    delete = DataFile.from_args(
        content=DataFileContent.POSITION_DELETES if equality_ids is None else DataFileContent.EQUALITY_DELETES,
        file_path=path, file_format=FileFormat.PARQUET,
        partition=Record(), record_count=len(positions), file_size_in_bytes=Path(_local(path)).stat().st_size,
        equality_ids=equality_ids, sort_order_id=None, spec_id=table.spec().spec_id)

    class DeleteManifest(ManifestWriterV2):
        def content(self) -> ManifestContent:  # type: ignore[override]
            return ManifestContent.DELETES

        @property
        def _meta(self) -> dict[str, str]:
            return {**super()._meta, "content": "deletes"}

    with table.transaction() as tx:
        producer = tx.update_snapshot().fast_append()
        producer._operation = Operation.DELETE
        producer.new_manifest_writer = lambda spec: DeleteManifest(  # type: ignore[method-assign]
            spec, producer.schema(), producer.new_manifest_output(), producer._snapshot_id, producer._compression)
        producer.append_data_file(delete)
        producer.commit()
    return table.catalog.load_table(table.name()) if hasattr(table, "catalog") else table


def compact_iceberg(table: Any) -> Any:
    """Commit an Iceberg `replace` snapshot rewriting every data file (none may have deletes) into one.
    Returns the reloaded table."""
    from pyiceberg.io.pyarrow import parquet_file_to_data_file
    from pyiceberg.table.snapshots import Operation

    tasks = list(table.scan().plan_files())
    assert all(not t.delete_files for t in tasks)
    merged = pa.concat_tables([pq.read_table(_local(t.file.file_path)) for t in tasks])
    path = f"{table.location().rstrip('/')}/data/compacted-{uuid.uuid4().hex}.parquet"
    pq.write_table(merged, _local(path))
    with table.transaction() as tx:
        new = parquet_file_to_data_file(tx._table.io, tx.table_metadata, path)
        producer = tx.update_snapshot().overwrite()
        overwrite = producer._summary

        def summary(properties: Any) -> Any:  # PyIceberg sums up overwrites only: the same counts, another name
            from pyiceberg.table.snapshots import Summary

            return Summary(Operation.REPLACE, **overwrite(properties)._additional_properties)

        producer._summary = summary  # type: ignore[method-assign]
        for task in tasks:
            producer.delete_data_file(task.file)
        producer.append_data_file(new)
        producer.commit()
    return table.catalog.load_table(table.name()) if hasattr(table, "catalog") else table
