"""Manifest segments: an output's shard entries as Parquet files under `_manifest/`, one row per entry.

A large output's `_manifest.json` stays the root that users and tools open (its header, `complete`, the
row counts), but its `shards` is not the list of entries: it names the segments that hold them, in
input order, each with its first and last key (rel, first row group) and its entry count:

    OUTPUT/_manifest.json                                   the root: header, counts, segment list
    OUTPUT/_manifest/seg-000007-3fa2b1c09d4e.parquet        entries, sorted by (rel, first row group)

Segments are written under unique names (the generation that wrote them and a hash of their bytes)
and never rewritten in place: a checkpoint writes its new segments, then the root (atomically), then
deletes the segments no root names any more. A run that changes few entries rewrites only the segments
whose key range holds them. An output of at most `INLINE_MAX` entries keeps them inline, as JSON.

    >>> table = entries_table([{"id": "a:0-1", "input": "/in/a", "rel": "a", "fingerprint": "f",
    ...                         "row_groups": [0, 1], "rows_in": 3, "rows_out": 3, "rows_rejected": 0,
    ...                         "output": "a-00000.parquet", "status": "committed", "note": [1]}])
    >>> table_entries(table)[0]["row_groups"], table_entries(table)[0]["note"]
    ([0, 1], [1])
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from basis.errors import OutputConflictError
from basis.storage import Location, delete_file, read_bytes, write_bytes_atomic

SEGMENT_DIR = "_manifest"
INLINE_MAX = 10_000  # entries kept inline in `_manifest.json` (about 5 MB of JSON); more go to segments
SEGMENT_ROWS = 65_536  # entries per segment written (about 4 MB of Parquet): what one changed entry rewrites
_READ_THREADS = 8

_STR, _INT = pa.string(), pa.int64()
SCHEMA = pa.schema([
    ("id", _STR), ("input", _STR), ("rel", _STR), ("fingerprint", _STR), ("file_row_groups", _INT),
    ("first", _INT), ("stop", _INT),  # row_groups [first, stop)
    ("rows_in", _INT), ("rows_out", _INT), ("rows_rejected", _INT), ("output", _STR), ("bytes", _INT),
    ("sha256", _STR), ("rejected_output", _STR), ("rejected_bytes", _INT), ("rejected_sha256", _STR),
    ("status", _STR), ("attempts", _INT), ("error", _STR), ("generation", _INT),
    ("extra", _STR),  # any other field of an entry, as a JSON object (none today)
])
_REQUIRED = ("id", "input", "rel", "fingerprint", "first", "stop", "rows_in", "rows_out", "rows_rejected",
             "output", "status")
_PLAIN = [name for name in SCHEMA.names if name not in ("first", "stop", "extra")]
_KNOWN = {*_PLAIN, "row_groups"}


def entries_table(entries: Iterable[Mapping[str, Any]], *, status: Sequence[str] | None = None,
                  columns: Sequence[str] | None = None) -> pa.Table:
    """Entries (manifest dicts) as a table of `SCHEMA` (only its `columns`, when given); `status`: each
    entry's status in place of its own (no entry copied to set it)."""
    names = SCHEMA.names if columns is None else list(columns)
    table: dict[str, list[Any]] = {name: [] for name in names}
    plain = [(name, table[name]) for name in _PLAIN if name in table and (status is None or name != "status")]
    first, stop, extra = table.get("first"), table.get("stop"), table.get("extra")
    for entry in entries:
        for name, column in plain:
            column.append(entry.get(name))
        if first is not None or stop is not None:
            bounds = entry["row_groups"]
            if first is not None:
                first.append(bounds[0])
            if stop is not None:
                stop.append(bounds[1])
        if extra is not None:
            rest = None if _KNOWN.issuperset(entry) else {k: v for k, v in entry.items() if k not in _KNOWN}
            extra.append(json.dumps(rest, sort_keys=True) if rest else None)
    if status is not None and "status" in table:
        table["status"] = list(status)
    return pa.table(table, schema=SCHEMA if columns is None else pa.schema([SCHEMA.field(n) for n in names]))


def table_entries(table: pa.Table) -> list[dict[str, Any]]:
    """The rows of a `SCHEMA` table as manifest entries (dicts), in order."""
    entries = []
    for batch in table.select(SCHEMA.names).to_batches(max_chunksize=16_384):
        for row in batch.to_pylist():
            row["row_groups"] = [row.pop("first"), row.pop("stop")]
            extra = row.pop("extra")
            if extra:
                row.update(json.loads(extra))
            entries.append(row)
    return entries


_ORDER = [("rel", "ascending"), ("first", "ascending"), ("pending", "ascending")]


def sorted_table(table: pa.Table) -> pa.Table:
    """`table` in manifest order: (rel, first row group, committed before the others)."""
    if table.num_rows <= 1:
        return table
    pending = pc.not_equal(table["status"], "committed")
    order = pc.sort_indices(table.append_column("pending", pending), sort_keys=_ORDER)
    if (np.diff(order.to_numpy()) == 1).all():
        return table  # in order already (a checkpoint's new entries): no copy
    return table.take(order)


