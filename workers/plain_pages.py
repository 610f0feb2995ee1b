"""Flat float32 columns decoded from their PLAIN pages straight into a stacking matrix.

pyarrow decodes a float column into an Arrow array (its definition levels into a validity
bitmap, its values copied into a builder) which `workers.stacking` then copies into the
stacking buffer. For the common case of a feature table, a top-level FLOAT column written
with PLAIN pages and no null (pyarrow's and Spark's writers with dictionary encoding off, or
random floats whose dictionary overflowed at once), that is three passes over values that
the page already holds in the matrix's layout: here each page is decompressed and its
values copied once, into the matrix row of their column. On the data-bound job (64 float
columns) that is 0.10 against 0.15 CPU seconds per million rows for decode and stack.

Only what this module reads with certainty is taken: a column chunk with a dictionary
page, another encoding than PLAIN, a codec pyarrow has no `Codec` for, nesting, or a page
whose definition levels hold a null makes `stack_plain` return False, and the caller
decodes the row group with pyarrow, which then also gives any corrupt file its error.

Example:
    >>> plan = plain_columns(parquet.metadata, parquet.schema_arrow, ["f00", "f01"], check=True)  # doctest: +SKIP
    >>> matrix = np.empty((2, rows), np.float32)  # doctest: +SKIP
    >>> stack_plain(parquet.handle, parquet.metadata.row_group(0), plan, matrix)  # doctest: +SKIP
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["Plan", "plain_columns", "stack_plain", "stack_row_group"]

# A chunk's codec as pyarrow names it -> pyarrow's `pa.Codec`. pyarrow calls Parquet's LZ4_RAW "LZ4" (and
# the older LZ4 of Hadoop's framing "LZ4_HADOOP", not here)
_CODECS = {"SNAPPY": "snappy", "GZIP": "gzip", "ZSTD": "zstd", "BROTLI": "brotli", "LZ4": "lz4_raw"}
_ENCODINGS = {"PLAIN", "RLE", "BIT_PACKED"}  # a chunk's values PLAIN, its levels RLE (or the old BIT_PACKED)
_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 2, 3
_PLAIN = 0


class _Unsupported(Exception):
    """A page this module does not decode: the row group goes to pyarrow."""


class Plan(NamedTuple):
    """The feature columns of a file that `stack_plain` may decode, in matrix row order."""

    names: tuple[str, ...]
    leaves: tuple[tuple[int, int], ...]  # per name: its leaf column index and maximum definition level (0 or 1)
    check: bool  # whether the stacked rows' sums are kept, for the invalid-row check


def plain_columns(meta: pq.FileMetaData, schema: pa.Schema, names: Sequence[str], *, check: bool) -> Plan | None:
    """The `Plan` for `names` when every one is a top-level float32 column stored as Parquet FLOAT (the
    file's part of the decision; each row group's chunks are checked by `stack_plain`); None when one
    is not."""
    parquet_schema = meta.schema
    plan = []
    for name in names:
        index = schema.get_field_index(name)
        if index < 0 or schema.field(index).type != pa.float32():
            return None
        leaf = _leaf_of(parquet_schema, name)
        if leaf is None:
            return None
        column = parquet_schema.column(leaf)
        if column.physical_type != "FLOAT" or column.max_repetition_level != 0 or column.max_definition_level > 1:
            return None
        plan.append((leaf, column.max_definition_level))
    return Plan(tuple(names), tuple(plan), check)


def _leaf_of(parquet_schema: pq.ParquetSchema, name: str) -> int | None:
    for i in range(len(parquet_schema)):
        if parquet_schema.column(i).path == name:
            return i
    return None


def stack_plain(handle: pa.NativeFile, group: pq.RowGroupMetaData, plan: Plan, matrix: np.ndarray,
                sums: np.ndarray | None = None) -> bool:
    """The row group's `plan` columns (`plain_columns`) decoded into `matrix`'s rows, in order:
    (columns, rows) float32, rows = the row group's. With `sums` (rows,), each column is added into
    it right after its copy (see `workers.stacking.stack_checked`). False, with `matrix` and `sums`
    partly written, when a chunk or page is not one this module decodes or does not decode as
    expected; the caller then decodes the row group with pyarrow.
    """
    rows = group.num_rows
    try:
        for i, (row, (leaf, max_def)) in enumerate(zip(matrix, plan.leaves)):
            chunk = group.column(leaf)
            if (chunk.has_dictionary_page or chunk.file_path or chunk.num_values != rows
                    or not _ENCODINGS.issuperset(chunk.encodings)):
                return False
            compression = chunk.compression
            codec = None if compression == "UNCOMPRESSED" else _codec(compression)
            data = handle.read_at(chunk.total_compressed_size, chunk.data_page_offset)
            if len(data) != chunk.total_compressed_size:
                return False
            if _pages(_bytes(data), codec, max_def, row) != rows:
                return False
            if sums is not None and i == 0:
                sums[...] = row
            elif sums is not None:
                with np.errstate(invalid="ignore", over="ignore"):  # inf + -inf: what the check looks for
                    sums += row
    except (_Unsupported, IndexError, ValueError, OSError, pa.ArrowException):
        return False
    return True


def stack_row_group(handle: pa.NativeFile, group: pq.RowGroupMetaData,
                    plan: Plan) -> tuple[np.ndarray, np.ndarray | None] | None:
    """`stack_plain` into a new (columns, rows) matrix and, with `plan.check`, (rows,) sums; None when
    it cannot. Both are allocated from pyarrow's memory pool, which reuses the memory of the row groups
    before (a fresh 64 MiB array from numpy is faulted in and zeroed by the kernel, row group after row
    group)."""
    rows, width = group.num_rows, len(plan.leaves)
    matrix = np.frombuffer(pa.allocate_buffer(4 * width * rows), np.float32).reshape(width, rows)
    sums = np.frombuffer(pa.allocate_buffer(4 * rows), np.float32) if plan.check else None
    return (matrix, sums) if stack_plain(handle, group, plan, matrix, sums) else None


_CODEC_CACHE: dict[str, pa.Codec] = {}


def _codec(compression: str) -> pa.Codec:
    codec = _CODEC_CACHE.get(compression)
    if codec is None:
        name = _CODECS.get(compression)
        if name is None or not pa.Codec.is_available(name):
            raise _Unsupported(compression)
        codec = _CODEC_CACHE[compression] = pa.Codec(name)
    return codec


def _pages(chunk: memoryview, codec: pa.Codec | None, max_def: int, out: np.ndarray) -> int:
    """A column chunk's data pages decoded into `out`; the values decoded (raises `_Unsupported`)."""
    at, end, filled = 0, len(chunk), 0
    while at < end:
        header, at = _page_header(chunk, at)
        kind, size = header[1], header[3]
        body = chunk[at: at + size]
        if len(body) != size:
            raise _Unsupported("a page runs past its chunk")
        at += size
        if kind == _DATA_PAGE:
            page = header.get(5)
            if page is None or page.get(2) != _PLAIN:
                raise _Unsupported("not a PLAIN data page")
            count = page[1]
            data = body if codec is None else _bytes(codec.decompress(body, header[2]))
            start = 0
            if max_def:  # v1: the levels' byte length (4 bytes, little-endian), then the levels
                levels = int.from_bytes(data[:4], "little")
                _all_defined(data[4: 4 + levels], count)
                start = 4 + levels
        elif kind == _DATA_PAGE_V2:
            page = header.get(8)
            if page is None or page.get(4) != _PLAIN or page.get(2, 0) != 0 or page.get(6, 0) != 0:
                raise _Unsupported("not a PLAIN data page without nulls")
            count, levels = page[1], page.get(5, 0)
            if max_def:  # v2: the levels uncompressed, before the (maybe compressed) values
                _all_defined(body[:levels], count)
            values, start = body[levels:], 0
            data = values if codec is None or not page.get(7, True) else _bytes(
                codec.decompress(values, header[2] - levels))
        elif kind == _DICTIONARY_PAGE:
            raise _Unsupported("a dictionary page")
        else:  # an index page: nothing to decode
            continue
        if filled + count > len(out) or len(data) - start < 4 * count:
            raise _Unsupported("more values than rows")
        out[filled: filled + count] = np.frombuffer(data, dtype="<f4", count=count, offset=start)
        filled += count
    return filled


