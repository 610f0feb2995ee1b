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
