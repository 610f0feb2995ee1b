"""The storage layer against a real S3 API: moto's server on loopback, the real pyarrow S3 client,
and a proxy in front that injects S3 errors (`503 SlowDown`, ...). A few runs go end to end."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TEST_REPLICA, reference, save_mlp
from s3 import BUCKET, FaultProxy, S3Server, s3, s3_server  # noqa: F401 - fixtures

import pipelines
from pipelines.commit import MANIFEST, SUCCESS
from basis.errors import ShardDataError, StorageError
from basis.storage import (
    Location,
    StagedFile,
    delete_file,
    read_bytes,
    read_parquet_footer,
    resolve,
    write_bytes_atomic,
)
from basis.listing import list_files, sweep_temps
from workers.plain_pages import plain_columns
from workers.reader import iter_batches, open_parquet
from workers.writer import ShardWriter

DATA_READ = ("Range", r"^bytes=[1-9]")  # a row group's column chunks; footers are read from byte 0 in these small files


def direct(proxy: FaultProxy, key: str) -> Location:
    """A location through the proxy whose S3 client does not retry by itself (only our layer does)."""
    location = resolve(proxy.uri(key))
    kwargs = location.fs.__reduce__()[1][0]
    fs = pafs.S3FileSystem(**kwargs, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    return Location(fs, location.path, location.uri, location.scheme)


def put_table(server: S3Server, key: str, table: pa.Table, *, row_group_size: int, **options: Any) -> None:
    with server.filesystem().open_output_stream(f"{BUCKET}/{key}") as sink:
        pq.write_table(table, sink, row_group_size=row_group_size, **options)


def features(rows: int, width: int, *, start: int = 0, seed: int = 0) -> pa.Table:
    values = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    return pa.table({"id": np.arange(start, start + rows), **{f"f{j}": values[:, j] for j in range(width)}})


def eventually(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- the pyarrow S3 client and our layer, no Ray ------------------------------------------------

def test_staged_upload_streams_parts_and_publishes_whole(s3: FaultProxy, s3_server: S3Server) -> None:
    location = resolve(s3.uri("stream/out"))
    chunk = os.urandom(4 << 20)
    staged = StagedFile(location.fs, location.join("big.bin"))
    digest = hashlib.sha256()
    for _ in range(4):  # 16 MiB
        staged.stream.write(chunk)
        digest.update(chunk)
    assert eventually(lambda: any("partNumber=" in r.path for r in s3.requests))
    parts = [r for r in s3.requests if r.method == "PUT" and "partNumber=" in r.path]
    assert parts and all(".big.bin." in r.path for r in parts)  # uploading while still writing: bounded memory
    assert s3_server.keys("stream/") == []  # an unfinished multipart upload is invisible
    assert staged.finish() == (16 << 20, digest.hexdigest())
    assert s3_server.keys("stream/") == [f"stream/out/{os.path.basename(staged.tmp)}"]  # hidden name only
    staged.publish()
    assert s3_server.keys("stream/") == ["stream/out/big.bin"]
    data = s3_server.filesystem().open_input_stream(f"{BUCKET}/stream/out/big.bin").read()
    assert hashlib.sha256(data).hexdigest() == digest.hexdigest()


def test_a_writer_failing_midway_leaves_nothing_under_the_final_name(s3: FaultProxy, s3_server: S3Server) -> None:
    location = resolve(s3.uri("midway/out"))
    table = pa.table({"x": np.random.default_rng(0).standard_normal(1 << 20)})  # 8 MiB a batch
    with pytest.raises(RuntimeError, match="failed midway"), \
            ShardWriter(location, location.join("part-0-00000.parquet"), table.schema) as writer:
        for batch in table.to_batches() * 3:
            writer.write(batch)
        assert eventually(lambda: any("partNumber=" in r.path for r in s3.requests))  # parts went out
        assert s3_server.keys("midway/") == []
        raise RuntimeError("the forward pass failed midway")
    assert s3_server.keys("midway/") == []  # the partial temporary object was completed, then deleted


def test_a_killed_writer_leaves_nothing_visible_and_sweep_removes_finished_temps(
        s3: FaultProxy, s3_server: S3Server) -> None:
    script = (
        "import sys, time\n"
        "from basis.storage import StagedFile, resolve\n"
        "location = resolve(sys.argv[1])\n"
        "staged = StagedFile(location.fs, location.join('part-0-00000.parquet'))\n"
        "staged.stream.write(b'x' * (12 << 20))\n"
        "print('writing', flush=True)\n"
        "time.sleep(60)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, s3.uri("killed/out")], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
        assert eventually(lambda: any("partNumber=" in r.path for r in s3.requests))
    finally:
        writer.kill()  # SIGKILL: no cleanup of any kind runs
        writer.wait()
    assert s3_server.keys("killed/") == []  # the multipart upload was never completed: invisible
    location = resolve(s3.uri("killed/out"))
    staged = StagedFile(location.fs, location.join("part-1-00000.parquet"))
    staged.stream.write(b"done")
    staged.finish()  # finished, then killed before publishing: a hidden temporary object
    assert s3_server.keys("killed/") == [f"killed/out/{os.path.basename(staged.tmp)}"]
    assert sweep_temps(location.fs, location.path) == 1
    assert s3_server.keys("killed/") == []


def test_transient_errors_in_every_storage_operation_are_retried(s3: FaultProxy, s3_server: S3Server) -> None:
    out = direct(s3, "ops")
    s3.fail("POST", r"/ops/\.a\.json\..*\?uploads", times=2)  # creating the temporary upload
    s3.fail("PUT", r"/ops/\.a\.json\..*partNumber=", times=1)  # its part: the whole write is redone
    s3.fail("PUT", r"/ops/a\.json$", times=2)  # the server-side copy that publishes it
    write_bytes_atomic(out.fs, out.join("a.json"), b'{"a": 1}')
    s3.fail("GET", r"/ops/a\.json$", times=2)
    assert read_bytes(out.fs, out.join("a.json")) == b'{"a": 1}'
    s3.fail("GET", r"list-type=2", times=2)
    base, infos = list_files(Location(out.fs, out.join("*.json"), out.uri, "s3"))
    assert (base, [i.path for i in infos]) == (out.path, [out.join("a.json")])
    s3.fail("DELETE", r"/ops/a\.json$", times=2)
    delete_file(out.fs, out.join("a.json"))
    assert s3_server.keys("ops/") == []
    assert len(s3.injected()) == 11


def test_globs_on_s3(s3: FaultProxy, s3_server: S3Server) -> None:
    fs = s3_server.filesystem()
    for key in ["g/in/day=1/part-0.parquet", "g/in/day=2/part-0.parquet", "g/in/day=2/_SUCCESS", "g/in/top.parquet",
                "g/in/day=2/deep/x.parquet", "g/in/.hidden/y.parquet", "g/in/data[1]/z.parquet"]:
        with fs.open_output_stream(f"{BUCKET}/{key}") as sink:
            sink.write(b"x")

    def listed(pattern: str) -> tuple[str, list[str]]:
        base, infos = list_files(resolve(s3.uri(pattern)))
        return base, [i.path[len(base) + 1:] for i in infos]

    assert listed("g/in/*.parquet") == (f"{BUCKET}/g/in", ["top.parquet"])
    assert listed("g/in/day=*/part-*.parquet") == (f"{BUCKET}/g/in", ["day=1/part-0.parquet", "day=2/part-0.parquet"])
    assert listed("g/in/**/*.parquet")[1] == ["data[1]/z.parquet", "day=1/part-0.parquet", "day=2/deep/x.parquet",
                                            "day=2/part-0.parquet", "top.parquet"]
    assert listed("g/in/day=[2]/**")[1] == ["day=2/deep/x.parquet", "day=2/part-0.parquet"]
    assert listed("g/in/data[1]") == (f"{BUCKET}/g/in/data[1]", ["z.parquet"])  # an existing prefix, taken literally


def test_footer_reads_retry_and_keep_failing_as_storage_error(s3: FaultProxy, s3_server: S3Server) -> None:
    put_table(s3_server, "footer/t.parquet", features(1000, 3), row_group_size=300)
    location = direct(s3, "footer/t.parquet")
    s3.fail("GET", r"/footer/t\.parquet", times=2)
    meta = read_parquet_footer(location.fs, location.path)
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [300, 300, 300, 100]
    s3.fail("GET", r"/footer/t\.parquet", code="InternalError", status=500)
    with pytest.raises(StorageError, match="reading the Parquet footer of .*t.parquet: still failing after 3"):
        read_parquet_footer(location.fs, location.path, attempts=3, base_delay=0.01)


def test_reader_resumes_on_s3_after_transient_errors(s3: FaultProxy, s3_server: S3Server) -> None:
    table = features(1000, 3)
    put_table(s3_server, "resume/t.parquet", table, row_group_size=250)
    location = direct(s3, "resume/t.parquet")
    s3.fail("GET", r"/resume/t\.parquet", header=DATA_READ, times=3)  # the first row group's read, three times
    s3.fail("GET", r"/resume/t\.parquet", header=("Range", r"^bytes=0-"), times=1, reset=True)  # and the footer
    parquet = open_parquet(location, location.path, "s3://resume/t.parquet", base_delay=0.01)
    ids = [i for batch in iter_batches(parquet, (0, 4), ["id", "f0"], 100, "t", base_delay=0.01)
           for i in batch.data.column("id").to_pylist()]
    assert ids == table.column("id").to_pylist()  # every row once, in order
    assert len(s3.injected("GET")) == 4


def test_feature_pages_on_s3_come_in_one_ranged_read_per_row_group_that_is_retried(
    s3: FaultProxy, s3_server: S3Server
) -> None:
    """Flat float32 features written without dictionaries are decoded from their pages
    (`workers.plain_pages`) on S3 too: a row group's feature chunks come in one ranged GET,
    retried like any read, and the rows are pyarrow's, bit for bit, each once and in order."""
    table = features(1000, 8)
    put_table(s3_server, "pages/t.parquet", table, row_group_size=250, use_dictionary=False)
    location = direct(s3, "pages/t.parquet")
    parquet = open_parquet(location, location.path, "s3://pages/t.parquet", base_delay=0.01)
    names = [f"f{j}" for j in range(8)]
    plan = plain_columns(parquet.metadata, parquet.schema_arrow, names, check=True)
    assert plan is not None
    starts = [min(parquet.metadata.row_group(rg).column(j + 1).data_page_offset for j in range(8)) for rg in range(4)]
    s3.fail("GET", r"/pages/t\.parquet", header=("Range", f"^bytes={starts[1]}-"), times=2)  # row group 1's, twice
    s3.requests.clear()
    batches = list(iter_batches(parquet, (0, 4), ["id", *names], 250, "s3://pages/t.parquet", base_delay=0.01,
                                plain=plan))
    assert all(b.stacked is not None for b in batches) and len(batches) == 4  # every row group from its pages
    assert [i for b in batches for i in b.data.column("id").to_pylist()] == table.column("id").to_pylist()
    stacked = np.concatenate([b.stacked for b in batches], axis=1)
    expected = np.stack([table.column(name).to_numpy() for name in names])
    assert stacked.tobytes() == expected.tobytes()
    windows = [r for r in s3.requests if r.method == "GET" and r.range.startswith(tuple(f"bytes={s}-" for s in starts))]
    assert [r.status for r in windows] == [206, 503, 503, 206, 206, 206], windows  # one read a row group, retried
    assert len(s3.injected("GET")) == 2


