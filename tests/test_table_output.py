"""Predictions committed into a Delta or Iceberg table, exactly once (issue 13, items 3 and 4).

Real deltalake and pyiceberg (its SQL catalog on SQLite in tmp_path), no mocks. The
jobs are small: they run in the driver (pipelines.lane), no Ray started. The results
are read back by engines other than the writing library: the Delta log replayed by
hand (its JSON actions) or the Iceberg scan plan gives the file list, which pyarrow
datasets, Polars and DuckDB read.

The driver is SIGKILLed around the table commit in a subprocess CLI run: the test's
own launcher (`_KILLER`) wraps `TableSink.commit` in that process to kill it right
before or right after the real commit; product code has no hook for it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import REPO, cli, feature_table, reference, save_mlp, write_files
from lakehouse import delta_files as delta_log_files
from deltalake import DeltaTable, write_deltalake

import pipelines
from pipelines.commit import MANIFEST, SUCCESS
from pipelines.tables.delta_sink import DeltaSink
from pipelines.config import JobConfig
from pipelines.tables.sink import APP_ID, RUN_PROPERTY, OutputFile, open_sink

FEATURES = 4


def catalog(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "wh").mkdir(exist_ok=True)
    return {"type": "sql", "uri": f"sqlite:///{tmp_path}/cat.db", "warehouse": f"file://{tmp_path}/wh"}


def job(tmp_path: Path, fmt: str) -> dict[str, Any]:
    """Three input files (3 shards of 1,000 rows each, 2 in the last) and a model; the output table."""
    if not (tmp_path / "in").exists():
        write_files(tmp_path / "in", [3000, 2000, 2000], features=FEATURES, row_group_size=1000)
        save_mlp(tmp_path / "m.pt", [FEATURES, 8, 1], seed=3)
    options: dict[str, Any] = {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"),
                               "output_format": fmt, "shard_rows": 1000}
    if fmt == "delta":
        options["output"] = str(tmp_path / "preds")
    else:
        options.update(output="preds.scores", catalog=catalog(tmp_path))
    return options


def run(options: dict[str, Any], **more: Any) -> pipelines.RunReport:
    report = pipelines.run(**options, **more, progress=False)
    assert report.status == "succeeded", report.errors
    return report


def args(options: dict[str, Any]) -> list[str]:
    """`batch-infer run` flags for `options`."""
    flags = []
    for key, value in options.items():
        flags += [f"--{key.replace('_', '-')}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


# --- reading the table back, without the writing library ---------------------------------------------

def delta_files(root: Path) -> list[Path]:
    """The table's current data files, by replaying its JSON log (adds minus removes) by hand."""
    from urllib.parse import unquote

    return sorted(root / unquote(path) for path in delta_log_files(root))


def delta_versions(root: Path) -> int:
    return len(list((root / "_delta_log").glob("*.json")))


def iceberg_table(options: dict[str, Any]) -> Any:
    from pyiceberg.catalog import load_catalog

    return load_catalog("default", **options["catalog"]).load_table(options["output"])


def iceberg_files(options: dict[str, Any]) -> list[Path]:
    """The current snapshot's data files from PyIceberg's scan plan (the metadata, not the data)."""
    table = iceberg_table(options)
    return sorted(Path(t.file.file_path.removeprefix("file://")) for t in table.scan().plan_files())


def table_files(tmp_path: Path, options: dict[str, Any]) -> list[Path]:
    return delta_files(tmp_path / "preds") if options["output_format"] == "delta" else iceberg_files(options)


def commits(tmp_path: Path, options: dict[str, Any]) -> int:
    """Table versions that hold data: Delta commits, Iceberg snapshots."""
    if options["output_format"] == "delta":
        return delta_versions(tmp_path / "preds")
    return len(iceberg_table(options).snapshots())


def check_exactly_once(tmp_path: Path, options: dict[str, Any]) -> None:
    """Three engines read the table's current files: every input row once, predicted by the model."""
    files = [str(p) for p in table_files(tmp_path, options)]
    inputs = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "in").rglob("*.parquet"))])
    model = torch_model(tmp_path)
    features = np.stack([inputs[f"f{j:02d}"].to_numpy() for j in range(FEATURES)], axis=1)
    want = dict(zip(inputs["id"].to_pylist(), reference(model, features)[:, 0].tolist()))

    arrow = ds.dataset(files, format="parquet").to_table(columns=["id", "prediction"]).sort_by("id")
    polars = pl.scan_parquet(files).select("id", "prediction").sort("id").collect()
    ducked = duckdb.sql(f"SELECT id, prediction FROM read_parquet({files!r}) ORDER BY id").fetchall()
    for ids, predictions in ((arrow["id"].to_pylist(), arrow["prediction"].to_pylist()),
                             (polars["id"].to_list(), polars["prediction"].to_list()),
                             ([r[0] for r in ducked], [r[1] for r in ducked])):
        assert ids == sorted(want), "each input row exactly once"
        np.testing.assert_allclose(predictions, [want[i] for i in ids], rtol=1e-5, atol=1e-6)
    report = pipelines.verify(options["output"], sample=10, seed=1,
                              catalog=options.get("catalog"))
    assert report.ok and report.complete, report.problems


