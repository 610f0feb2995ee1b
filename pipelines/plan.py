"""Planning: input files -> shards, from Parquet footers only. Never touches Ray.

A shard is a run of whole row groups of one file, about `shard_rows` rows.
Its id and output name derive from the input path and its row groups, never
from scheduling, so a retried or resumed shard writes the same file.

    >>> split_row_groups([400, 400, 400, 100], shard_rows=800)
    [(0, 2), (2, 4)]
    >>> output_name("date=2024-01-01/part-0.parquet", 2)
    'date=2024-01-01/part-0-00002.parquet'
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.config import JobConfig
from pipelines.errors import ConfigError, InputError
from pipelines.storage import Location, list_files, relative_to

DEFAULT_SHARD_ROWS = 1_000_000
_FOOTER_THREADS = 16
_PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")


@dataclass(frozen=True)
class InputFile:
    """One input file as its footer describes it (or why it could not be read)."""

    path: str  # filesystem path
    rel: str  # path relative to the input base; mirrored under the output
    uri: str  # as shown to users
    fingerprint: str  # changes when the file is rewritten
    row_group_rows: tuple[int, ...] = ()
    schema: pa.Schema | None = None
    error: str | None = None


@dataclass(frozen=True)
class Columns:
    """Which columns are read, predicted from and written."""

    features: tuple[str, ...]
    passthrough: tuple[str, ...]
    list_column: bool  # features is one fixed_size_list column
    width: int  # number of model inputs
    prediction: str
    keep_features: bool

    @property
    def read(self) -> list[str]:
        return list(dict.fromkeys(self.passthrough + self.features))

    @property
    def written(self) -> list[str]:
        kept = self.features if self.keep_features else ()
        return [*self.passthrough, *kept, self.prediction]


@dataclass(frozen=True)
class Shard:
    """Whole row groups [first, stop) of one input file."""

    id: str
    input: str  # as shown to users
    path: str  # filesystem path of the input file
    rel: str
    fingerprint: str
    row_groups: tuple[int, int]
    rows_in: int
    output: str  # relative to the output root
    error: str | None = None  # known at planning: the file can't be read or doesn't fit

    def to_task(self) -> dict[str, object]:
        """The small record a replica needs (no Arrow, no tensors)."""
        return {"id": self.id, "input": self.input, "path": self.path, "row_groups": self.row_groups,
                "rows_in": self.rows_in, "output": self.output}


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
    """The output path of a shard, mirroring the input's relative path."""
    stem = rel
    for suffix in _PARQUET_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return f"{stem}-{first_row_group:05d}.parquet"


def make_shards(
    files: Sequence[InputFile],
    shard_rows: int,
    reuse: Mapping[tuple[str, str], Sequence[tuple[int, int]]] | None = None,
) -> list[Shard]:
    """Shards for every file, in input order.

    `reuse` maps (rel, fingerprint) to the row-group spans an earlier run
    committed for an unchanged file, so changing `shard_rows` never splits a
    file twice in different ways.
    """
    shards = []
    for f in files:
        spans = (reuse or {}).get((f.rel, f.fingerprint)) or split_row_groups(f.row_group_rows, shard_rows)
        for first, stop in spans:
            shards.append(
                Shard(
                    id=f"{f.rel}:{first}-{stop}",
                    input=f.uri,
                    path=f.path,
                    rel=f.rel,
                    fingerprint=f.fingerprint,
                    row_groups=(first, stop),
                    rows_in=sum(f.row_group_rows[first:stop]),
                    output=output_name(f.rel, first),
                    error=f.error,
                )
            )
    return shards