def test_reads_that_keep_failing_raise_storage_error_not_a_data_error(s3: FaultProxy, s3_server: S3Server) -> None:
    put_table(s3_server, "flaky/t.parquet", features(1000, 3), row_group_size=250)
    location = direct(s3, "flaky/t.parquet")
    parquet = open_parquet(location, location.path, "s3://flaky/t.parquet", base_delay=0.01)
    s3.fail("GET", r"/flaky/t\.parquet", header=DATA_READ)  # every data read, forever
    with pytest.raises(StorageError, match=r"reading s3://flaky/t.parquet, row group 2: still failing after 3"):
        list(iter_batches(parquet, (2, 4), ["id"], 100, "s3://flaky/t.parquet", attempts=3, base_delay=0.01))
    s3.fail("HEAD", r"/flaky/t\.parquet", code="ServiceUnavailable")
    with pytest.raises(StorageError, match="opening s3://flaky/t.parquet: still failing after 2"):
        open_parquet(location, location.path, "s3://flaky/t.parquet", attempts=2, base_delay=0.01)
    s3.clear()
    parquet = open_parquet(location, location.path, "s3://flaky/t.parquet", base_delay=0.01)
    s3.fail("GET", r"/flaky/t\.parquet", header=DATA_READ, status=403, code="AccessDenied")
    with pytest.raises(ShardDataError, match="ACCESS_DENIED"):  # permanent: that file's failed shard
        list(iter_batches(parquet, (0, 1), ["id"], 100, "s3://flaky/t.parquet", base_delay=0.01))
    assert len(s3.injected()) == 1  # not retried


