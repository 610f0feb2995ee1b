"""What the input is: listing through symlinks and globs, hidden names, columns the quarantine needs.

Runs go through the driver lane (small jobs, no Ray).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli, read_output, save_mlp, write_files

import pipelines
from pipelines.commit import SUCCESS
from basis.errors import OutputConflictError
from basis.storage import resolve
from basis.listing import list_files


def _job(tmp_path: Path, rows: list[int], **extra: object) -> dict[str, object]:
    write_files(tmp_path / "in", rows, features=4, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [4, 8, 1], seed=3)
    return {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
            **extra}


def _listed(path: Path) -> list[str]:
    base, infos = list_files(resolve(str(path)))
    return [os.path.relpath(i.path, base) for i in infos]


# --- item 7: symlinks -------------------------------------------------------------------------------

def test_a_symlink_loop_lists_each_file_once(tmp_path: Path) -> None:
    job = _job(tmp_path, [100, 100])
    (tmp_path / "in" / "loop").symlink_to(".")  # before: every file under 40 levels of loop/
    (tmp_path / "in" / "sub").mkdir()
    (tmp_path / "in" / "sub" / "up").symlink_to("..")
    (tmp_path / "in" / "a-copy.parquet").symlink_to("part-0001.parquet")  # the same file twice
    (tmp_path / "shared").mkdir()
    write_files(tmp_path / "shared", [50], features=4, row_group_size=100, start=200)
    (tmp_path / "in" / "x").symlink_to(tmp_path / "shared")  # one real directory, two links
    (tmp_path / "in" / "y").symlink_to(tmp_path / "shared")
    (tmp_path / "in" / "dangling").symlink_to(tmp_path / "nowhere")
    assert _listed(tmp_path / "in") == ["part-0000.parquet", "part-0001.parquet", "x/part-0000.parquet"]
    report = pipelines.run(**job, progress=False)
    assert report.complete and report.rows_out == 250
    assert sorted(read_output(tmp_path / "out")["id"].to_pylist()) == list(range(250))  # each row once
    assert pipelines.verify(str(tmp_path / "out"), sample=20).ok


def test_an_input_that_leads_into_the_output_is_refused(tmp_path: Path) -> None:
    job = _job(tmp_path, [100])
    assert pipelines.run(**job, progress=False).complete
    (tmp_path / "in" / "previous").symlink_to(tmp_path / "out")  # the output's files would be read as input
    before = sorted(p.name for p in (tmp_path / "out").rglob("*"))
    with pytest.raises(OutputConflictError, match=r"in/previous leads to .*inside the output"):
        pipelines.run(**job, progress=False)
    result = cli("run", "--model", str(job["model"]), "--input", str(job["input"]), "--output", str(job["output"]))
    assert result.returncode == 2 and "in/previous" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before
    (tmp_path / "in" / "previous").unlink()
    (tmp_path / "in" / "one").symlink_to(tmp_path / "out" / "part-0000-00000.parquet")  # a file of the output
    with pytest.raises(OutputConflictError, match=r"in/one leads to"):
        pipelines.run(**job, progress=False)


# --- item 17: the quarantine's `reason`, hidden inputs, globs over directories ----------------------

def test_a_reason_column_is_refused_where_quarantined_rows_would_carry_two(tmp_path: Path) -> None:
    write_files(tmp_path / "src", [100], features=4, row_group_size=100)
    table = pq.read_table(tmp_path / "src" / "part-0000.parquet")
    f01 = table["f01"].to_numpy().copy()
    f01[5] = np.nan  # one row to quarantine
    table = table.set_column(table.schema.get_field_index("f01"), "f01", pa.array(f01))
    (tmp_path / "in").mkdir()
    pq.write_table(table.append_column("reason", pa.array(["upstream"] * 100)), tmp_path / "in" / "p.parquet")
    save_mlp(tmp_path / "m.pt", [4, 8, 1], seed=3)
    job = ["--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    result = cli("run", *job)
    # before: exit 0, and _rejected/p-00000.parquet held two `reason` fields (readers refuse it)
    assert result.returncode == 2, result.stderr
    assert "passthrough column 'reason' would collide" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    # Named out of passthrough, or with invalid_rows that quarantines nothing, the same input runs.
    result = cli("run", *job, "--passthrough", "id,name")
    assert result.returncode == 0, result.stderr
    rejected = pq.read_table(tmp_path / "out" / "_rejected" / "p-00000.parquet")
    assert rejected["reason"].to_pylist() == ["null, NaN or inf in feature 'f01'"]
    result = cli("run", *job[:-1], str(tmp_path / "out2"), "--invalid-rows", "keep")
    assert result.returncode == 0, result.stderr
    assert pq.read_table(tmp_path / "out2" / "p-00000.parquet")["reason"].to_pylist() == ["upstream"] * 100


def test_a_hidden_input_file_given_explicitly_gets_a_visible_output(tmp_path: Path) -> None:
    job = _job(tmp_path, [100])
    (tmp_path / "in" / "part-0000.parquet").rename(tmp_path / "in" / "_x.parquet")
    report = pipelines.run(**{**job, "input": str(tmp_path / "in" / "_x.parquet")}, progress=False)
    assert report.complete and (tmp_path / "out" / SUCCESS).exists()
    assert (tmp_path / "out" / "x-00000.parquet").exists()  # before: _x-00000.parquet, which readers skip
    assert read_output(tmp_path / "out")["id"].to_pylist() == list(range(100))
    assert pipelines.verify(str(tmp_path / "out"), sample=10).ok


def test_a_glob_that_matches_directories_takes_the_files_below(tmp_path: Path) -> None:
    for day, start in (("date=2024-01-01", 0), ("date=2024-01-02", 100), ("date=2023-12-31", 200)):
        write_files(tmp_path / "in" / day, [100], features=4, row_group_size=100, start=start)
    write_files(tmp_path / "in" / "date=2024-01-02" / "hour=01", [50], features=4, row_group_size=100, start=300)
    save_mlp(tmp_path / "m.pt", [4, 8, 1], seed=3)
    assert _listed(tmp_path / "in" / "date=2024-*") == [
        "date=2024-01-01/part-0000.parquet", "date=2024-01-02/hour=01/part-0000.parquet",
        "date=2024-01-02/part-0000.parquet"]
    report = pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in" / "date=2024-*"),
                           output=str(tmp_path / "out"), progress=False)
    assert report.complete and report.rows_out == 250  # before: InputError, no input files found
    assert (tmp_path / "out" / "date=2024-01-02" / "hour=01" / "part-0000-00000.parquet").exists()