def scan_inputs(location: Location) -> tuple[str, list[InputFile]]:
    """List the input files and read their footers (in parallel: footers are small reads)."""
    base, infos = list_files(location)
    if not infos:
        raise InputError(f"no input files found at {location.uri!r}")

    def footer(info: pafs.FileInfo) -> InputFile:
        rel = relative_to(base, info.path)
        uri = location.display(info.path)
        fingerprint = f"size={info.size};mtime_ns={info.mtime_ns}"
        try:
            with location.fs.open_input_file(info.path) as handle:
                meta = pq.ParquetFile(handle).metadata
                schema = meta.schema.to_arrow_schema()
                rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
            return InputFile(info.path, rel, uri, fingerprint, error=f"cannot read Parquet footer of {uri}: {exc}")
        return InputFile(info.path, rel, uri, fingerprint, rows, schema)

    with ThreadPoolExecutor(max_workers=min(_FOOTER_THREADS, len(infos))) as pool:
        return base, list(pool.map(footer, infos))


def resolve_columns(schema: pa.Schema, cfg: JobConfig, width: int, source: str) -> Columns:
    """Resolve `features` and `passthrough` against one file's schema and the model's width."""
    names = schema.names
    passthrough_given = set(cfg.passthrough or ())
    if cfg.features is None:
        features = [f.name for f in schema if pa.types.is_floating(f.type) and f.name not in passthrough_given]
        lists = [f.name for f in schema if _is_float_list(f.type) and f.name not in passthrough_given]
        if not features and len(lists) == 1:
            features = lists
        if not features:
            raise InputError(
                f"no floating-point feature columns in {source} (columns: {', '.join(names)}); "
                f"name them with 'features'"
            )
    else:
        features = []
        for entry in cfg.features:
            if any(ch in entry for ch in "*?["):
                matched = [n for n in names if fnmatch.fnmatchcase(n, entry) and n not in passthrough_given]
                if not matched:
                    raise InputError(f"feature pattern {entry!r} matches no column in {source} (columns: {', '.join(names)})")
                features.extend(n for n in matched if n not in features)
            elif entry not in names:
                raise InputError(f"feature column {entry!r} not found in {source} (columns: {', '.join(names)})")
            else:
                features.append(entry)
    list_column = len(features) == 1 and _is_float_list(schema.field(features[0]).type)
    found = schema.field(features[0]).type.list_size if list_column else len(features)
    if found != width:
        what = f"list column {features[0]!r} of size {found}" if list_column else f"{found} feature columns ({_short(features)})"
        raise InputError(f"the model expects {width} input features, but {source} gives {what}")
    passthrough = list(cfg.passthrough) if cfg.passthrough is not None else [n for n in names if n not in features]
    missing = [n for n in passthrough if n not in names]
    if missing:
        raise InputError(f"passthrough column(s) {missing} not found in {source} (columns: {', '.join(names)})")
    written = passthrough + (features if cfg.keep_features else [])
    if cfg.prediction_column in written:
        raise ConfigError(
            f"prediction_column {cfg.prediction_column!r} would overwrite an input column of the same name; "
            f"choose another name or leave that column out of passthrough"
        )
    return Columns(tuple(features), tuple(passthrough), list_column, width, cfg.prediction_column, cfg.keep_features)


def check_file(f: InputFile, columns: Columns) -> str | None:
    """Why this file can't be processed with these columns, or None when it fits."""
    if f.error is not None or f.schema is None:
        return f.error or f"{f.uri}: no schema"
    names = set(f.schema.names)
    missing = [n for n in columns.read if n not in names]
    if missing:
        return f"{f.uri}: missing column(s) {missing} (expected features {_short(columns.features)})"
    for name in columns.features:
        kind = f.schema.field(name).type
        if columns.list_column:
            ok = _is_float_list(kind) and kind.list_size == columns.width
        else:
            ok = pa.types.is_floating(kind) or pa.types.is_integer(kind)
        if not ok:
            return f"{f.uri}: feature column {name!r} has type {kind}, expected a number type"
    return None


def _is_float_list(kind: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(kind) and (
        pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)
    )


def _short(names: Sequence[str]) -> str:
    return ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:3])}, ..., {', '.join(names[-2:])}"

