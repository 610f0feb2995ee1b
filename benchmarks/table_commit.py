"""``python -m benchmarks.table_commit``: what committing into a table costs (issue 13, "Measured").

The data-bound workload (``benchmarks.data``: MLP 64-16-1 over 16 files) is run
by batch-infer in-process on one Ray connection, into a Parquet directory, a
Delta table and an Iceberg table (SQL catalog on SQLite), ``--reps`` times each
in rotated order, each run into a fresh output. Reported: the median and the
fastest wall time per format, their ratios to Parquet (the budget is 1.05), and
the driver's table work alone, timed by wrapping it in this process: the plan's
table listing and schema check (`TableSink.present`, `TableSink.check_schema`)
and the commit (``Recorder._commit_table``: listing the table, reading the new
files' footers, one transaction). On a shared machine the wall times swing by
more than the table work costs; its share of the run is the steadier figure.

Example:
    python -m benchmarks.table_commit --scale 0.05 --reps 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.data import OUT, ensure, workloads

FORMATS = ("parquet", "delta", "iceberg")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.table_commit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="row-count factor (default 1: 32M rows)")
    parser.add_argument("--reps", type=int, default=3, help="runs per format (default 3)")
    parser.add_argument("--shard-rows", type=int, default=None, help="shard_rows for every run (default: the system's)")
    args = parser.parse_args(argv)
    workload = ensure(workloads(args.scale)["data"])

    import pipelines
    from benchmarks.systems import connect_ray
    from pipelines.commit import Recorder
    from pipelines.tables.sink import TableSink

    commit_seconds: list[float] = []

    def timed(real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                commit_seconds.append(time.perf_counter() - started)
        return wrapper

    Recorder._commit_table = timed(Recorder._commit_table)  # type: ignore[method-assign]
    TableSink.present = timed(TableSink.present)  # type: ignore[method-assign]
    TableSink.check_schema = timed(TableSink.check_schema)  # type: ignore[method-assign]
    root = OUT / "table-commit"
    connect_ray()
    times: dict[str, list[float]] = {fmt: [] for fmt in FORMATS}
    commits: dict[str, list[float]] = {fmt: [] for fmt in FORMATS}
    try:
        for rep in range(args.reps):
            order = FORMATS[rep % 3:] + FORMATS[:rep % 3]
            for fmt in order:
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir(parents=True)
                options: dict[str, Any] = {"model": str(workload.model), "input": str(workload.input),
                                           "output_format": fmt, "progress": False}
                if args.shard_rows:
                    options["shard_rows"] = args.shard_rows
                if fmt == "iceberg":
                    (root / "wh").mkdir()
                    options.update(output="bench.preds", catalog={"type": "sql", "uri": f"sqlite:///{root}/cat.db",
                                                                   "warehouse": f"file://{root}/wh"})
                else:
                    options["output"] = str(root / "out")
                commit_seconds.clear()
                started = time.perf_counter()
                report = pipelines.run(**options)
                seconds = time.perf_counter() - started
                if report.status != "succeeded" or report.rows_out != workload.rows:
                    raise SystemExit(f"{fmt}: {report.status}, {report.rows_out} rows: {report.errors[:2]}")
                times[fmt].append(seconds)
                commits[fmt].append(sum(commit_seconds))
                print(json.dumps({"format": fmt, "rep": rep, "seconds": round(seconds, 3),
                                  "table_seconds": round(sum(commit_seconds), 3), "shards": report.shards_total}),
                      file=sys.stderr)
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(times["parquet"])
    print(f"data-bound workload, {workload.rows:,} rows, {args.reps} rep(s), median wall seconds:")
    fastest = min(times["parquet"])
    for fmt in FORMATS:
        median, table = statistics.median(times[fmt]), statistics.median(commits[fmt])
        print(f"  {fmt:8s} {median:8.2f} s  x{median / base:.3f} of parquet (fastest x{min(times[fmt]) / fastest:.3f}); "
              f"table work {table:.3f} s = {100 * table / base:.2f}% of parquet's run; "
              f"runs {[round(t, 2) for t in times[fmt]]}")
    print(json.dumps({"rows": workload.rows, "reps": args.reps,
                      **{fmt: {"median_seconds": round(statistics.median(times[fmt]), 3),
                               "ratio": round(statistics.median(times[fmt]) / base, 4),
                               "fastest_ratio": round(min(times[fmt]) / fastest, 4),
                               "table_seconds": round(statistics.median(commits[fmt]), 4)} for fmt in FORMATS}}))


if __name__ == "__main__":
    main()
