"""Reading one shard: row groups -> record batches -> a float32 feature matrix.

Decoding runs one batch ahead in a background thread (pyarrow releases the
GIL while it decodes), so the next batch is ready when the forward pass of the
current one finishes. Transient storage errors are retried (re-opening the file
and resuming where it failed) and end in `StorageError`; only a file that is
not readable Parquet raises `ShardDataError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow._parquet import ParquetReader

from basis.errors import ShardDataError, StorageError
from basis.masks import keep_mask
from basis.retry import RETRY_ATTEMPTS, RETRY_BASE_DELAY, backoff, is_transient, retry_transient
from basis.storage import Location
from workers.plain_pages import Plan, prefetch, stack_row_group
from workers.stacking import Spares, describe_invalid, feature_matrix, invalid_rows

__all__ = ["Batch", "ParquetSource", "Spares", "describe_invalid", "feature_matrix", "invalid_rows", "iter_batches",
           "open_parquet"]  # a shard's decoding threads: `workers.decode`

logger = logging.getLogger(__name__)

# Decoded row groups a shard's decoding threads may hold at once. Each thread holds up to two
# (the one it decodes and the one whose batches wait in its queue), so a thread reads a row
# group whole when it decodes to at most DECODE_BUDGET_BYTES / (2 x threads), else streams it.
DECODE_BUDGET_BYTES = 512 << 20
# A local file this small is read whole and parsed from memory (`ParquetSource`): a file of 100 rows costs one
# read, not a footer and ~11 more reads.
SMALL_FILE_BYTES = 2 << 20

@dataclass
class Batch:
    """One decoded record batch and where it sits in its file."""

    data: pa.RecordBatch
    row_group: int
    first_row: int  # index in the file of the batch's first row (before deleted rows were dropped)
    # (features, rows) float32: the features decoded straight from their pages (`workers.plain_pages`),
    # then not in `data`; with the check, `sums` holds each row's sum of them
    stacked: np.ndarray | None = None
    sums: np.ndarray | None = None


class _once:  # noqa: N801 - used like a decorator
    """An attribute computed on first use and then kept in the instance (`functools.cached_property` without its
    lock, taken at each first use in Python 3.11: a `ParquetSource` is used from one thread at a time)."""

    def __init__(self, compute: Callable[[Any], Any]) -> None:
        self.compute, self.name = compute, compute.__name__
        self.__doc__ = compute.__doc__

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.compute(instance)
        return value


class ParquetSource(pq.ParquetFile):
    """A Parquet file opened from a `Location` that can open itself again after a transient error.

    A local file of at most `SMALL_FILE_BYTES` is read whole with one read and parsed from memory: its
    footer and column chunks would each cost a read of their own. (On an object store `pre_buffer`
    already fetches a row group's chunks in one request.)
    """

    def __init__(self, location: Location, path: str, uri: str, *, metadata: pq.FileMetaData | None = None) -> None:
        # `pq.ParquetFile.__init__`'s work without what it does for every file that a shard never uses (its
        # path resolution, a map of every nested column path): ~15 us of a tiny file's ~1 ms (the map is made
        # by the first read that names columns, `_nested_paths_by_prefix`)
        self.location, self.path, self.uri = location, path, uri
        self.handle = location.fs.open_input_file(path)
        try:
            if location.is_local and self.handle.size() <= SMALL_FILE_BYTES:
                data = self.handle.read_buffer()
                self.handle.close()
                self.handle = pa.BufferReader(data)
            self._close_source = False  # as `ParquetFile` for a handle it was given: closed by its owner
            self.common_metadata = None
            self.reader = ParquetReader()
            # pre_buffer coalesces a row group's column chunks into few large reads on object stores
            self.reader.open(self.handle, metadata=metadata, arrow_extensions_enabled=True,
                             pre_buffer=not location.is_local and not isinstance(self.handle, pa.BufferReader))
        except BaseException:
            self.handle.close()
            raise

    @_once
    def _nested_paths_by_prefix(self) -> dict[str, list[int]]:
        return self._build_nested_paths()

    # The leaf columns of the last columns asked for, and the Arrow schema of the file they were found in.
    _last_indices: tuple[pa.Schema, tuple[str, ...], list[int]] | None = None

    def _get_column_indices(self, column_names: Any, use_pandas_metadata: bool = False) -> Any:
        """`pq.ParquetFile`'s, kept for the next file of an equal Arrow schema (many tiny files, one schema:
        the leaf columns under each top-level field follow from its Arrow type, so they are the same)."""
        if column_names is None or use_pandas_metadata:
            return super()._get_column_indices(column_names, use_pandas_metadata)
        names, last, schema = tuple(column_names), ParquetSource._last_indices, self.schema_arrow
        if last is not None and last[1] == names and last[0].equals(schema):
            return list(last[2])
        indices = super()._get_column_indices(column_names)
        ParquetSource._last_indices = (schema, names, list(indices))
        return indices

    @_once
    def schema_arrow(self) -> pa.Schema:
        """The file's Arrow schema, converted once (`pq.ParquetFile` converts the footer's schema again, ~10 us,
        at each use: a shard's plan, its columns and its output schema each look)."""
        return self.reader.schema_arrow

    def reopen(self, *, attempts: int = RETRY_ATTEMPTS, base_delay: float = RETRY_BASE_DELAY) -> ParquetSource:
        """A fresh handle on the same file (its footer is reused, not read again).

        The old handle is not closed here: reads of the failed attempt may still be in
        flight on it (pre-buffering), and closing it under them made the next attempt
        fail with "Operation on closed stream". It closes when it is collected.
        """
        return retry_transient(lambda: type(self)(self.location, self.path, self.uri, metadata=self.metadata),
                               what=f"reopening {self.uri}", attempts=attempts, base_delay=base_delay)


