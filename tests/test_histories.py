"""Histories, not single runs: a Hypothesis state machine over what a cron job meets in a few months.

Steps: add / modify / corrupt (same size and mtime, or changed) / restore / delete / rename input
files, nested directories, a changed `shard_rows`; runs, with `overwrite` and `prune`; a driver
SIGKILLed mid-run (with or without `overwrite`), a replica SIGKILLed mid-run; a change of the model
or of a prediction setting; an overwrite in which one file's shards fail (its pages rot under an
unchanged fingerprint); a run over a narrower input (refused); a file batch-infer did not write
dropped into the output and taken out again.

After every step `verify` holds (but for the foreign file, which it names). A run with another model
or config than the output's is refused (exit 2) unless `overwrite`, and so is a narrower input. After
every run that completes, the output holds, per input path, with the predictions of the output's one
model and config: the current version of every current input, every row once, in order; for an input
that vanished, what it last held (without `prune` and `overwrite`), or nothing (with them), or, where
a killed or failed run left that open, a part of one version of it, never two versions mixed.

The CI profile is small (a minute or two); `pytest -m soak` runs a longer one.
"""

from __future__ import annotations

import os
import re
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
from pipelines.commit import MANIFEST, SUCCESS

TRACE = os.environ.get("BATCH_INFER_HISTORY_TRACE")  # set it to print each step (debugging a history)
NAMES = ["part-0.parquet", "part-1.parquet", "part-2.parquet", "sub/part-0.parquet", "sub/deep/x.parquet"]
JOB = {"replicas": 2, "cpus_per_replica": 0.5, "batch_size": 32}
JOBS = [("m1", "sigmoid"), ("m2", "sigmoid"), ("m1", "none")]  # (model, output_activation): what makes predictions
FOREIGN = "zz-foreign.parquet"
_OUTPUT_NAME = re.compile(r"^(?P<stem>.+)-\d{5}(?:-[0-9a-f]{8})?\.parquet$")


