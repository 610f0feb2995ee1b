"""Predictions committed into an Iceberg table (PyIceberg): the run's data files in one snapshot.

`output: namespace.table` through `catalog`. The data files go under the
table's location in `data/` (mirroring the input's paths, each run's new files
named with its generation); the manifest, journal, `_LOCK` and `_SUCCESS` at
the table's location (names starting with `_`, which Iceberg's orphan-file
removal skips). One snapshot per run: an `append` when it only adds files, an
`overwrite` when it also removes retired ones, its summary carrying
`batch-infer.generation`; a run whose generation is already in a snapshot's
summary (an earlier try whose outcome was unknown landed) commits nothing. A
missing table (and its namespace) is created by the run's first commit, in the
same catalog transaction as its first snapshot, at the location it would get
by default (`<namespace location>/<table>` or `<warehouse>/<namespace>.db/<table>`).

Partitions: from an Iceberg input, a new table gets the input's partition
spec (same source columns, transforms and field names) where every source
column is a column of the output (passthrough), else it is unpartitioned (a
log line says why); each file's partition values are inferred from its column
statistics (`parquet_file_to_data_file`), which holds because each output file
mirrors one input file, so holds one partition. Not from a Hive-partitioned
input: Iceberg partitions derive from columns of the data files, and the
`key=value/` directories' columns are not in them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from basis.errors import ConfigError, OutputConflictError
from basis.storage import redact
from pipelines.tables.sink import RUN_PROPERTY, OutputFile, TableSink, describe_mismatch
from pipelines.tables.stores import iceberg_location, iceberg_uri

logger = logging.getLogger(__name__)

PartitionField = tuple[str, Any, str]  # source column, transform, partition field name


class IcebergSink(TableSink):
    """`output_format: iceberg`: `output: namespace.table` through the `catalog` properties."""

    format = "iceberg"
    data_prefix = "data/"

    def __init__(self, name: str, catalog: Mapping[str, str] | None, *, partitioned_like: str | None = None) -> None:
        """`partitioned_like`: the Iceberg input table (in the same catalog) whose spec a new table takes."""
        self._partitioned_like = partitioned_like
        from pyiceberg.catalog import load_catalog
        from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

        self.name = name
        props = dict(catalog or {})
        catalog_name = props.pop("name", "default")
        try:
            self.catalog = load_catalog(catalog_name, **props)
        except Exception as exc:  # ValueError, NotInstalledError, ... for a bad configuration
            raise ConfigError(f"cannot load the Iceberg catalog {catalog_name!r} for output {name!r} "
                              f"(config key 'catalog'): {redact(str(exc))}") from exc
        try:
            self.namespace, self.table_name = self.catalog.identifier_to_database_and_table(name)
        except Exception as exc:
            raise ConfigError(f"output {name!r} is not an Iceberg table identifier: give 'namespace.table'") from exc
        try:
            table = self.catalog.load_table(name)
            # The table's location as its metadata has it (data file paths are under it), and its FileIO's
            # settings: the catalog's, with what the catalog vends for the table.
            self.root, io = table.location().rstrip("/"), table.io.properties
        except (NoSuchTableError, NoSuchNamespaceError):
            self.root, io = self._default_location(), self.catalog.properties
        except Exception as exc:
            raise OutputConflictError(f"cannot load the Iceberg table {name!r} from catalog {catalog_name!r}: "
                                      f"{redact(str(exc)) or type(exc).__name__}") from exc
        # The same store through our storage layer: the FileIO's endpoint, region and keys (`stores`).
        self.uri = iceberg_uri(self.root, io)  # what replicas write to (keys as in an input URI, never shown)
        self.location = iceberg_location(self.root, io)  # the driver's (its `uri` redacted)

    def _default_location(self) -> str:
        """Where the catalog would put a new table (PyIceberg's default), so that the files written before
        the first commit are under the location the table is created with."""
        from pyiceberg.exceptions import NoSuchNamespaceError

        try:
            ns_location = self.catalog.load_namespace_properties(self.namespace).get("location")
        except NoSuchNamespaceError:
            ns_location = None
        if ns_location:
            return f"{ns_location.rstrip('/')}/{self.table_name}"
        warehouse = self.catalog.properties.get("warehouse")
        if not warehouse:
            raise ConfigError(f"the Iceberg table {self.name!r} does not exist and the catalog has no 'warehouse' "
                              f"to create it in: add 'warehouse' to 'catalog', or create the table first")
        return f"{warehouse.rstrip('/')}/{self.namespace}.db/{self.table_name}"

    def _open(self) -> Any:
        from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

        try:
            return self.catalog.load_table(self.name)
        except (NoSuchTableError, NoSuchNamespaceError):
            return None

    def partition_fields(self, schema: pa.Schema) -> list[PartitionField]:
        """The spec a new table gets: the input table's, where all its source columns are output columns."""
        if self._partitioned_like is None:
            return []
        source = self.catalog.load_table(self._partitioned_like)
        fields = _fields(source.spec(), source.schema())
        snapshot = source.current_snapshot()
        if fields and snapshot is not None and any(m.partition_spec_id != source.spec().spec_id
                                                   for m in snapshot.manifests(source.io)):
            # A file written under an earlier spec may hold several of the current spec's partitions, and an
            # output file that mirrors it could not be given one partition value (the manifest list says).
            logger.info("%s: the input %s has files written under an earlier partition spec than its current "
                        "one (%s); the table is created unpartitioned", self.name, self._partitioned_like,
                        _text(fields))
            return []
        missing = sorted({column for column, _, _ in fields if column not in schema.names})
        if missing:
            logger.info("%s: the input %s is partitioned by %s, but the columns %s are not passthrough; the table "
                        "is created unpartitioned", self.name, self._partitioned_like, _text(fields), missing)
            return []
        return fields

    def _check_schema(self, schema: pa.Schema) -> None:
        table = self._open()
        if table is None:
            return
        problems = describe_mismatch(table.schema().as_arrow(), schema)
        found, wanted = _fields(table.spec(), table.schema()), self.partition_fields(schema)
        if [(c, str(t)) for c, t, _ in found] != [(c, str(t)) for c, t, _ in wanted]:
            problems.append(f"the table is partitioned by {_text(found)} but this job's files by {_text(wanted)}")
        if not problems:
            from pyiceberg.io.pyarrow import _check_pyarrow_schema_compatible

            try:  # what PyIceberg itself checks when the files are added
                _check_pyarrow_schema_compatible(table.schema(), schema, format_version=table.format_version)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise OutputConflictError(f"the Iceberg table {self.name!r} does not fit this job's predictions: "
                                      f"{'; '.join(problems)}; write to a new table, or drop this one")

    def files(self) -> dict[str, OutputFile]:
        table = self._open()
        if table is None or table.current_snapshot() is None:
            return {}
        found = {}
        for task in table.scan().plan_files():
            data = task.file
            path = data.file_path
            rel = path[len(self.root) + 1:] if path.startswith(self.root + "/") else path
            found[rel] = OutputFile(rel, int(data.record_count), int(data.file_size_in_bytes))
        return found

    def committed(self, generation: int) -> bool:
        table = self._open()
        if table is None:
            return False
        return any(s.summary is not None and s.summary.additional_properties.get(RUN_PROPERTY) == str(generation)
                   for s in table.snapshots())

    def _commit(self, adds: Sequence[OutputFile], removes: Sequence[str], generation: int) -> None:
        from pyiceberg.io.pyarrow import parquet_file_to_data_file
        from pyiceberg.table import TableProperties

        if self.schema is None:
            raise RuntimeError("IcebergSink.check_schema() comes before commit()")
        table = self._open()
        if table is None:
            self.catalog.create_namespace_if_not_exists(self.namespace)
            tx = self.catalog.create_table_transaction(self.name, schema=self.schema, location=self.root)
            io = tx._table.io
            fields = self.partition_fields(self.schema)
            if fields:
                with tx.update_spec() as spec:
                    for column, transform, field_name in fields:
                        spec.add_field(column, transform, field_name)
        else:
            tx = table.transaction()
            io = table.io
        if tx.table_metadata.name_mapping() is None:  # our files carry no field ids: read them by name
            tx.set_properties(**{TableProperties.DEFAULT_NAME_MAPPING:
                                 tx.table_metadata.schema().name_mapping.model_dump_json()})
        metadata = tx.table_metadata
        with ThreadPoolExecutor(max_workers=8) as pool:  # one footer each: stats, and the schema checked
            try:
                data_files = list(pool.map(lambda f: parquet_file_to_data_file(io, metadata, f"{self.root}/{f.path}"),
                                           adds))
            except ValueError as exc:
                raise OutputConflictError(f"{self.name}: a data file does not fit the table (an input file typed "
                                          f"its columns differently, or holds rows of several partitions): {exc}; "
                                          f"nothing was committed to the table") from exc
        current = {}
        if removes:
            wanted = {f"{self.root}/{p}" if "://" not in p and not p.startswith("/") else p for p in removes}
            current = {t.file.file_path: t.file for t in table.scan().plan_files() if t.file.file_path in wanted}
        update = tx.update_snapshot(snapshot_properties={RUN_PROPERTY: str(generation)})
        with (update.overwrite() if current else update.fast_append()) as snapshot:
            for data_file in data_files:
                snapshot.append_data_file(data_file)
            for data_file in current.values():
                snapshot.delete_data_file(data_file)
        tx.commit_transaction()


def _fields(spec: Any, schema: Any) -> list[PartitionField]:
    """A partition spec's fields by source column name (ids differ between tables)."""
    return [(schema.find_column_name(f.source_id), f.transform, f.name) for f in spec.fields]


def _text(fields: Sequence[PartitionField]) -> str:
    return "[" + ", ".join(f"{t}({c})" for c, t, _ in fields) + "]" if fields else "nothing"
