"""Categorical columns: integer columns handed to a `.pt2` program as one (rows, k) int64 tensor.

Each batch's `categorical` columns (any integer type, nullable) are stacked
into int64 codes. A code the program cannot embed makes its row invalid,
like a NaN feature (`invalid_rows` decides what happens to it): null,
negative, or at least the size of the embedding table the column indexes
(`ProgramSpec.category_limits`, read from the program; None where no table
was found, then only nulls and negatives are caught). The reason names the
column and the value. On a GPU an out-of-range index would be a device-side
assert that ends the process, so they never reach the program.

Example:
    >>> batch = pa.record_batch({"country": pa.array([1, None, 12], pa.int16())})
    >>> codes, bad, reasons = category_codes(batch, ["country"], [10])
    >>> codes[:, 0].tolist(), bad.tolist(), reasons
    ([1, 0, 0], [False, True, True], ["null in categorical column 'country'", "categorical column 'country' value 12 is outside its embedding table (10 rows: 0 to 9)"])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def category_codes(batch: pa.RecordBatch, columns: Sequence[str], limits: Sequence[int | None]
                   ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(rows, k) int64 codes (0 where invalid), the invalid-row mask (None when all are valid) and a
    reason per invalid row, in row order, naming the first offending column and its value."""
    rows = batch.num_rows
    codes = np.zeros((rows, len(columns)), dtype=np.int64)
    reason: dict[int, str] = {}
    for j, name in enumerate(columns):
        column = batch.column(name)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        nulls = column.is_null().to_numpy(zero_copy_only=False) if column.null_count else None
        values = column.fill_null(0) if column.null_count else column
        if pa.types.is_uint64(column.type):  # above int64's range: as large as it gets
            values = pc.min_element_wise(values, pa.scalar(np.iinfo(np.int64).max, pa.uint64()))
        codes[:, j] = values.to_numpy(zero_copy_only=False)
        limit = limits[j] if j < len(limits) else None
        wrong = codes[:, j] < 0
        if limit is not None:
            wrong |= codes[:, j] >= limit
        if nulls is not None:
            wrong |= nulls
        for row in np.flatnonzero(wrong):
            if row in reason:
                continue
            if nulls is not None and nulls[row]:
                reason[row] = f"null in categorical column {name!r}"
            elif codes[row, j] < 0:
                reason[row] = f"categorical column {name!r} value {codes[row, j]} is negative"
            else:
                reason[row] = (f"categorical column {name!r} value {column[int(row)].as_py()} is outside its "
                               f"embedding table ({limit} rows: 0 to {limit - 1})")
        codes[wrong, j] = 0
    if not reason:
        return codes, None, []
    bad = np.zeros(rows, dtype=bool)
    bad[list(reason)] = True
    return codes, bad, [reason[row] for row in sorted(reason)]


def merge_invalid(rows: int, first: np.ndarray | None, first_reasons: list[str], second: np.ndarray | None,
                  second_reasons: list[str]) -> tuple[np.ndarray | None, list[str]]:
    """One invalid-row mask and reason list from two (features', then categories'); a row's first reason wins.

    Example:
        >>> merge_invalid(3, np.array([1, 0, 0], bool), ["a"], np.array([1, 0, 1], bool), ["b", "c"])
        (array([ True, False,  True]), ['a', 'c'])
    """
    if second is None:
        return first, first_reasons
    if first is None:
        return second, second_reasons
    reason = dict(zip(np.flatnonzero(second).tolist(), second_reasons))
    reason.update(zip(np.flatnonzero(first).tolist(), first_reasons))
    return first | second, [reason[row] for row in sorted(reason)]