def _bytes(buffer: pa.Buffer) -> memoryview:
    """A buffer's bytes as unsigned ints (a `pa.Buffer` exports signed chars)."""
    return memoryview(buffer).cast("B")


def _all_defined(levels: memoryview, count: int) -> None:
    """Raises `_Unsupported` unless the first `count` definition levels (RLE/bit-packed hybrid, bit
    width 1) are all 1: no null."""
    at, seen, end = 0, 0, len(levels)
    while seen < count:
        if at >= end:
            raise _Unsupported("fewer levels than values")
        run, at = _varint(levels, at)
        if run & 1:  # bit-packed: run >> 1 groups of 8 values, one byte each at width 1
            groups = run >> 1
            bits = np.unpackbits(np.frombuffer(levels, np.uint8, groups, at), bitorder="little")
            needed = min(8 * groups, count - seen)
            if not bits[:needed].all():
                raise _Unsupported("a null")
            at += groups
            seen += needed
        else:  # a run of one value, in one byte
            if levels[at] != 1:
                raise _Unsupported("a null")
            at += 1
            seen += run >> 1
    return None


def _varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _page_header(data: memoryview, at: int) -> tuple[dict[int, object], int]:
    """A Thrift compact-protocol `PageHeader` from `data[at:]`: its integer fields and its data page header
    structs (5, 8) by field id, and where the page's body starts."""
    return _struct(data, at, nested=(5, 8))


