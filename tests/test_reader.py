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
from workers.replica import Replica
from workers.replica_job import ReplicaJob

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
    from basis.storage import resolve
    from workers.decode import decode
    from workers.reader import ParquetSource

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


def _long_strings(rows: int, length: int, distinct: int = 20) -> pa.Array:
    """`distinct` strings of `length` bytes, repeated: Parquet dictionary-encodes them to almost nothing."""
    values = np.array([f"{i:04d}".ljust(length, "x") for i in range(distinct)], dtype=object)
    return pa.array(values[np.arange(rows) % distinct], pa.string())


def test_a_row_group_reported_small_but_decoding_large_is_streamed(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12, item 15: Parquet's "uncompressed" size of a dictionary-encoded string column is its encoded
    size (306 KB for a million rows that decoded to 505 MB): such a row group must not be read whole."""
    from basis.storage import resolve
    from workers import reader
    from workers.decode import decode
    from workers.reader import ParquetSource

    path = tmp_path / "t.parquet"
    rows = 20_000
    table = pa.table({"id": pa.array(np.arange(2 * rows)), "f": pa.array(np.ones(2 * rows, np.float32)),
                      "s": _long_strings(2 * rows, 500)})
    pq.write_table(table, path, row_group_size=rows)
    meta = pq.ParquetFile(path).metadata
    encoded = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i).total_uncompressed_size
               for i in range(3)}
    decoded_s = pq.ParquetFile(path).read_row_group(0, columns=["s"]).nbytes
    assert encoded["s"] * 100 < decoded_s  # the trap: ~10 MB reported as a few KB
    monkeypatch.setattr(reader, "DECODE_BUDGET_BYTES", 4 << 20)  # whole row groups up to 2 MiB

    class Counting(ParquetSource):
        whole = streamed = 0

        def read_row_group(self, *args: Any, **kwargs: Any) -> pa.Table:
            Counting.whole += 1
            return super().read_row_group(*args, **kwargs)

        def iter_batches(self, *args: Any, **kwargs: Any) -> Any:
            Counting.streamed += 1
            return super().iter_batches(*args, **kwargs)

    def read(columns: list[str]) -> tuple[int, int]:
        Counting.whole = Counting.streamed = 0
        source = Counting(resolve(str(path)), str(path), str(path))
        ids = []
        with decode(source, (0, 2), columns, 4096, str(path), features=["f"], list_column=False, width=1,
                    check_invalid=True) as batches:
            for item in batches:
                ids.extend(item.batch.data.column("id").to_pylist())
        assert ids == list(range(2 * rows))
        return Counting.whole, Counting.streamed

    assert read(["id", "s", "f"]) == (0, 2)  # 2 x ~10 MB decoded: streamed, 4096 rows at a time
    assert read(["id", "f"]) == (2, 0)  # 240 KB each: whole, as before


KINDS = {
    "int64_few": pa.array(np.arange(5000) % 3, pa.int64()),
    "float32": pa.array(np.linspace(0, 1, 5000, dtype=np.float32)),
    "bool": pa.array(np.arange(5000) % 2 == 0),
    "decimal": pa.array([None] * 10 + [1] * 4990, pa.int64()).cast(pa.decimal128(24, 2)),
    "timestamp": pa.array(np.full(5000, 1_700_000_000_000, np.int64), pa.timestamp("ms")),
    "string_few": _long_strings(5000, 300),
    "string_many": pa.array([f"{i:08d}" * 8 for i in range(5000)]),
    "large_string": _long_strings(5000, 120).cast(pa.large_string()),
    "binary": _long_strings(5000, 64).cast(pa.binary()),
    "dictionary": _long_strings(5000, 200).dictionary_encode(),
    "list": pa.array([[float(i)] * (i % 7) for i in range(5000)], pa.list_(pa.float32())),
    "list_strings": pa.array([["a" * 90] * (i % 4) for i in range(5000)], pa.list_(pa.string())),
    "struct": pa.StructArray.from_arrays([pa.array(np.arange(5000) % 4, pa.int32()), _long_strings(5000, 80)],
                                         ["n", "s"]),
    "map": pa.array([[("k" * 30, i)] for i in range(5000)], pa.map_(pa.string(), pa.int64())),
}


@pytest.mark.parametrize("dictionary", [True, False], ids=["dictionary", "plain"])
def test_the_decoded_size_estimate_is_not_below_what_arrow_holds(tmp_path: Path, dictionary: bool) -> None:
    from workers.reader import _decoded_bytes, _leaf_types, _leaves

    path = tmp_path / "kinds.parquet"
    pq.write_table(pa.table(KINDS), path, use_dictionary=dictionary)
    parquet = pq.ParquetFile(path)
    meta, types = parquet.metadata, _leaf_types(parquet)
    assert None not in types  # every leaf has its Arrow type
    for name in KINDS:
        estimate = _decoded_bytes(meta.row_group(0), _leaves(meta, [name]), types)
        actual = parquet.read_row_group(0, columns=[name]).nbytes
        assert actual <= estimate, (name, actual, estimate)
        if name != "dictionary" or dictionary:  # PLAIN values read back into a dictionary: far less, never more
            assert estimate < 3 * actual + 4096, (name, actual, estimate)


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_a_replicas_next_shard_stacks_into_the_buffers_the_last_one_left(tmp_path: Path, threads: int) -> None:
    """Issue 15: stacking buffers are kept from shard to shard (`Spares`), not faulted in afresh, and a
    reused buffer never shows a batch another one's values: every matrix is its own batch's features."""
    from basis.storage import resolve
    from workers.decode import decode
    from workers.reader import ParquetSource, Spares

    rows = 16 * 3 * BATCH
    rng = np.random.default_rng(7)
    paths = []
    for k in range(3):
        path = tmp_path / f"t{k}.parquet"
        pq.write_table(pa.table({"id": pa.array(np.arange(rows)), "f": rng.standard_normal(rows).astype(np.float32),
                                 "g": rng.standard_normal(rows).astype(np.float32)}), path, row_group_size=3 * BATCH)
        paths.append(path)
    spares = Spares()
    used: list[set[int]] = []
    for path in paths:
        source = ParquetSource(resolve(str(path)), str(path), str(path))
        buffers: set[int] = set()
        with decode(source, (0, 16), ["id", "f", "g"], BATCH, str(path), features=["f", "g"], list_column=False,
                    width=2, check_invalid=True, threads=threads, spares=spares) as batches:
            for item in batches:
                expected = np.stack([item.batch.data.column(c).to_numpy() for c in ("f", "g")], axis=1)
                assert np.array_equal(item.matrix, expected)
                buffers.add(id(item.matrix.base if item.matrix.base is not None else item.matrix))
                item.release()
        used.append(buffers)
    assert used[1] & used[0] and used[2] & used[1]  # the later shards stacked into the earlier ones' buffers
    assert sum(len(free) for free in spares._free.values()) <= spares.limit


def test_spares_keep_one_shape_and_at_most_their_limit() -> None:
    from workers.reader import Spares

    spares = Spares(limit=2)
    spares.keep([np.empty((2, 4), np.float32) for _ in range(3)])
    assert spares.take((2, 4)) is not None and spares.take((2, 4)) is not None and spares.take((2, 4)) is None
    spares.keep([np.empty((2, 4), np.float32)])
    spares.keep([np.empty((3, 4), np.float32)])  # another job's batch shape: the old buffers go
    assert spares.take((2, 4)) is None and spares.take((3, 4)) is not None


def test_a_thread_predicts_its_whole_row_group_while_the_consumer_is_still_on_another(tmp_path: Path) -> None:
    """Issue 15: with `predict` (the replica's CPU forward in the decoding threads), a predicted batch with no
    bad row keeps no stacking buffer, so a thread may queue all its row group's batches: while the consumer
    still holds the first batch of row group 0, thread 1 predicts all of row group 1 (with a queue of 2 it
    stopped after 2 of its 4 and waited, idle). A batch with a bad row keeps its matrix for the reasons;
    every prediction is its own batch's."""
    from basis.storage import resolve
    from workers.decode import decode
    from workers.reader import ParquetSource

    per_group, groups = 4, 4
    rows = groups * per_group * BATCH
    values = np.arange(rows, dtype=np.float32)
    values[5 * BATCH + 1] = np.nan  # a bad row in row group 1's second batch
    path = tmp_path / "groups.parquet"
    pq.write_table(pa.table({"id": pa.array(np.arange(rows)), "f": values}), path, row_group_size=per_group * BATCH)
    predicted = threading.Semaphore(0)

    def predict(matrix: np.ndarray, bad: np.ndarray | None) -> np.ndarray:
        predicted.release()
        return (matrix if bad is None else matrix[~bad])[:, 0].copy()

    source = ParquetSource(resolve(str(path)), str(path), str(path))
    seen = []
    with decode(source, (0, groups), ["id", "f"], BATCH, str(path), features=["f"], list_column=False, width=1,
                check_invalid=True, threads=2, predict=predict) as batches:
        for index, item in enumerate(batches):
            if index == 0:  # row group 0's and row group 1's batches are all predicted before this one is let go
                for k in range(2 * per_group):
                    assert predicted.acquire(timeout=SHARD_SECONDS), f"only {k} batches predicted"
            ids = item.batch.data.column("id").to_numpy()
            if item.bad is None:
                assert item.matrix is None
                np.testing.assert_array_equal(item.predicted, ids.astype(np.float32))
            else:
                assert item.matrix is not None and np.isnan(item.matrix[item.bad, 0]).all()
                np.testing.assert_array_equal(item.predicted, ids[~item.bad].astype(np.float32))
            seen.append(ids)
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(rows))


def test_a_small_local_file_is_read_whole_once_and_decoded_from_memory(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from basis.storage import resolve
    from workers import reader

    table = pa.table({"id": pa.array(range(300), pa.int64()), "f0": pa.array(np.arange(300, dtype=np.float32))})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=100)
    location = resolve(str(tmp_path))
    small = reader.open_parquet(location, str(path), str(path))
    assert isinstance(small.handle, pa.BufferReader) and small.handle.size() == path.stat().st_size
    path.unlink()  # nothing more is read from the file
    batches = reader.iter_batches(small, (1, 3), ["id"], 64, "t")
    assert [i for batch in batches for i in batch.data.column("id").to_pylist()] == list(range(100, 300))
    pq.write_table(table, path, row_group_size=100)
    monkeypatch.setattr(reader, "SMALL_FILE_BYTES", path.stat().st_size - 1)  # a larger file: read by ranges
    large = reader.open_parquet(location, str(path), str(path))
    assert not isinstance(large.handle, pa.BufferReader)
    assert [i for b in reader.iter_batches(large, (0, 3), ["id"], 64, "t") for i in b.data.column("id").to_pylist()] \
        == list(range(300))


def _predicting_decode(path: Path, groups: int, threads: int, predict: Any, *, list_column: bool = False,
                       width: int = 1) -> list[Any]:
    """`decode` of `path`'s row groups with `predict`, consumed on a thread of its own (a hang fails the test)."""
    from basis.storage import resolve
    from workers.decode import decode
    from workers.reader import ParquetSource

    items: list[Any] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            source = ParquetSource(resolve(str(path)), str(path), str(path))
            with decode(source, (0, groups), ["id", "f"], BATCH, str(path), features=["f"], list_column=list_column,
                        width=width, check_invalid=True, threads=threads, predict=predict) as batches:
                for item in batches:
                    ids = item.batch.data.column("id").to_numpy()
                    items.append((ids, item.bad, item.predicted))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=consume, name="test-reader-predict", daemon=True)
    thread.start()
    thread.join(SHARD_SECONDS)
    assert not thread.is_alive(), f"{threads} thread(s): the decoder stalled after {len(items)} batch(es)"
    if errors:
        raise errors[0]
    return items


