"""Small files planned by their replicas (issue 15, item 4): a run does not read the footer of a small fresh
local file while planning (its replica reads the file whole anyway), yet its shards, output names, manifest
entries and errors are the ones the driver's eager plan (`batch-infer plan`) gives; a job no file fits is
still exit 2 before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import feature_table, read_output, save_mlp, write_files

import pipelines
from basis.errors import InputError
from basis.storage import resolve
from pipelines.commit import SUCCESS, State
from pipelines.config import JobConfig
from pipelines.prepare import prepare
from pipelines.plan import resolve_failed

KEYS = ("id", "input", "rel", "fingerprint", "file_row_groups", "row_groups", "rows_in", "output", "status")


def _cfg(tmp_path: Path, **more: Any) -> dict[str, Any]:
    return {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
            "shard_rows": 100, **more}


def _entries(out: Path) -> list[dict[str, Any]]:
    state = State.load(resolve(str(out)))
    entries = [*state.files.values(), *state.others.values()]
    return sorted(({k: (list(e[k]) if k == "row_groups" else e[k]) for k in KEYS} for e in entries),
                  key=lambda e: e["id"])


def _planned(tmp_path: Path, **more: Any) -> list[dict[str, Any]]:
    """The eager plan's shards (every footer read), as manifest entries would describe them."""
    p = pipelines.plan(**_cfg(tmp_path, **more))
    return sorted(({"id": s.id, "input": s.input, "rel": s.rel, "fingerprint": s.fingerprint,
                    "file_row_groups": s.file_row_groups, "row_groups": list(s.row_groups), "rows_in": s.rows_in,
                    "output": s.output, "status": "failed" if s.error else "committed"} for s in p.shards),
                  key=lambda e: e["id"])


def _inputs(tmp_path: Path) -> Path:
    """Small files: one row group each, one of three row groups (two shards at shard_rows 100), one of
    two small row groups (one shard), one with no rows, and stems that sort like their paths."""
    root = tmp_path / "in"
    write_files(root, [30, 40, 50], features=4, row_group_size=100)
    pq.write_table(feature_table(np.arange(1000, 1150), 4, 7), root / "part-0003.parquet", row_group_size=60)
    pq.write_table(feature_table(np.arange(2000, 2040), 4, 8), root / "part-0004.parquet", row_group_size=20)
    pq.write_table(feature_table(np.arange(0), 4, 9), root / "part-0005.parquet")
    (root / "sub").mkdir()
    pq.write_table(feature_table(np.arange(3000, 3010), 4, 10), root / "sub" / "x.parquet")
    save_mlp(tmp_path / "m.pt", [4, 8, 1])
    return root


def test_a_run_plans_small_files_without_their_footers_and_commits_the_eager_plans_shards(tmp_path: Path) -> None:
    _inputs(tmp_path)
    eager = _planned(tmp_path)
    assert [e["output"] for e in eager if e["rel"] == "part-0003.parquet"] == [
        "part-0003-00000.parquet", "part-0003-00002.parquet"]  # 60+60 rows, then 30
    lazy = prepare(JobConfig.from_dict(_cfg(tmp_path)), lazy=True)
    assert len(lazy.files.read) == 1  # the first file's footer (the columns); the others' replicas read theirs
    assert len(lazy.shards) == len(lazy.files) == 7 and lazy.shards.lazy.sum() == 6

    report = pipelines.run(**_cfg(tmp_path), progress=False)
    assert report.status == "succeeded", report.errors
    assert report.shards_done == len(eager) == 8 and report.rows_out == 30 + 40 + 50 + 150 + 40 + 10
    assert _entries(tmp_path / "out") == eager
    ids = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "in").rglob("*.parquet"))])["id"]
    assert read_output(tmp_path / "out")["id"].to_pylist() == ids.to_pylist()
    assert (tmp_path / "out" / SUCCESS).exists()
    assert pipelines.verify(str(tmp_path / "out"), sample=20, seed=1).ok

    again = pipelines.run(**_cfg(tmp_path), progress=False)  # planned from the manifest: nothing to do, same shards
    assert (again.shards_done, again.shards_skipped) == (0, 8)

    # A small file rewritten with more row groups: planned by its replica again, split as the plan splits it.
    pq.write_table(feature_table(np.arange(0, 30), 4, 11), tmp_path / "in" / "part-0000.parquet", row_group_size=10)
    pq.write_table(feature_table(np.arange(30, 250), 4, 12), tmp_path / "in" / "part-0001.parquet",
                   row_group_size=110)
    eager = _planned(tmp_path)
    third = pipelines.run(**_cfg(tmp_path), progress=False)
    assert third.status == "succeeded" and third.shards_done == 3, third.errors  # 1 + 2 shards
    assert _entries(tmp_path / "out") == eager
    assert pipelines.verify(str(tmp_path / "out"), sample=20, seed=2).ok


