"""What the input is: listing through symlinks and globs, hidden names, columns the quarantine needs.

Runs go through the driver lane (small jobs, no Ray).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, read_output, save_mlp, write_files

import pipelines
from pipelines.commit import SUCCESS
from pipelines.errors import OutputConflictError
from pipelines.storage import list_files, resolve


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
