"""Issue 15, item 2: flat float32 feature columns decoded from their PLAIN pages straight into the stacking matrix
(`workers/plain_pages.py`): the same values as pyarrow's decode, bit for bit, for every codec and page version it
takes; everything else (dictionary pages, nulls, other types, nesting) left to pyarrow; and a whole run over such
files predicting, rejecting and failing exactly as a run over the same rows in files it does not take."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import reference, save_mlp

import pipelines
import workers.plain_pages
import workers.reader
from basis.storage import resolve
from workers.plain_pages import plain_columns, prefetch, stack_row_group
from workers.reader import ParquetSource, iter_batches


def _values(rows: int, width: int, seed: int) -> np.ndarray:
    """(width, rows) float32 with the values a decoder may get wrong: NaN, +-inf, -0.0, subnormals, extremes."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((width, rows)).astype(np.float32)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, -3.4e38, 3.4e38], np.float32)
    values[0, : len(specials)] = specials
    values[-1, rows - 3:] = [np.nan, 1e-40, -0.0]
    return values


def _write(path: Path, values: np.ndarray, *, nullable: bool = True, **options: Any) -> pa.Table:
    width, rows = values.shape
    schema = pa.schema([pa.field("id", pa.int64(), nullable=nullable)]
                       + [pa.field(f"f{j}", pa.float32(), nullable=nullable) for j in range(width)])
    table = pa.Table.from_arrays([pa.array(np.arange(rows)), *map(pa.array, values)], schema=schema)
    pq.write_table(table, path, **{"use_dictionary": False, **options})
    return table


def _stack(path: Path, width: int, group: int = 0,
           open_file: Any = pa.OSFile) -> tuple[np.ndarray, np.ndarray] | None:
    parquet = pq.ParquetFile(path)
    meta = parquet.metadata
    plan = plain_columns(meta, parquet.schema_arrow, [f"f{j}" for j in range(width)], check=True)
    assert plan is not None
    with open_file(str(path)) as handle:
        return stack_row_group(handle, meta.row_group(group), plan)