def test_pyarrow_s3_reads_lose_their_own_retries_on_small_ranges(s3: FaultProxy, s3_server: S3Server) -> None:
    """Why our retries matter even with the AWS SDK's: a 503 whose XML body is larger than the
    requested range breaks pyarrow's response buffer, and the SDK gives up at once."""
    fs = s3_server.filesystem()
    with fs.open_output_stream(f"{BUCKET}/small/x.bin") as sink:
        sink.write(b"0123456789")
    location = resolve(s3.uri("small/x.bin"))  # pyarrow's defaults from the URI, SDK retries on
    s3.fail("GET", r"/small/x\.bin", times=1)
    with pytest.raises(OSError) as info:
        location.fs.open_input_file(location.path).read_at(4, 2)
    assert "INTERNAL_FAILURE" in str(info.value) and len(s3.injected()) == 1
    s3.fail("GET", r"/small/x\.bin", times=1)
    assert read_bytes(location.fs, location.path) == b"0123456789"  # our retry gets past it


# --- end to end through Ray ----------------------------------------------------------------------

def run(**options: object) -> pipelines.RunReport:
    return pipelines.run(**{**TEST_REPLICA, **options}, progress=False)


def upload_inputs(server: S3Server, prefix: str, files: int, rows: int, width: int) -> pa.Table:
    tables = [features(rows, width, start=i * rows, seed=i) for i in range(files)]
    for i, table in enumerate(tables):
        put_table(server, f"{prefix}/part-{i:04d}.parquet", table, row_group_size=100)
    return pa.concat_tables(tables)


