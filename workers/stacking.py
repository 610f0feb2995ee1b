"""A batch's feature columns stacked into one float32 matrix, and its invalid rows found in the same pass.

A row is invalid when one of its features is null, NaN or infinite (`invalid_rows`).
Checking a whole stacked batch reads it from memory a second time; `stack_checked`
adds each column into a running row sum right after copying it, while it is still
in cache, and only a non-finite sum leads to the exact per-value check. Columns that
cannot hold an invalid value are left out of the sum (`can_hold_invalid`: integer
and boolean columns without nulls).

Example:
    >>> batch = pa.record_batch({"a": pa.array([1.0, float("nan")], pa.float32()), "b": pa.array([1, 2])})
    >>> matrix, bad = stack_checked(batch, ["a", "b"], False, 2)
    >>> matrix.tolist(), bad.tolist()
    ([[1.0, 1.0], [nan, 2.0]], [False, True])
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa


def feature_matrix(
    batch: pa.RecordBatch, features: Sequence[str], list_column: bool, width: int, out: np.ndarray | None = None
) -> np.ndarray:
    """The batch's features as a (rows, width) float32 array; nulls become NaN.

    Columns are stacked into one (width, rows) buffer (`out` when given, reused
    across batches) with a single copy each; the result is its transpose, a
    column-major view that matmul consumes as is.
    """
    rows = batch.num_rows
    if list_column:
        column = batch.column(features[0])
        values = column.values.slice(column.offset * width, rows * width)
        matrix = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(rows, width)
        if column.null_count:
            matrix = matrix.copy()
            matrix[column.is_null().to_numpy(zero_copy_only=False)] = np.nan
        return matrix
    buffer = np.empty((width, rows), dtype=np.float32) if out is None else out  # (features, rows), row-major
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: an invalid row, not a warning
        for i, name in enumerate(features):
            buffer[i] = batch.column(name).to_numpy(zero_copy_only=False)
    return buffer.T


def can_hold_invalid(column: pa.Array) -> bool:
    """Whether a decoded feature column may hold a value the check rejects once converted to float32.

    Floating-point columns may hold NaN or inf (and a float64 may overflow float32);
    a null becomes NaN; other types (decimals, ...) may overflow. An integer or boolean
    column without nulls cannot: every value converts to a finite float32 (2^64 is far
    below float32's 3.4e38). Its nulls are counted from the decoded validity bitmap, exact
    for this batch, never from the file's Parquet statistics, which may be absent or wrong.
    """
    kind = column.type
    return column.null_count > 0 or not (pa.types.is_integer(kind) or pa.types.is_boolean(kind))


def stack_checked(batch: pa.RecordBatch, features: Sequence[str], list_column: bool, width: int,
                  out: np.ndarray | None = None, *, check: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """`feature_matrix` and, with `check`, its `invalid_rows`, in one pass over the columns.

    Each column that `can_hold_invalid` is added into a running per-row sum right
    after it is copied (still in cache); a row's sum is finite unless one of its values
    is not (or the sum overflows), so only a non-finite sum leads to the exact check of
    every value. Returns the (rows, width) matrix and the bad-row mask (None: all valid,
    or `check` is off).
    """
    if list_column or not check:
        matrix = feature_matrix(batch, features, list_column, width, out)
        return matrix, invalid_rows(matrix) if check else None
    buffer = np.empty((width, batch.num_rows), dtype=np.float32) if out is None else out  # (features, rows)
    sums: np.ndarray | None = None
    with np.errstate(invalid="ignore", over="ignore"):  # inf + -inf, a float64 beyond float32: what it looks for
        for i, name in enumerate(features):
            column = batch.column(name)
            row = buffer[i]
            row[...] = column.to_numpy(zero_copy_only=False)
            if can_hold_invalid(column):
                if sums is None:
                    sums = row.copy()
                else:
                    sums += row
    matrix = buffer.T
    return matrix, None if sums is None else bad_rows(matrix, sums)


def invalid_rows(matrix: np.ndarray) -> np.ndarray | None:
    """Boolean mask of rows holding a NaN, inf or null feature; None when all are finite."""
    # One cheap pass first: a row's sum is finite unless a value is non-finite (or it overflows).
    with np.errstate(invalid="ignore", over="ignore"):
        sums = matrix.T.sum(axis=0) if not matrix.flags.c_contiguous else matrix.sum(axis=1)
    return bad_rows(matrix, sums)


def bad_rows(matrix: np.ndarray, sums: np.ndarray) -> np.ndarray | None:
    """The rows of a (rows, width) matrix holding a non-finite value, from its per-row `sums`: None when
    every sum is finite, else each row checked value by value (a finite row's sum may have overflowed)."""
    if np.isfinite(sums).all():
        return None
    bad = ~np.isfinite(matrix).all(axis=1)
    return bad if bad.any() else None


def describe_invalid(matrix: np.ndarray, bad: np.ndarray, features: Sequence[str], list_column: bool) -> list[str]:
    """A reason per bad row, naming the first offending feature."""
    offending = np.argmax(~np.isfinite(matrix[bad]), axis=1)
    if list_column:
        return [f"null, NaN or inf in feature {features[0]!r}[{i}]" for i in offending]
    return [f"null, NaN or inf in feature {features[i]!r}" for i in offending]


class Spares:
    """Stacking buffers kept from one shard to the next (a replica's): a shard's `decode` takes its
    buffers here before it allocates any, and gives back what it holds when it closes.

    A fresh (64, 65536) float32 buffer is 16 MiB that the kernel faults in and zeroes (2 MiB huge
    pages) the first time it is written; a replica's shards each made theirs anew. At most `limit`
    buffers are kept (what one shard's decoding threads use at most), so memory stays bounded by
    one shard's.
    """

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._free: dict[tuple[int, int], list[np.ndarray]] = {}

    def take(self, shape: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            free = self._free.get(shape)
            return free.pop() if free else None

    def keep(self, buffers: Iterable[np.ndarray]) -> None:
        with self._lock:
            for buffer in buffers:
                shape = (int(buffer.shape[0]), int(buffer.shape[1]))
                if sum(len(b) for b in self._free.values()) >= self.limit:
                    return
                if self._free and shape not in self._free:  # another batch shape: the old ones go
                    self._free.clear()
                self._free.setdefault(shape, []).append(buffer)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
