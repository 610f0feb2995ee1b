"""Delta and Iceberg input on S3 (issue 13, item 5): moto's S3 server on loopback behind the fault proxy
of tests/s3.py, real deltalake and pyiceberg (its SQL catalog on SQLite in tmp_path), no mocks.

delta-rs reads the Delta log and PyIceberg the Iceberg metadata, each with its own S3 client configured
from our URI or the catalog (pipelines/tables/stores.py); the data files are read by our storage layer,
as for any input. The jobs are small: they run in the driver (pipelines.lane), no Ray started.
"""

from __future__ import annotations

import doctest
import signal
import subprocess
import sys
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli, feature_table, reference, save_mlp
from deltalake import DeltaTable, write_deltalake
from s3 import BUCKET, FaultProxy, S3Server, s3, s3_server  # noqa: F401 - fixtures

import pipelines
from basis.errors import ConfigError, OutputConflictError
from basis.storage import REDACTED, resolve
from pipelines.commit import MANIFEST, SUCCESS
from pipelines.tables import stores
from pipelines.tables.sink import OutputFile
from pipelines.tables.stores import (
    delta_storage_options,
    delta_table_uri,
    iceberg_location,
    iceberg_properties,
    iceberg_uri,
)

FEATURES = 4
DATA_READ = ("Range", r"^bytes=[1-9]")  # a row group's column chunks (footers are read from byte 0)
ACCESS, SECRET, TOKEN = "AKIATABLELEAK0001", "sEcReTtAbLeLeAk42", "tOkEnTaBlEcHeCk77"
LEAKS = (ACCESS, SECRET, TOKEN)


def rows(first: int, stop: int, seed: int) -> pa.Table:
    return feature_table(np.arange(first, stop), FEATURES, seed)