@pytest.mark.parametrize("compression", ["snappy", "zstd", "gzip", "brotli", "lz4", "none"])
@pytest.mark.parametrize("version", ["1.0", "2.0"])
@pytest.mark.parametrize("nullable", [True, False])
def test_plain_pages_decode_bit_for_bit_what_pyarrow_decodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            compression: str, version: str, nullable: bool) -> None:
    into = []  # pages decompressed straight into the matrix (`_into`: snappy and zstd)
    real = workers.plain_pages._into
    monkeypatch.setattr(workers.plain_pages, "_into", lambda *args: into.append(real(*args)) or into[-1])
    values = _values(5000, 6, seed=1)
    path = tmp_path / "p.parquet"
    # small pages: many per chunk, the last one short
    _write(path, values, nullable=nullable, compression=compression, data_page_version=version,
           data_page_size=3000, row_group_size=4500)
    parquet = pq.ParquetFile(path)
    assert parquet.metadata.row_group(0).column(1).compression == {"none": "UNCOMPRESSED"}.get(
        compression, compression.upper())
    # read into the thread's scratch buffer, or sliced from a file in memory or memory-mapped
    in_memory = lambda name: pa.BufferReader(Path(name).read_bytes())  # noqa: E731
    for open_file in (pa.OSFile, pa.memory_map, in_memory):
        for group, (start, stop) in enumerate([(0, 4500), (4500, 5000)]):
            stacked = _stack(path, 6, group, open_file)
            assert stacked is not None
            matrix, sums = stacked
            expected = values[:, start:stop]
            np.testing.assert_array_equal(matrix.view(np.uint32), expected.view(np.uint32))  # NaN payloads, -0.0
            with np.errstate(invalid="ignore", over="ignore"):
                np.testing.assert_array_equal(sums, expected.sum(axis=0, dtype=np.float32))
    # (a v2 page the writer left uncompressed, random floats snappy cannot shrink, is copied as it is)
    assert (into and (version == "2.0" or all(into))) if compression in ("snappy", "zstd") else not into


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_a_page_decompressed_in_place_leaves_the_bytes_before_it_as_they_were(tmp_path: Path, version: str) -> None:
    """`_into` decompresses a v1 page's levels into the bytes before its values and puts them back; with no
    room before them it declines (the caller copies), and a page with a null is refused either way."""
    from workers.plain_pages import _SLACK, _into, _page_table, _read, _Unsupported

    values = np.tile(_values(300, 1, seed=4), 10)  # repeats: compressed pages in v2 too (random floats are not)
    _write(tmp_path / "p.parquet", values, compression="snappy", data_page_version=version, data_page_size=4000)
    chunk = pq.ParquetFile(tmp_path / "p.parquet").metadata.row_group(0).column(1)
    with pa.OSFile(str(tmp_path / "p.parquet")) as handle:
        data = _read(handle, chunk.data_page_offset, chunk.total_compressed_size)
    pages = _page_table(data)
    assert len(pages) > 2
    memory = np.full(_SLACK + 4 * 3000, 0xAB, np.uint8)
    at = _SLACK
    for page in pages:
        assert _into(workers.plain_pages._INTO["SNAPPY"], data, page, 1, memory, at)
        at += 4 * page.count
    assert (memory[:_SLACK] == 0xAB).all()  # the slack before the first page, put back
    np.testing.assert_array_equal(memory[_SLACK:].view(np.uint32), values[0].view(np.uint32))
    if version == "1.0":  # its levels need room before the values: none at the very start
        assert not _into(workers.plain_pages._INTO["SNAPPY"], data, pages[0], 1, memory, 0)
    with_null = pa.table({"f0": pa.array(values[0], mask=np.arange(3000) == 7)})
    pq.write_table(with_null, tmp_path / "n.parquet", use_dictionary=False, write_statistics=False,
                   data_page_version=version, compression="snappy")
    chunk = pq.ParquetFile(tmp_path / "n.parquet").metadata.row_group(0).column(0)
    with pa.OSFile(str(tmp_path / "n.parquet")) as handle:
        data = _read(handle, chunk.data_page_offset, chunk.total_compressed_size)
    memory[:] = 0xAB
    with pytest.raises(_Unsupported):
        for page in _page_table(data):
            if not _into(workers.plain_pages._INTO["SNAPPY"], data, page, 1, memory, _SLACK):
                raise _Unsupported("declined: the caller's own check refuses it")
    assert (memory[:_SLACK] == 0xAB).all()


def test_a_chunk_it_does_not_take_is_left_to_pyarrow(tmp_path: Path) -> None:
    values = _values(2000, 3, seed=2)
    _write(tmp_path / "dict.parquet", values, use_dictionary=True)
    assert _stack(tmp_path / "dict.parquet", 3) is None  # a dictionary page
    with_null = pa.table({"id": pa.array(np.arange(2000)), "f0": pa.array(values[0]),
                          "f1": pa.array(values[1], mask=np.arange(2000) == 1999), "f2": pa.array(values[2])})
    pq.write_table(with_null, tmp_path / "null.parquet", use_dictionary=False)
    assert _stack(tmp_path / "null.parquet", 3) is None  # its statistics count a null
    for version in ("1.0", "2.0"):  # no statistics: the page with the null holds one value fewer than rows
        pq.write_table(with_null, tmp_path / "null.parquet", use_dictionary=False, write_statistics=False,
                       data_page_version=version)
        assert _stack(tmp_path / "null.parquet", 3) is None
    # the file's part: a float64, a nested float32, a list: no plan at all
    for column in (pa.array(values[0].astype(np.float64)),
                   pa.StructArray.from_arrays([pa.array(values[0])], ["x"]),
                   pa.array(list(values.T[:, :2]), pa.list_(pa.float32()))):
        table = pa.table({"id": pa.array(np.arange(2000)), "f0": column})
        pq.write_table(table, tmp_path / "other.parquet", use_dictionary=False)
        parquet = pq.ParquetFile(tmp_path / "other.parquet")
        assert plain_columns(parquet.metadata, parquet.schema_arrow, ["f0"], check=True) is None


def _run(count: int, value: int) -> bytes:
    """An RLE run: its header (count << 1) as a ULEB128 varint, then the value in one byte."""
    header, out = count << 1, bytearray()
    while header >= 0x80:
        out.append(header & 0x7F | 0x80)
        header >>= 7
    return bytes([*out, header, value])