class Histories(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="bi-histories-"))
        (self.root / "in").mkdir()
        self.models = {name: save_mlp(self.root / f"{name}.pt", [3, 4, 1], seed=seed)
                       for name, seed in (("m1", 1), ("m2", 2))}
        self.tables: dict[str, pa.Table] = {}  # name -> what the file holds (or held, while broken)
        self.broken: dict[str, tuple[bytes, os.stat_result | None]] = {}  # name -> (good bytes, stat if same-stat)
        self.must_fail: set[str] = set()  # broken names whose entries an overwrite demoted: no run completes
        self.next_id = 0
        self.shard_rows = 100
        self.job = JOBS[0]  # what the user runs with now
        self.output_jobs = {JOBS[0]}  # what the output may be bound to (two: a killed run may or may not have begun)
        # What the output may hold per input path: versions since it last certainly held one (the last, when in
        # `certain`); an empty list with the name in `certain`: nothing.
        self.history: dict[str, list[pa.Table]] = {}
        self.certain: set[str] = set()
        self.foreign = False

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _options(self, **extra: object) -> dict[str, object]:
        model, activation = self.job
        return {"model": str(self.root / f"{model}.pt"), "input": str(self.root / "in"),
                "output": str(self.root / "out"), "shard_rows": self.shard_rows, "output_activation": activation,
                **JOB, **extra}

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
        self._now_holds(name, table)

    def _now_holds(self, name: str, table: pa.Table) -> None:
        self.tables[name] = table
        self.history.setdefault(name, []).append(table)
        self.certain.discard(name)

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
            self.certain.discard(name)  # its old version's entries go when a run begins
        self.broken[name] = (good, stat if same_stat else None)
        if TRACE:
            print(f"corrupt {name} same_stat={same_stat}", flush=True)

    @precondition(lambda self: bool(self.broken))
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.broken)))
        good, stat = self.broken.pop(name)
        self.must_fail.discard(name)
        if TRACE:
            print(f"restore {name}", flush=True)
        path = self.root / "in" / name
        path.write_bytes(good)
        if stat is not None:
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        else:
            self._now_holds(name, self.tables[name])  # the same rows under a new fingerprint

    @precondition(lambda self: bool(self.tables))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        """A partition aged out upstream: its predictions stay unless `prune`."""
        name = data.draw(st.sampled_from(sorted(self.tables)))
        (self.root / "in" / name).unlink()
        self.tables.pop(name)
        self.broken.pop(name, None)
        self.must_fail.discard(name)
        if TRACE:
            print(f"delete {name}", flush=True)

    @precondition(lambda self: bool(self._intact()) and len(self.tables) < len(NAMES))
    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        """Same content, new name (Spark-style part files regenerated upstream): without `prune`, both."""
        old = data.draw(st.sampled_from(self._intact()))
        new = data.draw(st.sampled_from([n for n in NAMES if n not in self.tables]))
        (self.root / "in" / new).parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.root / "in" / old, self.root / "in" / new)
        self._now_holds(new, self.tables.pop(old))
        if TRACE:
            print(f"rename {old} -> {new}", flush=True)

    @rule(shard_rows=st.sampled_from([40, 100, 1000]))
    def change_shard_rows(self, shard_rows: int) -> None:
        self.shard_rows = shard_rows

    # --- the job and the output change --------------------------------------------------------------

    @rule(job=st.sampled_from(JOBS))
    def change_the_job(self, job: tuple[str, str]) -> None:
        """The user edits the config: another model, or another prediction setting."""
        self.job = job
        if TRACE:
            print(f"job {job}", flush=True)

    @precondition(lambda self: not self.foreign)
    @rule()
    def drop_a_foreign_file(self) -> None:
        """An old dataset or a copy lands in the output: never deleted, never beside `_SUCCESS` after a run."""
        out = self.root / "out"
        pq.write_table(pa.table({"id": pa.array([-1], pa.int64())}), out / FOREIGN)
        self.foreign = True
        if TRACE:
            print("foreign file dropped in", flush=True)

    @precondition(lambda self: self.foreign)
    @rule()
    def take_the_foreign_file_away(self) -> None:
        assert (self.root / "out" / FOREIGN).exists()  # batch-infer left it alone
        (self.root / "out" / FOREIGN).unlink()
        self.foreign = False
        if TRACE:
            print("foreign file taken away", flush=True)

    # --- runs ------------------------------------------------------------------------------------

    @rule(overwrite=st.booleans(), prune=st.booleans())
    def run(self, overwrite: bool, prune: bool) -> None:
        self._check(self._run(overwrite=overwrite, prune=prune), overwrite=overwrite, prune=prune)

    @rule()
    def run_and_kill_a_replica(self) -> None:
        result, killed = signal_a_busy_replica(self._run, signal.SIGKILL)
        if TRACE:
            print(f"replica killed: {killed is not None}", flush=True)
        self._check(result)

    @precondition(lambda self: any(self.tables[n].num_rows for n in self._intact()))
    @rule(data=st.data())
    def overwrite_with_a_failing_shard(self, data: st.DataObject) -> None:
        """A file's data pages rot under an unchanged size and mtime; the overwrite finds out."""
        name = data.draw(st.sampled_from([n for n in self._intact() if self.tables[n].num_rows]))
        path = self.root / "in" / name
        good, stat = path.read_bytes(), path.stat()
        footer = len(good) - 8 - int.from_bytes(good[-8:-4], "little")
        path.write_bytes(good[:4] + b"\0" * (footer - 4) + good[footer:])
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        self.broken[name] = (good, stat)
        if TRACE:
            print(f"pages of {name} rot", flush=True)
        result = self._run(overwrite=True)
        assert isinstance(result, pipelines.RunReport) and result.status == "failed", result
        assert any(e["input"] and e["input"].endswith(name) for e in result.errors), result.errors
        self._check(result, overwrite=True)
        assert not result.complete

    @precondition(lambda self: any(n.startswith("sub/") for n in self.tables))
    @rule()
    def narrow_the_input(self) -> None:
        """A backfill of one directory against the output of all of them: refused, nothing written."""
        before = _files(self.root / "out")
        if TRACE:
            print("narrowed input", flush=True)
        with pytest.raises((pipelines.OutputConflictError, pipelines.InputError)) as refused:
            pipelines.run(**self._options(input=str(self.root / "in" / "sub")), progress=False)
        if isinstance(refused.value, pipelines.InputError):  # nothing readable there at all
            assert all(n in self.broken for n in self.tables if n.startswith("sub/")), refused.value
        assert _files(self.root / "out") == before

    @rule(commits=st.integers(0, 6), overwrite=st.booleans())
    def kill_the_driver(self, commits: int, overwrite: bool) -> None:
        """SIGKILL `batch-infer run` once `commits` shard records are in the journal (or it ended)."""
        model, activation = self.job
        args = ["run", "--model", str(self.root / f"{model}.pt"), "--input", str(self.root / "in"), "--output",
                str(self.root / "out"), "--shard-rows", str(self.shard_rows), "--replicas", "2",
                "--cpus-per-replica", "0.5", "--batch-size", "32", "--output-activation", activation,
                *(["--overwrite"] if overwrite else [])]
        journal = self.root / "out" / "_journal"

        def records() -> set[str]:
            try:
                return {p.name for p in journal.iterdir() if "-c-" in p.name}
            except FileNotFoundError:  # not made yet, or cleared by a run that has just completed
                return set()

        earlier = records()
        process = subprocess.Popen([sys.executable, "-m", "pipelines", *args], cwd=REPO, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if len(records() - earlier) >= commits:
                break
            time.sleep(0.01)
        ended = process.poll()
        began = ended in (0, 1) or bool(records() - earlier)  # its header is recorded before any commit
        if TRACE:
            print(f"driver (overwrite={overwrite}) killed after >= {commits} commit record(s): exit {ended}, "
                  f"began {began}", flush=True)
        _kill_group(process)
        if not (overwrite or self.job in self.output_jobs) or ended == 2:
            return  # refused (exit 2) or killed before it could tell: it wrote nothing
        self.output_jobs = {self.job} if began else self.output_jobs | {self.job}
        if overwrite and began:  # every entry demoted: a same-stat broken file is read (and fails) from now on
            self.must_fail |= {name for name, (_, stat) in self.broken.items() if stat is not None}
        self._uncertain(demoted=overwrite, began=began)

    # --- what must hold --------------------------------------------------------------------------

    def _run(self, overwrite: bool = False, prune: bool = False) -> pipelines.RunReport | Exception:
        try:
            result: pipelines.RunReport | Exception = pipelines.run(
                **self._options(overwrite=overwrite, prune=prune), progress=False)
        except (pipelines.InputError, pipelines.OutputConflictError) as exc:
            result = exc
        if TRACE:
            print(f"run {self.job} overwrite={overwrite} prune={prune} files={sorted(self.tables)} "
                  f"broken={sorted(self.broken)} -> {getattr(result, 'status', result)} "
                  f"complete={getattr(result, 'complete', None)}", flush=True)
        return result

    def _uncertain(self, *, demoted: bool, began: bool) -> None:
        """After a run that stopped short: current inputs may hold part of their version; with `overwrite` or
        `prune` (`demoted`) the vanished inputs' entries went if it `began`, and may have if it did not."""
        self.certain -= set(self.tables)
        for name in [n for n in self.history if n not in self.tables]:
            if demoted and began:
                self.history[name] = []
                self.certain.add(name)
            elif demoted:
                self.certain.discard(name)

    def _check(self, result: object, *, overwrite: bool = False, prune: bool = False) -> None:
        if isinstance(result, pipelines.OutputConflictError):  # another model or config than the output's
            assert not overwrite and self.output_jobs != {self.job}, result
            self.output_jobs.discard(self.job)
            return
        if isinstance(result, Exception):  # the whole input is unusable: allowed only when it really is
            assert all(name in self.broken for name in self.tables), result
            return
        assert isinstance(result, pipelines.RunReport)
        self.output_jobs = {self.job}
        if not self.broken and not self.foreign:
            assert result.complete, result.errors
        if any(stat is None for _, stat in self.broken.values()) or self.must_fail:
            assert not result.complete  # a changed, unreadable file can't be accounted for
        if self.foreign:  # no _SUCCESS beside a file batch-infer did not write; the run names it
            assert not result.complete and not (self.root / "out" / SUCCESS).exists()
            assert any(FOREIGN in e["error"] for e in result.errors), result.errors
        if overwrite:
            self.must_fail |= {name for name, (_, stat) in self.broken.items() if stat is not None}
        if not result.complete:
            self._uncertain(demoted=overwrite or prune, began=True)
            return
        for name in list(self.history):
            if name in self.tables:
                self.history[name] = [self.tables[name]]
                self.certain.add(name)
            elif overwrite or prune:  # a vanished input's predictions: deleted only when asked
                self.history[name] = []
                self.certain.add(name)
        self._converged()

    def _converged(self) -> None:
        """Per input path, the output holds (with the output's model and config) its current version's rows,
        every one once and in order; a vanished path what it last held, nothing, or a part of one version."""
        (job,) = self.output_jobs
        model = self.models[job[0]] if job[1] == "sigmoid" else self.models[job[0]][:-1]
        out = self.root / "out"
        groups: dict[str, list[Path]] = {}
        for path in sorted(p for p in out.rglob("*.parquet")
                           if not any(part.startswith(("_", ".")) for part in p.relative_to(out).parts)):
            match = _OUTPUT_NAME.match(str(path.relative_to(out)))
            assert match, path
            groups.setdefault(match["stem"] + ".parquet", []).append(path)
        assert set(groups) <= set(self.history), sorted(groups)  # nothing but predictions of inputs seen
        for name, versions in self.history.items():
            files = groups.get(name, [])
            held = pa.concat_tables([pq.read_table(p) for p in files]) if files else None
            ids = held["id"].to_pylist() if held is not None else []
            if name in self.tables or name in self.certain:
                want = self.tables[name] if name in self.tables else (versions[-1] if versions else None)
                assert ids == (want["id"].to_pylist() if want is not None else []), name  # every row once, in order
                source = want
            elif not ids:
                continue  # a killed or failed run may have left nothing of it
            else:  # a killed or failed run left part of one version of it
                source = next((v for v in versions if set(ids) <= set(v["id"].to_pylist())), None)
                assert source is not None and len(set(ids)) == len(ids), (name, ids)
                order = {i: k for k, i in enumerate(source["id"].to_pylist())}
                assert [order[i] for i in ids] == sorted(order[i] for i in ids), name
            if not ids or held is None or source is None:
                continue
            index = {i: k for k, i in enumerate(source["id"].to_pylist())}
            rows = np.array([index[i] for i in ids])
            features = np.stack([source[f"f{j}"].to_numpy()[rows] for j in range(3)], axis=1)
            want_predictions = reference(model, features)[:, 0]
            np.testing.assert_allclose(held["prediction"].to_numpy(), want_predictions, rtol=1e-5, atol=1e-6)

    @invariant()
    def the_manifest_is_the_truth(self) -> None:
        out = self.root / "out"
        if not (out / MANIFEST).exists() and not (out / "_journal").exists():
            return
        report = pipelines.verify(str(out))
        if self.foreign:  # verify names the file batch-infer did not write, and nothing else
            assert report.problems and all(FOREIGN in p for p in report.problems), report.problems
        else:
            assert report.ok, report.problems


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


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
