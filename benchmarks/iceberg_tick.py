"""An unchanged tick over an Iceberg input table: 1,000 snapshots, 10,000 data files (issue 13).

The target: a cron tick whose table has not changed since the last run (same snapshot,
complete output) takes under 5 s and reads no data file footer: it is planned from the
manifest, never from the table's file list (no `plan_files`, no manifest of the table read).

Steps, in this process (`pipelines.run`, the driver lane: no Ray):

1. build the table (cached under ``benchmarks/.data/iceberg-tick-S-F/``): S snapshots, each a
   fast append of F pre-written Parquet files (`add_files`), a SQL catalog on SQLite;
2. the first run scores every file: its wall time and the planner's footer reads (one per file);
3. the same run again (the tick): wall time, the planner's footer reads, the table's
   `plan_files` calls and the data files any thread of this process opened (inotify).

Example:
    python -m benchmarks.iceberg_tick                 # 1,000 snapshots x 10 files
    python -m benchmarks.iceberg_tick --snapshots 20 --files-per-snapshot 5   # quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TICK_TARGET_S = 5.0
FEATURES = 8
_MARKER = "_complete.json"


def build(root: Path, snapshots: int, files_per_snapshot: int, rows_per_file: int) -> dict[str, str]:
    """The table `bench.features` (cached by its marker) and its catalog properties."""
    from pyiceberg.catalog import load_catalog

    catalog = {"type": "sql", "uri": f"sqlite:///{root}/catalog.db", "warehouse": f"file://{root}/warehouse"}
    wanted = {"snapshots": snapshots, "files_per_snapshot": files_per_snapshot, "rows_per_file": rows_per_file}
    marker = root / _MARKER
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return catalog
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    store = load_catalog("default", **catalog)
    store.create_namespace("bench")
    schema = pa.schema([("id", pa.int64())] + [(f"f{i}", pa.float32()) for i in range(FEATURES)])
    table = store.create_table("bench.features", schema=schema)
    data = root / "files"
    data.mkdir()
    rng = np.random.default_rng(7)
    index = 0
    for _ in range(snapshots):
        paths = []
        for _ in range(files_per_snapshot):
            ids = np.arange(index * rows_per_file, (index + 1) * rows_per_file)
            columns = [pa.array(ids)] + [pa.array(rng.standard_normal(rows_per_file, dtype=np.float32))
                                         for _ in range(FEATURES)]
            path = table.location().removeprefix("file://") + f"/data/part-{index:06d}.parquet"
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_arrays(columns, schema=schema), path)
            paths.append("file://" + path)
            index += 1
        table.add_files(paths, check_duplicate_files=False)  # one fast append: one snapshot, its files
    marker.write_text(json.dumps(wanted))
    return catalog


@contextmanager
def counters() -> Iterator[dict[str, int]]:
    """Count the planner's footer reads and the table scans' `plan_files` calls while active."""
    import importlib

    from pyiceberg.table import DataScan

    plan = importlib.import_module("pipelines.plan")  # the module (`pipelines.plan` is also a function)

    counts = {"footers": 0, "plan_files": 0}
    read, planned = plan.read_parquet_footer, DataScan.plan_files

    def footer(*args: Any, **kwargs: Any) -> Any:
        counts["footers"] += 1
        return read(*args, **kwargs)

    def plan_files(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["plan_files"] += 1
        return planned(self, *args, **kwargs)

    plan.read_parquet_footer, DataScan.plan_files = footer, plan_files  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        plan.read_parquet_footer, DataScan.plan_files = read, planned  # type: ignore[method-assign]


def measure(root: Path, *, snapshots: int, files_per_snapshot: int, rows_per_file: int = 10) -> dict[str, Any]:
    """Build (or reuse) the table, score it once, then time the unchanged tick."""
    import torch

    import pipelines
    from benchmarks.opens import OpenWatch

    started = time.perf_counter()
    catalog = build(root / "table", snapshots, files_per_snapshot, rows_per_file)
    built = time.perf_counter() - started
    model = root / "model.pt"
    torch.manual_seed(0)
    torch.save(torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)).state_dict(),
               model)
    out = root / "out"
    shutil.rmtree(out, ignore_errors=True)
    job = {"model": str(model), "input": "bench.features", "input_format": "iceberg", "catalog": catalog,
           "output": str(out), "progress": False}
    with counters() as first_counts:
        started = time.perf_counter()
        first = pipelines.run(**job)
        first_s = time.perf_counter() - started
    assert first.complete, first.errors
    data = Path(str(root / "table" / "warehouse"))
    with counters() as tick_counts, OpenWatch(data) as watch:
        started = time.perf_counter()
        tick = pipelines.run(**job)
        tick_s = time.perf_counter() - started
    opened = None if watch.files is None else sorted(f for f in watch.files if f.endswith(".parquet"))
    return {"snapshots": snapshots, "files": snapshots * files_per_snapshot, "build_seconds": round(built, 1),
            "first_seconds": round(first_s, 2), "first_footer_reads": first_counts["footers"],
            "tick_seconds": round(tick_s, 3), "tick_footer_reads": tick_counts["footers"],
            "tick_planned_files": tick_counts["plan_files"],
            "tick_data_files_opened": None if opened is None else len(opened),
            "tick_shards_skipped": tick.shards_skipped, "tick_rows_in": tick.rows_in,
            "tick_target_seconds": TICK_TARGET_S, "tick_within_target": tick_s < TICK_TARGET_S}


def main(argv: list[str] | None = None) -> None:
    from benchmarks.data import ROOT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=1000)
    parser.add_argument("--files-per-snapshot", type=int, default=10)
    parser.add_argument("--rows-per-file", type=int, default=10)
    args = parser.parse_args(argv)
    root = ROOT / f"iceberg-tick-{args.snapshots}-{args.files_per_snapshot}"
    result = measure(root, snapshots=args.snapshots, files_per_snapshot=args.files_per_snapshot,
                     rows_per_file=args.rows_per_file)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
