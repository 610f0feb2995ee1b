"""Issue 15, item 2: stacking and the invalid-row check in one pass (`workers/stacking.py`), integer columns left
out of the check only where the decoded batch proves them null-free, and the CPU forward pass run in the decoding
threads (`decode`'s `predict`) with the same predictions, rejections and failures as before."""

from __future__ import annotations

import decimal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import reference, save_mlp

import pipelines
from workers.replica import Replica
from workers.replica_job import ReplicaJob
from workers.stacking import can_hold_invalid, feature_matrix, invalid_rows, stack_checked


def _exact_bad(matrix: np.ndarray) -> np.ndarray | None:
    bad = ~np.isfinite(matrix).all(axis=1)
    return bad if bad.any() else None


def _mixed_batch(rows: int, seed: int, *, spoil: bool) -> pa.RecordBatch:
    """Columns of every kind a feature may have; with `spoil`, each kind's invalid values in some rows."""
    rng = np.random.default_rng(seed)
    ints = rng.integers(-(2**62), 2**62, rows)
    floats = rng.standard_normal(rows)
    cols: dict[str, pa.Array] = {
        "i8": pa.array(rng.integers(-128, 127, rows), pa.int8()),
        "i64": pa.array(ints, pa.int64(), mask=(np.arange(rows) % 7 == 3) if spoil else None),
        "u64": pa.array(rng.integers(0, 2**63, rows).astype(np.uint64) * 2, pa.uint64()),
        "b": pa.array(rng.integers(0, 2, rows).astype(bool)),
        "f16": pa.array(floats.astype(np.float16)),
        "f32": pa.array(np.where(np.arange(rows) % 11 == 5, np.nan, floats) if spoil else floats, pa.float32()),
        "f64": pa.array(np.where(np.arange(rows) % 13 == 6, 1e300, floats) if spoil else floats, pa.float64()),
        "big": pa.array(np.full(rows, 3e38), pa.float32()),  # finite, but two of them overflow a float32 sum
        "d": pa.array([decimal.Decimal(int(v)) for v in ints % 1000], pa.decimal128(10, 0)),
    }
    if spoil:
        f32 = cols["f32"].to_numpy(zero_copy_only=False).copy()
        f32[1], f32[2] = np.inf, -np.inf
        cols["f32"] = pa.array(f32, pa.float32())
    return pa.record_batch(cols)


@pytest.mark.parametrize("spoil", [False, True])
def test_the_fused_check_finds_exactly_the_rows_the_full_check_finds(spoil: bool) -> None:
    batch = _mixed_batch(1000, seed=3, spoil=spoil)
    features = batch.schema.names + ["big"]  # "big" twice: its row sums overflow, and no row is invalid for it
    out = np.full((len(features), 1000), 7.0, np.float32)  # a reused buffer holding another batch's values
    matrix, bad = stack_checked(batch, features, False, len(features), out)
    expected = feature_matrix(batch, features, False, len(features))
    np.testing.assert_array_equal(matrix, expected)
    exact = _exact_bad(expected)
    assert (bad is None) == (exact is None) == (not spoil)
    if spoil:
        np.testing.assert_array_equal(bad, exact)
        assert bad[1] and bad[2] and bad[3] and bad[5] and bad[6] and not bad[0]
        np.testing.assert_array_equal(bad, invalid_rows(expected))


def test_only_integer_and_boolean_columns_proven_null_free_by_the_batch_skip_the_check() -> None:
    assert not can_hold_invalid(pa.array([1, 2, 3], pa.int64()))
    assert not can_hold_invalid(pa.array([True, False]))
    assert can_hold_invalid(pa.array([1, None, 3], pa.int64()))  # a null becomes NaN
    assert can_hold_invalid(pa.array([1.0, 2.0], pa.float32()))  # may hold NaN or inf, whatever it holds now
    assert can_hold_invalid(pa.array([decimal.Decimal(1)], pa.decimal128(5, 0)))
    # the null count is the decoded batch's own, not the file's: a slice without the null has none
    assert not can_hold_invalid(pa.array([1, 2, None], pa.int64()).slice(0, 2))


def test_nulls_in_integer_features_are_caught_when_the_file_has_no_statistics(tmp_path: Path) -> None:
    """Parquet statistics are never trusted to skip the check: a file without them (or with wrong ones) is
    checked from its decoded values. Also a NaN or inf in a float column next to null-free integers."""
    rows = 600
    ids = np.arange(rows)
    ints = pa.array(ids % 50, pa.int64(), mask=np.isin(ids, [10, 333, 599]))
    floats = np.linspace(-1, 1, rows).astype(np.float32)
    floats[[20, 400]] = [np.nan, np.inf]
    table = pa.table({"id": pa.array(ids), "a": ints, "b": pa.array(ids % 3, pa.int32()), "c": floats})
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "p.parquet", row_group_size=100, write_statistics=False)
    assert not pq.ParquetFile(tmp_path / "in" / "p.parquet").metadata.row_group(0).column(1).is_stats_set
    model = save_mlp(tmp_path / "m.pt", [3, 4, 1], seed=2)
    report = pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                           features=["a", "b", "c"], batch_size=64, progress=False)
    assert report.complete and (report.rows_out, report.rows_rejected) == (rows - 5, 5)
    rejected = pq.read_table(tmp_path / "out" / "_rejected" / "p-00000.parquet")
    assert rejected["id"].to_pylist() == [10, 20, 333, 400, 599]
    assert rejected["reason"].to_pylist()[:2] == ["null, NaN or inf in feature 'a'", "null, NaN or inf in feature 'c'"]


