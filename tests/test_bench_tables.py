"""The table-scale benchmark's pure parts: size parsing, the scaling lines, the open watcher (no Ray)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks import tables
from benchmarks.opens import OpenWatch


def test_parse_sizes() -> None:
    assert tables.parse_sizes("100000,1000,10_000,1000") == [1000, 10000, 100000]
    assert tables.parse_sizes("none") == []
    assert tables.parse_sizes("") == []


def test_run_args_tables_default_only_at_full_scale() -> None:
    from benchmarks import run

    assert run._parse_args(["--scale", "0.05", "--reps", "1"]).tables == []
    assert run._parse_args([]).tables == [1000, 10000, 100000]
    assert run._parse_args(["--scale", "0.05", "--tables", "1000"]).tables == [1000]


def test_scaling_ratio_against_10000(capsys: pytest.CaptureFixture[str]) -> None:
    def result(n: int, rate: float) -> dict[str, object]:
        return {"files": n, "shards_per_second": rate, "steady_shards_per_second": rate * 2,
                "unchanged_tick_seconds": 1.5, "unchanged_tick_input_files_opened": 0,
                "cpu_ms_per_shard": 200.0 / rate, "driver_peak_rss_bytes": 200 << 20}

    line = tables._scaling([result(1000, 50.0), result(10000, 200.0), result(100000, 160.0)])
    assert line is not None and line["reference_files"] == 10000
    assert line["ratio"] == {"shards_per_second": 0.8, "steady_shards_per_second": 0.8, "cpu_ms_per_shard": 1.25}
    out = capsys.readouterr().out
    assert "100,000 files / 10,000 files = 0.80" in out and "CPU ms per shard" in out and "= 1.25" in out
    assert "driver peak RSS 200 MiB" in out


def test_the_table_gives_the_kernels_share_of_the_cpu_per_file(capsys: pytest.CaptureFixture[str]) -> None:
    row = {"files": 100_000, "run_seconds": 50.0, "shards_per_second": 2000.0, "steady_shards_per_second": 2100.0,
           "driver_peak_rss_bytes": 250 << 20, "manifest_bytes": 4_830_000, "unchanged_tick_seconds": 1.6,
           "unchanged_tick_input_files_opened": 0, "changed_tick_seconds": 4.0, "driver_cpu_seconds": 11.0,
           "cpu_ms_per_shard": 0.9, "kernel_cpu_ms_per_shard": 0.28, "shards_per_call": 63.8, "call_gaps": 0.046,
           "path": "driver lane, 2 child replica processes", "problems": []}
    tables._print([row])
    out = capsys.readouterr().out
    header, line = [text for text in out.splitlines() if "files" in text and "shards/s" in text][0], \
        [text for text in out.splitlines() if text.strip().startswith("100,000")][0]
    assert header.split()[-3:] == ["kernel", "shards/call", "gaps"]
    assert line.split()[-4:] == ["0.90", "0.28", "63.8", "4.6%"]
    assert "kernel: of which in the kernel" in out and "gaps: the replicas' time between two calls" in out
    older = {key: value for key, value in row.items() if key not in ("kernel_cpu_ms_per_shard", "call_gaps")}
    tables._print([older])  # a result saved before those columns
    assert [text for text in capsys.readouterr().out.splitlines()
            if text.strip().startswith("100,000")][0].split()[-4:] == ["0.90", "-", "63.8", "-"]


def test_the_call_gaps_are_each_replicas_time_between_two_calls(tmp_path: Path) -> None:
    """The share of the replicas' time between the end of a call's last shard and the start of the next call's
    first (what showed a lane child waiting on the driver 12% of its time), from a run's timeline: gaps inside a
    call do not count, nor the time before a replica's first shard."""
    import json

    def span(replica: int, call: int, start: float, end: float) -> dict[str, object]:
        return {"ph": "X", "tid": replica, "ts": start, "dur": end - start, "args": {"call": call, "rows_in": 100}}

    trace = tmp_path / "t.timeline.json"
    trace.write_text(json.dumps({"traceEvents": [
        {"ph": "M", "name": "thread_name", "tid": -1},
        span(-1, 1, 100, 110), span(-1, 1, 112, 120), span(-1, 2, 130, 140), span(-1, 2, 140, 150),  # 10 of 50
        span(-2, 1, 0, 30), span(-2, 2, 30, 50),  # none: its second call starts as the first ends
    ]}))
    assert tables._calls(trace) == {"shards_per_call": 1.5, "call_gaps": round(10 / 100, 3)}
    trace.write_text(json.dumps({"traceEvents": [{"ph": "X", "tid": -1, "ts": 0, "dur": 5, "args": {}}]}))
    assert tables._calls(trace) == {"shards_per_call": None, "call_gaps": None}  # before bundles: not told


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify")
def test_open_watch_counts_file_opens_not_listings(tmp_path: Path) -> None:
    (tmp_path / "d0").mkdir()
    for name in ("d0/a.parquet", "d0/b.parquet", "c.parquet"):
        (tmp_path / name).write_bytes(b"x")
    with OpenWatch(tmp_path) as watch:
        sorted(tmp_path.rglob("*"))  # listings only
    assert watch.files == set()
    with OpenWatch(tmp_path) as watch:
        (tmp_path / "d0" / "b.parquet").read_bytes()
        (tmp_path / "c.parquet").read_bytes()
        (tmp_path / "c.parquet").read_bytes()
    assert watch.files == {"d0/b.parquet", "c.parquet"}