def _struct(data: memoryview, at: int, nested: tuple[int, ...] = ()) -> tuple[dict[int, object], int]:
    fields: dict[int, object] = {}
    field = 0
    while True:
        byte = data[at]
        at += 1
        if byte == 0:  # STOP
            return fields, at
        kind, delta = byte & 0x0F, byte >> 4
        if delta:
            field += delta
        else:
            raw, at = _varint(data, at)
            field = (raw >> 1) ^ -(raw & 1)
        if kind in (4, 5, 6):  # i16, i32, i64: zigzag varints
            raw, at = _varint(data, at)
            fields[field] = (raw >> 1) ^ -(raw & 1)
        elif kind in (1, 2):  # a bool, held in the type
            fields[field] = kind == 1
        elif kind == 12 and field in nested:
            fields[field], at = _struct(data, at)
        else:
            at = _skip(data, at, kind)


def _skip(data: memoryview, at: int, kind: int) -> int:
    """Past one Thrift compact value of type `kind` (a page's statistics, a field a newer writer added)."""
    if kind in (1, 2):
        return at
    if kind == 3:
        return at + 1
    if kind in (4, 5, 6):
        return _varint(data, at)[1]
    if kind == 7:
        return at + 8
    if kind == 8:
        size, at = _varint(data, at)
        return at + size
    if kind in (9, 10):  # list, set: size and element type in one byte (size 15: a varint follows)
        byte = data[at]
        at += 1
        size, element = byte >> 4, byte & 0x0F
        if size == 15:
            size, at = _varint(data, at)
        for _ in range(size):
            at = at + 1 if element in (1, 2) else _skip(data, at, element)
        return at
    if kind == 11:  # map: size, then key and value types in one byte
        size, at = _varint(data, at)
        if size:
            types = data[at]
            at += 1
            for _ in range(size):
                at = _skip(data, _skip(data, at, types >> 4), types & 0x0F)
        return at
    if kind == 12:
        return _struct(data, at)[1]
    raise _Unsupported(f"Thrift type {kind}")
