"""Flat float32 feature columns decoded from their PLAIN pages straight into a stacking matrix.

pyarrow decodes a float column into an Arrow array (its definition levels into a validity
bitmap, its values copied into a builder), which `workers.stacking` then copies into the
stacking buffer. A feature table's usual column, a top-level FLOAT column of PLAIN pages
without nulls (pyarrow's, Spark's or Polars' writers with dictionary encoding off), already
holds its values in the matrix row's layout: here each page is decompressed and its values
copied once, into the row of their column, without the levels or the builder (a snappy or
zstd page is decompressed into the row itself, `_into`: not even that copy). Single-threaded
on the data-bound job's files (64 float columns, 250,000-row row groups, snappy), decoding
and stacking took 0.087-0.10 against 0.17-0.20 s per million rows with pyarrow; a replica's
CPU per row dropped by ~20-27%.

Only what this module reads with certainty is taken. A row group whose feature chunks have
a dictionary page, another encoding than PLAIN, a codec pyarrow has no `Codec` for, or
statistics that count a null, and a page that holds a null (its values are then fewer than
its rows) or does not decode as its header says, make `stack_row_group` return None: the
caller decodes that row group with pyarrow, which also gives a corrupt file its error.
Nested, list, float64, integer and other columns are never taken (`plain_columns`).

Example:
    >>> plan = plain_columns(parquet.metadata, parquet.schema_arrow, ["f00", "f01"], check=True)  # doctest: +SKIP
    >>> matrix, sums = stack_row_group(handle, parquet.metadata.row_group(0), plan)  # doctest: +SKIP
    >>> matrix.shape  # (features, rows) float32  # doctest: +SKIP
    (2, 250000)
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

import cramjam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["Plan", "plain_columns", "stack_row_group"]

# A chunk's codec as pyarrow names it -> pyarrow's `pa.Codec`. pyarrow calls Parquet's LZ4_RAW "LZ4" (and
# the older LZ4 of Hadoop's framing "LZ4_HADOOP", not here)
_CODECS = {"SNAPPY": "snappy", "GZIP": "gzip", "ZSTD": "zstd", "BROTLI": "brotli", "LZ4": "lz4_raw"}
_ENCODINGS = {"PLAIN", "RLE", "BIT_PACKED"}  # a chunk's values PLAIN, its levels RLE (or the old BIT_PACKED)
_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 2, 3
_PLAIN = 0


class _Unsupported(Exception):
    """A chunk or page this module does not decode: the row group goes to pyarrow."""


class Plan(NamedTuple):
    """The feature columns of a file that `stack_row_group` may decode, in matrix row order."""

    names: tuple[str, ...]
    leaves: tuple[tuple[int, int], ...]  # per name: its leaf column index and maximum definition level (0 or 1)
    check: bool  # whether the stacked rows' sums are kept, for the invalid-row check
    # held while a row group is decoded: one of a shard's threads at a time (see `stack_row_group`)
    turn: threading.Lock


def plain_columns(meta: pq.FileMetaData, schema: pa.Schema, names: Sequence[str], *, check: bool) -> Plan | None:
    """The `Plan` for `names` when every one is a top-level float32 column stored as Parquet FLOAT (the
    file's part of the decision; each row group's chunks are checked by `stack_row_group`); None when
    one is not."""
    parquet_schema = meta.schema
    leaves = {}  # top-level leaf column name -> (index, its schema)
    for i in range(len(parquet_schema)):
        column = parquet_schema.column(i)
        leaves[column.path] = (i, column)
    plan = []
    for name in names:
        index = schema.get_field_index(name)
        if index < 0 or schema.field(index).type != pa.float32() or name not in leaves:
            return None
        leaf, column = leaves[name]
        if column.physical_type != "FLOAT" or column.max_repetition_level != 0 or column.max_definition_level > 1:
            return None
        plan.append((leaf, column.max_definition_level))
    return Plan(tuple(names), tuple(plan), check, threading.Lock())


class Page(NamedTuple):
    """Where one data page's values lie in its column chunk."""

    count: int  # values (rows: the columns are flat)
    start: int  # its body's offset in the chunk
    size: int  # its body's bytes in the chunk
    uncompressed: int  # its body's bytes once decompressed (for v2, of the values only)
    levels: int  # v2: the bytes of definition levels before the values (uncompressed); v1: -1
    compressed: bool  # whether the (v1: whole body, v2: values) is compressed


