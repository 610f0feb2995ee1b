"""Lakehouse tables as input (issue 13, item 1): only a table's live rows are scored.

Real deltalake and pyiceberg (its SQL catalog on SQLite in tmp_path), no mocks.
The jobs are small: they run in the driver (pipelines.lane), no Ray started.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli, feature_table, reference, save_mlp
from deltalake import DeltaTable, write_deltalake

import pipelines
from pipelines.commit import MANIFEST, SUCCESS
from basis.errors import ConfigError, InputError, OutputConflictError

FEATURES = 4


def run(**options: Any) -> pipelines.RunReport:
    return pipelines.run(**options, progress=False)


def rows(first: int, stop: int, seed: int) -> pa.Table:
    return feature_table(np.arange(first, stop), FEATURES, seed)


def delta_with_deletes(root: Path) -> Path:
    """The issue's reproduction: two appends of 3,000 rows, then 500 rows deleted (copy-on-write:
    the rewritten file's old version stays on disk until vacuum)."""
    table = root / "delta"
    write_deltalake(str(table), rows(0, 3000, 1))
    write_deltalake(str(table), rows(3000, 6000, 2), mode="append")
    metrics = DeltaTable(str(table)).delete("id >= 1000 AND id < 1500")
    assert metrics["num_deleted_rows"] == 500 and metrics["num_removed_files"] == 1
    assert len(list(table.glob("*.parquet"))) == 3  # the removed file is still there
    return table


def check_scored(out: Path, model: Any, live: pa.Table) -> None:
    """The output holds every live row exactly once, equal to a plain torch forward of it."""
    # delta-rs writes a rewritten file's strings as string_view: the outputs mirror each file's types
    got = pa.concat_tables([t.select(["id", "prediction"]) for t in (pq.read_table(p) for p in sorted(
        p for p in out.rglob("*.parquet") if not p.name.startswith(("_", ".")) and "_rejected" not in p.parts))])
    got = got.sort_by("id")
    live = live.sort_by("id")
    assert got["id"].to_pylist() == live["id"].to_pylist()  # each live row once, no deleted row
    features = np.stack([live[f"f{j:02d}"].to_numpy() for j in range(FEATURES)], axis=1)
    want = reference(model, features)[:, 0]
    np.testing.assert_allclose(np.asarray(got["prediction"].to_pylist(), np.float32), want, rtol=1e-5, atol=1e-7)


def test_delta_table_scores_exactly_its_live_rows_and_records_its_version(tmp_path: Path) -> None:
    table = delta_with_deletes(tmp_path)
    model = save_mlp(tmp_path / "m.pt", [FEATURES, 8, 1], seed=3)
    out = tmp_path / "out"

    report = run(model=str(tmp_path / "m.pt"), input=str(table), output=str(out), shard_rows=1000)

    assert report.status == "succeeded" and report.complete and (out / SUCCESS).exists()
    assert report.rows_in == report.rows_out == 5500  # not 8,500: removed file and deleted rows left out
    check_scored(out, model, DeltaTable(str(table)).to_pyarrow_table())
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"]["format"] == "delta" and manifest["source"]["version"] == 2
    live = {a for a in DeltaTable(str(table)).get_add_actions(flatten=True).column("path").to_pylist()}
    entries = manifest["shards"]
    assert {e["rel"] for e in entries} == live  # shard ids and names derive from the table's own file list
    assert all(e["fingerprint"].startswith("size=") and "mtime" not in e["fingerprint"] for e in entries)

    again = run(model=str(tmp_path / "m.pt"), input=str(table), output=str(out), shard_rows=1000)
    assert again.shards_done == 0 and again.shards_skipped == report.shards_total  # nothing to do


def test_parquet_directory_of_a_delta_table_is_still_read_as_files_when_asked(tmp_path: Path) -> None:
    table = delta_with_deletes(tmp_path)
    save_mlp(tmp_path / "m.pt", [FEATURES, 1], seed=3)

    report = run(model=str(tmp_path / "m.pt"), input=str(table), output=str(tmp_path / "out"),
                 input_format="parquet")

    assert report.rows_out == 8500  # what `auto` avoids: every file on disk, removed ones included
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert "format" not in manifest["source"]  # a Parquet directory's header is as before


