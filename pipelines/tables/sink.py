"""Where the predictions go: a Parquet directory, a Delta Lake table or an Iceberg table.

Each format is one small class with the same methods (`Sink`), chosen once from
the config by `open_sink`; the driver and `verify` call it and never ask which
format it holds:

    Sink                          the output, as the committer sees it
    ├── ParquetSink               a directory of Parquet files          (here)
    ├── DeltaSink                 a Delta table at a path or URI        (delta_sink.py)
    └── IcebergSink               `namespace.table` through `catalog`   (iceberg_sink.py)

Replicas write every format's data files the same way (staged, journalled with
their sha256, published under their final name) into `location`; the manifest,
the journal, `_LOCK` and `_SUCCESS` live there too (names starting with `_`,
which table readers, Delta's VACUUM and Iceberg's orphan-file removal skip).
For a table, the driver then makes the table's current files equal the
manifest's committed ones in one table transaction per run (`commit`), carrying
the run's generation (Delta `txn`, Iceberg snapshot summary), so that a commit
whose outcome was unknown is recognised and never applied twice.

A table's readers may still read a file that an older version references, so
a table's data files are never rewritten in place: each run names its new
files with its generation (`data_name`), and files the table no longer
references are left to the table's own maintenance (VACUUM, expire_snapshots /
remove_orphan_files), never deleted by a run.
"""

from __future__ import annotations

import logging
import posixpath
from urllib.parse import unquote
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from basis.errors import ConfigError
from basis.storage import Location, absolute, redact, resolve
from pipelines.config import JobConfig

logger = logging.getLogger(__name__)

RUN_PROPERTY = "batch-infer.generation"  # Iceberg snapshot summary / Delta commitInfo: the run that committed
APP_ID = "batch-infer"  # Delta `txn` application id; its version is the run's generation


@dataclass(frozen=True)
class OutputFile:
    """One data file a run hands to the table."""

    path: str  # relative to `Sink.location`
    rows: int
    size: int


class Sink(ABC):
    """The output of a job: where its data files go and who else must be told about them."""

    format: str  # "parquet", "delta", "iceberg"
    location: Location  # the output root: data files, `_manifest.json`, `_journal/`, `_LOCK`, `_SUCCESS`
    uri: str  # what replicas resolve to write (a URI or absolute local path)
    name: str  # the output as the user named it (messages)
    is_table = False  # whether a table's files (`files()`) are what readers see, rather than the directory
    # Set by `check_schema`: the schema every data file of this job has (a missing table is created with it).
    schema: pa.Schema | None = None

    def data_name(self, name: str, generation: int) -> str:
        """The name a shard of run `generation` writes (relative to `location`)."""
        return name

    def check_schema(self, schema: Callable[[], pa.Schema]) -> None:
        """Refuse (`OutputConflictError`, exit 2) an existing table whose schema differs from the one this
        job writes (`schema()`, called only by a table: it may read a footer)."""

    def present(self, state: Any, listing: Mapping[str, int]) -> Mapping[str, int]:
        """The files under the output (relative path -> size) that its state is reconciled with: for a
        directory every file (the listing itself: `pipelines.commit.Listing`, columns); for a table the
        bookkeeping, the files the table references and the files the state (`pipelines.commit.State`)
        describes. Files no version needs any more, left for the table's maintenance, are neither foreign
        nor ours."""
        return listing

    def files(self) -> dict[str, OutputFile] | None:
        """The table's current data files (path relative to `location`, or absolute when outside it),
        or None where the directory itself is the output."""
        return None

    def commit(self, adds: Sequence[OutputFile], removes: Sequence[str], generation: int) -> bool:
        """Make `adds` part of the table and `removes` no longer part of it, in one transaction that
        carries `generation`; False when a commit of `generation` is already in the table (an earlier
        try whose outcome was unknown landed). Nothing to do for a directory."""
        return False

    def record(self) -> dict[str, Any]:
        """What `verify` needs besides the manifest to find the table (in the manifest's config)."""
        return {"format": self.format}