def test_a_row_group_with_a_null_is_decoded_by_pyarrow_and_the_others_stacked(tmp_path: Path) -> None:
    values = _values(3000, 4, seed=3)
    mask = np.zeros(3000, bool)
    mask[1500] = True  # in the second of three row groups
    table = pa.table({"id": pa.array(np.arange(3000)), **{f"f{j}": pa.array(values[j], mask=mask if j == 2 else None)
                                                          for j in range(4)}})
    pq.write_table(table, tmp_path / "p.parquet", use_dictionary=False, row_group_size=1000)
    location = resolve(str(tmp_path / "p.parquet"))
    parquet = ParquetSource(location, location.path, str(tmp_path / "p.parquet"))
    names = [f"f{j}" for j in range(4)]
    plan = plain_columns(parquet.metadata, parquet.schema_arrow, names, check=True)
    batches = list(iter_batches(parquet, (0, 3), ["id", *names], 400, "p", plain=plan))
    assert [b.row_group for b in batches] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [b.stacked is not None for b in batches] == [True] * 3 + [False] * 3 + [True] * 3
    for batch in batches:
        rows = np.arange(batch.first_row, batch.first_row + batch.data.num_rows)
        assert batch.data.column("id").to_pylist() == rows.tolist()
        if batch.stacked is None:
            assert batch.data.schema.names == ["id", *names]
            continue
        assert batch.data.schema.names == ["id"]
        np.testing.assert_array_equal(batch.stacked, values[:, rows])
        with np.errstate(invalid="ignore", over="ignore"):
            np.testing.assert_array_equal(batch.sums, values[:, rows].sum(axis=0, dtype=np.float32))


@pytest.mark.parametrize("mode", ["quarantine", "keep", "fail"])
def test_a_run_over_plain_pages_predicts_and_rejects_as_one_over_dictionary_pages(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                                  mode: str) -> None:
    rows, width = 6000, 5
    values = _values(rows, width, seed=4)
    values[:, 2600] = 1.0
    values[3, 2600] = np.nan  # (values[0] holds the specials in rows 0-6, values[-1] a NaN at rows - 3)
    if mode == "fail":  # the first invalid row in the second row group's second batch
        values[0, :7] = values[-1, rows - 3:] = 0.5
    model = save_mlp(tmp_path / "m.pt", [width, 8, 1], seed=6)
    stacked: list[bool] = []
    decode_plain = workers.reader.stack_row_group

    def spy(*args: Any, **kwargs: Any) -> Any:
        done = decode_plain(*args, **kwargs)
        stacked.append(done is not None)
        return done

    monkeypatch.setattr(workers.reader, "stack_row_group", spy)
    results = {}
    for pages in ("plain", "dictionary"):
        (tmp_path / pages).mkdir()
        _write(tmp_path / pages / "p.parquet", values, use_dictionary=pages == "dictionary", row_group_size=2000)
        for cpus in (1, 2):
            out = tmp_path / f"out-{pages}-{cpus}"
            run = lambda: pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / pages),  # noqa: E731
                                        output=str(out), features=[f"f{j}" for j in range(width)], batch_size=512,
                                        cpus_per_replica=cpus, invalid_rows=mode, progress=False)
            report = run()
            if mode == "fail":
                assert report.status == "failed" and report.shards_failed == 1
                results[pages, cpus] = report.errors[0]["error"]
                continue
            assert report.complete
            output = pq.read_table(out / "p-00000.parquet")
            rejected = (pq.read_table(out / "_rejected" / "p-00000.parquet")
                        if (out / "_rejected").exists() else None)
            results[pages, cpus] = (output, rejected)
    assert any(stacked) and not all(stacked)  # both paths ran: plain pages stacked, dictionary ones not
    for cpus in (1, 2):
        plain, dictionary = results["plain", cpus], results["dictionary", cpus]
        if mode == "fail":
            assert plain.replace("/plain/", "/dictionary/") == dictionary, (plain, dictionary)
            assert "plain/p.parquet: row 2600 (row group 1): null, NaN or inf in feature 'f3'" in plain, plain
            continue
        assert plain[0].column_names == dictionary[0].column_names == ["id", "prediction"]
        assert plain[0]["id"].equals(dictionary[0]["id"])
        np.testing.assert_allclose(plain[0]["prediction"].to_numpy(), dictionary[0]["prediction"].to_numpy(),
                                   rtol=1e-6)
        if mode == "keep":
            assert plain[1] is None and plain[0].num_rows == rows
            continue
        bad = ~np.isfinite(values).all(axis=0)
        # the rejected rows with their features, exact (NaN payloads too), and the same reasons
        assert plain[1].schema.equals(dictionary[1].schema)
        assert plain[1].column_names == ["id", *(f"f{j}" for j in range(width)), "reason"]
        assert plain[1]["id"].to_pylist() == dictionary[1]["id"].to_pylist() == np.flatnonzero(bad).tolist()
        assert plain[1]["reason"].to_pylist() == dictionary[1]["reason"].to_pylist()
        for table in (plain[1], dictionary[1]):
            rejected = np.stack([table[f"f{j}"].to_numpy() for j in range(width)])
            np.testing.assert_array_equal(rejected.view(np.uint32), values[:, bad].view(np.uint32))
        good = np.flatnonzero(~bad)
        assert plain[0]["id"].to_pylist() == good.tolist()
        expected = reference(model, values[:, good].T)[:, 0]
        np.testing.assert_allclose(plain[0]["prediction"].to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_features_written_out_are_decoded_by_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = _values(3000, 3, seed=5)
    values[:, :8] = values[:, -3:] = 0.5  # no invalid row
    (tmp_path / "in").mkdir()
    _write(tmp_path / "in" / "p.parquet", values, row_group_size=1000)
    save_mlp(tmp_path / "m.pt", [3, 4, 1], seed=1)
    calls: list[object] = []
    monkeypatch.setattr(workers.reader, "stack_row_group", lambda *args, **kwargs: calls.append(args))
    report = pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                           features=["f0", "f1", "f2"], keep_features=True, batch_size=256, progress=False)
    assert report.complete and calls == []
    output = pq.read_table(tmp_path / "out" / "p-00000.parquet")
    np.testing.assert_array_equal(output["f1"].to_numpy(), values[1])