def test_a_thread_with_no_row_group_left_predicts_the_batches_of_another_threads(tmp_path: Path) -> None:
    """Issue 15: in a shard's last row group one thread stacked and predicted all its batches while the
    other, done with its own, waited. Now it takes batches of the other's decoded row group: here thread 0
    is held in its first batch's forward until another thread has predicted row group 0's last batch (before,
    no thread but 0 ever did: it waited out the timeout). Order and each batch's prediction are unchanged."""
    per_group, groups = 4, 2
    rows = groups * per_group * BATCH
    path = tmp_path / "two.parquet"
    pq.write_table(pa.table({"id": pa.array(np.arange(rows)), "f": np.arange(rows, dtype=np.float32)}), path,
                   row_group_size=per_group * BATCH)
    last = threading.Event()
    who: dict[int, int] = {}

    def predict(matrix: np.ndarray, bad: np.ndarray | None) -> np.ndarray:
        first = int(matrix[0, 0])
        who[first] = threading.get_ident()
        if first == (per_group - 1) * BATCH:  # row group 0's last batch
            last.set()
        if first == 0:
            last.wait(SHARD_SECONDS / 4)
        return matrix[:, 0].copy()

    items = _predicting_decode(path, groups, 2, predict)
    assert last.is_set() and who[(per_group - 1) * BATCH] != who[0], "no other thread helped with row group 0"
    np.testing.assert_array_equal(np.concatenate([ids for ids, _, _ in items]), np.arange(rows))
    for ids, _, predicted in items:
        np.testing.assert_array_equal(predicted, ids.astype(np.float32))