def _replica_job(tmp: Path, plan: pipelines.Plan, **extra: Any) -> ReplicaJob:
    return ReplicaJob(model=str(tmp / "m.pt"), model_sha256=plan.model.sha256, input=str(tmp / "in"),
                      output=str(tmp / "out"), features=plan.columns.features, passthrough=plan.columns.passthrough,
                      list_column=False, width=plan.columns.width, prediction_column="prediction",
                      keep_features=False, **extra)


@pytest.mark.parametrize("mode", ["quarantine", "keep", "fail"])
def test_a_two_thread_replica_predicts_in_its_decoding_threads_as_one_thread_does(tmp_path: Path, mode: str) -> None:
    rows, width = 3000, 5
    rng = np.random.default_rng(11)
    features = rng.standard_normal((rows, width)).astype(np.float32)
    features[[5, 1234, 2999], [0, 3, 4]] = [np.nan, np.inf, np.nan]
    table = pa.table({"id": pa.array(np.arange(rows)), **{f"f{j}": features[:, j] for j in range(width)}})
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "p.parquet", row_group_size=250)
    model = save_mlp(tmp_path / "m.pt", [width, 8, 1], seed=5)
    plan = pipelines.plan(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    outputs = {}
    for cpus in (1, 2):
        job = _replica_job(tmp_path, plan, cpus=cpus, batch_size=100, invalid_rows=mode)
        job = ReplicaJob(**{**job.__dict__, "output": str(tmp_path / f"out{cpus}")})
        replica = Replica(0, job, in_driver=True)
        try:
            calls: list[str] = []
            predict = replica._predict

            def spy(matrix: np.ndarray, bad: np.ndarray | None) -> Any:
                calls.append(threading.current_thread().name)
                return predict(matrix, bad)

            replica._predict = spy  # type: ignore[method-assign]
            result = replica.process(plan.todo[0].to_task())
        finally:
            replica.close()
        assert (len(calls) > 0) == (cpus == 2)  # one decoding thread: the shard's loop runs the forward
        assert all(name != threading.current_thread().name for name in calls)
        if mode == "fail":
            assert result["status"] == "failed" and "row 5 (row group 0)" in result["error"], result
            assert not list((tmp_path / f"out{cpus}").rglob("*.parquet"))
            continue
        assert result["status"] == "committed", result
        outputs[cpus] = pq.read_table(tmp_path / f"out{cpus}" / plan.todo[0].output)
    if mode == "fail":
        return
    assert outputs[1]["id"].equals(outputs[2]["id"])
    np.testing.assert_array_equal(outputs[1]["prediction"].to_numpy(), outputs[2]["prediction"].to_numpy())  # NaN too
    keep = np.arange(rows) if mode == "keep" else np.setdiff1d(np.arange(rows), [5, 1234, 2999])
    assert outputs[2]["id"].to_pylist() == keep.tolist()
    expected = reference(model, features[keep])[:, 0]
    np.testing.assert_allclose(outputs[2]["prediction"].to_numpy(zero_copy_only=False), expected, rtol=1e-5,
                               atol=1e-7, equal_nan=True)


def test_decode_runs_predict_in_its_threads_and_hands_results_out_in_order(tmp_path: Path) -> None:
    from basis.storage import resolve
    from workers.decode import decode
    from workers.reader import ParquetSource

    path = tmp_path / "t.parquet"
    values = np.arange(12 * 40, dtype=np.float32)
    pq.write_table(pa.table({"id": pa.array(np.arange(values.size)), "f": values}), path, row_group_size=40)
    source = ParquetSource(resolve(str(path)), str(path), str(path))
    threads: set[str] = set()

    def predict(matrix: np.ndarray, bad: np.ndarray | None) -> np.ndarray:
        threads.add(threading.current_thread().name)
        return matrix[:, 0] * 2  # a copy: the buffer goes back to the pool before the consumer sees it used

    seen = []
    with decode(source, (0, 12), ["id", "f"], 16, str(path), features=["f"], list_column=False, width=1,
                check_invalid=True, threads=3, predict=predict) as batches:
        for item in batches:
            np.testing.assert_array_equal(item.predicted, item.batch.data.column("f").to_numpy() * 2)
            seen.append(item.predicted)
    np.testing.assert_array_equal(np.concatenate(seen), values * 2)
    assert len(threads) == 3 and threading.current_thread().name not in threads