def test_one_thread_of_a_shard_decodes_pages_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two decoding threads take turns in the page loop (`Plan.turn`), each still decoding its own row groups."""
    values = _values(8000, 4, seed=7)
    values[:, :8] = values[:, -3:] = 0.5
    (tmp_path / "in").mkdir()
    _write(tmp_path / "in" / "p.parquet", values, row_group_size=1000)
    save_mlp(tmp_path / "m.pt", [4, 4, 1], seed=2)
    inside, most, threads = [0], [0], set()
    lock = threading.Lock()
    decode_pages = workers.plain_pages._decode

    def spy(*args: Any) -> Any:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            threads.add(threading.get_ident())
        time.sleep(0.02)  # long enough for the other thread to arrive meanwhile
        try:
            return decode_pages(*args)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(workers.plain_pages, "_decode", spy)
    report = pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                           features=[f"f{j}" for j in range(4)], batch_size=256, cpus_per_replica=2,
                           shard_rows=8000, progress=False)
    assert report.complete and report.rows_out == 8000
    assert len(threads) == 2 and most[0] == 1


def test_a_remote_row_group_is_read_in_one_window_unless_other_columns_lie_between(tmp_path: Path) -> None:
    """`prefetch`: the feature chunks in one read, decoded from it with no read of the file; with a large column between two of them, pyarrow's
    reads (which fetch only what they need) are left the row group."""
    values = _values(4000, 2, seed=7)
    text = pa.array([f"{i:064d}" for i in range(4000)])  # ~260 kB a row group, between f0 and f1
    for name, columns in (("together", {"f0": values[0], "f1": values[1], "s": text}),
                          ("apart", {"f0": values[0], "s": text, "f1": values[1]})):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table(columns), path, use_dictionary=False, compression="none", row_group_size=2000)
        parquet = pq.ParquetFile(path)
        plan = plain_columns(parquet.metadata, parquet.schema_arrow, ["f0", "f1"], check=False)
        assert plan is not None
        reads: list[int] = []
        with pa.OSFile(str(path)) as handle:
            windows = []
            for g in range(2):  # one fetch at a time on a handle, as the reader's
                fetching = prefetch(_Counted(handle, reads), parquet.metadata.row_group(g), plan)
                windows.append(None if fetching is None else fetching.result())
        if name == "apart":
            assert windows == [None, None] and reads == []  # nothing fetched: pyarrow reads it
            continue
        assert len(reads) == 2  # one read a row group
        stacked = [stack_row_group(None, parquet.metadata.row_group(g), plan, window=w)  # type: ignore[arg-type]
                   for g, w in enumerate(windows)]
        matrix = np.concatenate([s[0] for s in stacked], axis=1)  # type: ignore[index]
        assert matrix.tobytes() == values.tobytes()


class _Counted:
    """A file whose `read_buffer` calls are counted (their sizes), as a remote file's requests."""

    def __init__(self, handle: pa.NativeFile, reads: list[int]) -> None:
        self.handle, self.reads = handle, reads

    def seek(self, offset: int) -> int:
        return self.handle.seek(offset)

    def read_buffer(self, size: int) -> pa.Buffer:
        self.reads.append(size)
        return self.handle.read_buffer(size)


