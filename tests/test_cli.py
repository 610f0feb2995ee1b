"""The CLI as a user drives it: `python -m pipelines` (the same entry point as `batch-infer`)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import cli, golden_model, save_mlp, write_files


@pytest.fixture
def golden_job(tmp_path: Path) -> Path:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [1, 2], "a": pa.array([1.0, 0.0], pa.float32()),
                             "b": pa.array([2.0, 0.0], pa.float32())}), tmp_path / "in" / "x.parquet")
    golden_model(tmp_path / "g.pt")
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {tmp_path / 'g.pt'}\ninput: {tmp_path / 'in'}\noutput: {tmp_path / 'wrong'}\n"
                   f"batch_size: 1\ncpus_per_replica: 0.5\n")
    return job


def test_golden_value_through_the_cli_with_json_report_and_timeline(tmp_path: Path, golden_job: Path) -> None:
    result = cli("run", str(golden_job), "--set", f"output={tmp_path / 'set'}", "--output", str(tmp_path / "out"),
                 "--set", "replicas=1", "--json", "--report", str(tmp_path / "r.json"),
                 "--timeline", str(tmp_path / "t.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout holds the JSON report and nothing else
    assert report["status"] == "succeeded" and report["rows_out"] == 2 and report["shards_done"] == 1
    assert set(report) >= {"status", "shards_total", "shards_done", "shards_skipped", "shards_failed", "rows_in",
                           "rows_out", "rows_rejected", "seconds", "rows_per_second", "errors", "replicas"}
    assert set(report["replicas"][0]) == {"node", "device", "gpu_ids", "shards", "rows", "busy_seconds",
                                          "peak_rss_bytes", "ended"}
    assert report["replicas"][0]["ended"] in ("finished", "released: no shards left")
    assert json.loads((tmp_path / "r.json").read_text()) == report
    assert not (tmp_path / "set").exists() and not (tmp_path / "wrong").exists()  # flag > --set > file
    out = pq.read_table(tmp_path / "out" / "x-00000.parquet")
    assert out["prediction"][0].as_py() == pytest.approx(0.7757198, abs=1e-7)
    assert out["prediction"][1].as_py() == pytest.approx(torch.sigmoid(torch.tensor(0.3 * 0.5 + 0.5 * 0.5 + 0.9 * 0.5)).item())
    trace = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert [e["name"] for e in trace if e["ph"] == "X"] == ["x.parquet:0-1"]

    status = cli("status", str(tmp_path / "out"))
    assert status.returncode == 0 and "complete" in status.stdout and "1 committed" in status.stdout

    again = cli("run", str(golden_job), "--output", str(tmp_path / "out"))  # nothing to do: no Ray started
    assert again.returncode == 0, again.stderr
    assert "0 shard(s) done, 1 already committed" in again.stdout


def test_exit_2_cases_name_the_problem_and_write_nothing(tmp_path: Path, golden_job: Path) -> None:
    out = tmp_path / "out"
    unknown = cli("run", str(golden_job), "--set", "batchsize=5", "--output", str(out))
    assert unknown.returncode == 2 and "unknown config key" in unknown.stderr and "batch_size" in unknown.stderr

    pickled = tmp_path / "whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 1)), pickled)
    unsafe = cli("run", str(golden_job), "--model", str(pickled), "--output", str(out))
    assert unsafe.returncode == 2 and "needs pickle code" in unsafe.stderr

    save_mlp(tmp_path / "wide.pt", [3, 1])
    wide = cli("run", str(golden_job), "--model", str(tmp_path / "wide.pt"), "--output", str(out))
    assert wide.returncode == 2 and "expects 3 input features" in wide.stderr and "x.parquet" in wide.stderr

    missing = cli("run", "--model", str(tmp_path / "g.pt"), "--input", str(tmp_path / "in"))
    assert missing.returncode == 2 and "output" in missing.stderr
    assert "Traceback" not in unknown.stderr + unsafe.stderr + wide.stderr + missing.stderr
    assert not out.exists()

    no_manifest = cli("status", str(tmp_path / "nowhere"))
    assert no_manifest.returncode == 2 and "no batch-infer manifest" in no_manifest.stderr


def test_plan_prints_shards_and_writes_nothing(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [300, 200], features=4, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [4, 1])
    result = cli("plan", "--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "out"), "--shard-rows", "200", "--features", "f00,f01,f02,f03",
                 "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert [s["id"] for s in plan["shards"]] == ["part-0000.parquet:0-2", "part-0000.parquet:2-3",
                                                "part-0001.parquet:0-2"]
    assert plan["features"] == ["f00", "f01", "f02", "f03"] and plan["passthrough"] == ["id", "name"]
    assert not (tmp_path / "out").exists()


def test_lock_held_exits_3(tmp_path: Path, golden_job: Path) -> None:
    import os
    import socket

    out = tmp_path / "out"
    out.mkdir()
    (out / "_LOCK").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                           "heartbeat": 9e18, "started": "now"}))
    result = cli("run", str(golden_job), "--output", str(out))
    assert result.returncode == 3 and "another run holds the lock" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["_LOCK"]


def test_data_error_exits_1(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [100], features=4, row_group_size=100)
    (tmp_path / "in" / "part-9999.parquet").write_bytes(b"garbage")
    save_mlp(tmp_path / "m.pt", [4, 1])
    result = cli("run", "--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "out"), "--cpus-per-replica", "0.5")
    assert result.returncode == 1, result.stderr
    assert "part-9999.parquet" in result.stdout and "no _SUCCESS" in result.stdout
    assert (tmp_path / "out" / "part-0000-00000.parquet").exists()
