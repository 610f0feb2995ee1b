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
           "cpu_ms_per_shard": 0.9, "kernel_cpu_ms_per_shard": 0.28, "shards_per_call": 63.8,
           "path": "driver lane, 2 child replica processes", "problems": []}
    tables._print([row])
    out = capsys.readouterr().out
    header, line = [text for text in out.splitlines() if "files" in text and "shards/s" in text][0], \
        [text for text in out.splitlines() if text.strip().startswith("100,000")][0]
    assert header.split()[-2:] == ["kernel", "shards/call"]
    assert line.split()[-3:] == ["0.90", "0.28", "63.8"]
    assert "kernel: of which in the kernel" in out
    older = {key: value for key, value in row.items() if key != "kernel_cpu_ms_per_shard"}  # a result saved before
    tables._print([older])
    assert [text for text in capsys.readouterr().out.splitlines()
            if text.strip().startswith("100,000")][0].split()[-3:] == ["0.90", "-", "63.8"]


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