def direct_options(server: S3Server) -> dict[str, str]:
    """delta-rs options for setting tables up on the server itself (no proxy, no faults)."""
    return {"AWS_ENDPOINT_URL": f"http://{server.endpoint}", "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}


def delta_on_s3(server: S3Server, key: str) -> pa.Table:
    """Two appends of 600 rows, then 100 rows deleted (the rewritten file's old version stays on S3).
    Returns the table's live rows."""
    uri, options = f"s3://{BUCKET}/{key}", direct_options(server)
    write_deltalake(uri, rows(0, 600, 1), storage_options=options)
    write_deltalake(uri, rows(600, 1200, 2), mode="append", storage_options=options)
    assert DeltaTable(uri, storage_options=options).delete("id >= 100 AND id < 200")["num_deleted_rows"] == 100
    assert len([k for k in server.keys(key) if k.endswith(".parquet")]) == 3  # the removed file is still there
    return DeltaTable(uri, storage_options=options).to_pyarrow_table()


def warehouse(tmp_path: Path) -> str:
    """The test's own warehouse prefix in the session's bucket."""
    return f"ice/{tmp_path.name}/wh"


def iceberg_catalog(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    return {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db",
            "warehouse": f"s3://{BUCKET}/{warehouse(tmp_path)}", "s3.endpoint": f"http://{endpoint}",
            "s3.region": "us-east-1", **extra}


def iceberg_on_s3(server: S3Server, tmp_path: Path) -> pa.Table:
    """`feats.users` in a SQLite catalog, its files on S3: two appends, then a copy-on-write delete."""
    from pyiceberg.catalog import load_catalog

    catalog = load_catalog("default", **iceberg_catalog(tmp_path, server.endpoint))
    catalog.create_namespace("feats")
    table = catalog.create_table("feats.users", schema=rows(0, 1, 0).schema)
    table.append(rows(0, 600, 1))
    table.append(rows(600, 1200, 2))
    table.delete("id >= 100 and id < 200")
    table = catalog.load_table("feats.users")
    assert table.location() == f"s3://{BUCKET}/{warehouse(tmp_path)}/feats/users"
    assert len([k for k in server.keys(f"{warehouse(tmp_path)}/feats/users/data/") if k.endswith(".parquet")]) == 3
    return table.scan().to_arrow()


def read_output(server: S3Server, prefix: str) -> pa.Table:
    fs = server.filesystem()
    keys = [k for k in server.keys(prefix) if k.endswith(".parquet") and "_rejected" not in k
            and not any(part.startswith(("_", ".")) for part in k[len(prefix):].split("/"))]
    return pa.concat_tables([pq.read_table(f"{BUCKET}/{k}", filesystem=fs).select(["id", "prediction"])
                             for k in keys])


def check_scored(server: S3Server, prefix: str, model: Any, live: pa.Table) -> None:
    """The output holds every live row exactly once, equal to a plain torch forward of it."""
    got, live = read_output(server, prefix).sort_by("id"), live.sort_by("id")
    assert got["id"].to_pylist() == live["id"].to_pylist()  # each live row once, no deleted row
    features = np.stack([live[f"f{j:02d}"].to_numpy() for j in range(FEATURES)], axis=1)
    np.testing.assert_allclose(np.asarray(got["prediction"].to_pylist(), np.float32),
                               reference(model, features)[:, 0], rtol=1e-5, atol=1e-7)


def manifest(server: S3Server, prefix: str) -> dict[str, Any]:
    return json.loads(server.filesystem().open_input_stream(f"{BUCKET}/{prefix}{MANIFEST}").read())


def hit(proxy: FaultProxy, method: str, path: str) -> bool:
    """Whether a fault was injected into a `method` request whose path matches `path`."""
    return any(re.search(path, r.path) for r in proxy.injected(method))


def leaked(text: str) -> list[str]:
    return [secret for secret in LEAKS if secret in text]


# --- the translation, no server ------------------------------------------------------------------

def test_store_settings_translate_between_our_uris_delta_rs_and_pyiceberg() -> None:
    assert doctest.testmod(stores).failed == 0
    location = resolve(f"s3://{ACCESS}:{SECRET}@b/t/?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-1")

    assert delta_table_uri(location) == "s3://b/t"
    assert delta_storage_options(location) == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ALLOW_HTTP": "true", "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET}
    properties = iceberg_properties(location)
    assert properties == {"s3.endpoint": "http://127.0.0.1:9000", "s3.region": "eu-west-1",
                          "s3.access-key-id": ACCESS, "s3.secret-access-key": SECRET}
    # And back: the same store and keys; the replicas' URI carries the keys as a user writes them in an input URI.
    assert iceberg_uri("s3://b/t", properties) == (f"s3://{ACCESS}:{SECRET}@b/t?endpoint_override=127.0.0.1:9000"
                                                   f"&scheme=http&region=eu-west-1")
    assert iceberg_location("s3://b/t", properties).uri == iceberg_uri("s3://b/t", properties).replace(
        f"{ACCESS}:{SECRET}", f"{REDACTED}:{REDACTED}")
    # Temporary keys: the token cannot go into a URI, so the keys reach the driver's filesystem only.
    temporary = {**properties, "s3.session-token": TOKEN}
    assert leaked(iceberg_uri("s3://b/t", temporary)) == []
    back = iceberg_location("s3://b/t", temporary)
    assert back.path == "b/t" and leaked(back.uri) == []
    options = back.fs.__reduce__()[1][0]
    assert (options["access_key"], options["secret_key"], options["session_token"]) == (ACCESS, SECRET, TOKEN)
    assert (options["endpoint_override"], options["scheme"], options["region"]) == ("127.0.0.1:9000", "http",
                                                                                     "eu-west-1")
    # PyIceberg's `client.*` fallbacks and Hadoop's scheme names; https by default.
    hadoop = iceberg_location("s3a://b/wh/t/", {"client.region": "us-west-2", "s3.endpoint": "minio.local:9000"})
    assert hadoop.uri == "s3://b/wh/t?endpoint_override=minio.local:9000&scheme=https&region=us-west-2"
    # Other stores keep their libraries' defaults.
    assert delta_storage_options(resolve("/tmp/t")) == iceberg_properties(resolve("/tmp/t")) == {}
    assert delta_table_uri(resolve("/tmp/t/")) == "/tmp/t"
    assert iceberg_location("file:///tmp/wh/t", {"s3.endpoint": "http://h:1"}).path == "/tmp/wh/t"
    with pytest.raises(ConfigError, match="only one of s3.access-key-id and s3.secret-access-key") as bad:
        iceberg_location("s3://b/t", {"s3.endpoint": "http://127.0.0.1:9000", "s3.access-key-id": ACCESS})
    assert leaked(str(bad.value)) == []


# --- runs through the fault proxy ----------------------------------------------------------------

def test_delta_table_on_s3_under_503s_scores_each_live_row_once(s3: FaultProxy, s3_server: S3Server,
                                                                 tmp_path: Path) -> None:
    live = delta_on_s3(s3_server, "dt/delta")
    model = save_mlp(tmp_path / "m.pt", [FEATURES, 8, 1], seed=3)
    job = {"model": str(tmp_path / "m.pt"), "input": s3.uri("dt/delta"), "output": s3.uri("dt/out"),
           "shard_rows": 200}
    s3.fail("GET", r"/dt/delta/_delta_log/", times=3)  # delta-rs reading the log
    s3.fail("GET", r"list-type=2", times=2)  # listings: ours (is it a Delta table?) and delta-rs's
    s3.fail("GET", r"/dt/delta/part-", header=DATA_READ, times=5)  # the replica's row group reads
    s3.fail("GET", r"/dt/delta/part-", header=("Range", r"^bytes=0-"), times=2)  # footers
    s3.fail("PUT", r"/dt/out/part-.*\.parquet$", times=3)  # publishing a shard's file
    s3.fail(None, r"/dt/out/\.part-", fraction=0.3)  # and scattered ones on the staged uploads

    report = pipelines.run(**job, progress=False)

    assert (report.status, report.shards_failed, report.errors) == ("succeeded", 0, [])
    assert report.rows_out == live.num_rows == 1100  # not 1,700: the removed file is not read
    check_scored(s3_server, "dt/out/", model, live)
    assert f"dt/out/{SUCCESS}" in s3_server.keys("dt/out/")
    header = manifest(s3_server, "dt/out/")
    assert header["source"]["format"] == "delta" and header["source"]["version"] == 2
    assert all(s["status"] == "committed" and not s["error"] for s in header["shards"])
    assert hit(s3, "GET", r"/dt/delta/_delta_log/") and hit(s3, "GET", r"/dt/delta/part-")  # each kind of
    assert hit(s3, "GET", r"list-type=2") and hit(s3, "PUT", r"/dt/out/part-")  # fault was injected
    # delta-rs and our layer went through the proxy: the endpoint reached the replica too.
    assert [r for r in s3.requests if r.method == "GET" and "/dt/delta/part-" in r.path and not r.injected
            and r.range.startswith("bytes=4")]

    s3.clear()
    again = pipelines.run(**job, progress=False)
    assert (again.shards_done, again.shards_skipped) == (0, report.shards_total)
    check_scored(s3_server, "dt/out/", model, live)


def test_iceberg_table_on_s3_under_503s_scores_each_live_row_once(s3: FaultProxy, s3_server: S3Server,
                                                                   tmp_path: Path) -> None:
    live = iceberg_on_s3(s3_server, tmp_path)
    model = save_mlp(tmp_path / "m.pt", [FEATURES, 8, 1], seed=4)
    # The run reaches the table's files through the proxy: the catalog's s3.endpoint is the proxy's.
    job = {"model": str(tmp_path / "m.pt"), "input": "feats.users", "input_format": "iceberg",
           "catalog": iceberg_catalog(tmp_path, s3.endpoint), "output": s3.uri("ice/out"), "shard_rows": 200}
    s3.fail("GET", r"/feats/users/metadata/", times=2)  # PyIceberg reading metadata and manifests
    s3.fail("GET", r"/feats/users/data/", header=DATA_READ, times=5)
    s3.fail("GET", r"/feats/users/data/", header=("Range", r"^bytes=0-"), times=2)
    s3.fail("PUT", r"/ice/out/data/[^./][^/]*\.parquet$", times=3)  # output names mirror the table's data/
    s3.fail(None, r"/ice/out/data/\.", fraction=0.3)

    report = pipelines.run(**job, progress=False)

    assert (report.status, report.shards_failed, report.errors) == ("succeeded", 0, [])
    assert report.rows_out == live.num_rows == 1100
    check_scored(s3_server, "ice/out/", model, live)
    header = manifest(s3_server, "ice/out/")
    assert header["source"]["format"] == "iceberg" and header["source"]["table"] == "feats.users"
    assert all(s["status"] == "committed" and not s["error"] for s in header["shards"])
    assert hit(s3, "GET", r"/users/metadata/") and hit(s3, "GET", r"/users/data/") and hit(s3, "PUT", r"/ice/out/data/")
    assert [r for r in s3.requests if r.method == "GET" and "/feats/users/data/" in r.path
            and not r.injected and r.range.startswith("bytes=4")]

    s3.clear()
    again = pipelines.run(**job, progress=False)
    assert (again.shards_done, again.shards_skipped) == (0, report.shards_total)


def test_no_credential_of_a_table_on_s3_is_persisted_or_printed(s3: FaultProxy, s3_server: S3Server,
                                                                 tmp_path: Path) -> None:
    """Keys in a Delta URI (`s3://KEY_ID:SECRET@...`) or in the Iceberg catalog's properties are used, and
    appear nowhere in the manifest, the report, the output or an error message."""
    live = delta_on_s3(s3_server, "leak/delta")
    iceberg_on_s3(s3_server, tmp_path)
    save_mlp(tmp_path / "m.pt", [FEATURES, 1], seed=3)
    delta = s3.uri("leak/delta").replace("s3://", f"s3://{ACCESS}:{SECRET}@", 1)
    catalog = json.dumps(iceberg_catalog(tmp_path, s3.endpoint, **{
        "s3.access-key-id": ACCESS, "s3.secret-access-key": SECRET, "s3.session-token": TOKEN}))
    runs = {
        "delta": ["--input", delta, "--output", s3.uri("leak/out-delta")],
        "iceberg": ["--input", "feats.users", "--input-format", "iceberg", "--catalog", catalog,
                    "--output", s3.uri("leak/out-iceberg")],
    }
    printed = []
    for name, args in runs.items():
        result = cli("run", "--model", str(tmp_path / "m.pt"), *args, "--json", "-v",
                     "--report", str(tmp_path / f"{name}.json"))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["rows_out"] == live.num_rows
        printed.append(result.stdout + result.stderr + (tmp_path / f"{name}.json").read_text())
    stored = " ".join(s3_server.filesystem().open_input_stream(f"{BUCKET}/{key}").read().decode(errors="replace")
                      for key in s3_server.keys("leak/out-"))
    assert MANIFEST in " ".join(s3_server.keys("leak/out-iceberg/")) and leaked(stored) == []
    assert leaked(" ".join(printed)) == []
    header = manifest(s3_server, "leak/out-delta/")
    assert REDACTED in header["source"]["input"] and "endpoint_override" in header["source"]["input"]
    header = manifest(s3_server, "leak/out-iceberg/")
    assert header["config"]["catalog"]["s3.secret-access-key"] == REDACTED

    # Errors name the table, without its secrets.
    missing = cli("run", "--model", str(tmp_path / "m.pt"), "--input", delta.replace("leak/delta", "leak/nope"),
                  "--input-format", "delta", "--output", s3.uri("leak/o2"))
    assert missing.returncode == 2 and "leak/nope" in missing.stderr and "Traceback" not in missing.stderr
    no_table = cli("run", "--model", str(tmp_path / "m.pt"), "--input", "feats.nope", "--input-format", "iceberg",
                   "--catalog", catalog, "--output", s3.uri("leak/o3"))
    assert no_table.returncode == 2 and "feats.nope" in no_table.stderr and "Traceback" not in no_table.stderr
    half = json.dumps({**json.loads(catalog), "s3.secret-access-key": ""})  # a key id without its secret
    refused = cli("run", "--model", str(tmp_path / "m.pt"), "--input", "feats.users", "--input-format", "iceberg",
                  "--catalog", half, "--output", s3.uri("leak/o4"))
    assert refused.returncode == 2 and "secret_key" in refused.stderr and "Traceback" not in refused.stderr
    assert leaked(missing.stderr + no_table.stderr + refused.stderr) == []
    assert [k for k in s3_server.keys("leak/") if k.startswith(("leak/o2", "leak/o3", "leak/o4"))] == []


# --- table OUTPUT on S3: one commit per run, under faults ------------------------------------------------

def local_input(tmp_path: Path) -> Path:
    """Two Parquet files of 600 and 400 rows (shards of 200) and a model."""
    from conftest import write_files

    write_files(tmp_path / "in", [600, 400], features=FEATURES, row_group_size=200)
    save_mlp(tmp_path / "m.pt", [FEATURES, 8, 1], seed=5)
    return tmp_path / "in"


def delta_log(server: S3Server, prefix: str) -> list[list[dict[str, Any]]]:
    """The table's commits, in order: each one's actions (its JSON lines)."""
    fs = server.filesystem()
    return [[json.loads(line) for line in fs.open_input_stream(f"{BUCKET}/{key}").read().decode().splitlines()]
            for key in server.keys(f"{prefix}_delta_log/") if key.endswith(".json")]


def delta_table_files(server: S3Server, prefix: str) -> list[str]:
    """The table's current data files (keys), by replaying its log by hand: adds minus removes."""
    from urllib.parse import unquote

    live: set[str] = set()
    for commit in delta_log(server, prefix):
        for action in commit:
            if "add" in action:
                live.add(action["add"]["path"])
            elif "remove" in action:
                live.discard(action["remove"]["path"])
    return sorted(f"{prefix}{unquote(p)}" for p in live)


def check_table_scored(server: S3Server, keys: list[str], model: Any, inputs: pa.Table) -> None:
    """The table's files (read by pyarrow datasets, not the writing library) hold every input row once,
    equal to a plain torch forward of it."""
    import pyarrow.dataset as pads

    got = pads.dataset([f"{BUCKET}/{k}" for k in keys], format="parquet", filesystem=server.filesystem()) \
        .to_table(columns=["id", "prediction"]).sort_by("id")
    inputs = inputs.sort_by("id")
    assert got["id"].to_pylist() == inputs["id"].to_pylist()  # each row once
    features = np.stack([inputs[f"f{j:02d}"].to_numpy() for j in range(FEATURES)], axis=1)
    np.testing.assert_allclose(np.asarray(got["prediction"].to_pylist(), np.float32),
                               reference(model, features)[:, 0], rtol=1e-5, atol=1e-7)


def stored_text(server: S3Server, prefix: str) -> str:
    """Every object under `prefix` that is not a data file (logs, metadata, manifest, journal), as text."""
    fs = server.filesystem()
    return " ".join(fs.open_input_stream(f"{BUCKET}/{key}").read().decode(errors="replace")
                    for key in server.keys(prefix) if not key.endswith(".parquet"))


def test_delta_output_on_s3_under_503s_commits_each_run_exactly_once(s3: FaultProxy, s3_server: S3Server,
                                                                    tmp_path: Path) -> None:
    """delta-rs reaches our endpoint (the URI's options) with the URI's keys; a commit whose answer is
    lost after S3 applied it (the log entry's PUT) is recognised by the run's txn, never applied twice."""
    from conftest import write_files

    model = save_mlp(tmp_path / "m.pt", [FEATURES, 8, 1], seed=5)
    local_input(tmp_path)
    output = s3.uri("dto/preds").replace("s3://", f"s3://{ACCESS}:{SECRET}@", 1)
    job = {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": output,
           "output_format": "delta", "shard_rows": 200}
    s3.fail("PUT", r"/dto/preds/part-.*\.parquet$", times=3)  # publishing a shard's file
    s3.fail(None, r"/dto/preds/\.part-", fraction=0.3)  # staged uploads
    s3.fail("GET", r"/dto/preds/_delta_log/", times=2)  # delta-rs reading the log
    s3.fail("PUT", r"/dto/preds/_delta_log/0+\.json$", times=1, lost=True)  # the commit: applied, answer lost

    report = pipelines.run(**job, progress=False)

    assert (report.status, report.shards_failed, report.errors) == ("succeeded", 0, [])
    assert report.rows_out == 1000
    log = delta_log(s3_server, "dto/preds/")
    assert len(log) == 1  # one commit, though its PUT was answered 503 and tried again
    txns = [a["txn"] for a in log[0] if "txn" in a]
    assert [(t["appId"], t["version"]) for t in txns] == [("batch-infer", 1)]
    inputs = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "in").glob("*.parquet"))])
    check_table_scored(s3_server, delta_table_files(s3_server, "dto/preds/"), model, inputs)
    assert hit(s3, "PUT", r"/_delta_log/0+\.json$") and hit(s3, "GET", r"/_delta_log/")
    assert hit(s3, "PUT", r"/dto/preds/part-")
    assert f"dto/preds/{SUCCESS}" in s3_server.keys("dto/preds/")
    verified = pipelines.verify(output, sample=5, seed=1)
    assert verified.ok and verified.complete, verified.problems

    s3.clear()  # nothing new: no commit
    assert pipelines.run(**job, progress=False).rows_out == 0
    assert len(delta_log(s3_server, "dto/preds/")) == 1

    # An append, its commit's answer lost on a table that exists (delta-rs's append path).
    write_files(tmp_path / "in" / "more", [400], features=FEATURES, row_group_size=200, start=5000, seed=7)
    s3.fail("PUT", r"/dto/preds/_delta_log/0+1\.json$", times=1, lost=True)
    s3.fail("GET", r"/dto/preds/_delta_log/", times=2)
    again = pipelines.run(**job, progress=False)
    assert (again.status, again.rows_out) == ("succeeded", 400)
    log = delta_log(s3_server, "dto/preds/")
    assert len(log) == 2 and hit(s3, "PUT", r"/_delta_log/0+1\.json$")
    inputs = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "in").rglob("*.parquet"))])
    check_table_scored(s3_server, delta_table_files(s3_server, "dto/preds/"), model, inputs)
    assert DeltaTable(f"s3://{BUCKET}/dto/preds", storage_options=direct_options(s3_server)).version() == 1
    # The keys were used (the URI's), and are stored nowhere: not in the log, the manifest or the journal.
    assert leaked(stored_text(s3_server, "dto/preds/")) == []
    assert leaked(json.dumps(dataclasses_dict(again))) == []
    # A table that does not fit is refused before any work, naming it without its keys.
    DeltaTable.create(f"s3://{BUCKET}/dto/other", pa.schema([("id", pa.int64())]),
                      storage_options=direct_options(s3_server))
    with pytest.raises(OutputConflictError, match="does not fit this job's predictions") as refused:
        pipelines.run(**{**job, "output": output.replace("dto/preds", "dto/other")}, progress=False)
    assert "dto/other" in str(refused.value) and leaked(str(refused.value)) == []