def stack_row_group(handle: pa.NativeFile, group: pq.RowGroupMetaData, plan: Plan, *,
                    window: _Window | None = None) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The row group's `plan` columns decoded into a new (columns, rows) float32 matrix, in order, and
    with `plan.check` their (rows,) sums, each column added right after its copy (see
    `workers.stacking.stack_checked`); None when a chunk is not one this module decodes (a dictionary
    page, another encoding than PLAIN, a codec pyarrow has none for, statistics that count a null, a
    page with a null, so fewer values than rows, or a page that does not decode as its header says):
    the caller then decodes the row group with pyarrow, which also gives a corrupt chunk its error.

    Column after column, its chunk is read (one read, into a buffer the thread reuses: still in cache
    when its pages are decompressed) and its pages decoded into its row of the matrix. The matrix and
    sums come from pyarrow's memory pool, which reuses the memory of the row groups before (a fresh
    64 MiB array from numpy is faulted in and zeroed by the kernel, row group after row group).

    One thread of a shard decodes at a time (`plan.turn`): the page loop is Python, ~3,200 pages per
    million rows, and two threads in it at once wait on each other for the interpreter, while one
    thread's forward passes and writes (torch, pyarrow) run beside another's decoding without it. On
    the data-bound job, one at a time took 10% less CPU and 3% less time per row (8 alternating pairs).

    `window`: an object store's file's chunks, fetched beforehand (`prefetch`), read from instead of
    `handle`.
    """
    rows, width = group.num_rows, len(plan.leaves)
    found = _chunks(group, plan) if window is None else (window.chunks, window.codecs)
    if found is None:
        return None
    chunks, codecs = found
    # the matrix's bytes after `_SLACK` bytes of room for a first page's levels (see `_into`)
    memory = np.frombuffer(pa.allocate_buffer(_SLACK + 4 * width * rows), np.uint8)
    matrix = memory[_SLACK:].view(np.float32).reshape(width, rows)
    sums = np.frombuffer(pa.allocate_buffer(4 * rows), np.float32) if plan.check else None
    with plan.turn:
        return _decode(handle if window is None else window, chunks, codecs, plan.leaves, memory, matrix, sums)


def prefetch(handle: pa.NativeFile, group: pq.RowGroupMetaData,
             plan: Plan) -> concurrent.futures.Future[_Window | None] | None:
    """An object store's file: the row group's feature chunks fetched on a thread of their own, in one
    ranged read of the bytes from the first to the last (`_Window`), not a request per column, while
    the caller reads the other columns (both requests at once, as pyarrow's `pre_buffer` makes them);
    the result goes to `stack_row_group`, outside the turn. None, for pyarrow to read it all, when the
    row group is not one this module decodes or its chunks lie far apart (other columns between them).
    An error of the read is raised by the future's `result`, for the caller's retries.

    The read seeks and reads `handle` while pyarrow reads it positionally (`ReadAt`, which moves no
    position) on the caller's thread: no read of one moves the other's. One fetch at a time on a
    handle (two would move each other's position).
    """
    found = _chunks(group, plan)
    if found is None or not _Window.close(found[0]):
        return None
    return _fetcher().submit(_Window.fetch, handle, *found)


def _chunks(group: pq.RowGroupMetaData,
            plan: Plan) -> tuple[list[pq.ColumnChunkMetaData], list[pa.Codec | None]] | None:
    """The row group's chunks of `plan`'s columns and their codecs, from the footer alone; None when
    one is not a chunk this module decodes."""
    rows = group.num_rows
    chunks: list[pq.ColumnChunkMetaData] = []
    codecs: list[pa.Codec | None] = []
    for leaf, max_def in plan.leaves:
        chunk = group.column(leaf)
        if (chunk.has_dictionary_page or chunk.file_path or chunk.num_values != rows
                or not _ENCODINGS.issuperset(chunk.encodings)):
            return None
        if max_def and chunk.is_stats_set and chunk.statistics.has_null_count and chunk.statistics.null_count:
            return None  # (a count of 0 is not trusted: every page's values are counted)
        try:
            codecs.append(_codec(chunk.compression))
        except _Unsupported:
            return None
        chunks.append(chunk)
    return chunks, codecs


def _decode(handle: pa.NativeFile | _Window, chunks: list[pq.ColumnChunkMetaData], codecs: list[pa.Codec | None],
            leaves: Sequence[tuple[int, int]], memory: np.ndarray, matrix: np.ndarray,
            sums: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None] | None:
    rows = matrix.shape[1]
    try:
        for i, (chunk, codec, (_, max_def), row) in enumerate(zip(chunks, codecs, leaves, matrix)):
            data = _read(handle, chunk.data_page_offset, chunk.total_compressed_size)
            into = _INTO.get(chunk.compression)
            filled = 0
            for page in _page_table(data):
                if filled + page.count > rows:
                    return None
                if into is None or not _into(into, data, page, max_def, memory, _SLACK + 4 * (i * rows + filled)):
                    row[filled: filled + page.count] = _values(data, page, codec, max_def)
                filled += page.count
            if filled != rows:
                return None
            if sums is not None and i == 0:
                sums[...] = row
            elif sums is not None:
                with np.errstate(invalid="ignore", over="ignore"):  # inf + -inf: what the check looks for
                    sums += row
    except (_Unsupported, IndexError, ValueError, OSError, pa.ArrowException):
        return None
    return matrix, sums


class _Window:
    """The bytes of a row group's chunks, read from an object store in one request; `_read` slices them.
    It keeps the chunks and their codecs that `prefetch` found in the footer, for `stack_row_group`."""

    SPARE = 0.25  # at most this share of the bytes fetched belongs to no chunk of the plan

    def __init__(self, data: pa.Buffer, start: int, chunks: list[pq.ColumnChunkMetaData],
                 codecs: list[pa.Codec | None]) -> None:
        self.data, self.start, self.chunks, self.codecs = data, start, chunks, codecs

    @classmethod
    def close(cls, chunks: Sequence[pq.ColumnChunkMetaData]) -> bool:
        """Whether `chunks` lie close enough together to be fetched as one range."""
        start, end = cls._span(chunks)
        return end - start <= sum(chunk.total_compressed_size for chunk in chunks) * (1 + cls.SPARE)

    @staticmethod
    def _span(chunks: Sequence[pq.ColumnChunkMetaData]) -> tuple[int, int]:
        return (min(chunk.data_page_offset for chunk in chunks),
                max(chunk.data_page_offset + chunk.total_compressed_size for chunk in chunks))

    @classmethod
    def fetch(cls, handle: pa.NativeFile, chunks: list[pq.ColumnChunkMetaData],
              codecs: list[pa.Codec | None]) -> _Window | None:
        """The window over `chunks`, or None when the file ends first."""
        start, end = cls._span(chunks)
        handle.seek(start)
        data = handle.read_buffer(end - start)
        return cls(data, start, chunks, codecs) if data.size == end - start else None

    def slice(self, offset: int, size: int) -> memoryview:
        return _bytes(self.data.slice(offset - self.start, size))


_FETCHER: concurrent.futures.ThreadPoolExecutor | None = None
_FETCHER_LOCK = threading.Lock()


def _fetcher() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that fetch windows: one per decoding thread of a replica is enough (4)."""
    global _FETCHER
    with _FETCHER_LOCK:
        if _FETCHER is None:
            _FETCHER = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="batch-infer-fetch")
        return _FETCHER


def _forget_fetcher() -> None:
    """A forked child has none of its parent's threads: a pool it inherited would take work and never run it."""
    global _FETCHER, _FETCHER_LOCK
    _FETCHER, _FETCHER_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_fetcher)


