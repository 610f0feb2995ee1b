"""`verify`: what it proves about an output, and what it must not get wrong either way.

Runs here go through the driver lane (small jobs, no Ray), which computes fp32 on numpy's BLAS,
while `verify --sample` recomputes with torch: two correct forwards, two summation orders.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import cli, save_mlp, write_files

import pipelines
from pipelines.commit import SUCCESS


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


# --- item 6: what verify must not let pass, and what it must not fail --------------------------------

def _small(tmp_path: Path, **extra: object) -> dict[str, object]:
    write_files(tmp_path / "in", [400], features=4, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [4, 8, 1], seed=3)
    return {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
            "shard_rows": 200, **extra}


def test_verify_sample_fails_an_output_file_whose_data_cannot_be_read(tmp_path: Path) -> None:
    job = _small(tmp_path)
    assert pipelines.run(**job, progress=False).complete
    victim = tmp_path / "out" / "part-0000-00000.parquet"
    data = bytearray(victim.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    data[4:len(data) - 8 - footer] = b"\xff" * (len(data) - 12 - footer)  # the pages; footer and size intact
    victim.write_bytes(bytes(data))
    assert pipelines.verify(job["output"]).ok  # footers only: rows and sizes as recorded
    result = cli("verify", job["output"], "--sample", "50", "--seed", "1")
    assert result.returncode == 1, result.stdout  # before: a note, exit 0
    assert "problem: part-0000-00000.parquet: cannot be read" in result.stdout
    assert "delete it and rerun" in result.stdout
    victim.unlink()  # what verify says to do
    assert pipelines.run(**job, progress=False).shards_done == 1
    assert pipelines.verify(job["output"], sample=50).ok


def test_verify_lists_the_input_beside_success(tmp_path: Path) -> None:
    job = _small(tmp_path)
    assert pipelines.run(**job, progress=False).complete
    # An input file that was there before _SUCCESS was written, with no entry: _SUCCESS claims rows it
    # does not hold (as a listing that missed a file would leave it).
    write_files(tmp_path / "extra", [100], features=4, row_group_size=100, start=400)
    (tmp_path / "extra" / "part-0000.parquet").rename(tmp_path / "in" / "part-0001.parquet")
    success = tmp_path / "out" / SUCCESS
    later = time.time() + 5
    os.utime(success, (later, later))
    report = pipelines.verify(job["output"])
    assert not report.ok  # before: OK
    assert report.problems == ["input part-0001.parquet has no committed shard, but _SUCCESS says the output "
                               "is complete (the input listed unchanged since before _SUCCESS)"]
    # One added after _SUCCESS is the next run's work: a note.
    os.utime(success, (later - 3600, later - 3600))
    report = pipelines.verify(job["output"])
    assert report.ok and any("added since _SUCCESS" in n for n in report.notes)
    assert pipelines.run(**job, progress=False).complete
    assert pipelines.verify(job["output"], sample=20).ok


def test_verify_passes_a_faithful_output_with_a_failed_shard(tmp_path: Path) -> None:
    job = _small(tmp_path, invalid_rows="fail")
    path = tmp_path / "in" / "part-0000.parquet"
    table = pq.read_table(path)
    f01 = table["f01"].to_numpy().copy()
    f01[250] = np.nan  # row group 2: the shard [2, 4) fails
    pq.write_table(table.set_column(table.schema.get_field_index("f01"), "f01", pa.array(f01)), path,
                   row_group_size=100)
    report = pipelines.run(**job, progress=False)
    assert report.shards_failed == 1 and report.shards_done == 1 and not report.complete
    result = pipelines.verify(job["output"], sample=20)
    assert result.ok, result.problems  # before: "row groups [2, 4) are in no committed shard"
    assert not result.complete and result.inputs_checked == 1