def test_a_small_file_that_does_not_fit_fails_as_its_eager_plan_says_and_the_others_go_on(tmp_path: Path) -> None:
    root = _inputs(tmp_path)
    pq.write_table(feature_table(np.arange(5000, 5020), 4, 3).drop(["f02"]), root / "part-0002.parquet")
    pq.write_table(feature_table(np.arange(6000, 6020), 4, 3).set_column(
        3, "f01", pa.array(["a"] * 20)), root / "sub" / "x.parquet")
    (root / "part-0004.parquet").write_bytes(b"not parquet at all")
    eager = _planned(tmp_path)
    errors = {s.id: s.error for s in pipelines.plan(**_cfg(tmp_path)).shards if s.error}
    assert len(errors) == 3

    report = pipelines.run(**_cfg(tmp_path), progress=False)
    assert report.status == "failed" and report.shards_failed == 3
    assert {e["shard"]: e["error"] for e in report.errors} == errors  # the plan's very messages
    assert _entries(tmp_path / "out") == eager
    assert not (tmp_path / "out" / SUCCESS).exists()


def test_footers_are_read_until_one_file_fits_and_a_job_no_file_fits_is_exit_2_before_any_work(
        tmp_path: Path) -> None:
    root = tmp_path / "in"
    write_files(root, [20, 20, 20], features=3, row_group_size=100)  # the model wants 4 features
    save_mlp(tmp_path / "m.pt", [4, 8, 1])
    with pytest.raises(InputError, match="the model expects 4 input features"):
        pipelines.run(**_cfg(tmp_path), progress=False)
    assert not (tmp_path / "out").exists()

    for path in root.iterdir():  # no file readable at all: the same message as the plan's
        path.write_bytes(b"not parquet at all")
    with pytest.raises(InputError) as refused:
        pipelines.run(**_cfg(tmp_path), progress=False)
    with pytest.raises(InputError) as planned:
        pipelines.plan(**_cfg(tmp_path))
    assert str(refused.value) == str(planned.value) and "cannot read Parquet footer" in str(planned.value)

    # The first file gives the columns but holds a feature as text; no other file has them all.
    pq.write_table(feature_table(np.arange(20), 4, 0).set_column(5, "f03", pa.array(["x"] * 20)),
                   root / "part-0000.parquet")
    for name in ("part-0001.parquet", "part-0002.parquet"):
        pq.write_table(feature_table(np.arange(20), 4, 0).drop(["f03"]), root / name)
    features = {"features": ["f00", "f01", "f02", "f03"]}
    with pytest.raises(InputError) as refused:
        pipelines.run(**_cfg(tmp_path, **features), progress=False)
    with pytest.raises(InputError) as planned:
        pipelines.plan(**_cfg(tmp_path, **features))
    assert str(refused.value) == str(planned.value) and "no input file fits the model" in str(planned.value)
    assert "part-0002.parquet: missing column(s) ['f03']" in str(planned.value)
    assert not (tmp_path / "out").exists()

    # One fitting file after the misfits: read up to it, the run goes on (exit 1 for the misfits).
    pq.write_table(feature_table(np.arange(100, 120), 4, 0), root / "part-0003.parquet")
    report = pipelines.run(**_cfg(tmp_path, **features), progress=False)
    assert report.status == "failed" and report.shards_failed == 3 and report.rows_out == 20
    assert {e["shard"]: e["error"] for e in report.errors} == {
        s.id: s.error for s in pipelines.plan(**_cfg(tmp_path, **features)).shards if s.error}


def test_a_lazy_shard_that_fails_before_its_replica_planned_it_is_recorded_as_the_eager_plans_shards(
        tmp_path: Path) -> None:
    """A replica that died (or storage that kept failing) before it read the file: the driver reads that one
    footer and records the file's shards as the eager plan makes them, each failed."""
    _inputs(tmp_path)
    eager = {s.id: s for s in pipelines.plan(**_cfg(tmp_path)).shards}
    p = prepare(JobConfig.from_dict(_cfg(tmp_path)), lazy=True)
    lazy = [s for s in p.todo if s.lazy]
    three = next(s for s in lazy if s.rel == "part-0003.parquet")
    assert three.row_groups == (0, 0) and three.rows_in > 0  # an estimate until it is read
    pieces = resolve_failed(p.shards, three, p.source, p.columns)
    assert [(s.id, s.row_groups, s.rows_in, s.output, s.file_row_groups) for s in pieces] == [
        (e.id, e.row_groups, e.rows_in, e.output, e.file_row_groups) for e in eager.values()
        if e.rel == "part-0003.parquet"]
    assert len(p.shards) == len(eager)  # its second span added to the plan
    assert {s.id for s in p.shards if s.rel == "part-0003.parquet"} == {"part-0003.parquet:0-2", "part-0003.parquet:2-3"}
    empty = next(s for s in lazy if s.rel == "part-0005.parquet")
    (tmp_path / "in" / "part-0005.parquet").write_bytes(b"gone bad")  # unreadable now: the plan's failed shard
    [failed] = resolve_failed(p.shards, empty, p.source, p.columns)
    assert (failed.id, failed.row_groups, failed.rows_in) == ("part-0005.parquet:0-0", (0, 0), 0)