_SCRATCH = threading.local()  # per thread: the buffer its chunks are read into
_SCRATCH_LIMIT = 16 << 20  # a larger chunk is read into a buffer of its own, not kept


def _read(handle: pa.NativeFile | _Window, offset: int, size: int) -> memoryview:
    """A chunk's bytes: a slice of a `_Window`, an in-memory or a memory-mapped file, else read into the
    calling thread's scratch buffer (valid until its next `_read`) from the position `handle` is left at
    (the thread's own). Raises `_Unsupported` when the file ends first."""
    if isinstance(handle, _Window):
        return handle.slice(offset, size)
    handle.seek(offset)
    if isinstance(handle, (pa.BufferReader, pa.MemoryMappedFile)) or size > _SCRATCH_LIMIT:
        data = handle.read_buffer(size)
        if data.size != size:
            raise _Unsupported("the file ends inside a column chunk")
        return _bytes(data)
    scratch = getattr(_SCRATCH, "buffer", None)
    if scratch is None or len(scratch) < size:
        scratch = _SCRATCH.buffer = np.empty(max(size, 1 << 20), np.uint8)
    if handle.readinto(scratch[:size]) != size:
        raise _Unsupported("the file ends inside a column chunk")
    return memoryview(scratch)[:size]


_CODEC_CACHE: dict[str, pa.Codec] = {}