def open_parquet(location: Location, path: str, uri: str, *, attempts: int = RETRY_ATTEMPTS,
                 base_delay: float = RETRY_BASE_DELAY) -> ParquetSource:
    """Open a shard's file and read its footer.

    Raises `StorageError` when transient storage errors outlast the retries, and
    `ShardDataError` when the file is missing or is not readable Parquet.
    """
    try:
        return retry_transient(lambda: ParquetSource(location, path, uri), what=f"opening {uri}",
                               attempts=attempts, base_delay=base_delay)
    except StorageError:
        raise
    except Exception as exc:
        raise ShardDataError(f"cannot open {uri} as Parquet: {exc}") from exc


def iter_batches(
    parquet: pq.ParquetFile,
    row_groups: tuple[int, int],
    columns: Sequence[str],
    batch_size: int,
    uri: str,
    *,
    use_threads: bool = False,
    whole_bytes: int | None = None,
    leaves: Sequence[int] | None = None,
    types: Sequence[tuple[pa.DataType, int] | None] | None = None,
    attempts: int = RETRY_ATTEMPTS,
    base_delay: float = RETRY_BASE_DELAY,
    deleted: np.ndarray | None = None,
    plain: Plan | None = None,
) -> Iterator[Batch]:
    """Record batches of at most `batch_size` rows, row group by row group, in order.

    `plain` (`workers.plain_pages`): a row group read whole has those feature columns
    decoded straight into a matrix when its pages allow, given as each batch's `stacked` columns
    instead of in its `data`, the deleted rows left out of both; any other row group has them in `data`.

    `deleted`: the file's deleted row positions (sorted, `basis.masks`): those rows are
    dropped from the batches (a table's deletion vector or position deletes), so only
    live rows come out; a batch whose rows are all deleted is not yielded.

    A row group whose wanted columns (their leaf indices: `leaves`, found from the footer
    when not given) decode to at most `whole_bytes` (default: half of
    `DECODE_BUDGET_BYTES`; sized from their Arrow `types`, see `_leaf_bytes`) is read
    in one call and sliced (zero-copy) into batches: ~15% less decoding time than
    streaming it (0.28 against 0.33 s per million rows of 64 float columns on one
    core); a larger one is streamed batch by batch, so memory stays bounded.

    A transient storage error re-opens the file (a `ParquetSource`) and resumes at the
    row group that failed, skipping the rows already yielded, so no row comes twice.
    `attempts` failures in a row without a decoded batch raise `StorageError`; any
    other error is the file's fault and raises `ShardDataError`.
    """
    meta = parquet.metadata
    first_row = sum(meta.row_group(i).num_rows for i in range(row_groups[0]))
    leaves = _leaves(meta, columns) if leaves is None else leaves
    types = _leaf_types(parquet) if types is None else types
    whole_bytes = DECODE_BUDGET_BYTES // 2 if whole_bytes is None else whole_bytes
    rest = [] if plain is None else [name for name in columns if name not in plain.names]  # left to pyarrow
    if not (rest and isinstance(parquet, ParquetSource)):
        plain = None  # (without a column of its own, pyarrow would not say how many rows a row group has)
    remote = isinstance(parquet, ParquetSource) and not parquet.location.is_local
    for rg in range(*row_groups):
        whole = _decoded_bytes(meta.row_group(rg), leaves, types) <= whole_bytes
        yielded = 0  # rows of this row group already handed out
        failures = 0  # transient failures since the last decoded batch
        skip = 0  # rows to drop from the front after re-opening
        batches: Iterator[pa.RecordBatch] | None = None
        stacked: tuple[np.ndarray, np.ndarray | None] | None = None
        at = 0  # where `batches`' next batch starts in the row group
        while True:
            try:
                if batches is None:
                    at = 0
                    if whole:
                        table, stacked = None, None
                        fetching = (prefetch(parquet.handle, meta.row_group(rg), plain)
                                    if plain is not None and remote else None)
                        if fetching is not None:  # its feature chunks fetched while the rest is read
                            table = parquet.read_row_group(rg, columns=rest, use_threads=use_threads)
                            window = fetching.result()
                            if window is not None:
                                stacked = stack_row_group(parquet.handle, meta.row_group(rg), plain, window=window)
                        elif plain is not None and not remote:
                            stacked = stack_row_group(parquet.handle, meta.row_group(rg), plain)
                        if stacked is None:
                            table = parquet.read_row_group(rg, columns=list(columns), use_threads=use_threads)
                        elif table is None:
                            table = parquet.read_row_group(rg, columns=rest, use_threads=use_threads)
                        batches = iter(table.to_batches(max_chunksize=batch_size))
                    else:
                        batches = iter(parquet.iter_batches(batch_size=batch_size, row_groups=[rg],
                                                            columns=list(columns), use_threads=use_threads))
                    skip = yielded
                data = next(batches, None)
            except Exception as exc:  # ArrowInvalid, OSError, ... from a corrupt or truncated file, or the store
                if not is_transient(exc):
                    raise ShardDataError(f"cannot decode {uri}, row group {rg}: {exc}") from exc
                failures += 1
                if failures >= attempts:
                    raise StorageError(f"reading {uri}, row group {rg}: still failing after {attempts} "
                                       f"attempt(s): {exc}") from exc
                delay = backoff(failures, base_delay)
                logger.warning("reading %s, row group %d failed (%s); resuming in %.2f s (attempt %d of %d)",
                               uri, rg, exc, delay, failures + 1, attempts)
                time.sleep(delay)
                if isinstance(parquet, ParquetSource):
                    parquet = parquet.reopen(attempts=attempts, base_delay=base_delay)
                batches = None
                continue
            if data is None:
                break
            failures = 0
            begin, at = at, at + data.num_rows
            if data.num_rows == 0:
                continue
            if skip:  # re-decoded after a failure: drop what was yielded before it
                dropped = min(skip, data.num_rows)
                skip -= dropped
                data = data.slice(dropped)
                begin += dropped
                if data.num_rows == 0:
                    continue
            count = data.num_rows
            keep = None if deleted is None else keep_mask(deleted, first_row, count)
            if keep is None or keep.any():
                matrix = sums = None
                if stacked is not None:
                    matrix, sums = stacked[0][:, begin:at], None if stacked[1] is None else stacked[1][begin:at]
                if keep is not None:  # the live rows (a stacked matrix's columns copied: `decode` reads a view)
                    data = data.filter(pa.array(keep))
                    matrix = None if matrix is None else matrix[:, keep]
                    sums = None if sums is None else sums[keep]
                yield Batch(data, rg, first_row, matrix, sums)
            yielded += count
            first_row += count


