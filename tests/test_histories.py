"""Histories, not single runs: a Hypothesis state machine over what a cron job meets in a few months.

Steps: add / modify / corrupt (same size and mtime, or changed) / restore / delete / rename input
files, nested directories, a changed `shard_rows`, runs, runs with `overwrite`, a driver SIGKILLed
mid-run, a replica SIGKILLed mid-run. After every step `verify` holds; after every run that
completes, the output equals a plain torch forward of the current inputs, every id once, in order.

The CI profile is small (a minute or two); `pytest -m soak` runs a longer one.
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, read_output, reference, save_mlp
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
from test_failures import signal_a_busy_replica

import pipelines
from pipelines.commit import MANIFEST

TRACE = os.environ.get("BATCH_INFER_HISTORY_TRACE")  # set it to print each step (debugging a history)
NAMES = ["part-0.parquet", "part-1.parquet", "part-2.parquet", "sub/part-0.parquet", "sub/deep/x.parquet"]
JOB = {"replicas": 2, "cpus_per_replica": 0.5, "batch_size": 32}


class Histories(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="bi-histories-"))
        (self.root / "in").mkdir()
        self.model = save_mlp(self.root / "m.pt", [3, 4, 1], seed=1)
        self.tables: dict[str, pa.Table] = {}  # name -> what the file holds (or held, while broken)
        self.broken: dict[str, tuple[bytes, os.stat_result | None]] = {}  # name -> (good bytes, stat if same-stat)
        self.next_id = 0
        self.shard_rows = 100

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def job(self) -> dict[str, object]:
        return {"model": str(self.root / "m.pt"), "input": str(self.root / "in"), "output": str(self.root / "out"),
                "shard_rows": self.shard_rows, **JOB}

    @initialize(rows=st.lists(st.integers(0, 240), min_size=2, max_size=3), row_group_size=st.integers(15, 120))
    def a_committed_table(self, rows: list[int], row_group_size: int) -> None:
        """Histories start from an output that holds something."""
        for name, count in zip(NAMES, rows):
            self._write(name, count, row_group_size, seed=self.next_id)
        self._check(self._run())

    # --- the input changes ------------------------------------------------------------------------

    def _write(self, name: str, rows: int, row_group_size: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        values = rng.standard_normal((rows, 3)).astype(np.float32)
        table = pa.table({"id": pa.array(np.arange(self.next_id, self.next_id + rows), pa.int64()),
                          **{f"f{j}": pa.array(values[:, j]) for j in range(3)}})
        self.next_id += rows
        path = self.root / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=row_group_size)
        self.tables[name] = table

    def _intact(self) -> list[str]:
        return sorted(n for n in self.tables if n not in self.broken)

    @precondition(lambda self: len(self.tables) < len(NAMES))
    @rule(data=st.data(), rows=st.integers(0, 240), row_group_size=st.integers(15, 120))
    def add(self, data: st.DataObject, rows: int, row_group_size: int) -> None:
        name = data.draw(st.sampled_from([n for n in NAMES if n not in self.tables]))
        self._write(name, rows, row_group_size, seed=self.next_id)
        if TRACE:
            print(f"add {name} rows={rows}", flush=True)

    @precondition(lambda self: bool(self._intact()))
    @rule(data=st.data(), rows=st.integers(0, 240), row_group_size=st.integers(15, 120))
    def modify(self, data: st.DataObject, rows: int, row_group_size: int) -> None:
        name = data.draw(st.sampled_from(self._intact()))
        time.sleep(0.01)  # a new mtime even on coarse clocks
        self._write(name, rows, row_group_size, seed=self.next_id + 1)

    @precondition(lambda self: bool(self._intact()))
    @rule(data=st.data(), same_stat=st.booleans())
    def corrupt(self, data: st.DataObject, same_stat: bool) -> None:
        name = data.draw(st.sampled_from(self._intact()))
        path = self.root / "in" / name
        good, stat = path.read_bytes(), path.stat()
        if same_stat:  # a truncated footer, a half-synced mount: same size and mtime, unreadable
            path.write_bytes(b"\0" * len(good))
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        else:
            path.write_bytes(b"not parquet at all")
        self.broken[name] = (good, stat if same_stat else None)

    @precondition(lambda self: bool(self.broken))
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.broken)))
        good, stat = self.broken.pop(name)
        path = self.root / "in" / name
        path.write_bytes(good)
        if stat is not None:
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    @precondition(lambda self: bool(self.tables))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.tables)))
        (self.root / "in" / name).unlink()
        self.tables.pop(name)
        self.broken.pop(name, None)

    @precondition(lambda self: bool(self._intact()) and len(self.tables) < len(NAMES))
    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        """Same content, new name (Spark-style part files regenerated upstream)."""
        old = data.draw(st.sampled_from(self._intact()))
        new = data.draw(st.sampled_from([n for n in NAMES if n not in self.tables]))
        (self.root / "in" / new).parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.root / "in" / old, self.root / "in" / new)
        self.tables[new] = self.tables.pop(old)

    @rule(shard_rows=st.sampled_from([40, 100, 1000]))
    def change_shard_rows(self, shard_rows: int) -> None:
        self.shard_rows = shard_rows

    # --- runs ------------------------------------------------------------------------------------

    @rule(overwrite=st.booleans())
    def run(self, overwrite: bool) -> None:
        self._check(self._run(overwrite=overwrite))

    @rule()
    def run_and_kill_a_replica(self) -> None:
        result, killed = signal_a_busy_replica(self._run, signal.SIGKILL)
        if TRACE:
            print(f"replica killed: {killed is not None}", flush=True)
        self._check(result)

    @rule(commits=st.integers(0, 6))
    def kill_the_driver(self, commits: int) -> None:
        """SIGKILL `batch-infer run` once `commits` shard records are in the journal (or it ended)."""
        args = ["run", "--model", str(self.root / "m.pt"), "--input", str(self.root / "in"), "--output",
                str(self.root / "out"), "--shard-rows", str(self.shard_rows), "--replicas", "2",
                "--cpus-per-replica", "0.5", "--batch-size", "32"]
        process = subprocess.Popen([sys.executable, "-m", "pipelines", *args], cwd=REPO, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        journal = self.root / "out" / "_journal"

        def records() -> int:
            try:
                return sum(1 for p in journal.iterdir() if "-c-" in p.name)
            except FileNotFoundError:  # not made yet, or cleared by a run that has just completed
                return 0

        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if records() >= commits:
                break
            time.sleep(0.01)
        if TRACE:
            print(f"driver killed after >= {commits} commit record(s): {process.poll() is None}", flush=True)
        _kill_group(process)

    # --- what must hold --------------------------------------------------------------------------

    def _run(self, overwrite: bool = False) -> pipelines.RunReport | Exception:
        try:
            result: pipelines.RunReport | Exception = pipelines.run(**self.job, overwrite=overwrite, progress=False)
        except pipelines.InputError as exc:
            result = exc
        if TRACE:
            print(f"run overwrite={overwrite} files={sorted(self.tables)} broken={sorted(self.broken)} -> "
                  f"{getattr(result, 'status', result)} complete={getattr(result, 'complete', None)}", flush=True)
        return result

    def _check(self, result: object) -> None:
        if isinstance(result, Exception):  # the whole input is unusable: allowed only when it really is
            assert all(name in self.broken for name in self.tables), result
            return
        assert isinstance(result, pipelines.RunReport)
        if not self.broken:
            assert result.complete, result.errors
        if any(stat is None for _, stat in self.broken.values()):
            assert not result.complete  # a changed, unreadable file can't be accounted for
        if result.complete:
            self._converged()

    def _converged(self) -> None:
        """The output equals a plain torch forward of the current inputs (broken-but-same-stat files:
        what they held, since nothing can tell them from an unchanged file without reading them)."""
        names = sorted(self.tables)
        out = read_output(self.root / "out")
        if not names or not sum(self.tables[n].num_rows for n in names):
            assert out.num_rows == 0
            return
        table = pa.concat_tables([self.tables[n] for n in names])
        assert out["id"].to_pylist() == table["id"].to_pylist()  # every id once, in input order
        features = np.stack([table[f"f{j}"].to_numpy() for j in range(3)], axis=1)
        want = reference(self.model, features)[:, 0]
        np.testing.assert_allclose(out["prediction"].to_numpy(), want, rtol=1e-5, atol=1e-6)

    @invariant()
    def the_manifest_is_the_truth(self) -> None:
        out = self.root / "out"
        if not (out / MANIFEST).exists() and not (out / "_journal").exists():
            return
        report = pipelines.verify(str(out))
        assert report.ok, report.problems


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the run's process group (driver, its embedded Ray's daemons) and wait until it is gone."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    time.sleep(1.0)  # the raylet's workers (own process groups) exit once the raylet is gone


def _profile(examples: int, steps: int) -> settings:
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None, 
                    suppress_health_check=list(HealthCheck))


@pytest.mark.usefixtures("ray_shared")
def test_every_history_converges_and_verify_always_holds() -> None:
    run_state_machine_as_test(Histories, settings=_profile(examples=6, steps=10))


@pytest.mark.soak
@pytest.mark.timeout(4 * 3600)
@pytest.mark.usefixtures("ray_shared")
def test_every_history_converges_soak() -> None:
    run_state_machine_as_test(Histories, settings=_profile(examples=40, steps=30))
