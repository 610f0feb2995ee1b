"""Predictions committed into a Delta Lake table (delta-rs): the run's data files as add actions.

The table lives at `output` (a path or URI); the data files are written at its
root, mirroring the input's paths, each run's new files named with its
generation. One commit per run: the files added, the retired ones removed, and
a `txn` action (app id `batch-infer`, version = the run's generation). delta-rs
records the `txn` but does not enforce it (delta-rs#2580), so the sink reads
the table's `txn` version before committing and after an error: the run's
generation there means that commit is already in the table.
A missing table is created by the run's first commit, with the files in it.

Partitions: where the input is Hive-partitioned (a Parquet directory's or a
Delta table's `key=value/` directories, which the output's paths mirror), the
table is partitioned by those keys: each add action's `partitionValues` come
from its file's path, and the partition columns are strings unless the input
is a Delta table, whose metadata types them. The data files do not hold the
partition columns (Delta's convention); readers of the table add them.

On S3 delta-rs opens the table with our URI's endpoint, region and keys
(`stores.delta_storage_options`). Its commits there are safe against other
writers without a lock: delta-rs 1.6 creates each log entry with a conditional
PUT (`If-None-Match: *`, S3's conditional writes; MinIO, R2 and moto support it
too), so two writers can never both create version N, and the loser gets 412
(`AWS_S3_ALLOW_UNSAFE_RENAME` no longer changes this; `aws_conditional_put:
disabled` makes every commit fail, and the DynamoDB locking provider is gone).
Our output lock (`_LOCK`) keeps a second batch-infer run out; the conditional
PUT keeps a compaction or another tool's commit from being overwritten by ours.
Limit: an S3-compatible store that ignores `If-None-Match` (older MinIO, some
appliances) would let a concurrent writer's entry replace ours; there nothing
but batch-infer may commit to the output table.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

import pyarrow as pa

from basis.errors import OutputConflictError
from basis.storage import Location, absolute, read_parquet_footer, redact, resolve
from pipelines.tables import is_delta_table
from pipelines.tables.sink import APP_ID, RUN_PROPERTY, OutputFile, TableSink, describe_mismatch, hive_values
from pipelines.tables.stores import delta_storage_options, delta_table_uri


logger = logging.getLogger(__name__)

_COMMIT_TRIES = 5  # commits tried while other writers' commits take the next version first


class DeltaSink(TableSink):
    """`output_format: delta`: a Delta table at `output`, created by the first commit when missing."""

    format = "delta"

    def __init__(self, output: str, *, hive: bool = True, typed_by: Location | None = None) -> None:
        """`hive`: partition a new table by the `key=value/` directories of its files' paths (not for an
        Iceberg input, whose layout is its own); `typed_by`: the Delta input table that types them."""
        self._hive, self._typed_by = hive, typed_by
        self._dirs: set[str] = set()  # the directories of this run's files (`data_name`)
        self.uri = absolute(output)
        self.location = resolve(self.uri)
        self.name = self.location.uri
        # What delta-rs opens: the path, or the URI without our options, which become its storage options
        # (endpoint, region, keys given in the URI; the rest from the environment, as for pyarrow).
        self._table_uri = delta_table_uri(self.location)
        self._storage_options = delta_storage_options(self.location) or None

    def _open(self) -> object | None:
        """The table as it is now, or None when there is none yet."""
        from deltalake import DeltaTable

        if not is_delta_table(self.location):
            return None
        try:
            return DeltaTable(self._table_uri, storage_options=self._storage_options)
        except Exception as exc:  # TableNotFoundError, DeltaError, OSError ...
            raise OutputConflictError(f"cannot open the Delta table {self.name!r} to write predictions into: "
                                      f"{redact(str(exc))}") from exc

    def data_name(self, name: str, generation: int) -> str:
        self._dirs.add(posixpath.dirname(name) + "/")  # this run's partitions, checked against the table's
        return super().data_name(name, generation)

    def partition_columns(self, paths: Sequence[str]) -> list[str]:
        """The partition columns files at `paths` give a new table: their Hive keys, where all have the same
        ones and none is a column of the data files; else none."""
        keys = {tuple(hive_values(p)) for p in paths} if self._hive else set()
        if len(keys) != 1:
            if len(keys) > 1:
                logger.warning("%s: the input's paths have different partition keys (%s); the Delta table is "
                               "not partitioned", self.name, sorted(keys))
            return []
        columns = list(keys.pop())
        clash = [c for c in columns if self.schema is not None and c in self.schema.names]
        if clash:
            logger.warning("%s: the partition keys %s are also columns of the data files; the Delta table is not "
                           "partitioned", self.name, clash)
            return []
        return columns

    def _partition_types(self, columns: Sequence[str]) -> dict[str, pa.DataType]:
        """Each partition column's type: the Delta input table's, else string."""
        types = {c: pa.string() for c in columns}
        if columns and self._typed_by is not None:
            from deltalake import DeltaTable

            from pipelines.tables.stores import delta_storage_options as options, delta_table_uri as uri

            source = DeltaTable(uri(self._typed_by), storage_options=options(self._typed_by) or None)
            found = pa.schema(source.schema().to_arrow())
            types.update({c: found.field(c).type for c in columns
                          if c in source.metadata().partition_columns and c in found.names})
        return types

    def _table_schema(self, schema: pa.Schema, columns: Sequence[str]) -> pa.Schema:
        types = self._partition_types(columns)
        return pa.schema([*schema, *(pa.field(c, types[c]) for c in columns)])

    def _check_schema(self, schema: pa.Schema) -> None:
        table = self._open()
        if table is None:
            return
        found = pa.schema(table.schema().to_arrow())  # type: ignore[attr-defined]
        partitions = list(table.metadata().partition_columns)  # type: ignore[attr-defined]
        ours = pa.schema([*schema, *(found.field(c) for c in partitions if c in found.names)])
        problems = describe_mismatch(found, ours)
        if self._dirs:
            wanted = self.partition_columns(sorted(self._dirs))
            if wanted != partitions:
                problems.append(_partitioned(partitions, wanted))
        if problems:
            raise OutputConflictError(f"the Delta table {self.name!r} does not fit this job's predictions: "
                                      f"{'; '.join(problems)}; write to a new table, or drop this one")

    def files(self) -> dict[str, OutputFile]:
        table = self._open()
        if table is None:
            return {}
        actions = table.get_add_actions(flatten=True)  # type: ignore[attr-defined]
        columns = {name: actions.column(name).to_pylist() for name in ("path", "size_bytes", "num_records")}
        return {unquote(path): OutputFile(unquote(path), rows if rows is not None else -1, size)
                for path, size, rows in zip(columns["path"], columns["size_bytes"], columns["num_records"])}

    def committed(self, generation: int) -> bool:
        table = self._open()
        if table is None:
            return False
        # Generations only grow, and a run asks only about its own: equality, not Spark's `>=`, so that a
        # table whose txn is ahead of a restarted manifest is never taken to hold a commit it does not.
        return table.transaction_version(APP_ID) == generation  # type: ignore[attr-defined]

    def _commit(self, adds: Sequence[OutputFile], removes: Sequence[str], generation: int) -> None:
        from deltalake.transaction import (
            AddAction,
            CommitProperties,
            RemoveAction,
            Transaction,
            create_table_with_add_actions,
        )

        if self.schema is None:
            raise RuntimeError("DeltaSink.check_schema() comes before commit()")
        check_files(self.location, adds, self.schema, self.name)
        from deltalake.exceptions import CommitFailedError

        table = self._open()
        columns = wanted = self.partition_columns([f.path for f in adds])
        if table is not None:
            columns = list(table.metadata().partition_columns)  # type: ignore[attr-defined]
            if adds and wanted != columns:
                raise OutputConflictError(f"the Delta table {self.name!r}: {_partitioned(columns, wanted)}; "
                                          f"nothing was committed to the table")
        schema = self._table_schema(self.schema, columns) if table is None else None

        def values(path: str) -> dict[str, str | None]:
            return {c: v for c, v in hive_values(path).items() if c in columns}

        now = int(time.time() * 1000)
        added = [AddAction(f.path, f.size, values(f.path), now, True, json.dumps({"numRecords": f.rows}))
                 for f in adds]
        # delta-rs may not retry a commit on its own: when the log entry's name is taken, its retry applies
        # the same actions again under the next version (its conflict check lets two blind appends through),
        # and the name is taken by this very commit when S3 applied the PUT but its answer was lost (the
        # client's retry of the conditional PUT then gets 412). So the sink decides: its generation in the
        # table's txn means the commit landed; otherwise another writer's commit (a compaction) got in
        # first, and the commit is tried again on the table as it now is.
        props = CommitProperties(app_transactions=[Transaction(APP_ID, generation, now)],
                                 custom_metadata={RUN_PROPERTY: generation}, max_commit_retries=0)
        for attempt in range(1, _COMMIT_TRIES + 1):
            table = self._open()
            try:
                if table is None:
                    create_table_with_add_actions(self._table_uri, _delta_schema(schema or self.schema), added,
                                                  mode="error", partition_by=columns or None,
                                                  storage_options=self._storage_options, commit_properties=props)
                    return
                sizes = {path: f.size for path, f in self.files().items()}
                removed = [RemoveAction(path, True, now, sizes.get(path), values(path)) for path in removes]
                found = pa.schema(table.schema().to_arrow())  # type: ignore[attr-defined]
                table.create_write_transaction([*added, *removed], mode="append",  # type: ignore[attr-defined]
                                               schema=_delta_schema(found), partition_by=columns or None,
                                               commit_properties=props)
                return
            except CommitFailedError:
                if self.committed(generation) or attempt == _COMMIT_TRIES:
                    raise  # landed (`commit` re-reads the txn and takes it), or lost the race too often

def _partitioned(table: Sequence[str], ours: Sequence[str]) -> str:
    return (f"the table is partitioned by {list(table) or 'nothing'} but this job's files by {list(ours) or 'nothing'} "
            f"(their paths' key=value directories)")


def _delta_schema(schema: pa.Schema) -> object:
    from deltalake import Schema

    return Schema.from_arrow(schema)


def check_files(location: object, adds: Sequence[OutputFile], schema: pa.Schema, name: str) -> None:
    """Every file about to be committed has the job's schema (by its footer), so a table never
    references a file its readers cannot read as the table's columns."""
    from pipelines.tables.sink import _same_type

    def look(f: OutputFile) -> str | None:
        found = read_parquet_footer(location.fs, location.join(f.path)).schema.to_arrow_schema()  # type: ignore
        want = {field.name: field.type for field in schema}
        have = {field.name: field.type for field in found}
        if set(want) != set(have) or any(not _same_type(have[n], want[n]) for n in want):
            return f"{f.path} has columns {found} but the table's are {schema}"
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        wrong = [w for w in pool.map(look, adds) if w]
    if wrong:
        raise OutputConflictError(f"{name}: {len(wrong)} data file(s) do not have the table's schema (an input "
                                  f"file typed its columns differently), e.g. {wrong[0]}; nothing was committed "
                                  f"to the table")