def segment_ref(path: str, table: pa.Table, size: int) -> dict[str, Any]:
    """The root's record of one segment: where, how many entries, and its key range."""
    return {"path": path, "entries": table.num_rows, "bytes": size,
            "first": [table["rel"][0].as_py(), table["first"][0].as_py()],
            "last": [table["rel"][-1].as_py(), table["first"][-1].as_py()]}


def write_segment(output: Location, table: pa.Table, generation: int) -> dict[str, Any]:
    """Write one segment under a name no other segment has (its generation and a hash of its bytes)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table.select(SCHEMA.names).cast(SCHEMA), sink, compression="zstd", row_group_size=SEGMENT_ROWS)
    data = sink.getvalue().to_pybytes()
    path = f"{SEGMENT_DIR}/seg-{generation:06d}-{hashlib.sha256(data).hexdigest()[:12]}.parquet"
    write_bytes_atomic(output.fs, output.join(path), data)
    return segment_ref(path, table, len(data))


def read_segments(output: Location, refs: Sequence[Mapping[str, Any]], where: str,
                  columns: Sequence[str] | None = None) -> list[pa.Table]:
    """Every segment the root names (only `columns`, with "status"), checked (exit 2 naming the segment when
    one is missing or broken)."""
    names = SCHEMA.names if columns is None else list(dict.fromkeys([*columns, "status"]))
    schema = pa.schema([SCHEMA.field(name) for name in names])

    def read(ref: Mapping[str, Any]) -> pa.Table:
        path = ref["path"]
        data = read_bytes(output.fs, output.join(path))
        if data is None:
            raise OutputConflictError(f"{where} names the segment {output.display(output.join(path))}, which is "
                                      f"missing; restore it (or the output), or write to a new output")
        try:
            file = pq.ParquetFile(pa.BufferReader(data))
            problem = _segment_problem(file.schema_arrow, ref, file.metadata.num_rows)
            table = file.read(columns=[name for name in names if name in file.schema_arrow.names]) \
                if problem is None else None
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a broken file
            raise OutputConflictError(f"{output.display(output.join(path))} (a segment of {where}) is not a "
                                      f"readable Parquet file ({exc}); restore it, or write to a new output") from exc
        problem = problem or _rows_problem(table)
        if problem is not None:
            raise OutputConflictError(f"{output.display(output.join(path))} (a segment of {where}) is malformed: "
                                      f"{problem}; restore it, or write to a new output")
        return table.select(names).cast(schema)

    with ThreadPoolExecutor(max_workers=max(1, min(_READ_THREADS, len(refs)))) as pool:
        return list(pool.map(read, refs))


def _segment_problem(schema: pa.Schema, ref: Mapping[str, Any], rows: int) -> str | None:
    missing = [name for name in SCHEMA.names if name not in schema.names]
    if missing:
        return f"no column(s) {missing}"
    for field in SCHEMA:
        if not schema.field(field.name).type.equals(field.type) and not (
                pa.types.is_integer(field.type) and pa.types.is_integer(schema.field(field.name).type)):
            return f"column {field.name!r} has type {schema.field(field.name).type}, not {field.type}"
    if ref.get("entries") is not None and ref["entries"] != rows:
        return f"{rows} entries where the root records {ref['entries']}"
    return None


def _rows_problem(table: pa.Table) -> str | None:
    for name in _REQUIRED:
        if name not in table.column_names:
            continue
        nulls = table[name].null_count
        if nulls:
            index = pc.index(pc.is_null(table[name]), True).as_py()
            return f"entry {index} ({table['id'][index].as_py() if 'id' in table.column_names else '?'}) has no {name!r}"
    bad = pc.invert(pc.is_in(table["status"], pa.array(["committed", "failed", "pending", "superseded"])))
    if pc.any(bad).as_py():
        index = pc.index(bad, True).as_py()
        return f"entry {index} has status {table['status'][index].as_py()!r}"
    if pc.any(pc.or_(pc.less(table["first"], 0), pc.less(table["stop"], table["first"]))).as_py():
        return "an entry whose row groups are not [first, stop)"
    return None


def segment_files(output: Location) -> Iterator[str]:
    """The relative paths of the files under `_manifest/` (referenced by the root or not)."""
    try:
        infos = output.fs.get_file_info(pafs.FileSelector(output.join(SEGMENT_DIR), allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return iter(())
    return (f"{SEGMENT_DIR}/{posixpath.basename(info.path)}" for info in infos if info.type == pafs.FileType.File)


def delete_unreferenced(output: Location, keep: Iterable[str]) -> None:
    """After the root was written: every segment it does not name (replaced ones, a killed checkpoint's)."""
    keep = set(keep)
    stale = [path for path in segment_files(output) if path not in keep]
    with ThreadPoolExecutor(max_workers=max(1, min(_READ_THREADS, len(stale)))) as pool:
        list(pool.map(lambda path: delete_file(output.fs, output.join(path)), stale))
