"""Credentials given in URIs (`s3://...?access_key=...&secret_key=...`) are used, never persisted or printed.

Against the loopback S3 server (tests/s3.py), which takes any key: the secrets here are distinctive
strings that must appear nowhere in what a run leaves behind or prints.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import cli, save_mlp
from s3 import BUCKET, FaultProxy, S3Server, s3, s3_server  # noqa: F401 - fixtures

import pipelines
from basis.storage import REDACTED, redact, resolve

ACCESS, SECRET, TOKEN = "AKIALEAKCHECK0001", "sEcReTlEaKcHeCk42", "tOkEnLeAkCheck77"
LEAKS = (ACCESS, SECRET, TOKEN)


def _with_keys(uri: str) -> str:
    """An `s3://` URI carrying an access key id and secret key (pyarrow takes them as `user:password@`)."""
    return uri.replace("s3://", f"s3://{ACCESS}:{SECRET}@", 1)


def _in_query(uri: str) -> str:
    """The same keys as query options (which pyarrow refuses: a clear exit 2, with no secret in it)."""
    return f"{uri}&access_key={ACCESS}&secret_key={SECRET}&session_token={TOKEN}"


def _leaked(text: str) -> list[str]:
    return [secret for secret in LEAKS if secret in text]


def test_redact_keeps_the_uri_usable() -> None:
    uri = "s3://b/in/?endpoint_override=127.0.0.1:9000&scheme=http&access_key=A&secret_key=S&session_token=T"
    assert redact(uri) == (f"s3://b/in/?endpoint_override=127.0.0.1:9000&scheme=http&access_key={REDACTED}"
                           f"&secret_key={REDACTED}&session_token={REDACTED}")
    userinfo = "s3://AKIA1:se%2Fcr%2Bet@b/in/?endpoint_override=127.0.0.1:9000&scheme=http"
    assert redact(userinfo) == f"s3://{REDACTED}:{REDACTED}@b/in/?endpoint_override=127.0.0.1:9000&scheme=http"
    assert redact("hdfs://etl@namenode:8020/x") == "hdfs://etl@namenode:8020/x"  # a user alone is no secret
    assert redact("/data/keys/part-0.parquet") == "/data/keys/part-0.parquet"
    location = resolve(userinfo)
    assert location.uri == redact(userinfo) and location.path == "b/in"
    assert resolve(redact(userinfo)).path == "b/in"  # a redacted URI resolves, with the environment's credentials


def test_no_secret_of_a_uri_is_persisted_or_printed(s3: FaultProxy, s3_server: S3Server, tmp_path: Path) -> None:
    fs = s3_server.filesystem()
    values = np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32)
    with fs.open_output_stream(f"{BUCKET}/creds/in/part-0.parquet") as sink:
        pq.write_table(pa.table({"id": np.arange(300), **{f"f{j}": values[:, j] for j in range(4)}}), sink,
                       row_group_size=100)
    with fs.open_output_stream(f"{BUCKET}/creds/in/part-1.parquet") as sink:
        sink.write(b"not parquet at all")  # a failed shard: its error is recorded
    save_mlp(tmp_path / "m.pt", [4, 8, 1], seed=3)
    with fs.open_output_stream(f"{BUCKET}/creds/m.pt") as sink:
        sink.write((tmp_path / "m.pt").read_bytes())
    model, source, output = (_with_keys(s3.uri(key)) for key in ("creds/m.pt", "creds/in/", "creds/out/"))

    result = cli("run", "--model", model, "--input", source, "--output", output, "--shard-rows", "100", "--json",
                 "-v", "--report", str(tmp_path / "report.json"))
    assert result.returncode == 1, result.stderr  # part-1 failed; part-0's 3 shards committed
    report = json.loads(result.stdout)
    assert report["rows_out"] == 300 and report["shards_failed"] == 1
    assert REDACTED in report["output"] and "endpoint_override" in report["output"]
    printed = result.stdout + result.stderr + (tmp_path / "report.json").read_text()
    assert _leaked(printed) == []  # before: the report's output and the manifest held all three
    stored = {key: fs.open_input_stream(f"{BUCKET}/{key}").read().decode(errors="replace")
              for key in s3_server.keys("creds/out/")}
    assert "creds/out/_manifest.json" in stored and _leaked(" ".join(stored.values())) == []
    manifest = json.loads(stored["creds/out/_manifest.json"])
    assert manifest["source"]["input"] == redact(source) and manifest["config"]["output"] == redact(output)
    assert pipelines.plan(model=model, input=source, output=output).output.uri == redact(output)  # the metrics tag

    # The redacted manifest still serves verify and status (credentials from the environment).
    for command in (["verify", output, "--sample", "20"], ["status", output], ["status", output, "--json"]):
        result = cli(*command)
        assert result.returncode == 0, result.stdout + result.stderr
        assert _leaked(result.stdout + result.stderr) == [], command
    # Errors name the URI, without its secrets.
    result = cli("run", "--model", _with_keys(s3.uri("creds/missing.pt")), "--input", source, "--output", output)
    assert result.returncode == 2 and "creds/missing.pt" in result.stderr
    assert _leaked(result.stderr) == [] and "Traceback" not in result.stderr
    result = cli("run", "--model", model, "--input", _in_query(s3.uri("creds/in/")), "--output", output)
    assert result.returncode == 2 and "Unexpected query parameter" in result.stderr
    assert _leaked(result.stderr) == [] and "Traceback" not in result.stderr
