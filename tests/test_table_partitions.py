"""Output tables partitioned like the input (issue 13, item 3): a Hive-partitioned Parquet input into a Delta
table partitioned by its keys; an identity-partitioned Iceberg input into an Iceberg table with its spec.

Real deltalake, pyiceberg (SQL catalog on SQLite in tmp_path) and Polars; small jobs in the driver (no Ray).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import feature_table, save_mlp
from deltalake import DeltaTable

import pipelines
from basis.errors import OutputConflictError

FEATURES = 4
DAYS = {"2024-01-01": 300, "2024-01-02": 200}


def hive_input(root: Path, days: dict[str, int], start: int = 0) -> dict[int, str]:
    """One file per `day=` directory (named as Hive escapes the value); returns id -> day."""
    day_of = {}
    for day, rows in days.items():
        (root / f"day={day}").mkdir(parents=True, exist_ok=True)
        ids = np.arange(start, start + rows)
        pq.write_table(feature_table(ids, FEATURES, seed=start), root / f"day={day}" / "part-0.parquet")
        day_of.update({int(i): unquote(day) for i in ids})
        start += rows
    return day_of


def run(options: dict[str, Any]) -> pipelines.RunReport:
    report = pipelines.run(**options, progress=False)
    assert report.status == "succeeded", report.errors
    return report


def test_a_hive_partitioned_input_gives_a_delta_table_partitioned_by_its_keys(tmp_path: Path) -> None:
    day_of = hive_input(tmp_path / "in", DAYS)
    save_mlp(tmp_path / "m.pt", [FEATURES, 8, 1], seed=3)
    options = {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": str(tmp_path / "preds"),
               "output_format": "delta", "shard_rows": 1000}
    run(options)

    def check() -> None:
        table = DeltaTable(str(tmp_path / "preds"))
        assert table.metadata().partition_columns == ["day"]
        for rows in (table.to_pyarrow_table().to_pylist(), pl.read_delta(str(tmp_path / "preds")).to_dicts()):
            assert sorted(r["id"] for r in rows) == sorted(day_of), "every row once"
            assert all(r["day"] == day_of[r["id"]] for r in rows), "each row's partition value"

    check()
    versions = len(list((tmp_path / "preds" / "_delta_log").glob("*.json")))
    day_of.update(hive_input(tmp_path / "in", {"2024-01-03 06%3A00": 150}, start=1000))  # Hive escapes ':'

    run(options)
    assert len(list((tmp_path / "preds" / "_delta_log").glob("*.json"))) == versions + 1, "one commit"
    check()


def test_a_delta_table_partitioned_otherwise_is_exit_2_naming_both(tmp_path: Path) -> None:
    hive_input(tmp_path / "in", DAYS)
    save_mlp(tmp_path / "m.pt", [FEATURES, 8, 1], seed=3)
    from deltalake import write_deltalake

    other = pa.table({"id": pa.array([], pa.int64()), "name": pa.array([], pa.string()),
                      "prediction": pa.array([], pa.float32()), "region": pa.array([], pa.string())})
    write_deltalake(str(tmp_path / "preds"), other, partition_by=["region"])
    options = {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": str(tmp_path / "preds"),
               "output_format": "delta", "shard_rows": 1000, "passthrough": ["id", "name"]}
    with pytest.raises(OutputConflictError, match=r"partitioned by \['region'\] but this job's files by \['day'\]"):
        pipelines.run(**options, progress=False)


@pytest.mark.parametrize("transform", ["identity", "day"])
def test_an_iceberg_input_gives_an_iceberg_table_with_its_partition_spec(tmp_path: Path, transform: str) -> None:
    import datetime

    from pyiceberg.catalog import load_catalog
    from pyiceberg.expressions import And, EqualTo, GreaterThanOrEqual, LessThan
    from pyiceberg.transforms import DayTransform, IdentityTransform

    (tmp_path / "wh").mkdir()
    catalog = {"type": "sql", "uri": f"sqlite:///{tmp_path}/cat.db", "warehouse": f"file://{tmp_path}/wh"}
    iceberg = load_catalog("default", **catalog)
    iceberg.create_namespace("feats")
    parts = {}
    for d, (day, count) in enumerate(DAYS.items()):
        part = feature_table(np.arange(d * 1000, d * 1000 + count), FEATURES, seed=d)
        stamps = [datetime.datetime(2024, 1, 1 + d, 6) + datetime.timedelta(minutes=i) for i in range(count)]
        parts[day] = part.append_column("day", pa.array([day] * count)).append_column(
            "ts", pa.array(stamps, pa.timestamp("us")))
    ids = {day: part["id"].to_pylist() for day, part in parts.items()}
    source = iceberg.create_table("feats.users", schema=parts[day].schema)
    data = Path(source.location().removeprefix("file://")) / "data"
    data.mkdir(parents=True)
    for day, part in parts.items():  # one file per partition, added by PyIceberg's add_files
        pq.write_table(part, data / f"{day}.parquet")
    files = [f"file://{data}/{day}.parquet" for day in parts]
    column, spec = ("day", IdentityTransform()) if transform == "identity" else ("ts", DayTransform())
    with source.update_spec() as update:
        update.add_field(column, spec, f"{column}_part")
    source.add_files(files)
    save_mlp(tmp_path / "m.pt", [FEATURES, 8, 1], seed=3)
    run({"model": str(tmp_path / "m.pt"), "input": "feats.users", "input_format": "iceberg", "catalog": catalog,
         "output": "preds.scores", "output_format": "iceberg", "features": [f"f{j:02d}" for j in range(FEATURES)],
         "shard_rows": 1000})

    table = iceberg.load_table("preds.scores")
    assert [(table.schema().find_column_name(f.source_id), str(f.transform), f.name) for f in table.spec().fields] \
        == [(column, transform, f"{column}_part")], "the input's spec"
    assert sorted(table.scan().to_arrow()["id"].to_pylist()) == sorted(ids["2024-01-01"] + ids["2024-01-02"])
    # A filter on one partition: the scan plans only that partition's file(s) and returns exactly its rows.
    one = (EqualTo("day", "2024-01-02") if transform == "identity" else
           And(GreaterThanOrEqual("ts", "2024-01-02T00:00:00"), LessThan("ts", "2024-01-03T00:00:00")))
    planned = list(table.scan(row_filter=one).plan_files())
    assert planned and {t.file.partition[0] for t in planned} == {"2024-01-02" if transform == "identity" else 19724}
    assert sorted(table.scan(row_filter=one).to_arrow()["id"].to_pylist()) == ids["2024-01-02"]


def test_a_partitioned_delta_input_gives_a_delta_table_with_its_typed_partition_columns(tmp_path: Path) -> None:
    from deltalake import write_deltalake

    table = feature_table(np.arange(400), FEATURES, seed=1)
    table = table.append_column("bucket", pa.array(np.arange(400) % 3, pa.int64()))
    write_deltalake(str(tmp_path / "in"), table, partition_by=["bucket"])
    save_mlp(tmp_path / "m.pt", [FEATURES, 8, 1], seed=3)
    run({"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": str(tmp_path / "preds"),
         "output_format": "delta", "shard_rows": 1000})

    out = DeltaTable(str(tmp_path / "preds"))
    assert out.metadata().partition_columns == ["bucket"]
    read = out.to_pyarrow_table()
    assert read.schema.field("bucket").type == pa.int64(), "typed as the input table types it"
    assert sorted(zip(read["id"].to_pylist(), read["bucket"].to_pylist())) == [(i, i % 3) for i in range(400)]
    polars = pl.read_delta(str(tmp_path / "preds")).sort("id")
    assert polars["bucket"].to_list() == [i % 3 for i in range(400)]


def test_an_iceberg_input_with_files_from_before_its_spec_gives_an_unpartitioned_table(tmp_path: Path) -> None:
    from pyiceberg.catalog import load_catalog
    from pyiceberg.transforms import IdentityTransform

    (tmp_path / "wh").mkdir()
    catalog = {"type": "sql", "uri": f"sqlite:///{tmp_path}/cat.db", "warehouse": f"file://{tmp_path}/wh"}
    iceberg = load_catalog("default", **catalog)
    iceberg.create_namespace("feats")
    both = feature_table(np.arange(300), FEATURES, seed=0)
    both = both.append_column("day", pa.array(["2024-01-01"] * 150 + ["2024-01-02"] * 150))
    source = iceberg.create_table("feats.users", schema=both.schema)
    data = Path(source.location().removeprefix("file://")) / "data"
    data.mkdir(parents=True)
    pq.write_table(both, data / "both.parquet")  # two days in one file, unpartitioned
    source.add_files([f"file://{data}/both.parquet"])
    with source.update_spec() as update:
        update.add_field("day", IdentityTransform(), "day_part")
    later = feature_table(np.arange(300, 400), FEATURES, seed=1).append_column("day", pa.array(["2024-01-03"] * 100))
    pq.write_table(later, data / "later.parquet")
    source.add_files([f"file://{data}/later.parquet"])
    save_mlp(tmp_path / "m.pt", [FEATURES, 8, 1], seed=3)
    run({"model": str(tmp_path / "m.pt"), "input": "feats.users", "input_format": "iceberg", "catalog": catalog,
         "output": "preds.scores", "output_format": "iceberg", "features": [f"f{j:02d}" for j in range(FEATURES)]})

    table = iceberg.load_table("preds.scores")
    assert not table.spec().fields, "a file of the old spec holds two partitions: not partitioned"
    assert sorted(table.scan().to_arrow()["id"].to_pylist()) == list(range(400))
