"""The storage layer without a network: globs, transient-error classification and retries,
staged files (local, and a rename-publishing filesystem), the reader's resume after a transient
error. The same layer against a real S3 API is in test_s3.py."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from basis.errors import ShardDataError, StorageError
from basis.retry import is_transient, retry_transient
from basis.storage import (
    Location,
    StagedFile,
    atomic_sink,
    is_temp,
    read_bytes,
    read_parquet_footer,
    resolve,
    write_bytes_atomic,
)
from basis.listing import glob_matcher, list_files, static_prefix, sweep_temps
from workers import reader
from workers.decode import decode
from workers.reader import ParquetSource, iter_batches, open_parquet

# --- globs ------------------------------------------------------------------------------------

TREE = [
    "in/a.parquet",
    "in/b.parquet",
    "in/c.csv",
    "in/sub/x.parquet",
    "in/sub/deeper/y.parquet",
    "in/day=2024-01-01/part-0.parquet",
    "in/day=2024-01-01/part-1.parquet",
    "in/day=2024-01-02/part-0.parquet",
    "in/day=2024-01-02/_SUCCESS",
    "in/day=2024-01-02/.part-0.parquet.crc",
    "in/_tmp/part-9.parquet",
    "in/.hidden/part-8.parquet",
    "in/p1.parquet",
    "in/p2.parquet",
    "in/p10.parquet",
    "in/data[1]/z.parquet",
    "in/data1/w.parquet",
]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel in TREE:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    return tmp_path


def listed(root: Path, pattern: str) -> tuple[str, list[str]]:
    base, infos = list_files(resolve(str(root / pattern)))
    return os.path.relpath(base, root), [os.path.relpath(i.path, root) for i in infos]


def test_star_stays_within_one_directory(tree: Path) -> None:
    base, files = listed(tree, "in/*.parquet")
    assert base == "in"
    assert files == ["in/a.parquet", "in/b.parquet", "in/p1.parquet", "in/p10.parquet", "in/p2.parquet"]


def test_question_mark_and_character_classes(tree: Path) -> None:
    assert listed(tree, "in/p?.parquet")[1] == ["in/p1.parquet", "in/p2.parquet"]
    assert listed(tree, "in/[ab].parquet")[1] == ["in/a.parquet", "in/b.parquet"]
    assert listed(tree, "in/[!ab]*.parquet")[1] == ["in/p1.parquet", "in/p10.parquet", "in/p2.parquet"]
    assert listed(tree, "in/p[0-9][0-9].parquet")[1] == ["in/p10.parquet"]


def test_hive_partitions_keep_their_directories(tree: Path) -> None:
    base, files = listed(tree, "in/day=*/part-*.parquet")
    assert base == "in"  # the static prefix: outputs mirror day=.../part-... below it
    assert files == ["in/day=2024-01-01/part-0.parquet", "in/day=2024-01-01/part-1.parquet",
                     "in/day=2024-01-02/part-0.parquet"]
    assert listed(tree, "in/day=2024-01-0[2]/*")[1] == ["in/day=2024-01-02/part-0.parquet"]  # _SUCCESS, .crc skipped


def test_double_star_recurses_zero_or_more_directories(tree: Path) -> None:
    base, files = listed(tree, "in/**/*.parquet")
    assert base == "in"
    assert files == ["in/a.parquet", "in/b.parquet", "in/data1/w.parquet", "in/data[1]/z.parquet",
                     "in/day=2024-01-01/part-0.parquet", "in/day=2024-01-01/part-1.parquet",
                     "in/day=2024-01-02/part-0.parquet", "in/p1.parquet", "in/p10.parquet", "in/p2.parquet",
                     "in/sub/deeper/y.parquet", "in/sub/x.parquet"]  # never _tmp/ or .hidden/
    assert listed(tree, "in/sub/**/y.parquet")[1] == ["in/sub/deeper/y.parquet"]
    assert listed(tree, "in/**/deeper/*.parquet")[1] == ["in/sub/deeper/y.parquet"]
    assert listed(tree, "in/sub/**")[1] == ["in/sub/deeper/y.parquet", "in/sub/x.parquet"]
    assert listed(tree, "in/*/*.parquet")[1] == ["in/data1/w.parquet", "in/data[1]/z.parquet",
                                                 "in/day=2024-01-01/part-0.parquet", "in/day=2024-01-01/part-1.parquet",
                                                 "in/day=2024-01-02/part-0.parquet", "in/sub/x.parquet"]


def test_an_existing_path_is_taken_literally(tree: Path) -> None:
    base, files = listed(tree, "in/data[1]")  # a directory whose name holds glob characters
    assert base == "in/data[1]"
    assert files == ["in/data[1]/z.parquet"]
    assert listed(tree, "in/data[1]/z.parquet") == ("in/data[1]", ["in/data[1]/z.parquet"])
    # not an existing path: a glob, where [1] is a class; [[] escapes a literal '['
    assert listed(tree, "in/data[1]/*.parquet")[1] == ["in/data1/w.parquet"]
    assert listed(tree, "in/data[[]1]/*.parquet")[1] == ["in/data[1]/z.parquet"]


def test_nothing_matches(tree: Path) -> None:
    assert listed(tree, "in/*.orc")[1] == []
    assert listed(tree, "nowhere/*.parquet")[1] == []
    assert listed(tree, "in/missing.parquet")[1] == []


def test_static_prefix_and_matcher() -> None:
    assert static_prefix("/d/day=*/x.parquet") == "/d"
    assert static_prefix("/d/x.parquet") == "/d/x.parquet"
    assert static_prefix("/*.parquet") == "/"
    assert static_prefix("bucket/in/**/*.parquet", "*[") == "bucket/in"
    assert static_prefix("bucket/in/p?.parquet", "*[") == "bucket/in/p?.parquet"  # '?' is literal in URIs
    match = glob_matcher("**/*.parquet")
    assert match("a.parquet") and match("x/y/a.parquet") and not match("x/a.csv")
    assert not glob_matcher("*.parquet")("sub/a.parquet")
    uri_match = glob_matcher("p?.parquet", "*[")
    assert uri_match("p?.parquet") and not uri_match("p1.parquet")


def test_uri_globs_follow_the_same_rules(tree: Path) -> None:
    uri = f"file://{tree}/in/day=*/part-*.parquet"
    location = resolve(uri)
    assert location.glob_chars == "*["
    base, infos = list_files(location)
    assert os.path.relpath(base, tree) == "in"
    assert [os.path.relpath(i.path, tree) for i in infos] == [
        "in/day=2024-01-01/part-0.parquet", "in/day=2024-01-01/part-1.parquet", "in/day=2024-01-02/part-0.parquet"]
    _, infos = list_files(resolve(f"file://{tree}/in/*.parquet"))
    assert len(infos) == 5


# --- transient errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("exc", [
    OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate."),
    OSError("When reading information for key 'k' in bucket 'b': AWS Error UNKNOWN (HTTP status 503) "
            "during HeadObject operation: No response body."),
    OSError("AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream (eof: 0, bad: 1)"),
    OSError("AWS Error SERVICE_UNAVAILABLE during CreateMultipartUpload operation: Service Unavailable"),
    OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 52, Server returned nothing"),
    OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 28, Timeout was reached"),
    OSError("AWS Error REQUEST_TIMEOUT during UploadPart operation: Your socket connection to the server was not read"),
    OSError("google::cloud::Status(UNAVAILABLE: Retry policy exhausted in GetObjectMetadata)"),
    OSError("google::cloud::Status(RESOURCE_EXHAUSTED: HTTP status 429)"),
    OSError("HDFS read failed: java.net.SocketTimeoutException: 60000 millis timeout"),
    OSError("Connection reset by peer"),
    OSError(errno.ETIMEDOUT, "Connection timed out"),
    OSError(errno.EIO, "Input/output error"),
    OSError(errno.ESTALE, "Stale file handle"),
    ConnectionResetError(errno.ECONNRESET, "reset"),
    TimeoutError("read timed out"),
])
def test_transient_errors(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    pa.ArrowInvalid("Parquet magic bytes not found in footer. Either the file is corrupted or this is not parquet"),
    OSError("Couldn't deserialize thrift: don't know what type: \x0f"),
    OSError("Unexpected end of stream: Page was smaller (5030) than expected (6000)"),
    OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied"),
    OSError("AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation"),
    FileNotFoundError(errno.ENOENT, "Path does not exist 'bucket/x'"),
    PermissionError(errno.EACCES, "Permission denied (and a message mentioning timed out)"),
    OSError(errno.ENOSPC, "No space left on device"),
    ValueError("row 503 is invalid"),
    StorageError("reading x: still failing after 6 attempt(s): AWS Error SLOW_DOWN"),
])
def test_errors_that_are_not_transient(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_a_transient_cause_counts() -> None:
    try:
        try:
            raise OSError("AWS Error SLOW_DOWN during GetObject operation")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert is_transient(outer)


class Flaky:
    """Fails `failures` times with `error`, then returns 'ok'."""

    def __init__(self, failures: int, error: BaseException) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def test_retry_transient_retries_with_growing_delays() -> None:
    flaky = Flaky(3, OSError("AWS Error SLOW_DOWN during GetObject operation"))
    started = time.monotonic()
    assert retry_transient(flaky, what="reading x", attempts=4, base_delay=0.02) == "ok"
    elapsed = time.monotonic() - started
    assert flaky.calls == 4
    assert 0.07 / 2 <= elapsed < 2.0  # 0.02 + 0.04 + 0.08 seconds, each jittered down to half at most


def test_retry_transient_gives_up_with_storage_error() -> None:
    flaky = Flaky(10, OSError("AWS Error SERVICE_UNAVAILABLE during GetObject operation"))
    with pytest.raises(StorageError, match=r"reading s3://b/x: still failing after 3 attempt\(s\)") as info:
        retry_transient(flaky, what="reading s3://b/x", attempts=3, base_delay=0.001)
    assert flaky.calls == 3
    assert isinstance(info.value.__cause__, OSError)


def test_retry_transient_passes_other_errors_through_at_once() -> None:
    flaky = Flaky(10, pa.ArrowInvalid("not parquet"))
    with pytest.raises(pa.ArrowInvalid):
        retry_transient(flaky, what="x", attempts=5, base_delay=0.001)
    assert flaky.calls == 1


# --- staged files ---------------------------------------------------------------------------------

def test_staged_file_publishes_whole_with_size_and_hash(tmp_path: Path) -> None:
    fs = pafs.LocalFileSystem()
    final = str(tmp_path / "out" / "part-0.parquet")
    staged = StagedFile(fs, final)
    assert is_temp(staged.tmp) and os.path.dirname(staged.tmp) == os.path.dirname(final)
    staged.stream.write(b"hello ")
    staged.stream.write(b"world")
    assert not os.path.exists(final)
    size, sha = staged.finish()
    assert (size, sha) == (11, hashlib.sha256(b"hello world").hexdigest())
    staged.publish()
    assert Path(final).read_bytes() == b"hello world"
    assert os.listdir(tmp_path / "out") == ["part-0.parquet"]


def test_a_failing_writer_leaves_nothing(tmp_path: Path) -> None:
    fs = pafs.LocalFileSystem()
    final = str(tmp_path / "out" / "x.bin")
    with pytest.raises(RuntimeError), atomic_sink(fs, final) as sink:
        sink.write(b"partial")
        raise RuntimeError("the writer failed midway")
    assert os.listdir(tmp_path / "out") == []


def test_sweep_temps_deletes_only_temporary_files(tmp_path: Path) -> None:
    fs = pafs.LocalFileSystem()
    for rel in ["a.parquet", "sub/.b.parquet.0123abcd.tmp", ".c.parquet.ff.tmp", "_manifest.json", ".keep"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    StagedFile(fs, str(tmp_path / "sub" / "d.parquet")).finish()  # a finished attempt that never published
    assert sweep_temps(fs, str(tmp_path)) == 3
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == [".keep", "_manifest.json", "a.parquet"]
    assert sweep_temps(fs, str(tmp_path)) == 0


@pytest.fixture
def renaming_fs(tmp_path: Path) -> pafs.FileSystem:
    """A filesystem that is neither local nor an object store, so it publishes by `move` (as HDFS does)."""
    return pafs.SubTreeFileSystem(str(tmp_path), pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("file"))))


def test_rename_publishing_leaves_an_identical_file_alone(renaming_fs: pafs.FileSystem, tmp_path: Path) -> None:
    write_bytes_atomic(renaming_fs, "out/part.bin", b"same bytes")
    first = (tmp_path / "out" / "part.bin").stat()
    time.sleep(0.01)
    staged = StagedFile(renaming_fs, "out/part.bin")  # a duplicate attempt of the same shard
    staged.stream.write(b"same bytes")
    staged.finish()
    staged.publish()
    again = (tmp_path / "out" / "part.bin").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # never replaced
    assert sorted(os.listdir(tmp_path / "out")) == ["part.bin"]  # its temporary file is gone
    write_bytes_atomic(renaming_fs, "out/part.bin", b"other bytes")  # different content replaces it
    assert (tmp_path / "out" / "part.bin").read_bytes() == b"other bytes"
    assert sorted(os.listdir(tmp_path / "out")) == ["part.bin"]
    assert read_bytes(renaming_fs, "out/part.bin") == b"other bytes"
    assert read_bytes(renaming_fs, "out/none.bin") is None


# --- reading --------------------------------------------------------------------------------------

def parquet_file(path: Path, rows: int = 1000, row_group_size: int = 250) -> pa.Table:
    table = pa.table({"id": np.arange(rows), "f": np.arange(rows, dtype=np.float32) / 7})
    pq.write_table(table, path, row_group_size=row_group_size)
    return table


class FlakyFile:
    """A local input file whose reads fail transiently at chosen moments (a fake with the real interface)."""

    def __init__(self, path: Path, fail_reads: set[int], error: OSError) -> None:
        self.inner = pa.OSFile(str(path))
        self.fail_reads, self.error, self.reads = fail_reads, error, 0
        self.closed = False

    def _count(self) -> None:
        self.reads += 1
        if self.reads in self.fail_reads:
            raise self.error

    def read(self, n: int = -1) -> bytes:
        self._count()
        return self.inner.read(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.inner.seek(offset, whence)

    def tell(self) -> int:
        return self.inner.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def collect(batches: Iterator[object]) -> list[object]:
    return list(batches)


@pytest.mark.parametrize("whole", [False, True], ids=["streamed-row-groups", "whole-row-groups"])
def test_reader_resumes_after_a_transient_error_without_repeating_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, whole: bool
) -> None:
    path = tmp_path / "t.parquet"
    table = parquet_file(path, rows=1000, row_group_size=250)
    if not whole:  # every row group is streamed batch by batch, as a large one is
        monkeypatch.setattr(reader, "DECODE_BUDGET_BYTES", 0)
    slow_down = OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")

    class FailsOnce(ParquetSource):
        """Decoding fails transiently once, in the middle of the second row group (streamed) or reading it (whole)."""

        decoded = 0
        opened = 0
        whole_reads: list[int] = []

        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            FailsOnce.opened += 1

        def iter_batches(self, *args: object, **kwargs: object) -> Iterator[pa.RecordBatch]:  # type: ignore[override]
            for batch in super().iter_batches(*args, **kwargs):  # type: ignore[arg-type]
                if FailsOnce.decoded == 4:  # rows 0-249 done, 250-349 handed out: fail inside row group 1
                    FailsOnce.decoded += 1
                    raise slow_down
                FailsOnce.decoded += 1
                yield batch

        def read_row_group(self, i: int, *args: object, **kwargs: object) -> pa.Table:  # type: ignore[override]
            FailsOnce.whole_reads.append(i)
            if FailsOnce.whole_reads == [0, 1]:
                raise slow_down
            return super().read_row_group(i, *args, **kwargs)  # type: ignore[arg-type]

    source = FailsOnce(resolve(str(path)), str(path), str(path))
    seen: list[int] = []
    for batch in iter_batches(source, (0, 4), ["id", "f"], 100, str(path), base_delay=0.001):
        ids = batch.data.column("id").to_pylist()
        assert batch.first_row == ids[0]
        seen.extend(ids)
    assert seen == table.column("id").to_pylist()  # every row once, in order
    assert FailsOnce.opened == 2  # the file was opened again after the failure
    assert FailsOnce.whole_reads == ([0, 1, 1, 2, 3] if whole else [])
    assert (FailsOnce.decoded == 0) == whole  # a row group is read whole or streamed, never both


def test_reader_gives_up_with_storage_error_not_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    parquet_file(path)
    error = OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")
    flaky = FlakyFile(path, set(), error)
    parquet = pq.ParquetFile(pa.PythonFile(flaky, mode="r"))
    flaky.fail_reads = set(range(flaky.reads + 1, 1000))  # the footer was read; every read after it fails
    with pytest.raises(StorageError, match=r"reading in\.parquet, row group 1: still failing after 3 attempt"):
        collect(iter_batches(parquet, (1, 3), ["id"], 100, "in.parquet", attempts=3, base_delay=0.001))


def test_corrupt_data_stays_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all" * 10)
    with pytest.raises(ShardDataError, match="cannot open .*bad.parquet as Parquet"):
        open_parquet(resolve(str(path)), str(path), str(path), base_delay=0.001)
    with pytest.raises(ShardDataError, match="cannot open"):
        open_parquet(resolve(str(path)), str(tmp_path / "gone.parquet"), "gone.parquet", base_delay=0.001)
    good = tmp_path / "good.parquet"
    parquet_file(good)
    data = bytearray(good.read_bytes())
    data[4:400] = b"\xff" * 396  # the first column chunk's pages
    path.write_bytes(bytes(data))
    parquet = open_parquet(resolve(str(path)), str(path), str(path), base_delay=0.001)
    with pytest.raises(ShardDataError, match="cannot decode .*row group 0"):
        collect(iter_batches(parquet, (0, 1), ["id", "f"], 100, str(path), base_delay=0.001))


def test_read_parquet_footer(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    parquet_file(path, rows=1000, row_group_size=300)
    meta = read_parquet_footer(pafs.LocalFileSystem(), str(path))
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [300, 300, 300, 100]
    with pytest.raises(pa.ArrowInvalid):
        (tmp_path / "x.parquet").write_bytes(b"nope" * 10)
        read_parquet_footer(pafs.LocalFileSystem(), str(tmp_path / "x.parquet"))


def test_location_glob_chars() -> None:
    assert Location(pafs.LocalFileSystem(), "/x", "/x", "").glob_chars == "*?["


def test_whole_row_group_reads_count_only_the_wanted_columns(tmp_path: Path) -> None:
    path = tmp_path / "nested.parquet"
    rows = 1000
    pq.write_table(pa.table({
        "id": pa.array(range(rows), pa.int64()),
        "features": pa.array([[float(i)] * 8 for i in range(rows)], pa.list_(pa.float32())),
        "blob": pa.array(["x" * 200] * rows),
        "blob.more": pa.array(["y" * 10] * rows),
    }), path, compression="snappy")
    meta = pq.ParquetFile(path).metadata
    group = meta.row_group(0)
    sizes = {group.column(i).path_in_schema: group.column(i).total_uncompressed_size for i in range(group.num_columns)}
    assert set(sizes) == {"id", "features.list.element", "blob", "blob.more"}

    parquet = pq.ParquetFile(path)
    types = reader._leaf_types(parquet)
    leaf = {group.column(i).path_in_schema: reader._leaf_bytes(group.column(i), types[i]) for i in range(4)}

    def decoded(columns: set[str]) -> float:
        return reader._decoded_bytes(group, reader._leaves(meta, columns), types)

    assert decoded({"id", "features"}) == leaf["id"] + leaf["features.list.element"]
    assert decoded({"blob.more"}) == leaf["blob.more"]
    assert decoded({"blob"}) == leaf["blob"] + leaf["blob.more"]  # a dotted neighbour: more, never less
    for name in ("id", "features", "blob", "blob.more"):  # each at least what Arrow holds once decoded
        assert decoded({name}) >= parquet.read_row_group(0, columns=[name]).nbytes, name
    assert decoded({"blob"}) > 100 * sizes["blob"]  # 200-byte strings, dictionary-encoded: not their encoded size


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_decoding_threads_share_one_budget_of_whole_row_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    path = tmp_path / "t.parquet"
    table = parquet_file(path, rows=4000, row_group_size=1000)
    group = pq.ParquetFile(path).metadata.row_group(0)
    size = reader._decoded_bytes(group, reader._leaves(pq.ParquetFile(path).metadata, ["id", "f"]),
                                 reader._leaf_types(pq.ParquetFile(path)))
    monkeypatch.setattr(reader, "DECODE_BUDGET_BYTES", 4 * size)  # whole groups for up to 2 threads

    class Counting(ParquetSource):
        whole = streamed = 0

        def read_row_group(self, *args: object, **kwargs: object) -> pa.Table:  # type: ignore[override]
            Counting.whole += 1
            return super().read_row_group(*args, **kwargs)  # type: ignore[arg-type]

        def iter_batches(self, *args: object, **kwargs: object) -> Iterator[pa.RecordBatch]:  # type: ignore[override]
            Counting.streamed += 1
            return super().iter_batches(*args, **kwargs)  # type: ignore[arg-type]

    source = Counting(resolve(str(path)), str(path), str(path))
    with decode(source, (0, 4), ["id", "f"], 300, str(path), features=["f"], list_column=False, width=1,
                check_invalid=True, threads=threads) as batches:
        ids = []
        for item in batches:
            ids.extend(item.batch.data.column("id").to_pylist())
            item.release()
    assert ids == table.column("id").to_pylist()
    assert (Counting.whole, Counting.streamed) == ((4, 0) if threads <= 2 else (0, 4))


def test_unique_names_differ_between_calls_and_between_a_process_and_its_forked_child() -> None:
    """Temporary names and commit tokens draw one random prefix per process (no `getrandom` per name)."""
    import os

    from basis.storage import temp_name, unique_suffix

    names = {unique_suffix() for _ in range(1000)}
    assert len(names) == 1000 and all(len(n) == 24 and int(n, 16) >= 0 for n in names)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a forked replica or worker: its own prefix, not its parent's
        os.write(write, unique_suffix().encode())
        os._exit(0)
    os.waitpid(child, 0)
    theirs = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert theirs[:16] != next(iter(names))[:16]
    assert temp_name("/out/a.parquet").startswith("/out/.a.parquet.") and temp_name("/o/a") != temp_name("/o/a")