def iceberg_catalog(tmp_path: Path) -> dict[str, str]:
    return {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": f"file://{tmp_path}/warehouse"}


def test_iceberg_table_after_append_and_delete_scores_its_live_rows(tmp_path: Path) -> None:
    from pyiceberg.catalog import load_catalog

    catalog = iceberg_catalog(tmp_path)
    iceberg = load_catalog("default", **catalog)
    iceberg.create_namespace("feats")
    table = iceberg.create_table("feats.users", schema=rows(0, 1, 0).schema)
    table.append(rows(0, 3000, 1))
    table.append(rows(3000, 6000, 2))
    table.delete("id >= 1000 and id < 1500")
    table = iceberg.load_table("feats.users")
    # PyIceberg 0.12 deletes copy-on-write: the file is rewritten, no delete file is written
    assert table.current_snapshot().summary.operation.value == "overwrite"
    assert all(not task.delete_files for task in table.scan().plan_files())
    on_disk = list((tmp_path / "warehouse").rglob("*.parquet"))
    assert len(on_disk) == 3  # the rewritten file's old version is still there
    model = save_mlp(tmp_path / "m.pt", [FEATURES, 8, 1], seed=4)
    out = tmp_path / "out"

    report = run(model=str(tmp_path / "m.pt"), input="feats.users", input_format="iceberg", catalog=catalog,
                 output=str(out))

    assert report.status == "succeeded" and report.rows_out == 5500
    check_scored(out, model, table.scan().to_arrow())
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"]["format"] == "iceberg" and manifest["source"]["table"] == "feats.users"
    assert manifest["source"]["snapshot_id"] == table.current_snapshot().snapshot_id
    again = run(model=str(tmp_path / "m.pt"), input="feats.users", input_format="iceberg", catalog=catalog,
                output=str(out))
    assert again.shards_done == 0 and again.shards_skipped == report.shards_total


def test_delta_table_with_deletion_vectors_enabled_but_none_written_is_scored(tmp_path: Path) -> None:
    table = tmp_path / "dv"
    write_deltalake(str(table), rows(0, 100, 1), configuration={"delta.enableDeletionVectors": "true"})
    assert "deletionVectors" in (DeltaTable(str(table)).protocol().reader_features or [])
    save_mlp(tmp_path / "m.pt", [FEATURES, 1], seed=3)

    report = run(model=str(tmp_path / "m.pt"), input=str(table), output=str(tmp_path / "out"))

    assert report.rows_out == 100


def test_delta_table_whose_files_cannot_be_read_by_column_name_is_refused(tmp_path: Path) -> None:
    table = tmp_path / "mapped"
    write_deltalake(str(table), rows(0, 100, 1), configuration={"delta.columnMapping.mode": "name"})
    save_mlp(tmp_path / "m.pt", [FEATURES, 1], seed=3)

    with pytest.raises(InputError, match=r"mapped.*(columnMapping|reader feature)") as refused:
        run(model=str(tmp_path / "m.pt"), input=str(table), output=str(tmp_path / "out"))

    assert refused.value.exit_code == 2 and not (tmp_path / "out").exists()


def test_refusals_exit_2_with_the_reason(tmp_path: Path) -> None:
    table = delta_with_deletes(tmp_path)
    save_mlp(tmp_path / "m.pt", [FEATURES, 1], seed=3)
    base = ["run", "--model", str(tmp_path / "m.pt"), "--input", str(table)]

    write_deltalake(str(tmp_path / "other"), rows(0, 10, 1))
    into_table = cli(*base, "--output", str(tmp_path / "other"))
    assert into_table.returncode == 2 and "is a Delta table" in into_table.stderr
    assert "output_format: delta" in into_table.stderr  # the way to write into it

    missing = cli(*base[:3], "--input", "feats.nope", "--input-format", "iceberg",
                  "--catalog", json.dumps(iceberg_catalog(tmp_path)), "--output", str(tmp_path / "o2"))
    assert missing.returncode == 2 and "cannot load the Iceberg table 'feats.nope'" in missing.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "o2").exists()


def test_catalog_key_is_a_mapping_kept_without_its_secrets(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="catalog"):
        pipelines.plan(model="m.pt", input="a.b", output="o", catalog=["type", "sql"])
    with pytest.raises(ConfigError, match="catalog.*input_format: iceberg"):
        pipelines.plan(model=str(save_mlp(tmp_path / "m.pt", [FEATURES, 1]) and tmp_path / "m.pt"),
                       input=str(tmp_path), output=str(tmp_path / "o"), catalog={"type": "sql"})
    from pipelines.tables import catalog_record

    assert catalog_record({"type": "glue", "s3.secret-access-key": "SK", "token": "T"}) == {
        "type": "glue", "s3.secret-access-key": "REDACTED", "token": "REDACTED"}


def test_a_delete_of_scored_rows_is_refused_until_prune_or_overwrite(tmp_path: Path) -> None:
    """A table's delete rewrites a scored file: keeping the old file's predictions beside the rewritten
    file's would score its surviving rows twice (and keep the deleted ones), so the run stops (exit 2)."""
    table = tmp_path / "delta"
    write_deltalake(str(table), rows(0, 3000, 1))
    write_deltalake(str(table), rows(3000, 6000, 2), mode="append")
    model = save_mlp(tmp_path / "m.pt", [FEATURES, 8, 1], seed=3)
    out = tmp_path / "out"
    job = {"model": str(tmp_path / "m.pt"), "input": str(table), "output": str(out), "shard_rows": 1000}
    assert run(**job).rows_out == 6000
    DeltaTable(str(table)).delete("id >= 1000 AND id < 1500")  # rewrites the first append's file (version 2)
    before = sorted(p.name for p in out.rglob("*") if p.is_file())

    with pytest.raises(OutputConflictError, match=r"\(format delta, version 2\) no longer holds 1 data file.*prune"):
        run(**job)
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == before  # nothing written
    refused = cli("run", "--model", job["model"], "--input", job["input"], "--output", job["output"])
    assert refused.returncode == 2 and "version 2" in refused.stderr

    report = run(**job, prune=True)
    assert report.status == "succeeded" and report.complete and (out / SUCCESS).exists()
    check_scored(out, model, DeltaTable(str(table)).to_pyarrow_table())  # 5,500 live rows, each once
    assert cli("verify", str(out)).returncode == 0