def read_output(server: S3Server, prefix: str) -> pa.Table:
    fs = server.filesystem()
    keys = [k for k in server.keys(prefix) if k.endswith(".parquet")
            and not any(part.startswith(("_", ".")) for part in k[len(prefix):].split("/"))]
    return pa.concat_tables([pq.read_table(f"{BUCKET}/{k}", filesystem=fs) for k in keys])


def check_predictions(server: S3Server, prefix: str, model: object, table: pa.Table) -> None:
    out = read_output(server, prefix)
    assert out.column("id").to_pylist() == table.column("id").to_pylist()  # every id once, in input order
    matrix = np.stack([table.column(f"f{j}").to_numpy() for j in range(4)], axis=1)
    expected = reference(model, matrix)[:, 0]  # type: ignore[arg-type]
    np.testing.assert_allclose(out.column("prediction").to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_ray_workers_inherit_the_s3_credentials(s3_server: S3Server, ray_shared: None) -> None:
    import ray

    @ray.remote(num_cpus=0)
    def credentials() -> tuple[str | None, str | None]:
        return os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_EC2_METADATA_DISABLED")

    assert ray.get(credentials.remote()) == ("testing", "true")


def test_end_to_end_on_s3_and_a_rerun_does_nothing(s3: FaultProxy, s3_server: S3Server, ray_shared: None,
                                                   tmp_path: Path) -> None:
    model = save_mlp(tmp_path / "m.pt", [4, 8, 1])
    table = upload_inputs(s3_server, "e2e/in", files=3, rows=300, width=4)
    put_table(s3_server, "e2e/in/sub/extra.parquet", features(10, 4, start=10_000), row_group_size=100)
    options = {"model": str(tmp_path / "m.pt"), "input": s3.uri("e2e/in/*.parquet"), "output": s3.uri("e2e/out"),
               "shard_rows": 200}
    report = run(**options)
    assert (report.status, report.shards_done, report.rows_out, report.errors) == ("succeeded", 6, 900, [])
    check_predictions(s3_server, "e2e/out/", model, table)  # sub/extra.parquet is not in the glob
    manifest = json.loads(s3_server.filesystem().open_input_stream(f"{BUCKET}/e2e/out/{MANIFEST}").read())
    assert [s["status"] for s in manifest["shards"]] == ["committed"] * 6
    assert f"e2e/out/{SUCCESS}" in s3_server.keys("e2e/out/")
    assert not [k for k in s3_server.keys("e2e/") if os.path.basename(k).startswith(".")]  # no temporary left
    # The replicas read and wrote through S3 themselves: the driver reads only footers (from byte 0).
    assert [r for r in s3.requests if r.method == "GET" and "/e2e/in/part-" in r.path and r.range.startswith("bytes=4")]
    assert [r for r in s3.requests if r.method == "POST" and "/e2e/out/.part-0002-00000.parquet." in r.path]

    before = {i.path: i.mtime_ns for i in s3_server.filesystem().get_file_info(
        pafs.FileSelector(f"{BUCKET}/e2e/out", recursive=True)) if not i.path.endswith("_LOCK")}
    s3.clear()
    again = run(**options)
    assert (again.status, again.shards_done, again.shards_skipped) == ("succeeded", 0, 6)
    after = {i.path: i.mtime_ns for i in s3_server.filesystem().get_file_info(
        pafs.FileSelector(f"{BUCKET}/e2e/out", recursive=True)) if not i.path.endswith("_LOCK")}
    assert after == before
    writes = [r.path for r in s3.requests if r.method in ("PUT", "POST") and "_LOCK" not in r.path
              and not r.path.endswith("/")]
    assert writes == []  # only the lock was written


def test_a_run_over_plain_pages_on_s3_reads_them_in_windows_and_retries_them(
    s3: FaultProxy, s3_server: S3Server, ray_shared: None, tmp_path: Path
) -> None:
    """The replicas decode feature pages written without dictionaries straight from S3 (one ranged
    GET of a row group's feature chunks, `workers.plain_pages`); those GETs fail and are retried."""
    model = save_mlp(tmp_path / "m.pt", [4, 8, 1])
    tables = [features(600, 4, start=i * 600, seed=i) for i in range(2)]
    for i, table in enumerate(tables):
        put_table(s3_server, f"windows/in/part-{i}.parquet", table, row_group_size=200, use_dictionary=False)
    meta = pq.read_metadata(f"{BUCKET}/windows/in/part-0.parquet", filesystem=s3_server.filesystem())
    window = min(meta.row_group(1).column(j).data_page_offset for j in range(1, 5))  # past the id chunk
    s3.fail("GET", r"/windows/in/part-0\.parquet", header=("Range", f"^bytes={window}-"), times=3)
    report = run(model=str(tmp_path / "m.pt"), input=s3.uri("windows/in"), output=s3.uri("windows/out"),
                 shard_rows=400, batch_size=64)  # shards of two row groups, several batches: not the tiny path
    assert (report.status, report.shards_done, report.rows_out) == ("succeeded", 4, 1200), report.errors
    assert len(s3.injected("GET")) == 3  # requested by the page decoder alone: pyarrow's reads start at the id
    check_predictions(s3_server, "windows/out/", model, pa.concat_tables(tables))


def test_transient_faults_during_a_run_are_retried_not_data_errors(s3: FaultProxy, s3_server: S3Server,
                                                                    ray_shared: None, tmp_path: Path) -> None:
    model = save_mlp(tmp_path / "m.pt", [4, 8, 1])
    table = upload_inputs(s3_server, "faults/in", files=3, rows=300, width=4)
    # More failures in a row than pyarrow's own S3 retries absorb (about 30 over 6 s): our layer must
    # resume the read and redo the publishing copy.
    s3.fail("GET", r"/faults/in/part-0000\.parquet", header=DATA_READ, times=40)
    s3.fail("PUT", r"/faults/out/part-0001-00000\.parquet$", times=40)
    # And scattered ones that the S3 client's retries take, on every kind of request of the replicas.
    s3.fail("GET", r"/faults/in/part-000[12]\.parquet", header=DATA_READ, fraction=0.3)
    s3.fail(None, r"/faults/out/\.part-", fraction=0.3)
    # The random draws land on ~12 multipart POSTs in an order that changes from run to run, and can miss all of
    # them (seen in CI: 0 of 12): two are claimed outright so every kind of request surely meets a fault.
    s3.fail("POST", r"/faults/out/\.part-.*\?uploads", times=2)
    report = run(model=str(tmp_path / "m.pt"), input=s3.uri("faults/in"), output=s3.uri("faults/out"), shard_rows=200)
    assert (report.status, report.shards_done, report.shards_failed) == ("succeeded", 6, 0), report.errors
    check_predictions(s3_server, "faults/out/", model, table)
    manifest = json.loads(s3_server.filesystem().open_input_stream(f"{BUCKET}/faults/out/{MANIFEST}").read())
    assert all(s["status"] == "committed" and not s["error"] for s in manifest["shards"])
    assert len(s3.injected("GET")) >= 40 and len(s3.injected("PUT")) >= 40
    assert {r.method for r in s3.injected()} >= {"GET", "PUT", "POST"}
