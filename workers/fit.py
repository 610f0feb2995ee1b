"""Whether an input file fits the job, and how its row groups become shards and output names: the rules
the driver's plan (`pipelines.plan`) and a replica that plans a small file itself (`workers.lazy`) share,
so a file planned either way gets the same shards, names and messages.

    >>> split_row_groups([400, 400, 400, 100], shard_rows=800)
    [(0, 2), (2, 4)]
    >>> output_name("date=2024-01-01/part-0.parquet", 2)
    'date=2024-01-01/part-0-00002.parquet'
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pyarrow as pa

from basis.errors import StorageError

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")


def split_row_groups(rows: Sequence[int], shard_rows: int) -> list[tuple[int, int]]:
    """Group consecutive row groups into runs of about `shard_rows` rows.

    A run closes once it holds at least `shard_rows` rows, so a shard is never
    split inside a row group. A file with no row groups has one empty shard.
    """
    if not rows:
        return [(0, 0)]
    spans, first, total = [], 0, 0
    for index, count in enumerate(rows):
        total += count
        if total >= shard_rows:
            spans.append((first, index + 1))
            first, total = index + 1, 0
    if first < len(rows):
        spans.append((first, len(rows)))
    return spans


def output_name(rel: str, first_row_group: int) -> str:
    """The output path of a shard, mirroring the input's relative path.

    A hidden name (`_x.parquet`, given as the input itself) loses its leading `_` and `.`:
    readers skip hidden files, so its predictions would be invisible beside `_SUCCESS`.

    Example:
        >>> output_name("_x.parquet", 0)
        'x-00000.parquet'
    """
    return f"{_visible(stem(rel))}-{first_row_group:05d}.parquet"


def distinct_output_name(rel: str, first_row_group: int) -> str:
    """The name used when `output_name` is taken by another input with the same stem.

    `a.parquet`, `a.parq` and `a` share the stem `a`; the second to claim it gets
    a name that also carries a hash of its full relative path.

    Example:
        >>> distinct_output_name("a.parq", 0)
        'a-00000-4bd32b85.parquet'
    """
    digest = hashlib.sha1(rel.encode()).hexdigest()[:8]
    return f"{_visible(stem(rel))}-{first_row_group:05d}-{digest}.parquet"


def _visible(path: str) -> str:
    """`path` with the leading `_` and `.` of each part dropped (a part of only those becomes `part`)."""
    return "/".join(part.lstrip("_.") or "part" for part in path.split("/"))


def stem(rel: str) -> str:
    """`rel` without its Parquet suffix."""
    for suffix in PARQUET_SUFFIXES:
        if rel.endswith(suffix):
            return rel[: -len(suffix)]
    return rel


def footer_error(uri: str, exc: Exception) -> str:
    """Why a file's footer could not be read (a failed shard's error)."""
    if isinstance(exc, StorageError):  # storage kept failing: not a verdict on the file's bytes
        return f"storage error reading the Parquet footer of {uri} (retried): {exc}"
    return f"cannot read Parquet footer of {uri}: {exc}"


def misfit(schema: pa.Schema, uri: str, read: Sequence[str], features: Sequence[str], list_column: bool, width: int,
           categorical: Sequence[str] = ()) -> str | None:
    """Why a file of this schema can't be processed with these columns (`read`: every column read), or None
    when it fits."""
    names = set(schema.names)
    missing = [n for n in read if n not in names]
    if missing:
        return f"{uri}: missing column(s) {missing} (expected features {short(features)})"
    for name in features:
        kind = schema.field(name).type
        if list_column:
            ok = is_float_list(kind) and kind.list_size == width
        else:
            ok = pa.types.is_floating(kind) or pa.types.is_integer(kind)
        if not ok:
            return f"{uri}: feature column {name!r} has type {kind}, expected a number type"
    for name in categorical:
        kind = schema.field(name).type
        if not pa.types.is_integer(kind):
            return f"{uri}: categorical column {name!r} has type {kind}, expected an integer type"
    return None


def is_float_list(kind: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(kind) and (
        pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)
    )


def short(names: Sequence[str]) -> str:
    return ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:3])}, ..., {', '.join(names[-2:])}"