def _leaves(meta: pq.FileMetaData, columns: Iterable[str]) -> list[int]:
    """The leaf column indices of `columns` (nested leaves included)."""
    names = set(columns)
    paths = [meta.schema.column(i).path for i in range(meta.num_columns)]
    # a leaf of column "a" is "a" or "a.<...>"; a name with dots in it may count a neighbour too (the safe side)
    return [i for i, path in enumerate(paths) if any(path == n or path.startswith(n + ".") for n in names)]


def _leaf_types(parquet: pq.ParquetFile) -> list[tuple[pa.DataType, int] | None]:
    """Per leaf column, in leaf order: the Arrow type it decodes to and the offset bytes per value
    of the lists around it (None for every leaf where the Arrow and Parquet schemas do not line up)."""
    leaves: list[tuple[pa.DataType, int]] = []

    def walk(kind: pa.DataType, offsets: int) -> None:
        if isinstance(kind, pa.ExtensionType):
            walk(kind.storage_type, offsets)
        elif pa.types.is_struct(kind):
            for i in range(kind.num_fields):
                walk(kind.field(i).type, offsets)
        elif pa.types.is_map(kind):
            walk(kind.key_type, offsets + 4)
            walk(kind.item_type, offsets + 4)
        elif pa.types.is_fixed_size_list(kind):
            walk(kind.value_type, offsets)
        elif pa.types.is_list(kind):
            walk(kind.value_type, offsets + 4)
        elif pa.types.is_large_list(kind) or pa.types.is_list_view(kind):
            walk(kind.value_type, offsets + 8)
        elif pa.types.is_large_list_view(kind):
            walk(kind.value_type, offsets + 16)
        else:
            leaves.append((kind, offsets))

    meta = parquet.metadata
    try:
        for field in parquet.schema_arrow:
            walk(field.type, 0)
    except Exception:  # an Arrow schema pyarrow cannot build: sized from the Parquet types alone
        leaves = []
    return list(leaves) if len(leaves) == meta.num_columns else [None] * meta.num_columns