class ParquetSink(Sink):
    """A directory of Parquet files beside `_manifest.json` and `_SUCCESS`: the output as it always was."""

    format = "parquet"

    def __init__(self, uri: str) -> None:
        self.uri = absolute(uri)
        self.location = resolve(self.uri)
        self.name = self.location.uri


class TableSink(Sink):
    """What the Delta and Iceberg sinks share: generation-unique names, a table's files, one commit per run."""

    is_table = True
    data_prefix = ""  # where data files go under `location` (Iceberg: `data/`)

    def data_name(self, name: str, generation: int) -> str:
        stem, ext = posixpath.splitext(name)
        return f"{self.data_prefix}{stem}-g{generation}{ext or '.parquet'}"

    def check_schema(self, schema: Callable[[], pa.Schema]) -> None:
        self.schema = schema()
        self._check_schema(self.schema)

    def present(self, state: Any, listing: Mapping[str, int]) -> Mapping[str, int]:
        from pipelines.commit import described_files, is_data_file

        table, described = self.files(), described_files(state)
        return {path: size for path, size in listing.items()
                if not is_data_file(path) or path in described or path in table}

    @abstractmethod
    def _check_schema(self, schema: pa.Schema) -> None: ...

    @abstractmethod
    def files(self) -> dict[str, OutputFile]: ...

    @abstractmethod
    def committed(self, generation: int) -> bool:
        """Whether the table holds a commit of run `generation` (re-read from the table)."""

    @abstractmethod
    def _commit(self, adds: Sequence[OutputFile], removes: Sequence[str], generation: int) -> None: ...

    def publish(self, output: Location, committed: Mapping[str, Mapping[str, Any]], retiring: set[str],
                generation: int) -> None:
        """One table transaction: the committed files (the manifest's, path -> entry) the table lacks in,
        the retiring files it holds out; none when the table already is the manifest."""
        table = self.files()
        adds = [OutputFile(path, entry["rows_out"], entry["bytes"] if entry.get("bytes") is not None
                           else output.fs.get_file_info(output.join(path)).size)
                for path, entry in sorted(committed.items()) if path not in table]
        removes = sorted(path for path in table if path in retiring)
        if self.commit(adds, removes, generation):
            logger.info("committed %d file(s) into the %s table %s (%d removed), generation %d", len(adds),
                        self.format, self.name, len(removes), generation)
        elif adds or removes:
            logger.info("the %s table %s already holds generation %d's commit", self.format, self.name, generation)

    def commit(self, adds: Sequence[OutputFile], removes: Sequence[str], generation: int) -> bool:
        if not adds and not removes:
            return False  # a run with nothing new makes no commit
        if self.committed(generation):
            return False
        try:
            self._commit(adds, removes, generation)
        except Exception:
            # The request may have landed before the error (a lost response, a kill of the connection):
            # the table says whether it did; if not, the error stands and the next run commits the files.
            if self.committed(generation):
                return True
            raise
        return True


def open_sink(cfg: JobConfig) -> Sink:
    """The sink `cfg.output_format` names (`auto`: Parquet; a Delta table there is refused, exit 2)."""
    fmt = cfg.output_format
    if fmt == "iceberg":
        from pipelines.tables.iceberg_sink import IcebergSink

        # Partitioned like an Iceberg input (its spec; a Hive-partitioned input's keys are not in the files).
        return IcebergSink(cfg.output, cfg.catalog,
                           partitioned_like=cfg.input if cfg.input_format == "iceberg" else None)
    if fmt == "delta":
        from pipelines.tables.delta_sink import DeltaSink

        # Partitioned like a Hive-partitioned input (a Parquet directory's or a Delta table's `key=value/`
        # directories, which the output's paths mirror); a Delta input's metadata types its partition columns.
        return DeltaSink(cfg.output, hive=cfg.input_format != "iceberg", typed_by=_delta_input(cfg))
    sink = ParquetSink(cfg.output)
    from pipelines.tables import is_delta_table

    if is_delta_table(sink.location):
        raise ConfigError(f"output {sink.location.uri!r} is a Delta table (it holds _delta_log/): set "
                          f"'output_format: delta' to commit predictions into it, or choose a directory for "
                          f"Parquet output")
    return sink


