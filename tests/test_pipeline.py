"""End to end on one shared embedded Ray: predictions, order, resume, overwrite, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TEST_REPLICA, feature_table, golden_model, output_files, read_output, reference, save_mlp, write_files
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import pipelines
from pipelines.commit import MANIFEST, SUCCESS

pytestmark = pytest.mark.usefixtures("ray_shared")


def run(**options: object) -> pipelines.RunReport:
    return pipelines.run(**{**TEST_REPLICA, **options}, progress=False)


def test_golden_value_through_the_api(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [7], "x1": pa.array([1.0], pa.float32()), "x2": pa.array([2.0], pa.float32())}),
                   tmp_path / "in" / "one.parquet")
    report = run(model=str(golden_model(tmp_path / "g.pt")), input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    assert report.status == "succeeded" and report.rows_out == 1
    out = pq.read_table(tmp_path / "out" / "one-00000.parquet")
    assert out.column_names == ["id", "prediction"] and out.schema.field("prediction").type == pa.float32()
    assert out["id"].to_pylist() == [7]
    assert out["prediction"][0].as_py() == pytest.approx(0.7757198, abs=1e-7)


@pytest.mark.parametrize(
    "sizes, bias, output",
    [([8, 1], False, "sigmoid"), ([8, 16, 1], True, "sigmoid"), ([8, 32, 16, 3], True, "softmax")],
)
def test_predictions_order_and_passthrough(tmp_path: Path, sizes: list[int], bias: bool, output: str) -> None:
    files = write_files(tmp_path / "in", [1000, 1, 2500, 700], features=8, row_group_size=300, seed=len(sizes))
    model = save_mlp(tmp_path / "m.pt", sizes, bias=bias, seed=5, output=output)
    report = run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                 shard_rows=600, output_activation=output, batch_size=256)
    expected_in = pa.concat_tables([pq.read_table(f) for f in files])
    assert report.status == "succeeded" and report.complete
    assert report.rows_in == report.rows_out == expected_in.num_rows == 4201
    assert report.shards_done == report.shards_total > len(files)  # several shards per file
    out = read_output(tmp_path / "out")
    assert out.column_names == ["id", "name", "prediction"]
    assert out["id"].to_pylist() == list(range(4201))  # input order, every id once
    assert out["name"].equals(expected_in["name"])
    features = np.stack([expected_in[f"f{j:02d}"].to_numpy() for j in range(8)], axis=1)
    want = reference(model, features)
    got = np.asarray(out["prediction"].to_pylist(), dtype=np.float32).reshape(len(want), -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    if sizes[-1] > 1:
        assert out.schema.field("prediction").type == pa.list_(pa.float32(), 3)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_rejected"] == 4201
    assert [s["status"] for s in manifest["shards"]] == ["committed"] * report.shards_total
    assert manifest["model"]["layers"] == [[a, b] for a, b in zip(sizes[:-1], sizes[1:])]
    assert (tmp_path / "out" / SUCCESS).exists()
    assert 1 <= len(report.replicas) <= 2 and sum(r["rows"] for r in report.replicas) == 4201
    assert all(r["peak_rss_bytes"] > 0 and r["device"] == "cpu" for r in report.replicas)


def test_a_replica_with_several_cpus_decodes_row_groups_in_parallel_and_in_order(tmp_path: Path) -> None:
    files = write_files(tmp_path / "in", [2600, 900], features=6, row_group_size=250, seed=4)
    table = pq.read_table(files[0])
    f02 = table["f02"].to_numpy().copy()
    f02[[7, 1200, 2599]] = np.nan  # quarantined rows in the first, a middle and the last row group
    pq.write_table(table.set_column(4, "f02", pa.array(f02)), files[0], row_group_size=250)
    model = save_mlp(tmp_path / "m.pt", [6, 32, 1], seed=8)
    report = pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                           replicas=1, cpus_per_replica=2, batch_size=100, progress=False)
    assert report.complete and (report.rows_out, report.rows_rejected) == (3497, 3)
    expected = pa.concat_tables([pq.read_table(f) for f in files])
    keep = [i for i in range(3500) if i not in (7, 1200, 2599)]
    out = read_output(tmp_path / "out")
    assert out["id"].to_pylist() == keep  # 11 + 4 row groups, decoded on two threads, written in order
    features = np.stack([expected[f"f{j:02d}"].to_numpy() for j in range(6)], axis=1)[keep]
    np.testing.assert_allclose(out["prediction"].to_numpy(), reference(model, features)[:, 0], rtol=1e-5, atol=1e-7)
    rejected = pq.read_table(tmp_path / "out" / "_rejected" / "part-0000-00000.parquet")
    assert rejected["id"].to_pylist() == [7, 1200, 2599]


def test_rerun_skips_new_file_alone_model_change_and_overwrite(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [500, 500], features=4, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [4, 8, 1], seed=1)
    job = {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
           "shard_rows": 200}
    first = run(**job)
    assert first.shards_done == 6 and first.shards_skipped == 0
    before = output_files(tmp_path / "out")

    again = run(**job)
    assert (again.status, again.shards_done, again.shards_skipped, again.rows_in) == ("succeeded", 0, 6, 0)
    assert output_files(tmp_path / "out") == before  # not one file rewritten, manifest included

    extra = feature_table(np.arange(1000, 1300), 4, seed=9)
    pq.write_table(extra, tmp_path / "in" / "part-0002.parquet", row_group_size=100)
    incremental = run(**job)
    assert (incremental.shards_done, incremental.shards_skipped, incremental.rows_in) == (2, 6, 300)
    after = output_files(tmp_path / "out")
    assert {k: v for k, v in after.items() if k in before and not k.startswith("_")} == {
        k: v for k, v in before.items() if not k.startswith("_")}
    assert read_output(tmp_path / "out")["id"].to_pylist() == list(range(1300))

    save_mlp(tmp_path / "m.pt", [4, 8, 1], seed=2)  # a different model at the same path
    with pytest.raises(pipelines.OutputConflictError, match="different model"):
        run(**job)
    with pytest.raises(pipelines.OutputConflictError, match="activation"):
        run(**{**job, "model": str(tmp_path / "m.pt"), "activation": "relu", "overwrite": False})
    redone = run(**job, overwrite=True)
    assert (redone.shards_done, redone.shards_skipped) == (8, 0)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["model"]["sha256"] != json.loads(json.dumps(first.to_dict()))["status"]  # sanity: real hash
    assert read_output(tmp_path / "out").num_rows == 1300


def test_changed_shard_rows_reuses_committed_boundaries(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [400], features=4, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [4, 1])
    job = {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": str(tmp_path / "out")}
    assert run(**job, shard_rows=200).shards_done == 2
    report = run(**job, shard_rows=100)  # not a prediction setting: committed shards stand
    assert (report.shards_done, report.shards_skipped) == (0, 2)
    assert read_output(tmp_path / "out")["id"].to_pylist() == list(range(400))


def test_invalid_rows_quarantine_keep_and_fail(tmp_path: Path) -> None:
    table = feature_table(np.arange(10), 3, seed=0)
    f01 = table["f01"].to_numpy().copy()
    f01[2], f01[5] = np.nan, np.inf
    table = table.set_column(3, "f01", pa.array(f01))
    table = table.set_column(2, "f00", pa.array([None if i == 7 else 0.5 for i in range(10)], pa.float32()))
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "p.parquet")
    save_mlp(tmp_path / "m.pt", [3, 1])
    job = {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in")}

    q = run(**job, output=str(tmp_path / "q"))
    assert (q.status, q.rows_in, q.rows_out, q.rows_rejected) == ("succeeded", 10, 7, 3)
    assert read_output(tmp_path / "q")["id"].to_pylist() == [0, 1, 3, 4, 6, 8, 9]
    rejected = pq.read_table(tmp_path / "q" / "_rejected" / "p-00000.parquet")
    assert rejected["id"].to_pylist() == [2, 5, 7]
    assert rejected["reason"].to_pylist() == [
        "null, NaN or inf in feature 'f01'", "null, NaN or inf in feature 'f01'", "null, NaN or inf in feature 'f00'"]
    assert (tmp_path / "q" / SUCCESS).exists()

    k = run(**job, output=str(tmp_path / "k"), invalid_rows="keep")
    kept = read_output(tmp_path / "k")["prediction"].to_numpy(zero_copy_only=False)
    assert k.rows_out == 10 and np.isnan(kept[[2, 7]]).all() and np.isfinite(np.delete(kept, [2, 7])).all()

    f = run(**job, output=str(tmp_path / "f"), invalid_rows="fail")
    assert f.status == "failed" and f.shards_failed == 1 and not (tmp_path / "f" / SUCCESS).exists()
    assert "p.parquet: row 2 (row group 0)" in f.errors[0]["error"] and "f01" in f.errors[0]["error"]
    assert not list((tmp_path / "f").rglob("p-00000.parquet"))  # nothing partial left behind


def test_bad_file_fails_alone_and_names_the_file(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [300, 300], features=4, row_group_size=100)
    (tmp_path / "in" / "part-0001.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    save_mlp(tmp_path / "m.pt", [4, 1])
    report = run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    assert report.status == "failed" and (report.shards_done, report.shards_failed) == (1, 1)
    assert "part-0001.parquet" in report.errors[0]["error"]
    assert read_output(tmp_path / "out")["id"].to_pylist() == list(range(300))
    assert not (tmp_path / "out" / SUCCESS).exists()
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert [s["status"] for s in manifest["shards"]] == ["committed", "failed"]


def test_whole_job_problems_raise_before_anything_is_written(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [100], features=4, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [5, 1])
    with pytest.raises(pipelines.InputError, match="expects 5 input features"):
        run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    with pytest.raises(pipelines.InputError, match="no input files"):
        run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "nothing"), output=str(tmp_path / "out"))
    with pytest.raises(pipelines.OutputConflictError, match="overlaps"):
        run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "in" / "preds"))
    assert not (tmp_path / "out").exists()


def test_lock_held_by_a_live_run(tmp_path: Path) -> None:
    from pipelines.lock import OutputLock
    from basis.storage import resolve

    write_files(tmp_path / "in", [100], features=4, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [4, 1])
    with OutputLock(resolve(str(tmp_path / "out"))):
        with pytest.raises(pipelines.LockHeldError, match="another run holds the lock"):
            run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    (tmp_path / "out" / "_LOCK").write_text(json.dumps({"pid": 2**22 + 7, "host": "elsewhere", "heartbeat": 0}))
    assert run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out")).succeeded
    assert not (tmp_path / "out" / "_LOCK").exists()


@settings(max_examples=4, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(rows=[0, 1], row_group_size=1, shard_rows=1, batch_size=1)  # an empty file among others
@given(
    rows=st.lists(st.integers(min_value=0, max_value=400), min_size=1, max_size=3),
    row_group_size=st.integers(min_value=1, max_value=150),
    shard_rows=st.integers(min_value=1, max_value=500),
    batch_size=st.integers(min_value=1, max_value=300),
)
def test_any_table_any_shard_size_roundtrips(tmp_path: Path, rows: list[int], row_group_size: int,
                                             shard_rows: int, batch_size: int) -> None:
    root = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"
    files = write_files(root / "in", rows, features=3, row_group_size=row_group_size)
    model = save_mlp(root / "m.pt", [3, 4, 1], seed=sum(rows))
    report = run(model=str(root / "m.pt"), input=str(root / "in"), output=str(root / "out"),
                 shard_rows=shard_rows, batch_size=batch_size)
    assert report.succeeded and report.rows_out == sum(rows)
    out = read_output(root / "out")
    assert out.column("id").to_pylist() == list(range(sum(rows)))
    expected = pa.concat_tables([pq.read_table(f) for f in files])
    if sum(rows):
        want = reference(model, np.stack([expected[f"f{j:02d}"].to_numpy() for j in range(3)], axis=1))[:, 0]
        np.testing.assert_allclose(out["prediction"].to_numpy(), want, rtol=1e-5, atol=1e-7)
    shutil.rmtree(root)
