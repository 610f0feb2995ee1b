"""The benchmark's summary table (issue 8) and its CLI switches: pure parts, no Ray, no Daft venv."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import peers, run, summary


def test_row_ratios_are_against_the_limit_and_the_faster_peer() -> None:
    seconds = {"batch-infer": 10.0, "ray-data": 40.0, "daft": 25.0, "floor": 30.0, "limit": 8.0}
    row = summary.summarise_row("data-bound", seconds, 32_000_000)
    assert row["vs_limit"] == 0.8
    assert (row["best_peer"], row["vs_best_peer"]) == ("daft", 2.5)  # the plain loop is no peer
    assert row["batch_infer_rows_per_second"] == 3_200_000


def test_render_marks_a_peer_that_could_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_venv() -> None:
        raise peers.PeerUnavailable("could not build the Daft venv (see daft-venv.log):\nERROR: no such package")

    monkeypatch.setattr(peers, "daft_python", no_venv)
    notes: dict[str, str] = {}
    assert run._daft_python(["batch-infer", "daft"], notes) is None
    label = summary.workload_label("small job, ...", (64, 16, 1), 100_000, 1, whole=True)
    rows = [summary.summarise_row(label, {"batch-infer": 9.0, "ray-data": 12.8, "floor": 1.9}, 100_000)]
    text = summary.render(rows, notes)
    line = next(line for line in text.splitlines() if line.startswith("| small job"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == "small job 64->16->1, 100k rows, 1 file, whole process"
    assert cells[1:] == ["9.00 s (11.11k rows/s)", "12.80 s", "n/a", "1.90 s", "-", "-", "1.42x (Ray Data)"]
    assert "Daft: not run: could not build the Daft venv" in text


def test_quick_is_the_smoke_scale_unless_overridden() -> None:
    args = run._parse_args(["--quick"])
    assert (args.scale, args.reps, args.tables) == (0.05, 1, [])
    assert run._parse_args(["--quick", "--reps", "2"]).reps == 2
    full = run._parse_args([])
    assert (full.scale, full.reps) == (1.0, 3)
    assert full.systems == ["batch-infer", "ray-data", "daft", "floor", "limit"]


def test_steady_state_splits_a_run_into_start_up_and_its_steady_rate() -> None:
    # Two replicas; replica 1 commits its first shard last, at 3 s: the steady state runs 3 s -> 7 s.
    spans = [
        {"replica": 0, "start": 0.0, "end": 2.0, "rows": 100},
        {"replica": 1, "start": 0.5, "end": 3.0, "rows": 100},
        {"replica": 0, "start": 2.0, "end": 4.0, "rows": 100},  # half of it inside
        {"replica": 1, "start": 3.0, "end": 5.0, "rows": 100},
        {"replica": 0, "start": 4.0, "end": 6.0, "rows": 100},
        {"replica": 1, "start": 5.0, "end": 7.0, "rows": 100},
    ]
    steady = summary.steady_state(spans, seconds=8.0)
    assert steady == {"rows_per_second": 87.5, "start_up_seconds": round(8.0 - 600 / 87.5, 3), "steady_from_seconds": 3.0}
    assert summary.steady_state(spans[:2], seconds=3.0) is None  # nothing after the first shards: no steady state
    assert summary.steady_state([], seconds=1.0) is None


def test_the_table_states_the_steady_rate_against_the_limits() -> None:
    steady = {"rows_per_second": 4_000_000.0, "start_up_seconds": 2.5}
    row = summary.summarise_row("data-bound", {"batch-infer": 10.5, "limit": 6.4}, 32_000_000, steady)
    assert row["steady"]["steady_vs_limit"] == 0.8  # 4M rows/s against the limit's 32M / 6.4 s = 5M rows/s
    text = summary.render([row], {})
    assert "batch-infer, data-bound: steady state 4.00M rows/s = 0.80x the limit's rate; start-up" in text
    assert "2.50 s" in text
    both = summary.summarise_row("data-bound", {"batch-infer": 10.5, "limit": 6.4}, 32_000_000, steady,
                                 parallel_limit=7.2)
    assert both["steady"]["steady_vs_parallel_limit"] == 0.9 and both["steady"]["limit_scaling"] == 0.889
    assert ("0.80x the limit's rate (0.90x the rate of the limit's loop run on every core at once, which reaches"
            " 0.89x of the limit)") in summary.render([both], {})


def test_each_repetition_measures_the_limit_right_after_batch_infer_and_the_table_pairs_them() -> None:
    names = ["batch-infer", "ray-data", "daft", "floor", "limit"]
    orders = [run._order(names, rep) for rep in range(5)]
    for order in orders:
        assert sorted(order) == sorted(names)
        assert order[order.index("batch-infer") + 1] == "limit"
    assert [order[0] for order in orders] == ["batch-infer", "ray-data", "daft", "floor", "batch-infer"]
    assert run._order(["ray-data", "limit"], 1) == ["limit", "ray-data"]  # no batch-infer: rotated only
    # Per-arm medians pair the slowest batch-infer run with the fastest limit here (0.75x); each repetition
    # against its own limit gives 0.8x, 0.8x and 0.9x.
    steadies = [{"rows_per_second": 4.0e6}, {"rows_per_second": 3.6e6}, {"rows_per_second": 4.5e6}]
    paired = summary.paired_ratio(steadies, [6.4, 7.111, 6.4], 32_000_000)
    assert paired == 0.8
    assert summary.paired_ratio([None, None], [6.4, 6.4], 32_000_000) is None
    steady = {"rows_per_second": 4.0e6, "start_up_seconds": 2.5}
    row = summary.summarise_row("data-bound", {"batch-infer": 10.5, "limit": 6.0}, 32_000_000, steady, paired=paired)
    assert row["steady"]["steady_vs_limit"] == 0.75 and row["steady"]["steady_vs_limit_paired"] == 0.8
    assert ("0.75x the limit's rate; 0.80x as the median of each repetition against the limit measured right"
            " after it") in summary.render([row], {})


def test_the_limit_arm_runs_its_loop_on_every_core_at_once(tmp_path: Path) -> None:
    """`benchmarks.limit.run` measures the single-core loop, then `cores` copies of it released together:
    each copy covers every row, and the parallel limit is stated against the ideal one."""
    from benchmarks import data, limit

    data._ensure_model((64, 16, 1), tmp_path / "m.pt")
    (tmp_path / "in").mkdir()
    for index in range(2):
        data._write_file(tmp_path / "in" / f"part-{index}.parquet", index, 2_000)
    result = limit.run(tmp_path / "m.pt", tmp_path / "in", tmp_path / "out")
    assert result["rows"] == 4_000 and result["cores"] >= 1
    parallel = result["parallel"]
    assert parallel["copies"] == result["cores"] and len(parallel["single_core_seconds_each"]) == result["cores"]
    assert parallel["seconds"] > 0 and parallel["scaling"] > 0
    total = sum(e["total"] for e in parallel["single_core_seconds_each"]) / result["cores"]
    assert parallel["scaling"] == pytest.approx(result["single_core_seconds"]["total"] / total, abs=0.01)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part-0.parquet", "part-1.parquet"]  # copies gone


def test_whole_process_times_are_medians_and_state_the_cli_against_the_api(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 15's first target from one `make bench`: a single whole-process run was off by 0.2x between two."""
    from benchmarks import processes

    runs = [{"workload": "data", "system": "batch-infer", "seconds": s, "first_output_seconds": 1.0}
            for s in (17.3, 8.4, 9.3, 9.0)]
    assert processes._median_run(runs)["seconds"] == 9.0  # the lower middle of an even count
    assert processes._median_run(runs[:3])["seconds"] == 9.3
    timings = [{"workload": "data", "system": "batch-infer", "seconds": 9.0},
               {"workload": "data", "system": "daft", "seconds": 13.5},
               {"workload": "data", "system": "ray-data", "seconds": 40.0}]
    run._print_cli_against_api(timings, {"data": {"batch-infer": [{"seconds": s} for s in (8.0, 7.5, 9.5)]}})
    line = capsys.readouterr().out.splitlines()[0]
    assert "9.00 s against the API's 8.00 s: 1.12x" in line and "(daft) 13.50 s: 1.50x faster" in line, line