def dataclasses_dict(report: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(report)


def iceberg_snapshots(catalog: dict[str, str], name: str) -> list[Any]:
    from pyiceberg.catalog import load_catalog

    return load_catalog("default", **catalog).load_table(name).snapshots()


def iceberg_table_files(server: S3Server, catalog: dict[str, str], name: str) -> list[str]:
    """The current snapshot's data files (keys), from PyIceberg's scan plan (the metadata, not the data)."""
    from pyiceberg.catalog import load_catalog

    table = load_catalog("default", **catalog).load_table(name)
    prefix = f"s3://{BUCKET}/"
    paths = [t.file.file_path for t in table.scan().plan_files()]
    assert all(p.startswith(prefix) for p in paths), paths
    return sorted(p[len(prefix):] for p in paths)


def test_iceberg_output_on_s3_under_503s_commits_each_run_exactly_once(s3: FaultProxy, s3_server: S3Server,
                                                                      tmp_path: Path) -> None:
    """The table's files go where the catalog's FileIO says (its s3.endpoint, its keys), for the driver
    and the replicas alike; the driver killed right after the table commit, then a rerun under 503s,
    makes one snapshot; a snapshot's metadata PUT answered 503 after S3 applied it changes nothing."""
    from conftest import REPO, write_files
    from test_table_output import _KILLER

    model = save_mlp(tmp_path / "m.pt", [FEATURES, 8, 1], seed=5)
    local_input(tmp_path)
    catalog = iceberg_catalog(tmp_path, s3.endpoint, **{"s3.access-key-id": ACCESS, "s3.secret-access-key": SECRET})
    location = f"{warehouse(tmp_path)}/preds.db/scores/"
    job = {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": "preds.scores",
           "output_format": "iceberg", "catalog": catalog, "shard_rows": 200}
    flags = [f"--{k.replace('_', '-')}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in job.items()]
    s3.fail("PUT", r"/preds.db/scores/data/[^./][^/]*\.parquet$", times=3)  # publishing a shard's file
    s3.fail(None, r"/preds.db/scores/data/\.", fraction=0.3)  # staged uploads

    killed = subprocess.run([sys.executable, "-c", _KILLER, "after", *flags], cwd=REPO, capture_output=True,
                            text=True, timeout=240)

    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(iceberg_snapshots(catalog, "preds.scores")) == 1  # the commit landed, the driver never knew
    assert f"{location}{SUCCESS}" not in s3_server.keys(location)
    assert hit(s3, "PUT", r"/preds.db/scores/data/")  # the replica wrote through the catalog's endpoint
    assert any("/_journal/" in k for k in s3_server.keys(location)) and leaked(stored_text(s3_server, location)) == []
    s3.clear()
    s3.fail("GET", r"/preds.db/scores/metadata/", times=2)  # PyIceberg reading the table's metadata
    s3.fail("GET", r"/preds.db/scores/_journal/", times=2)

    rerun = pipelines.run(**job, progress=False)

    assert (rerun.status, rerun.errors) == ("succeeded", [])
    assert len(iceberg_snapshots(catalog, "preds.scores")) == 1  # recognised by its generation: no second one
    inputs = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "in").glob("*.parquet"))])
    check_table_scored(s3_server, iceberg_table_files(s3_server, catalog, "preds.scores"), model, inputs)
    assert hit(s3, "GET", r"/preds.db/scores/metadata/")
    assert f"{location}{SUCCESS}" in s3_server.keys(location) and manifest(s3_server, location)["rows_out"] == 1000
    verified = pipelines.verify("preds.scores", sample=5, seed=1, catalog=catalog)
    assert verified.ok and verified.complete, verified.problems

    # An append: its snapshot's metadata file PUT answered 503 after S3 stored it (the client writes it again).
    write_files(tmp_path / "in" / "more", [400], features=FEATURES, row_group_size=200, start=5000, seed=7)
    s3.clear()
    # pyarrow uploads them in parts: the completing POST is the one that makes the file exist.
    s3.fail("POST", r"/preds.db/scores/metadata/[^/]*\.metadata\.json\?uploadId=", times=1, lost=True)
    s3.fail("PUT", r"/preds.db/scores/metadata/[^/]*\.avro\?partNumber=", times=1, lost=True)
    again = pipelines.run(**job, progress=False)
    assert (again.status, again.rows_out) == ("succeeded", 400)
    snapshots = iceberg_snapshots(catalog, "preds.scores")
    generations = [s.summary.additional_properties.get("batch-infer.generation") for s in snapshots]
    assert generations[0] == "1" and len(generations) == len(set(generations)) == 2  # the rerun added nothing
    assert hit(s3, "POST", r"/metadata/[^/]*\.metadata\.json\?") and hit(s3, "PUT", r"/metadata/[^/]*\.avro\?")
    inputs = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "in").rglob("*.parquet"))])
    check_table_scored(s3_server, iceberg_table_files(s3_server, catalog, "preds.scores"), model, inputs)
    assert pipelines.run(**job, progress=False).rows_out == 0
    assert len(iceberg_snapshots(catalog, "preds.scores")) == 2  # nothing new: no snapshot
    # The catalog's keys were used, and are stored nowhere: not in the table's metadata, the manifest or journal.
    assert leaked(stored_text(s3_server, location)) == []
    assert leaked(killed.stdout + killed.stderr + json.dumps(dataclasses_dict(again))) == []


