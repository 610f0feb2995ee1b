"""Histories, not single runs: a Hypothesis state machine over what a cron job meets in a few months.

Steps: add / modify / corrupt (same size and mtime, or changed, or readable but not fitting) / restore / delete / rename input
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

import json
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
from conftest import REPO, lane_children, read_output, reference, save_mlp
from journal_files import record_ids
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
from pipelines.lock import LOCK

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
        self.misfit: set[str] = set()  # broken names that hold readable Parquet with a feature column of text
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
        # every other version without dictionaries: its features decoded from their pages (`workers.plain_pages`)
        pq.write_table(table, path, row_group_size=row_group_size, use_dictionary=seed % 2 == 0)
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
    @rule(data=st.data(), kind=st.sampled_from(["same_stat", "garbage", "misfit"]))
    def corrupt(self, data: st.DataObject, kind: str) -> None:
        """Unreadable (same size and mtime, or changed), or readable Parquet that does not fit the job (a
        feature column of text): a small file's replica finds that, the run's plan did not open it."""
        name = data.draw(st.sampled_from(self._intact()))
        path = self.root / "in" / name
        good, stat = path.read_bytes(), path.stat()
        same_stat = kind == "same_stat"
        if same_stat:  # a truncated footer, a half-synced mount: same size and mtime, unreadable
            path.write_bytes(b"\0" * len(good))
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        else:
            if kind == "misfit":
                table = self.tables[name]
                pq.write_table(table.set_column(2, "f1", pa.array(["x"] * table.num_rows, pa.string())), path)
                self.misfit.add(name)
            else:
                path.write_bytes(b"not parquet at all")
            self.certain.discard(name)  # its old version's entries go when a run begins
        self.broken[name] = (good, stat if same_stat else None)
        if TRACE:
            print(f"corrupt {name} kind={kind}", flush=True)

    @precondition(lambda self: bool(self.broken))
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.broken)))
        good, stat = self.broken.pop(name)
        self.must_fail.discard(name)
        self.misfit.discard(name)
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
        self.misfit.discard(name)
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
        if isinstance(result, pipelines.InputError):  # the first readable file is a misfit: the run is refused
            self._check(result, overwrite=True)
            return
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

    def _holds_lock(self, pid: int) -> bool:
        try:
            return json.loads((self.root / "out" / LOCK).read_text()).get("pid") == pid
        except (FileNotFoundError, ValueError):  # none yet, or caught half-written
            return False

    @rule(commits=st.integers(0, 6), overwrite=st.booleans(), checkpoints=st.booleans(),
          where=st.sampled_from(["ray", "lane children", "a lane child", "a starting lane child"]),
          how=st.sampled_from(["SIGKILL", "SIGINT", "SIGTERM"]))
    def kill_the_driver(self, commits: int, overwrite: bool, checkpoints: bool, where: str, how: str) -> None:
        """Signal `batch-infer run` once `commits` shard records are in the journal (or it ended): `how`,
        SIGKILL, or Ctrl-C or SIGTERM, which unwind (the journal flushed, replicas stopped, the lock released,
        exit 130; a Ctrl-C once let a run go on to `_SUCCESS`, see test_signals); with
        `checkpoints`, the run checkpoints its journal into the manifest after every record, and is killed
        once it wrote one or two mid-run roots. `where` the run's replicas are: two Ray replicas, or the
        driver lane's child processes (`pipelines.lane_processes`, bundle journal files); "a lane child":
        one of those children is killed instead of the driver, which goes on (a fresh child retries); "a starting
        lane child": the first child is killed as soon as it exists, while it still imports (the OOM killer at
        start: it is a dead replica, not one that cannot start)."""
        model, activation = self.job
        replicas = ["--replicas", "2", "--cpus-per-replica", "0.5", "--batch-size", "32"] if where == "ray" else []
        args = ["run", "--model", str(self.root / f"{model}.pt"), "--input", str(self.root / "in"), "--output",
                str(self.root / "out"), "--shard-rows", str(self.shard_rows), *replicas,
                "--output-activation", activation, *(["--overwrite"] if overwrite else [])]

        def records() -> set[str]:
            return record_ids(self.root / "out")

        def root() -> str:
            try:
                return (self.root / "out" / MANIFEST).read_text()
            except FileNotFoundError:
                return ""

        def checkpointed(text: str) -> bool:  # a root this run wrote in its middle (a killed run's may be before)
            return text != before and "journal_folded" in json.loads(text or "{}")

        earlier, before = records(), root()
        patches = ["from pipelines.commit import recorder; recorder.CHECKPOINT_RECORDS = 1"] if checkpoints else []
        if where != "ray":  # the children's path for any number of shards (it takes 2,000 by default)
            patches.append("import pipelines.startup; pipelines.startup.LANE_PROCESS_SHARDS = 1")
        command = (["-c", "; ".join(["import sys", *patches, "from pipelines.cli import entry",
                                     "sys.argv[0] = 'batch-infer'", "entry()"])] if patches else ["-m", "pipelines"])
        log = self.root / "driver.log"  # what the driver said, for a failing step's message (not in `out`)
        with log.open("w") as stderr:
            process = subprocess.Popen([sys.executable, *command, *args], cwd=REPO, start_new_session=True,
                                       stdout=subprocess.DEVNULL, stderr=stderr,
                                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120
        seen: set[str] = set()
        roots: set[str] = set()  # the mid-run roots seen (a checkpoint deletes the commit records it holds)
        while process.poll() is None and time.monotonic() < deadline:
            if where == "a starting lane child":
                children = lane_children(process.pid)
                if children:
                    break
                time.sleep(0.005)
                continue
            seen |= records() - earlier
            if checkpoints:
                text = root()
                if checkpointed(text):
                    roots.add(text)
                if len(roots) > commits % 2:  # killed after one or two mid-run checkpoints
                    break
            elif len(seen) >= commits:
                break
            time.sleep(0.01)
        folded = bool(roots)
        killed = None  # the lane child killed, if any
        if where in ("a lane child", "a starting lane child") and process.poll() is None:
            children = lane_children(process.pid)
            if children:
                killed = children[0]
                os.kill(killed, signal.SIGKILL)
                if process.wait(timeout=120) not in (0, 1):  # 1: a broken input's shard failed
                    raise AssertionError(f"a lane child killed: the run exited {process.returncode}")
        elif how != "SIGKILL" and where in ("ray", "lane children") and process.poll() is None:
            # Ctrl-C or SIGTERM once the run has begun (the lock is its own): with no commit to wait for, sent at
            # once it came before the CLI's handler (~0.2 s in) and the driver died of it (exit -15).
            while not self._holds_lock(process.pid) and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            how = f"{how} (sent while it ran)"
            if process.poll() is None:
                process.send_signal(getattr(signal, how.split()[0]))
            code = process.wait(timeout=120)  # 0 or 1: it ended as the signal came
            assert code in (0, 1, 130), f"{how} to a running driver: exit {code}: {log.read_text()[-3000:]}"
            assert not (self.root / "out" / LOCK).exists()  # the next tick runs
        ended = process.poll()
        # its header is recorded before any commit (and before any checkpoint)
        began = ended in (0, 1) or bool(seen | (records() - earlier)) or folded
        if TRACE:
            print(f"driver ({where}, overwrite={overwrite}, checkpoints={checkpoints}, checkpointed={folded}) "
                  f"{f'child {killed}' if killed else how} after "
                  f">= {commits} commit record(s): exit {ended}, "
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
            readable = [n for n in sorted(self.tables) if n not in self.broken or n in self.misfit]
            # (or the first readable file, which the columns are resolved from, is the misfit)
            assert all(name in self.broken for name in self.tables) or readable[0] in self.misfit, result
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


# --- a Delta table as the input --------------------------------------------------------------------------

class DeltaHistories(RuleBasedStateMachine):
    """A Delta table's life under an hourly job: appends, deletes (deletion vectors), updates (rewritten
    files), compactions (OPTIMIZE), runs with and without `prune`, into a Parquet directory.

    A run without `prune` succeeds after appends and compactions of scored rows alone, and is refused
    (exit 2, nothing written) after a delete or update of scored rows; with `prune` it succeeds. After
    every complete run the output equals a plain torch forward of the table's live rows, each row once
    (delta-rs's own engine reads them, deletion vectors applied); `verify` holds after every step.
    """

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="bi-delta-histories-"))
        self.table = self.root / "table"
        self.model = save_mlp(self.root / "m.pt", [3, 4, 1], seed=5)
        self.next_id = 0
        self.scored: set[int] = set()  # ids the output held after its last complete run
        self.changes: set[str] = set()  # since then: "append", "compaction", "rewrite" (of scored rows), "mixed"

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _rows(self, count: int) -> pa.Table:
        rng = np.random.default_rng(self.next_id)
        values = rng.standard_normal((count, 3)).astype(np.float32)
        table = pa.table({"id": pa.array(np.arange(self.next_id, self.next_id + count), pa.int64()),
                          **{f"f{j}": pa.array(values[:, j]) for j in range(3)}})
        self.next_id += count
        return table

    def _live(self) -> pa.Table:
        from lakehouse import delta_live

        return delta_live(self.table).select(["id", "f0", "f1", "f2"]).sort_by("id")

    @initialize(rows=st.integers(1, 200))
    def a_scored_table(self, rows: int) -> None:
        from deltalake import WriterProperties, write_deltalake

        write_deltalake(str(self.table), self._rows(rows), configuration={"delta.enableDeletionVectors": "true"},
                        writer_properties=WriterProperties(max_row_group_size=50))
        self.run(prune=False)

    @rule(rows=st.integers(1, 150))
    def append(self, rows: int) -> None:
        from deltalake import WriterProperties, write_deltalake

        write_deltalake(str(self.table), self._rows(rows), mode="append",
                        writer_properties=WriterProperties(max_row_group_size=50))
        self.changes.add("append")

    def _touch(self, ids: set[int]) -> None:
        if ids & self.scored:
            self.changes.add("rewrite")
        elif ids:
            self.changes.add("mixed")  # a rewrite of unscored rows: a file of scored rows may be rewritten too

    @rule(data=st.data(), count=st.integers(1, 20))
    def delete(self, data: st.DataObject, count: int) -> None:
        """A deletion vector on one file (merge-on-read), deleting some of its live rows."""
        from lakehouse import add_deletion_vector, delta_files

        path = data.draw(st.sampled_from(sorted(delta_files(self.table))))
        ids = pq.read_table(self.table / path, columns=["id"])["id"].to_pylist()
        live = set(self._live()["id"].to_pylist())
        chosen = data.draw(st.lists(st.sampled_from(range(len(ids))), min_size=1, max_size=count))
        add_deletion_vector(self.table, path, chosen)
        self._touch({ids[i] for i in chosen} & live)

    @rule(data=st.data())
    def update(self, data: st.DataObject) -> None:
        """delta-rs rewrites the files holding the updated rows (copy-on-write)."""
        from deltalake import DeltaTable

        live = self._live()["id"].to_pylist()
        if not live:
            return
        low = data.draw(st.sampled_from(live))
        high = low + data.draw(st.integers(0, 30))
        DeltaTable(str(self.table)).update(updates={"f0": "f0 + 1"}, predicate=f"id >= {low} AND id <= {high}")
        self._touch({i for i in live if low <= i <= high})

    @rule()
    def compaction(self) -> None:
        from deltalake import DeltaTable

        metrics = DeltaTable(str(self.table)).optimize.compact()
        if metrics["numFilesRemoved"]:
            # rows appended since the last run compacted with scored ones cannot be told apart: refused
            self.changes.add("compaction" if "append" not in self.changes else "mixed")

    @rule(prune=st.booleans())
    def run(self, prune: bool) -> None:
        out = self.root / "out"
        before = _files(out) if out.exists() else {}
        try:
            report = pipelines.run(model=str(self.root / "m.pt"), input=str(self.table), output=str(out),
                                   shard_rows=60, **JOB, prune=prune, progress=False)
        except pipelines.OutputConflictError as refused:
            assert not prune and self.changes - {"append", "compaction"}, (self.changes, refused)
            assert "prune" in str(refused) and "version" in str(refused)
            assert _files(out) == before  # nothing written
            return
        if TRACE:
            print(f"delta run prune={prune} changes={sorted(self.changes)} -> rows_in={report.rows_in}", flush=True)
        assert prune or "rewrite" not in self.changes, self.changes
        assert report.complete, report.errors
        live = self._live()
        held = read_output(out).select(["id", "prediction"]).sort_by("id")
        assert held["id"].to_pylist() == live["id"].to_pylist()  # every live row once, no deleted row
        features = np.stack([live[f"f{j}"].to_numpy() for j in range(3)], axis=1)
        np.testing.assert_allclose(held["prediction"].to_numpy(), reference(self.model, features)[:, 0],
                                   rtol=1e-5, atol=1e-6)
        self.scored = set(live["id"].to_pylist())
        self.changes = set()

    @invariant()
    def verify_holds(self) -> None:
        out = self.root / "out"
        if (out / MANIFEST).exists():
            report = pipelines.verify(str(out))
            assert report.ok, report.problems


@pytest.mark.usefixtures("ray_shared")
def test_every_delta_table_history_scores_its_live_rows_once() -> None:
    run_state_machine_as_test(DeltaHistories, settings=_profile(examples=4, steps=8))
