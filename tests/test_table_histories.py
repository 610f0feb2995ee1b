"""Histories of a table OUTPUT (issue 13): a Hypothesis state machine over the predictions committed into
a Delta (or Iceberg) table, beside tests/test_histories.py's machine over a Parquet directory.

Steps: add / rewrite / delete input files, runs with and without `prune`, the driver SIGKILLed right before
or right after the table commit (tests/test_table_output.py's launcher), the model changed with or without
`overwrite`. Runs are small: they run in the driver (pipelines.lane), no Ray started.

The CI profile is small (about 40 s); `pytest -m soak` runs a longer one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import REPO, reference, save_mlp
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import pipelines

TRACE = os.environ.get("BATCH_INFER_HISTORY_TRACE")  # set it to print each step (debugging a history)
TABLE_NAMES = ["a.parquet", "b.parquet", "c.parquet", "sub/d.parquet"]


class TableOutputHistories(RuleBasedStateMachine):
    """Steps: add / rewrite / delete input files, runs with and without `prune`, the driver SIGKILLed right
    before or right after the table commit, the model changed with or without `overwrite`.

    After every step `verify` holds, and the table holds exactly one commit per run that had something new
    (a killed run's commit that landed counts; its rerun adds none). After every run that completes, the
    table, read through its own file list (the Delta log replayed by hand, or Iceberg's scan plan) with
    pyarrow datasets, equals a plain torch forward of the input's rows, each once (and of the deleted
    files' rows, unless a `prune` or an `overwrite` took them out). Runs are small: in the driver, no Ray.
    """

    FORMAT = "delta"

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="bi-table-histories-"))
        (self.root / "in").mkdir()
        self.models = {name: save_mlp(self.root / f"{name}.pt", [3, 4, 1], seed=seed)
                       for name, seed in (("m1", 1), ("m2", 2))}
        self.model = "m1"  # the output's model
        self.inputs: dict[str, pa.Table] = {}  # name -> what the input file holds
        self.table: dict[str, pa.Table] = {}  # input path -> the version whose predictions the table holds
        self.commits = 0  # table commits there must be
        self.next_id = 0

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _options(self, model: str | None = None, **extra: object) -> dict[str, object]:
        options: dict[str, object] = {"model": str(self.root / f"{model or self.model}.pt"),
                                      "input": str(self.root / "in"), "shard_rows": 60,
                                      "output_format": self.FORMAT, **extra}
        if self.FORMAT == "delta":
            options["output"] = str(self.root / "preds")
        else:
            (self.root / "wh").mkdir(exist_ok=True)
            options.update(output="preds.scores", catalog={"type": "sql", "uri": f"sqlite:///{self.root}/cat.db",
                                                           "warehouse": f"file://{self.root}/wh"})
        return options

    def _write(self, name: str, rows: int, row_group_size: int) -> None:
        values = np.random.default_rng(self.next_id).standard_normal((rows, 3)).astype(np.float32)
        table = pa.table({"id": pa.array(np.arange(self.next_id, self.next_id + rows), pa.int64()),
                          **{f"f{j}": pa.array(values[:, j]) for j in range(3)}})
        self.next_id += rows
        path = self.root / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=row_group_size)
        self.inputs[name] = table
        if TRACE:
            print(f"[table] write {name} rows={rows}", flush=True)

    @initialize(rows=st.lists(st.integers(1, 150), min_size=1, max_size=2))
    def a_committed_table(self, rows: list[int]) -> None:
        for name, count in zip(TABLE_NAMES, rows):
            self._write(name, count, 50)
        self._completed(pipelines.run(**self._options(), progress=False), self._target())

    # --- the input changes ------------------------------------------------------------------------

    @precondition(lambda self: len(self.inputs) < len(TABLE_NAMES))
    @rule(data=st.data(), rows=st.integers(1, 150), row_group_size=st.integers(20, 80))
    def add(self, data: st.DataObject, rows: int, row_group_size: int) -> None:
        self._write(data.draw(st.sampled_from([n for n in TABLE_NAMES if n not in self.inputs])), rows,
                    row_group_size)

    @rule(data=st.data(), rows=st.integers(1, 150))
    def rewrite(self, data: st.DataObject, rows: int) -> None:
        """Other rows under the same path: the table's files of it go out, the new ones in, in one commit."""
        time.sleep(0.01)  # a new mtime even on coarse clocks
        self._write(data.draw(st.sampled_from(sorted(self.inputs))), rows, 50)

    @precondition(lambda self: len(self.inputs) > 1)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        """A partition aged out upstream: its predictions stay in the table unless `prune`."""
        name = data.draw(st.sampled_from(sorted(self.inputs)))
        (self.root / "in" / name).unlink()
        self.inputs.pop(name)
        if TRACE:
            print(f"[table] delete {name}", flush=True)

    # --- runs ------------------------------------------------------------------------------------

    @rule(prune=st.booleans())
    def run(self, prune: bool) -> None:
        self._completed(pipelines.run(**self._options(prune=prune), progress=False), self._target(prune=prune))

    @rule(overwrite=st.booleans())
    def change_the_model(self, overwrite: bool) -> None:
        """Another model: refused (exit 2, the table untouched) unless `overwrite`, which predicts every row
        afresh and takes the deleted inputs' predictions out, in one commit."""
        other = "m2" if self.model == "m1" else "m1"
        if TRACE:
            print(f"[table] model {other} overwrite={overwrite}", flush=True)
        if not overwrite:
            with pytest.raises(pipelines.OutputConflictError):
                pipelines.run(**self._options(model=other), progress=False)
            return
        report = pipelines.run(**self._options(model=other, overwrite=True), progress=False)
        self.model = other
        self.table = {}  # every row predicted afresh: whatever the table held goes
        self._completed(report, self._target(prune=True))

    @rule(when=st.sampled_from(["before", "after"]))
    def kill_the_driver_around_the_commit(self, when: str) -> None:
        """`batch-infer run` SIGKILLed right before or right after its table commit (test_table_output's
        launcher); one that has nothing to commit may end first."""
        from test_table_output import _KILLER, args

        killed = subprocess.run([sys.executable, "-c", _KILLER, when, *args(self._options())], cwd=REPO,
                                capture_output=True, text=True, timeout=240)
        if TRACE:
            print(f"[table] driver killed {when} the commit: exit {killed.returncode}", flush=True)
        assert killed.returncode in (0, -signal.SIGKILL), killed.stderr[-2000:]
        if killed.returncode == 0 or when == "after":  # the commit landed (if there was one to make)
            self._committed(self._target())

    # --- what must hold --------------------------------------------------------------------------

    def _target(self, *, prune: bool = False) -> dict[str, pa.Table]:
        """What the table holds after a run: the current inputs, and without `prune` what it held of the
        deleted ones."""
        kept = {} if prune else {n: t for n, t in self.table.items() if n not in self.inputs}
        return {**kept, **self.inputs}

    def _committed(self, target: dict[str, pa.Table]) -> None:
        """A run's table commit, made only where the table changes."""
        if target.keys() != self.table.keys() or any(target[n] is not self.table[n] for n in target):
            self.commits += 1
        self.table = target

    def _completed(self, report: pipelines.RunReport, target: dict[str, pa.Table]) -> None:
        assert report.status == "succeeded" and report.complete, report.errors
        self._committed(target)
        if TRACE:
            print(f"[table] run complete: rows_out={report.rows_out}, {self.commits} commit(s)", flush=True)
        files = self._table_files()
        assert len(set(files)) == len(files) and all(Path(f).is_file() for f in files), files
        got = ds.dataset(files, format="parquet").to_table(columns=["id", "prediction"]).sort_by("id")
        want = pa.concat_tables(list(self.table.values())).sort_by("id")
        assert got["id"].to_pylist() == want["id"].to_pylist()  # every row once, no deleted one
        features = np.stack([want[f"f{j}"].to_numpy() for j in range(3)], axis=1)
        np.testing.assert_allclose(got["prediction"].to_numpy(), reference(self.models[self.model], features)[:, 0],
                                   rtol=1e-5, atol=1e-6)

    def _table_files(self) -> list[str]:
        """The table's current data files, from its own metadata (never a directory listing)."""
        if self.FORMAT == "delta":
            from lakehouse import delta_files

            return sorted(str(self.root / "preds" / unquote(p)) for p in delta_files(self.root / "preds"))
        table = self._iceberg()
        return sorted(t.file.file_path.removeprefix("file://") for t in table.scan().plan_files()) if table else []

    def _iceberg(self) -> object | None:
        from pyiceberg.catalog import load_catalog
        from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

        try:
            return load_catalog("default", **self._options()["catalog"]).load_table("preds.scores")
        except (NoSuchTableError, NoSuchNamespaceError):
            return None

    def _table_commits(self) -> int:
        if self.FORMAT == "delta":
            return len(list((self.root / "preds" / "_delta_log").glob("*.json")))
        table = self._iceberg()
        return len(table.snapshots()) if table is not None else 0

    @invariant()
    def verify_holds_and_one_commit_per_run_with_something_new(self) -> None:
        assert self._table_commits() == self.commits
        options = self._options()
        report = pipelines.verify(str(options["output"]), catalog=options.get("catalog"))
        assert report.ok, report.problems


class IcebergOutputHistories(TableOutputHistories):
    FORMAT = "iceberg"


class _Drawn:
    """A rule's `data` argument that draws a given value (calling the rules by hand)."""

    def __init__(self, value: object) -> None:
        self.value = value

    def draw(self, strategy: object) -> object:
        return self.value


def test_verify_holds_after_a_driver_killed_before_the_commit_that_takes_a_rewritten_files_predictions_out(
        ) -> None:
    """The history the machine first found: an input rewritten, the driver killed right before the table
    commit. The journal retired the old predictions' file, which the table still references until the
    next complete run's commit: a note for `verify`, not a problem (it was one)."""
    machine = TableOutputHistories()
    try:
        machine.a_committed_table(rows=[1])
        machine.rewrite(_Drawn("a.parquet"), rows=1)
        machine.kill_the_driver_around_the_commit(when="before")
        machine.verify_holds_and_one_commit_per_run_with_something_new()
        machine.run(prune=False)
        machine.verify_holds_and_one_commit_per_run_with_something_new()
    finally:
        machine.teardown()


def test_table_output_histories_commit_once_per_run_and_converge() -> None:
    run_state_machine_as_test(TableOutputHistories, settings=_profile(examples=10, steps=12))
    run_state_machine_as_test(IcebergOutputHistories, settings=_profile(examples=3, steps=12))


@pytest.mark.soak
@pytest.mark.timeout(4 * 3600)
def test_table_output_histories_soak() -> None:
    run_state_machine_as_test(TableOutputHistories, settings=_profile(examples=30, steps=25))
    run_state_machine_as_test(IcebergOutputHistories, settings=_profile(examples=15, steps=25))


def _profile(examples: int, steps: int) -> settings:
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                    suppress_health_check=list(HealthCheck))