def test_a_forked_child_fetches_windows_with_threads_of_its_own(tmp_path: Path) -> None:
    """A program that forks after a run on an object store: the child's windows still come."""
    import os

    values = _values(1000, 2, seed=8)
    path = tmp_path / "p.parquet"
    _write(path, values)
    parquet = pq.ParquetFile(path)
    plan = plain_columns(parquet.metadata, parquet.schema_arrow, ["f0", "f1"], check=False)
    assert plan is not None
    with pa.OSFile(str(path)) as handle:
        assert prefetch(handle, parquet.metadata.row_group(0), plan).result() is not None  # type: ignore[union-attr]
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its window comes within 10 s
        try:
            with pa.OSFile(str(path)) as handle:
                future = prefetch(handle, parquet.metadata.row_group(0), plan)
                os._exit(0 if future is not None and future.result(timeout=10) is not None else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:  # a child stuck for another reason fails, not hangs
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child did not end within 60 s")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_deleted_rows_are_left_out_of_pages_decoded_as_of_pyarrow_batches(tmp_path: Path) -> None:
    """A file with deleted rows (a Delta deletion vector, Iceberg position deletes) is decoded from its
    pages too: each batch holds the same live rows, ids and features, as pyarrow's path gives."""
    values = _values(5000, 3, seed=9)
    values[1, 4321] = np.nan  # an invalid row that stays live: its sum says so
    _write(tmp_path / "p.parquet", values, row_group_size=2000)
    location = resolve(str(tmp_path))
    names = ["f0", "f1", "f2"]
    deleted = np.array([0, 1, 2, 1999, 2000, 2500, *range(3000, 3300), 4999], np.int64)
    got = {}
    for plain in (True, False):
        parquet = ParquetSource(location, str(tmp_path / "p.parquet"), "p.parquet")
        plan = plain_columns(parquet.metadata, parquet.schema_arrow, names, check=True) if plain else None
        batches = list(iter_batches(parquet, (0, 3), ["id", *names], 700, "p.parquet", deleted=deleted, plain=plan))
        assert all((b.stacked is not None) == plain for b in batches)
        ids = np.concatenate([b.data.column("id").to_numpy() for b in batches])
        features = (np.concatenate([b.stacked for b in batches], axis=1) if plain else  # type: ignore[misc]
                    np.stack([np.concatenate([b.data.column(n).to_numpy() for b in batches]) for n in names]))
        sums = np.concatenate([b.sums for b in batches]) if plain else None  # type: ignore[misc]
        got[plain] = ids, features, sums
    live = np.setdiff1d(np.arange(5000), deleted)
    for ids, features, _ in got.values():
        np.testing.assert_array_equal(ids, live)
        assert features.tobytes() == values[:, live].tobytes()
    expected = values[0, live].copy()  # the check's sums: each column added after the one before
    with np.errstate(invalid="ignore", over="ignore"):
        for row in values[1:, live]:
            expected += row
    np.testing.assert_array_equal(got[True][2], expected)  # the live rows' own, the NaN in row 4321 too
    assert not np.isfinite(expected[np.flatnonzero(live == 4321)[0]])