@pytest.mark.parametrize("list_column", [False, True])
def test_no_thread_count_row_group_length_or_bad_rows_deadlock_threads_that_help_each_other(
        tmp_path: Path, list_column: bool) -> None:
    """Threads that take each other's batches (with `predict`): for any thread count, batches per row group and
    bad rows (which keep their buffer), every batch comes once, in order, with its own prediction."""
    rng = np.random.default_rng(11)
    groups = 6
    width = 2 if list_column else 1

    def predict(matrix: np.ndarray, bad: np.ndarray | None) -> np.ndarray:
        if rng.random() < 0.2:  # uneven forward passes shuffle which thread takes what
            threading.Event().wait(0.002)
        return (matrix if bad is None else matrix[~bad])[:, 0].copy()

    for per_group in (1, 2, 3, 5, 8):
        rows = groups * per_group * BATCH - 3
        values = np.arange(rows, dtype=np.float32)
        values[rng.choice(rows, size=rows // 25, replace=False)] = np.nan  # bad rows in some batches
        column = pa.array(list(zip(values, values))) if list_column else pa.array(values)
        path = tmp_path / f"g{per_group}.parquet"
        pq.write_table(pa.table({"id": pa.array(np.arange(rows)), "f": column}), path,
                       row_group_size=per_group * BATCH)
        for threads in (2, 3, 5, 16):
            items = _predicting_decode(path, groups, threads, predict, list_column=list_column, width=width)
            np.testing.assert_array_equal(np.concatenate([ids for ids, _, _ in items]), np.arange(rows))
            for ids, bad, predicted in items:
                good = ids if bad is None else ids[~bad]
                np.testing.assert_array_equal(predicted, good.astype(np.float32), err_msg=f"{per_group} {threads}")
                assert bad is None or np.isnan(values[ids[bad]]).all()
