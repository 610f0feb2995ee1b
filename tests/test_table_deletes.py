"""Tables' deleted rows and snapshots (issue 13, items 1 and 2): live rows only, incrementally.

Real deltalake and pyiceberg (SQL catalog on SQLite); what the libraries cannot write (a Delta
deletion vector, an Iceberg position-delete file or `replace` snapshot) is written by the
formats' specs in tests/lakehouse.py and read back by the libraries themselves. The jobs are
small: they run in the driver (pipelines.lane), no Ray started.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli, feature_table, reference, save_mlp
from deltalake import DeltaTable, WriterProperties, write_deltalake
from lakehouse import add_deletion_vector, add_position_deletes, compact_iceberg, delta_files, delta_live

import pipelines
from basis.errors import InputError, OutputConflictError
from pipelines.commit import MANIFEST, SUCCESS

FEATURES = 4
DV = {"delta.enableDeletionVectors": "true"}
SMALL_GROUPS = WriterProperties(max_row_group_size=250)  # several row groups per file: masks cross them


def rows(first: int, stop: int, seed: int) -> pa.Table:
    return feature_table(np.arange(first, stop), FEATURES, seed)


def run(**options: Any) -> pipelines.RunReport:
    return pipelines.run(**options, progress=False)


def scored(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p).select(["id", "prediction"]) for p in sorted(
        p for p in out.rglob("*.parquet") if not p.name.startswith(("_", ".")) and "_rejected" not in p.parts)])


def check_scored(out: Path, model: Any, live: pa.Table) -> None:
    """The output holds every live row exactly once, equal to a plain torch forward of it."""
    got = scored(out).sort_by("id")
    live = live.select(["id", *(f"f{j:02d}" for j in range(FEATURES))]).sort_by("id")
    assert got["id"].to_pylist() == live["id"].to_pylist()  # each live row once, no deleted row
    features = np.stack([live[f"f{j:02d}"].to_numpy() for j in range(FEATURES)], axis=1)
    want = reference(model, features)[:, 0]
    np.testing.assert_allclose(np.asarray(got["prediction"].to_pylist(), np.float32), want, rtol=1e-5, atol=1e-7)
    assert (out / SUCCESS).exists()


def only(table: Path, first: int) -> str:
    """The data file holding the row with id `first` (each append writes one file)."""
    for path in delta_files(table):
        if first in pq.read_table(table / path, columns=["id"])["id"].to_pylist():
            return path
    raise AssertionError(first)


@pytest.fixture
def delta(tmp_path: Path) -> dict[str, Any]:
    table = tmp_path / "delta"
    write_deltalake(str(table), rows(0, 1000, 1), configuration=DV, writer_properties=SMALL_GROUPS)
    write_deltalake(str(table), rows(1000, 2000, 2), mode="append", writer_properties=SMALL_GROUPS)
    model = save_mlp(tmp_path / "m.pt", [FEATURES, 8, 1], seed=3)
    out = tmp_path / "out"
    return {"table": table, "model": model, "out": out,
            "job": {"model": str(tmp_path / "m.pt"), "input": str(table), "output": str(out), "shard_rows": 500}}


def test_delta_deletion_vector_rows_are_never_scored(delta: dict[str, Any]) -> None:
    table, out, job = delta["table"], delta["out"], delta["job"]
    first = only(table, 0)
    deleted = [3, 249, 250, 251, 600, 999]  # across row-group and shard boundaries
    add_deletion_vector(table, first, deleted)
    assert DeltaTable(str(table)).version() == 2
    live = delta_live(table)  # delta-rs's own engine, deletion vector applied
    assert live.num_rows == 2000 - len(deleted)

    report = run(**job)

    assert report.status == "succeeded" and report.complete
    assert report.rows_in == report.rows_out == 2000 - len(deleted)  # rows_in counts live rows
    check_scored(out, delta["model"], live)
    manifest = json.loads((out / MANIFEST).read_text())
    masked = [e for e in manifest["shards"] if e["rel"] == first]
    assert sum(e["rows_in"] for e in masked) == 1000 - len(deleted)
    assert all(";deleted=6:" in e["fingerprint"] for e in masked)
    assert cli("verify", str(out)).returncode == 0
    assert run(**job).shards_done == 0  # unchanged: nothing to do


def test_delta_append_is_scored_alone_and_a_delete_of_scored_rows_needs_prune(delta: dict[str, Any]) -> None:
    table, out, job = delta["table"], delta["out"], delta["job"]
    assert run(**job).rows_out == 2000
    write_deltalake(str(table), rows(2000, 2600, 3), mode="append")

    appended = run(**job)

    assert appended.rows_in == 600 and appended.shards_skipped == 4  # only the new file
    version = add_deletion_vector(table, only(table, 0), [10, 11, 700])  # a delete of scored rows
    before = sorted(p.name for p in out.rglob("*") if p.is_file())

    with pytest.raises(OutputConflictError, match=rf"version {version}.*new deleted rows.*version {version} "
                                                  rf"\(DELETE\) deleted or rewrote.*prune.*overwrite") as refused:
        run(**job)
    assert refused.value.exit_code == 2
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == before  # nothing written
    assert cli("run", "--model", job["model"], "--input", job["input"], "--output", job["output"]).returncode == 2

    pruned = run(**job, prune=True)

    assert pruned.status == "succeeded" and pruned.rows_in == 997  # the changed file, its live rows
    check_scored(out, delta["model"], delta_live(table))
    assert cli("verify", str(out)).returncode == 0


def test_delta_optimize_scores_nothing_and_its_coverage_holds_until_its_rows_change(delta: dict[str, Any]) -> None:
    table, out, job = delta["table"], delta["out"], delta["job"]
    run(**job)
    metrics = DeltaTable(str(table)).optimize.compact()
    assert metrics["numFilesRemoved"] == 2 and metrics["numFilesAdded"] == 1

    compacted = run(**job)

    assert compacted.rows_in == 0 and compacted.shards_done == 0 and compacted.complete
    check_scored(out, delta["model"], delta_live(table))  # the old files' predictions stand for the new file
    manifest = json.loads((out / MANIFEST).read_text())
    group = manifest["source"]["covered"]
    assert manifest["source"]["version"] == 2 and len(group) == 1 and len(group[0]["covers"]) == 2
    assert run(**job).shards_done == 0  # the next tick: unchanged

    write_deltalake(str(table), rows(2000, 2300, 4), mode="append")
    assert run(**job).rows_in == 300  # appended after the compaction: scored alone
    merged = next(iter(group[0]["files"]))
    version = add_deletion_vector(table, merged, [5, 1500])  # deletes rows the old files' predictions cover
    with pytest.raises(OutputConflictError, match=rf"version {version} \(DELETE\).*prune"):
        run(**job)

    pruned = run(**job, prune=True)

    assert pruned.rows_in == 1998  # the compacted file's live rows, its old files' predictions dropped
    check_scored(out, delta["model"], delta_live(table))
    assert "covered" not in json.loads((out / MANIFEST).read_text())["source"]


def test_delta_compaction_past_a_cleaned_up_log_counts_as_a_rewrite(delta: dict[str, Any],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    table, job = delta["table"], delta["job"]
    run(**job)
    DeltaTable(str(table)).optimize.compact()
    write_deltalake(str(table), rows(2000, 2100, 4), mode="append")
    DeltaTable(str(table)).create_checkpoint()
    (table / "_delta_log" / f"{2:020d}.json").unlink()  # the compaction's commit: cleaned up
    assert DeltaTable(str(table)).version() == 3

    with caplog.at_level(logging.INFO, logger="pipelines.tables"), pytest.raises(
            OutputConflictError, match=r"no longer holds 2 data file.*could not be followed"):
        run(**job)
    assert "cannot be followed" in caplog.text and "comparing file lists" in caplog.text
    assert run(**job, prune=True).rows_in == 2100  # the compacted file and the append
    check_scored(delta["out"], delta["model"], delta_live(table))


def iceberg(tmp_path: Path) -> tuple[Any, dict[str, str]]:
    from pyiceberg.catalog import load_catalog

    catalog = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": f"file://{tmp_path}/wh"}
    store = load_catalog("default", **catalog)
    store.create_namespace("feats")
    table = store.create_table("feats.users", schema=rows(0, 1, 0).schema)
    table.append(rows(0, 1000, 1))
    table.append(rows(1000, 2000, 2))
    return store.load_table("feats.users"), catalog


def data_file(table: Any, first: int) -> str:
    for task in table.scan().plan_files():
        if first in pq.read_table(task.file.file_path[len("file://"):], columns=["id"])["id"].to_pylist():
            return task.file.file_path
    raise AssertionError(first)


def test_iceberg_position_deletes_then_a_delete_and_an_append(tmp_path: Path) -> None:
    table, catalog = iceberg(tmp_path)
    table = add_position_deletes(table, data_file(table, 1000), [0, 1, 500])
    assert table.current_snapshot().summary.operation.value == "delete"
    model = save_mlp(tmp_path / "m.pt", [FEATURES, 8, 1], seed=4)
    out = tmp_path / "out"
    job = {"model": str(tmp_path / "m.pt"), "input": "feats.users", "input_format": "iceberg", "catalog": catalog,
           "output": str(out)}

    report = run(**job)

    assert report.rows_in == report.rows_out == 1997
    check_scored(out, model, table.scan().to_arrow())  # PyIceberg's own read, deletes applied
    table = add_position_deletes(table, data_file(table, 0), [7])  # a delete of scored rows
    table.append(rows(2000, 2200, 5))
    table = table.catalog.load_table("feats.users")
    snapshots = [s.snapshot_id for s in table.snapshots()]

    with pytest.raises(OutputConflictError, match=rf"snapshot_id {snapshots[-1]}.*new deleted rows.*"
                                                  rf"snapshot {snapshots[-2]} \(delete\).*prune"):
        run(**job)

    pruned = run(**job, prune=True)
    assert pruned.rows_in == 999 + 200  # the changed file's live rows and the append
    check_scored(out, model, table.scan().to_arrow())
    assert run(**job).shards_done == 0


def test_iceberg_compaction_scores_nothing(tmp_path: Path) -> None:
    table, catalog = iceberg(tmp_path)
    model = save_mlp(tmp_path / "m.pt", [FEATURES, 8, 1], seed=4)
    out = tmp_path / "out"
    job = {"model": str(tmp_path / "m.pt"), "input": "feats.users", "input_format": "iceberg", "catalog": catalog,
           "output": str(out)}
    assert run(**job).rows_in == 2000
    table = compact_iceberg(table)
    assert table.current_snapshot().summary.operation.value == "replace"

    compacted = run(**job)

    assert compacted.rows_in == 0 and compacted.complete
    check_scored(out, model, table.scan().to_arrow())
    assert json.loads((out / MANIFEST).read_text())["source"]["snapshot_id"] == table.current_snapshot().snapshot_id
    table.append(rows(2000, 2100, 6))
    assert run(**job).rows_in == 100
    check_scored(out, model, table.catalog.load_table("feats.users").scan().to_arrow())


def test_equality_deletes_are_refused_naming_the_file(tmp_path: Path) -> None:
    table, catalog = iceberg(tmp_path)
    table = add_position_deletes(table, data_file(table, 0), [1], equality_ids=[1])
    save_mlp(tmp_path / "m.pt", [FEATURES, 1], seed=4)

    with pytest.raises(InputError, match=r"equality deletes in .*deletes-.*\.parquet: equality deletes cannot "
                                         r"be applied") as refused:
        run(model=str(tmp_path / "m.pt"), input="feats.users", input_format="iceberg", catalog=catalog,
            output=str(tmp_path / "out"))
    assert refused.value.exit_code == 2 and not (tmp_path / "out").exists()


def test_unchanged_tick_plans_no_file_and_reads_no_footer(tmp_path: Path) -> None:
    from benchmarks.iceberg_tick import measure

    figures = measure(tmp_path, snapshots=20, files_per_snapshot=5, rows_per_file=20)

    assert figures["files"] == 100 and figures["first_footer_reads"] == 100
    assert figures["tick_footer_reads"] == 0 and figures["tick_planned_files"] == 0
    assert figures["tick_data_files_opened"] in (0, None)  # None: no inotify here
    assert figures["tick_shards_skipped"] == 100 and figures["tick_rows_in"] == 0


def test_masks_and_history_examples_hold() -> None:
    import doctest

    import basis.masks
    import pipelines.tables.history

    for module in (basis.masks, pipelines.tables.history):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_follow_chains_compactions_and_refuses_mixed_ones() -> None:
    from pipelines.tables.history import Commit, follow

    compact = lambda name, old, new: Commit(name, tuple((r, False) for r in old), tuple((r, False) for r in new))  # noqa: E731
    chained = follow([compact("v2", ["a", "b"], ["c"]), compact("v3", ["c", "d"], ["e", "f"])], scored={"a", "b", "d"})
    assert [(sorted(g.files), sorted(g.covers)) for g in chained.groups] == [(["e", "f"], ["a", "b", "d"])]
    assert not chained.removed_by
    appended = follow([Commit("v2 (WRITE)", added=(("n", True),)), compact("v3", ["a", "n"], ["c"])], scored={"a"})
    assert not appended.groups and appended.removed_by == {"a": "v3, which compacted scored and unscored rows together"}
    unscored = follow([compact("v2", ["n", "m"], ["c"])], scored={"a"})
    assert not unscored.groups and not unscored.removed_by  # only new rows compacted: the new file is new
    broken = follow([compact("v2", ["a"], ["c"]), Commit("v3 (DELETE)", removed=(("c", True),), added=(("c2", True),))],
                    scored={"a"})
    assert not broken.groups and broken.removed_by == {"a": "v3 (DELETE)"}