def _codec(compression: str) -> pa.Codec | None:
    """pyarrow's codec for a chunk's compression (kept), None for an uncompressed chunk; raises
    `_Unsupported` when pyarrow has none."""
    if compression == "UNCOMPRESSED":
        return None
    codec = _CODEC_CACHE.get(compression)
    if codec is None:
        name = _CODECS.get(compression)
        if name is None or not pa.Codec.is_available(name):
            raise _Unsupported(f"no codec for {compression}")
        codec = _CODEC_CACHE[compression] = pa.Codec(name)
    return codec


def _page_table(chunk: memoryview) -> list[Page]:
    """A column chunk's data pages (raises `_Unsupported` for a page other than a PLAIN data page)."""
    at, end, pages = 0, len(chunk), []
    while at < end:
        header, at = _page_header(chunk, at)
        kind, size = header[1], header[3]
        if at + size > end:
            raise _Unsupported("a page runs past its chunk")
        if kind == _DATA_PAGE:
            page = header.get(5)
            if not isinstance(page, dict) or page.get(2) != _PLAIN:
                raise _Unsupported("not a PLAIN data page")
            pages.append(Page(page[1], at, size, header[2], -1, True))
        elif kind == _DATA_PAGE_V2:
            page = header.get(8)
            if not isinstance(page, dict) or page.get(4) != _PLAIN or page.get(6, 0) != 0:
                raise _Unsupported("not a PLAIN data page")
            levels = page.get(5, 0)
            pages.append(Page(page[1], at, size, header[2] - levels, levels, page.get(7, True)))
        elif kind == _DICTIONARY_PAGE:
            raise _Unsupported("a dictionary page")
        else:  # an index page: nothing to decode
            at += size
            continue
        at += size
    return pages


def _values(chunk: memoryview, page: Page, codec: pa.Codec | None, max_def: int) -> np.ndarray:
    """A page's values, (count,) float32. Raises `_Unsupported` unless the page holds exactly `count`
    values: a PLAIN page stores no value for a null, so a page with a null holds fewer (the levels
    themselves need not be read)."""
    body = chunk[page.start: page.start + page.size]
    if page.levels < 0:  # v1: levels and values compressed together
        data = body if codec is None else _bytes(codec.decompress(body, page.uncompressed))
        # the levels' byte length (4 bytes, little-endian) and the levels, then the values
        start = 4 + int.from_bytes(data[:4], "little") if max_def else 0
    else:  # v2: the levels uncompressed, before the (maybe compressed) values
        values = body[page.levels:]
        data = values if codec is None or not page.compressed else _bytes(codec.decompress(values, page.uncompressed))
        start = 0
    if len(data) - start != 4 * page.count:
        raise _Unsupported("a null, or not the values the page header says")
    return np.frombuffer(data, dtype="<f4", count=page.count, offset=start)


# Codecs that decompress into a buffer of ours (cramjam's), so a page's values land in the matrix itself: no
# decompressed page to copy. One core decoded and stacked a data-bound file (2M rows, snappy) in 0.177-0.182
# against 0.198-0.254 CPU s (best of 12, 3 alternating runs); a replica's steady state took 0.172 against 0.188
# wall and 0.270 against 0.286 CPU s per million rows (medians of 6 alternating runs)
_INTO: dict[str, Callable[[object, object], int]] = {"SNAPPY": cramjam.snappy.decompress_raw_into,
                                                    "ZSTD": cramjam.zstd.decompress_into}
_SLACK = 64  # bytes before the matrix: a v1 page's levels, decompressed ahead of its values (see `_into`)


