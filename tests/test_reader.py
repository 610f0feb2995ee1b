"""The shard reader (`workers/reader.py`): decoding threads and buffers that cannot deadlock, and a
decode memory budget that holds for columns Parquet reports small but which decode large."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import save_mlp

import pipelines
from workers.replica import Replica, ReplicaJob

BATCH = 8  # rows per batch in the thread x batches grid
GROUPS = 16  # row groups per file: every thread count up to 16 gets row groups of its own
SHARD_SECONDS = 20.0  # a shard of a few thousand rows takes milliseconds; past this it is stuck


def _grid_input(root: Path, batches_per_group: range, width: int) -> None:
    """One file per batches-per-row-group count: GROUPS row groups of that many BATCH-row batches."""
    root.mkdir()
    first = 0
    rng = np.random.default_rng(5)
    for per_group in batches_per_group:
        rows = GROUPS * per_group * BATCH - 3  # the last batch of the last row group is short
        columns: dict[str, Any] = {"id": pa.array(np.arange(first, first + rows), pa.int64())}
        for j in range(width):
            columns[f"f{j}"] = pa.array(rng.standard_normal(rows).astype(np.float32))
        pq.write_table(pa.table(columns), root / f"b{per_group:02d}.parquet", row_group_size=per_group * BATCH)
        first += rows


def _process_with_timeout(replica: Replica, task: dict[str, Any]) -> dict[str, Any]:
    """`replica.process(task)` on a thread of its own; a hang fails the test instead of hanging it."""
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["value"] = replica.process(task)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=work, name="test-reader-process", daemon=True)
    thread.start()
    thread.join(SHARD_SECONDS)
    if thread.is_alive():
        pytest.fail(f"{replica.job.cpus:g} decoding thread(s), shard {task['id']} "
                    f"({task['rows_in']} rows): no result within {SHARD_SECONDS:g} s (deadlocked)")
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_no_thread_count_and_row_group_length_can_deadlock_the_decoder(tmp_path: Path) -> None:
    """Issue 12, item 8: with 5+ decoding threads and row groups of 3+ batches every shard stalled."""
    width, per_group = 3, range(1, 21)
    _grid_input(tmp_path / "in", per_group, width)
    save_mlp(tmp_path / "m.pt", [width, 4, 1])
    plan = pipelines.plan(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                          batch_size=BATCH, shard_rows=1_000_000)
    assert [s.row_groups for s in plan.todo] == [(0, GROUPS)] * len(per_group)  # one whole file per shard
    for threads in range(1, 17):
        job = ReplicaJob(model=str(tmp_path / "m.pt"), model_sha256=plan.model.sha256, input=str(tmp_path / "in"),
                         output=str(tmp_path / f"out-{threads}"), features=plan.columns.features,
                         passthrough=plan.columns.passthrough, list_column=False, width=width,
                         prediction_column="prediction", keep_features=False, batch_size=BATCH, cpus=threads)
        replica = Replica(0, job, in_driver=True, numpy_forward=True)
        try:
            for shard in plan.todo:
                # the file's first `threads` row groups: one per decoding thread (more would add only time)
                meta = pq.ParquetFile(shard.path).metadata
                task = {**shard.to_task(), "row_groups": (0, threads),
                        "rows_in": sum(meta.row_group(i).num_rows for i in range(threads))}
                result = _process_with_timeout(replica, task)
                assert result["status"] == "committed", (threads, shard.id, result)
                ids = pq.read_table(tmp_path / f"out-{threads}" / shard.output)["id"]
                expected = pq.read_table(shard.path, columns=["id"])["id"][: task["rows_in"]]
                assert ids.equals(expected), (threads, shard.id)  # every row once, in order
        finally:
            replica.close()


@pytest.mark.parametrize("threads", [1, 5, 16])
def test_taking_the_next_batch_hands_the_last_ones_buffer_back(tmp_path: Path, threads: int) -> None:
    """A consumer that never calls `release()` still cannot starve the decoder (nor see a reused buffer early)."""
    from pipelines.storage import resolve
    from workers.reader import ParquetSource, decode

    path = tmp_path / "t.parquet"
    rows = 16 * 5 * BATCH
    values = np.arange(rows, dtype=np.float32)
    pq.write_table(pa.table({"id": pa.array(np.arange(rows)), "f": values}), path, row_group_size=5 * BATCH)
    seen: list[np.ndarray] = []

    def consume() -> None:
        source = ParquetSource(resolve(str(path)), str(path), str(path))
        with decode(source, (0, 16), ["id", "f"], BATCH, str(path), features=["f"], list_column=False, width=1,
                    check_invalid=True, threads=threads) as batches:
            for item in batches:  # never released
                assert np.array_equal(item.matrix[:, 0], item.batch.data.column("f").to_numpy())
                seen.append(item.matrix[:, 0].copy())

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(SHARD_SECONDS)
    assert not thread.is_alive(), f"{threads} thread(s): the decoder stalled after {len(seen)} batch(es)"
    assert np.array_equal(np.concatenate(seen), values)