def test_a_delta_commit_that_loses_the_race_to_another_writer_is_made_once_on_top_of_it(
        s3: FaultProxy, s3_server: S3Server, tmp_path: Path) -> None:
    """Another writer (here an append; an OPTIMIZE alike) commits the version ours is taking while our log
    entry's PUT is on its way: S3's conditional PUT refuses ours (412), and the sink commits again on the
    table as it now is, once, keeping the other writer's commit."""
    import threading

    from pipelines.tables.delta_sink import DeltaSink

    uri = f"s3://{BUCKET}/race/t"
    write_deltalake(uri, rows(0, 10, 1), storage_options=direct_options(s3_server))
    sink = DeltaSink(s3.uri("race/t"))
    sink.check_schema(lambda: rows(0, 1, 0).schema)
    fs = s3_server.filesystem()
    pq.write_table(rows(100, 130, 3), f"{BUCKET}/race/t/ours-g1.parquet", filesystem=fs)
    size = fs.get_file_info(f"{BUCKET}/race/t/ours-g1.parquet").size
    held = s3.stall("PUT", r"/race/t/_delta_log/0+1\.json$", times=1)

    def other_writer() -> None:  # once our PUT of version 1 is held, the other writer takes version 1
        while not s3.injected("PUT"):
            threading.Event().wait(0.02)
        write_deltalake(uri, rows(10, 20, 2), mode="append", storage_options=direct_options(s3_server))
        held.set()

    racer = threading.Thread(target=other_writer, daemon=True)
    racer.start()
    assert sink.commit([OutputFile("ours-g1.parquet", 30, size)], [], 1) is True
    racer.join(60)

    assert [r.status for r in s3.requests if r.method == "PUT" and "_delta_log/0" in r.path] == [0, 412, 200]
    table = DeltaTable(uri, storage_options=direct_options(s3_server))
    assert table.version() == 2 and table.transaction_version("batch-infer") == 1
    assert sorted(table.to_pyarrow_table()["id"].to_pylist()) == list(range(20)) + list(range(100, 130))
    assert sink.commit([OutputFile("ours-g1.parquet", 30, size)], [], 1) is False  # never twice
