"""The deleted rows of one data file: a table's deletion vector or position deletes, as a row mask.

The planner (a table `Source`) finds them, once per file; they travel on the shard task
as compact bytes (`encode`), and the replica's reader drops those rows before the
forward pass (`keep_mask`), so only live rows are scored. Positions are 0-based row
indices in the data file, as both Delta deletion vectors and Iceberg position deletes
count them.

    >>> data = encode([7, 2, 3, 3])
    >>> decode(data).tolist()
    [2, 3, 7]
    >>> deleted_between(decode(data), 0, 4)
    2
    >>> keep_mask(decode(data), 2, 4).tolist()
    [False, False, True, True]
    >>> keep_mask(decode(data), 8, 4) is None
    True
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable

import numpy as np

_MAGIC = b"BIM1"  # sorted positions, delta-encoded as little-endian uint64, zlib-compressed


def encode(positions: Iterable[int] | np.ndarray) -> bytes:
    """Deleted row positions (any order, repeats allowed) as compact bytes."""
    array = np.unique(np.asarray(list(positions) if not isinstance(positions, np.ndarray) else positions,
                                 dtype=np.int64))
    if array.size and array[0] < 0:
        raise ValueError(f"a deleted row position is negative: {int(array[0])}")
    deltas = np.diff(array, prepend=np.int64(0)).astype("<u8")
    return _MAGIC + zlib.compress(deltas.tobytes(), 6)


def decode(data: bytes) -> np.ndarray:
    """The sorted int64 positions `encode` wrote."""
    if not data.startswith(_MAGIC):
        raise ValueError("not a batch-infer row mask")
    deltas = np.frombuffer(zlib.decompress(data[len(_MAGIC):]), dtype="<u8")
    return np.cumsum(deltas, dtype=np.uint64).astype(np.int64)


def digest(data: bytes) -> str:
    """A short identity of a mask, for a data file's fingerprint (it changes when the deletes do)."""
    return hashlib.sha256(data).hexdigest()[:16]


def deleted_between(positions: np.ndarray, start: int, stop: int) -> int:
    """How many deleted rows fall in the file's rows [start, stop)."""
    return int(np.searchsorted(positions, stop, "left") - np.searchsorted(positions, start, "left"))


def keep_mask(positions: np.ndarray, start: int, count: int) -> np.ndarray | None:
    """Which of the file's rows [start, start + count) are live; None when none of them is deleted."""
    first, stop = np.searchsorted(positions, [start, start + count], "left")
    if first == stop:
        return None
    keep = np.ones(count, dtype=bool)
    keep[positions[first:stop] - start] = False
    return keep
