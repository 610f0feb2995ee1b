"""`verify`: what it proves about an output, and what it must not get wrong either way.

Runs here go through the driver lane (small jobs, no Ray), which computes fp32 on numpy's BLAS,
while `verify --sample` recomputes with torch: two correct forwards, two summation orders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import save_mlp

import pipelines


def _unnormalised(tmp_path: Path, rows: int, *, scale: float = 1000.0, width: int = 16) -> dict[str, object]:
    values = np.random.default_rng(0).standard_normal((rows, width)).astype(np.float32) * np.float32(scale)
    (tmp_path / "in").mkdir()
    table = pa.table({"id": np.arange(rows), **{f"f{j:02d}": values[:, j] for j in range(width)}})
    pq.write_table(table, tmp_path / "in" / "part-0.parquet", row_group_size=1000)
    save_mlp(tmp_path / "m.pt", [width, 64, 1], seed=3)
    return {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
            "activation": "relu", "output_activation": "none"}


def test_sampled_predictions_of_unnormalised_features_are_within_rounding(tmp_path: Path) -> None:
    # Features x1000 through relu -> none: large terms cancel to small predictions, where the run's
    # kernel and verify's differ by more than a fixed 1e-5 (before: 3 of 2,000 rows flagged here).
    job = _unnormalised(tmp_path, 2000)
    assert pipelines.run(**job, progress=False).complete
    report = pipelines.verify(job["output"], sample=4000, seed=0)
    assert report.problems == [] and report.sampled > 1500
    # Still tight at this scale: predictions off by one part in 10^4 are caught.
    out = tmp_path / "out" / "part-0-00000.parquet"
    table = pq.read_table(out)
    wrong = pa.array(table["prediction"].to_numpy() * np.float32(1 + 1e-4))
    pq.write_table(table.set_column(table.schema.get_field_index("prediction"), "prediction", wrong), out)
    report = pipelines.verify(job["output"], sample=200, seed=0)
    assert any("stored prediction" in p for p in report.problems), report.problems
