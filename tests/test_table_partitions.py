"""Output tables partitioned like the input (issue 13, item 3): a Hive-partitioned Parquet input into a Delta
table partitioned by its keys; an identity-partitioned Iceberg input into an Iceberg table with its spec.

Real deltalake, pyiceberg (SQL catalog on SQLite in tmp_path) and Polars; small jobs in the driver (no Ray).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    """One file per `day=` directory; returns id -> day."""
    day_of = {}
    for day, rows in days.items():
        (root / f"day={day}").mkdir(parents=True, exist_ok=True)
        ids = np.arange(start, start + rows)
        pq.write_table(feature_table(ids, FEATURES, seed=start), root / f"day={day}" / "part-0.parquet")
        day_of.update({int(i): day for i in ids})
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
        actions = pa.table(table.get_add_actions(flatten=True)).to_pylist()
        assert all(a["path"].startswith(f"day={a['partition.day']}/") for a in actions)

    check()
    versions = len(list((tmp_path / "preds" / "_delta_log").glob("*.json")))
    day_of.update(hive_input(tmp_path / "in", {"2024-01-03": 150}, start=1000))
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
