"""`batch-infer demo`: make demo features and a model, run a job on embedded Ray, show the result."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DEMO_FEATURES = 32
DEMO_FILES = 8
DEMO_ROW_GROUPS = 4


def make_features(directory: str, rows: int, *, files: int = DEMO_FILES, features: int = DEMO_FEATURES,
                  seed: int = 0) -> list[str]:
    """Write `rows` rows of demo features as Hive-partitioned Parquet; returns the file paths.

    Columns: `id` (int64), `region` (string), `f00`.. (float32).
    """
    rng = np.random.default_rng(seed)
    paths, start = [], 0
    per_file = -(-rows // files)
    for index in range(files):
        count = min(per_file, rows - start)
        if count <= 0:
            break
        day = f"day=2026-11-{index // 4 + 1:02d}"
        os.makedirs(os.path.join(directory, day), exist_ok=True)
        columns = {
            "id": pa.array(np.arange(start, start + count, dtype=np.int64)),
            "region": pa.array(np.array(["north", "south", "east", "west"])[rng.integers(0, 4, count)]),
        }
        values = rng.standard_normal((features, count), dtype=np.float32)
        columns.update({f"f{i:02d}": pa.array(values[i]) for i in range(features)})
        path = os.path.join(directory, day, f"part-{index:04d}.parquet")
        pq.write_table(pa.table(columns), path, row_group_size=max(1, -(-count // DEMO_ROW_GROUPS)))
        paths.append(path)
        start += count
    return paths


def make_model(path: str, features: int = DEMO_FEATURES, hidden: int = 64, seed: int = 0) -> str:
    """Save a random `features -> hidden -> 1` MLP state_dict."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.Sigmoid(),
                                torch.nn.Linear(hidden, 1), torch.nn.Sigmoid())
    torch.save(model.state_dict(), path)
    return path


def run_demo(rows: int, directory: str) -> int:
    """Generate (once), run, and print the summary and a few predictions. Returns the exit code."""
    from pipelines.job import run

    directory = os.path.abspath(directory)
    data, output, model = (os.path.join(directory, name) for name in ("features", "predictions", "model.pt"))
    marker = os.path.join(data, f"_rows={rows}")
    if not os.path.exists(marker):
        began = time.perf_counter()
        if os.path.isdir(data):
            import shutil

            shutil.rmtree(data)
        make_features(data, rows)
        make_model(model)
        open(marker, "w").close()
        print(f"demo: wrote {rows:,} rows of {DEMO_FEATURES} features in {DEMO_FILES} files under {data} "
              f"and a {DEMO_FEATURES}->64->1 model at {model} ({time.perf_counter() - began:.1f} s)")
    report = run(model=model, input=data, output=output, overwrite=True)
    print(report.summary())
    table = pq.ParquetDataset(output).read().slice(0, 5)
    print("first predictions:")
    for row in table.to_pylist():
        print(f"  id={row['id']:<8} region={row['region']:<6} prediction={row['prediction']:.6f}")
    in_driver = all(r.get("node") == "driver" for r in report.replicas)
    where = "in this process, no Ray needed for a job this small" if in_driver else "including Ray start-up"
    print(f"throughput: {report.rows_per_second:,.0f} rows/s over {report.seconds:.1f} s ({where})")
    print(f"try: batch-infer status {output}")
    return 0 if report.succeeded else 1