def _delta_input(cfg: JobConfig) -> Location | None:
    """The input's location where it is a Delta table."""
    from pipelines.tables import is_delta_table

    if cfg.input_format == "iceberg":
        return None
    location = resolve(absolute(cfg.input))
    return location if cfg.input_format == "delta" or is_delta_table(location) else None


HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # Hive's (and Delta's) directory name for a null partition value


def hive_values(path: str) -> dict[str, str | None]:
    """The partition values a file's relative path gives in Hive's `key=value/` directories, in order
    (unquoted as Hive and Delta escape them; `__HIVE_DEFAULT_PARTITION__` is null).

    Example:
        >>> hive_values("day=2024-01-01/city=New%20York/part-0.parquet")
        {'day': '2024-01-01', 'city': 'New York'}
    """
    values: dict[str, str | None] = {}
    for segment in path.split("/")[:-1]:
        key, sep, value = segment.partition("=")
        if sep and key:
            values[unquote(key)] = None if value == HIVE_NULL else unquote(value)
    return values


def reopen_sink(config: Mapping[str, Any], output: str, catalog: Mapping[str, str] | None = None) -> Sink:
    """The sink of an existing output from its manifest's `config` (for `verify`); `catalog` replaces a
    recorded catalog whose secrets the manifest does not keep."""
    fmt = config.get("output_format") or "auto"
    if fmt == "iceberg":
        from pipelines.tables.iceberg_sink import IcebergSink

        props = catalog if catalog is not None else config.get("catalog")
        if props is not None and any(v == "REDACTED" for v in props.values()):
            raise ConfigError(f"the manifest at {redact(output)!r} keeps its Iceberg catalog without its secrets: "
                              f"give the catalog's properties (verify --catalog)")
        return IcebergSink(str(config.get("output")), props)
    if fmt == "delta":
        from pipelines.tables.delta_sink import DeltaSink

        return DeltaSink(output)
    return ParquetSink(output)


def output_schema(source: pa.Schema, columns: Sequence[str], predictions: Sequence[tuple[str, int]]) -> pa.Schema:
    """The schema replicas write: `columns` as typed in the input, then one prediction column per
    (name, outputs): float32, or a fixed-size list of float32 for several outputs (`workers.writer`).

    Example:
        >>> output_schema(pa.schema([("id", pa.int64()), ("f", pa.float32())]), ["id"], [("p", 1)]).names
        ['id', 'p']
    """
    from workers.writer import prediction_type

    fields = [source.field(name).remove_metadata() for name in columns]
    return pa.schema(fields + [pa.field(name, prediction_type(k)) for name, k in predictions])


def describe_mismatch(table: pa.Schema, ours: pa.Schema) -> list[str]:
    """Column by column, how a table's schema differs from the one this job writes (names, types)."""
    found = {f.name: f.type for f in table}
    want = {f.name: f.type for f in ours}
    problems = [f"column {name!r} ({want[name]}) is not in the table" for name in want if name not in found]
    problems += [f"the table's column {name!r} ({found[name]}) is not written" for name in found if name not in want]
    problems += [f"column {name!r}: the table has {found[name]}, this job writes {want[name]}"
                 for name in want if name in found and not _same_type(found[name], want[name])]
    return problems


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    """Equal up to string/binary/list width and view variants (a table's reader maps them the same)."""
    return _plain(a) == _plain(b)


def _plain(t: pa.DataType) -> Any:
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) \
            or pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return ("list", _plain(t.value_type))
    if pa.types.is_timestamp(t):
        return ("timestamp", t.tz is not None)  # units differ between engines (Delta: microseconds)
    return str(t)