def torch_model(tmp_path: Path) -> Any:
    import torch

    from conftest import mlp

    model = mlp([FEATURES, 8, 1], seed=3)
    model.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    return model


# --- one commit per run -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_one_commit_per_run_none_for_an_empty_tick_and_readers_see_each_row_once(tmp_path: Path, fmt: str) -> None:
    options = job(tmp_path, fmt)

    run(options)
    assert commits(tmp_path, options) == 1  # the table was created by the run's one commit, its files in it
    check_exactly_once(tmp_path, options)

    assert run(options).rows_out == 0
    assert commits(tmp_path, options) == 1  # nothing new: no commit

    write_files(tmp_path / "in" / "more", [1500], features=FEATURES, row_group_size=1000, start=7000, seed=9)
    assert run(options).rows_out == 1500
    assert commits(tmp_path, options) == 2
    check_exactly_once(tmp_path, options)
    if fmt == "delta":
        table = DeltaTable(str(tmp_path / "preds"))
        assert table.transaction_version(APP_ID) == 2  # the run's generation, in its commit's txn
        assert table.history()[0]["operation"] == "WRITE"
    else:
        summary = iceberg_table(options).current_snapshot().summary
        assert summary.operation.value == "append" and summary.additional_properties[RUN_PROPERTY] == "2"


@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_a_rewritten_input_replaces_its_predictions_in_one_commit_and_old_versions_stay_readable(
        tmp_path: Path, fmt: str) -> None:
    options = job(tmp_path, fmt)
    run(options)
    before = table_files(tmp_path, options)
    old = pa.concat_tables([pq.read_table(p) for p in before])

    pq.write_table(feature_table(np.arange(0, 3000), FEATURES, seed=42), tmp_path / "in" / "part-0000.parquet",
                   row_group_size=1000)  # same ids, other features: its three shards again
    assert run(options).rows_out == 3000
    assert commits(tmp_path, options) == 2  # the new files in, the old ones out, in one commit
    check_exactly_once(tmp_path, options)
    after = table_files(tmp_path, options)
    assert len(set(before) & set(after)) == 4  # the other files' shards stay as they were
    assert all("-g2" in p.name for p in set(after) - set(before))  # new names: nothing rewritten in place
    for path in before:  # the first version's files are still there, unchanged, for its readers
        assert path.exists()
    assert pa.concat_tables([pq.read_table(p) for p in before]).equals(old)
    if fmt == "delta":
        assert DeltaTable(str(tmp_path / "preds"), version=0).to_pyarrow_table().num_rows == 7000


# --- the driver killed around the commit ----------------------------------------------------------------