def _into(into: Callable[[object, object], int], chunk: memoryview, page: Page, max_def: int, memory: np.ndarray,
          at: int) -> bool:
    """A compressed page's values decompressed straight into `memory[at:]`, its place in the matrix; False
    when this page cannot be (the caller decompresses it as `_values` does). Raises `_Unsupported` as
    `_values` does for a page that holds a null or not what its header says.

    A v1 page's definition levels (its 4-byte length and the levels) are compressed together with its values,
    before them: they are decompressed into the bytes before `at` (the page before's last values, the row
    before's, or `_SLACK`), which are kept aside and put back. A page holds no null exactly when the levels'
    length says the levels take every byte before the values (the values are then 4 x count bytes)."""
    body = chunk[page.start: page.start + page.size]
    size = 4 * page.count
    if page.levels >= 0:  # v2: the levels uncompressed, before the values
        if not page.compressed or page.uncompressed != size:
            return False
        if _decompress(into, body[page.levels:], memory[at: at + size]) != size:
            raise _Unsupported("a null, or not the values the page header says")
        return True
    ahead = page.uncompressed - size  # v1: the levels' bytes, when the page holds no null
    if ahead < (4 if max_def else 0) or ahead > at or (ahead and not max_def):
        return False
    kept = memory[at - ahead: at].copy()
    try:
        written = _decompress(into, body, memory[at - ahead: at + size])
        levels = int.from_bytes(memory[at - ahead: at - ahead + 4], "little") if max_def else -4
    finally:
        memory[at - ahead: at] = kept
    if written != page.uncompressed or levels + 4 != ahead:
        raise _Unsupported("a null, or not the values the page header says")
    return True


def _decompress(into: Callable[[object, object], int], source: memoryview, target: np.ndarray) -> int:
    """`into(source, target)`: the bytes it wrote; raises `_Unsupported` for any error of cramjam's."""
    try:
        return into(source, target)
    except Exception as exc:  # noqa: BLE001 - cramjam's errors: not a page we can read
        raise _Unsupported(f"decompressing a page: {exc}") from exc


def _bytes(buffer: pa.Buffer) -> memoryview:
    """A buffer's bytes as unsigned ints (a `pa.Buffer` exports signed chars)."""
    return memoryview(buffer).cast("B")


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
    structs (5, 8) by field id, and where the page's body starts.

    One loop for the header and every struct in it (a page's statistics are walked past, not kept): the
    parse runs for every page of every column, ~3,200 pages per million rows of 64 columns, and a call per
    field cost twice as much."""
    header: dict[int, object] = {}
    fields: dict[int, object] | None = header  # where the current struct's fields go (None: walked past)
    field = 0
    outer: list[tuple[dict[int, object] | None, int]] = []  # the enclosing structs
    while True:
        byte = data[at]
        at += 1
        if byte == 0:  # STOP
            if not outer:
                return header, at
            fields, field = outer.pop()
            continue
        kind, delta = byte & 0x0F, byte >> 4
        if delta:
            field += delta
        else:
            raw, at = _varint(data, at)
            field = (raw >> 1) ^ -(raw & 1)
        if kind == 5 or kind == 6 or kind == 4:  # i32, i64, i16: a zigzag varint
            raw = data[at]
            at += 1
            if raw >= 0x80:  # (page sizes and value counts: 2-3 bytes, read here, not by a call)
                raw &= 0x7F
                shift = 7
                while True:
                    byte = data[at]
                    at += 1
                    raw |= (byte & 0x7F) << shift
                    if byte < 0x80:
                        break
                    shift += 7
            if fields is not None:
                fields[field] = (raw >> 1) ^ -(raw & 1)
        elif kind == 8:  # binary: its length, then its bytes
            size = data[at]
            at += 1
            if size >= 0x80:
                size, at = _varint(data, at - 1)
            at += size
        elif kind == 12:  # a struct: its fields follow
            outer.append((fields, field))
            nested: dict[int, object] | None = None
            if fields is header and field in (5, 8):
                nested = header[field] = {}
            fields, field = nested, 0
        elif kind == 1 or kind == 2:  # a bool, held in the type
            if fields is not None:
                fields[field] = kind == 1
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
    if kind == 12:  # a struct: fields until STOP
        while True:
            byte = data[at]
            at += 1
            if byte == 0:
                return at
            if not byte >> 4:  # a field id of its own
                at = _varint(data, at)[1]
            at = _skip(data, at, byte & 0x0F)
    raise _Unsupported(f"Thrift type {kind}")