# Bytes per value of the Parquet physical types, for leaves without an Arrow type.
_PHYSICAL_BYTES = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4, "DOUBLE": 8}
# Encodings of variable-width values whose encoded size is no measure of the decoded one: a dictionary
# (each distinct value stored once) or shared prefixes. PLAIN and DELTA_LENGTH_BYTE_ARRAY hold every byte.
_CONDENSED = {"PLAIN_DICTIONARY", "RLE_DICTIONARY", "DELTA_BYTE_ARRAY"}


def _leaf_bytes(column: pq.ColumnChunkMetaData, leaf: tuple[pa.DataType, int] | None) -> float:
    """What one leaf column chunk takes once decoded to Arrow; `inf` when there is no way to tell.

    Parquet's "uncompressed" size is the *encoded* size: a dictionary-encoded column of a
    few distinct 500-byte strings reported 306 KB for a million rows that decode to 505 MB.
    Fixed-width values take their Arrow width; variable-width ones their offsets plus
    their bytes, which the encoded size holds only for PLAIN-like encodings (values in
    lists add the lists' offsets). A condensed one is sized from its statistics (the
    longer of min and max, times the values: a guess, not a bound, but of the right
    order for the columns seen); without statistics it is `inf` (the row group is then
    streamed).
    """
    kind, lists = leaf if leaf is not None else (None, 8)
    values = column.num_values
    encoded = column.total_uncompressed_size
    extra = values // 8 + 1 + values * lists  # validity bitmap, offsets of the lists around it
    if kind is not None and pa.types.is_dictionary(kind):  # read back as a dictionary: indices + the dictionary
        return encoded + values * kind.index_type.bit_width // 8 + extra
    if kind is not None and (pa.types.is_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_string(kind)
                             or pa.types.is_large_binary(kind) or pa.types.is_string_view(kind)
                             or pa.types.is_binary_view(kind)):
        offsets = 16 if (pa.types.is_string_view(kind) or pa.types.is_binary_view(kind)) else \
            8 if (pa.types.is_large_string(kind) or pa.types.is_large_binary(kind)) else 4
    elif kind is None and column.physical_type == "BYTE_ARRAY":
        offsets = 8
    else:  # fixed width
        width = 0.0
        if kind is not None:
            try:
                width = kind.bit_width / 8
            except ValueError:  # bool (bits) or a type without a fixed width
                width = 1.0 if pa.types.is_boolean(kind) else 0.0
        if not width:
            width = _PHYSICAL_BYTES.get(column.physical_type, 0) or 16  # FIXED_LEN_BYTE_ARRAY: decimals at most 32
        return max(encoded, values * width) + extra
    if not _CONDENSED.intersection(column.encodings):
        return max(encoded, values * offsets + encoded) + extra  # each value's bytes (and a 4-byte length) encoded
    stats = column.statistics if column.is_stats_set else None
    if stats is None or not stats.has_min_max or not isinstance(stats.min, (str, bytes)):
        return float("inf")
    longest = max(len(stats.min.encode() if isinstance(stats.min, str) else stats.min),
                  len(stats.max.encode() if isinstance(stats.max, str) else stats.max))
    return max(encoded, values * (offsets + longest)) + extra


def _decoded_bytes(group: pq.RowGroupMetaData, leaves: Sequence[int],
                   types: Sequence[tuple[pa.DataType, int] | None] | None = None) -> float:
    """What the row group's `leaves` take once decoded to Arrow (`_leaf_bytes`; `inf`: unknown)."""
    return sum(_leaf_bytes(group.column(i), types[i] if types is not None else None) for i in leaves)