_KILLER = """
import os, signal, sys
from pipelines.tables import sink
real = sink.TableSink.commit
def commit(self, *args, **kwargs):
    if sys.argv[1] == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    done = real(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
sink.TableSink.commit = commit
from pipelines.cli import main
sys.exit(main(["run", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_the_driver_killed_around_the_table_commit_then_a_rerun_commits_every_row_once(
        tmp_path: Path, fmt: str, when: str) -> None:
    options = job(tmp_path, fmt)
    killed = subprocess.run([sys.executable, "-c", _KILLER, when, *args(options)], cwd=REPO, capture_output=True,
                            text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    root = tmp_path / "preds" if fmt == "delta" else tmp_path / "wh" / "preds.db" / "scores"
    assert not (root / SUCCESS).exists() and not (root / MANIFEST).exists()  # the journal is all there is
    assert (commits(tmp_path, options) if when == "after" else 0) == (1 if when == "after" else 0)
    if when == "before" and fmt == "delta":
        assert not (root / "_delta_log").exists()

    rerun = cli("run", *args(options))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert commits(tmp_path, options) == 1  # after: the killed run's commit was recognised, none added
    check_exactly_once(tmp_path, options)
    assert json.loads((root / MANIFEST).read_text())["rows_out"] == 7000


@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_a_commit_of_a_generation_already_in_the_table_is_never_applied_again(tmp_path: Path, fmt: str) -> None:
    """A commit whose outcome was unknown, tried again by the same run: the table's record of the
    generation (Delta txn, which delta-rs does not enforce; Iceberg's snapshot summary) stops it."""
    options = job(tmp_path, fmt)
    run(options)
    sink = open_sink(JobConfig.from_dict(options))
    sink.check_schema(lambda: pa.schema(pq.read_schema(table_files(tmp_path, options)[0])))
    extra = sink.location.join(sink.data_name("again.parquet", 1))
    pq.write_table(pq.read_table(table_files(tmp_path, options)[0]), extra)
    rel = sink.data_name("again.parquet", 1)
    size = Path(extra).stat().st_size
    assert sink.commit([OutputFile(rel, 1000, size)], [], 1) is False  # generation 1 is in the table
    assert commits(tmp_path, options) == 1 and rel not in sink.files()
    assert sink.commit([OutputFile(rel, 1000, size)], [], 2) is True
    assert commits(tmp_path, options) == 2 and rel in sink.files()
    assert sink.commit([], [], 3) is False and commits(tmp_path, options) == 2  # nothing: no commit


# --- refusals and verify ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_an_existing_table_with_other_columns_is_exit_2_before_any_work(tmp_path: Path, fmt: str) -> None:
    options = job(tmp_path, fmt)
    other = pa.table({"id": pa.array([1], pa.int64()), "score": pa.array([0.5], pa.float64())})
    if fmt == "delta":
        DeltaTable.create(str(tmp_path / "preds"), other.schema)  # empty: a table made for the predictions
    else:
        from pyiceberg.catalog import load_catalog

        cat = load_catalog("default", **options["catalog"])
        cat.create_namespace("preds")
        cat.create_table("preds.scores", schema=other.schema)
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file())

    refused = cli("run", *args(options))

    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "does not fit this job's predictions" in refused.stderr and "'prediction'" in refused.stderr
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == before  # nothing written


@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_verify_detects_a_table_that_is_not_the_manifest(tmp_path: Path, fmt: str) -> None:
    options = job(tmp_path, fmt)
    run(options)
    stranger = pq.read_table(table_files(tmp_path, options)[0]).slice(0, 10)
    if fmt == "delta":
        write_deltalake(str(tmp_path / "preds"), stranger, mode="append")  # someone else's append
    else:
        iceberg_table(options).append(stranger)

    report = pipelines.verify(options["output"], catalog=options.get("catalog"))

    assert not report.ok
    assert any("no committed manifest entry describes it" in p for p in report.problems), report.problems
    shown = cli("verify", *([options["output"], "--catalog", json.dumps(options["catalog"])] if fmt == "iceberg"
                            else [options["output"]]))
    assert shown.returncode == 1 and "no committed manifest entry describes it" in shown.stdout


def test_a_removed_file_is_a_verify_problem_and_a_delta_output_lock_lives_beside_its_data(tmp_path: Path) -> None:
    from deltalake.transaction import RemoveAction

    options = job(tmp_path, "delta")
    run(options)
    table = DeltaTable(str(tmp_path / "preds"))
    first = delta_files(tmp_path / "preds")[0]
    table.create_write_transaction([RemoveAction(first.name, True, 0, first.stat().st_size, {})], mode="append",
                                   schema=pa.schema(table.schema().to_arrow()))

    report = pipelines.verify(options["output"])

    assert not report.ok and any("not in the delta table" in p for p in report.problems), report.problems
    from pipelines.lock import LOCK, OutputLock

    with OutputLock(DeltaSink(options["output"]).location):
        assert (tmp_path / "preds" / LOCK).exists()
        held = cli("run", *args(options))
        assert held.returncode != 0 and "lock" in held.stderr.lower()


def test_a_partial_run_commits_nothing_to_the_table(tmp_path: Path) -> None:
    """A run that leaves a shard failed makes no table commit: readers never see part of a run."""
    options = job(tmp_path, "delta")
    (tmp_path / "in" / "broken.parquet").write_bytes(b"PAR1 not a parquet file PAR1")
    report = pipelines.run(**options, progress=False)
    assert report.status == "failed"
    assert not (tmp_path / "preds" / "_delta_log").exists() and not (tmp_path / "preds" / SUCCESS).exists()
    (tmp_path / "in" / "broken.parquet").unlink()
    run(options)
    assert commits(tmp_path, options) == 1
    check_exactly_once(tmp_path, options)
