"""A bundle's big shards staged overlapped (issue 15, item 2): a replica with several CPUs starts the next
shard's staging once the one before has decoded its rows, so its start (one thread decoding the first row
group) and the end before it (the last forward passes, the file's close, the commit) share the cores.
Commits stay in bundle order, one shard at a time; exactly-once holds under replica and driver kills."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import REPO, cli, read_output, save_mlp, write_files
from journal_files import commit_records
from test_failures import signal_a_busy_replica
from test_histories import _kill_group

import pipelines
import workers.decode

pytestmark = pytest.mark.usefixtures("ray_shared")
from basis.errors import ShardDataError
from pipelines.bundle import take
from pipelines.commit import MANIFEST, SUCCESS
from workers.staging import commit_in_order

# --- the staging itself (no Ray, no files) --------------------------------------------------------------


class _Stages:
    """Fake stagings that log what happens when, committed by `commit_in_order(..., overlapped=True)`."""

    def __init__(self, *, raises: dict[int, BaseException] | None = None, silent: set[int] | None = None) -> None:
        self.log: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0  # stagings running at once, at most
        self.raises = raises or {}
        self.silent = silent or set()  # never call `decoded`
        self.files: dict[int, contextlib.ExitStack] = {}
        self.discarded: list[int] = []  # stagings whose files were dropped, not published

    def note(self, what: str, index: int) -> None:
        with self.lock:
            self.log.append((what, index))

    def at(self, what: str, index: int) -> int:
        return self.log.index((what, index))

    def stage(self, task: dict[str, Any], files: contextlib.ExitStack, decoded: Any) -> int:
        index = task["i"]
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.note("start", index)
            self.files[index] = files
            files.callback(self.discarded.append, index)  # as a staged file's temporary name: dropped unless published
            time.sleep(0.03)  # decoding
            if index in self.raises:
                raise self.raises[index]
            if index not in self.silent:
                self.note("decoded", index)
                decoded()
            deadline = time.monotonic() + 1.0  # finishing: long enough for the next one to start beside it
            while ("start", index + 1) not in self.log and time.monotonic() < deadline:
                time.sleep(0.005)
            self.note("end", index)
            return index
        finally:
            with self.lock:
                self.running -= 1

    def commit(self, task: dict[str, Any], started: float, staged: int | str) -> dict[str, Any]:
        if not isinstance(staged, str):
            self.files[task["i"]].pop_all()  # published: nothing left to drop
        self.note("commit", task["i"])
        return {"i": task["i"], "staged": staged}


def _drive(stages: _Stages, count: int) -> list[dict[str, Any]]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        calls = commit_in_order([{"i": i} for i in range(count)], pool, 2, stages.stage, stages.commit,
                                overlapped=True)
        try:
            return [call() for call in calls]
        finally:
            calls.close()  # as `Replica.process_bundle` does


def test_each_staging_starts_once_the_one_before_decoded_and_commits_stay_in_order() -> None:
    stages = _Stages()
    results = _drive(stages, 5)
    assert [r["i"] for r in results] == list(range(5))
    assert [what for what, _ in stages.log].count("commit") == 5
    for i in range(4):
        assert stages.at("decoded", i) < stages.at("start", i + 1)  # never two shards decoding at once
        assert stages.at("start", i + 1) < stages.at("end", i)  # the next one decodes while this one finishes
        assert stages.at("commit", i) < stages.at("commit", i + 1)
    assert stages.most == 2
    assert stages.discarded == []  # every staging was committed


def test_a_staging_that_never_says_it_decoded_lets_the_next_start_when_it_ends() -> None:
    stages = _Stages(silent={1})
    results = _drive(stages, 3)
    assert [r["i"] for r in results] == [0, 1, 2]
    assert stages.at("end", 1) < stages.at("start", 2)


def test_a_shards_data_error_fails_that_shard_only() -> None:
    stages = _Stages(raises={1: ShardDataError("in/b.parquet: row group 0: not a float")})
    results = _drive(stages, 3)
    assert [(r["i"], r["staged"]) for r in results] == [(0, 0), (1, "in/b.parquet: row group 0: not a float"),
                                                        (2, 2)]
    assert stages.discarded == [1]  # its temporary files went at once


def test_an_error_that_is_not_the_datas_ends_the_bundle_and_nothing_after_it_commits() -> None:
    stages = _Stages(raises={1: OSError("no space left on device")})
    with pytest.raises(OSError, match="no space"):
        _drive(stages, 4)
    commits = [i for what, i in stages.log if what == "commit"]
    assert commits == [0]
    deadline = time.monotonic() + 10  # a staging that started beside it drops its files when it ends
    while 2 in {i for what, i in stages.log if what == "start"} and 2 not in stages.discarded \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    started = {i for what, i in stages.log if what == "start"}
    assert 3 not in started  # never began: the bundle had ended
    assert sorted(stages.discarded) == sorted(started - {0})


# --- `decode` says when its row groups are all read -----------------------------------------------------


@pytest.mark.parametrize("dictionary, threads", [(False, 2), (True, 2), (False, 1)])
def test_decode_says_once_when_every_row_group_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       dictionary: bool, threads: int) -> None:
    """Plain pages (`workers.plain_pages`) or pyarrow's decode, one or two threads: `on_decoded` is called
    once, after the last row group was read, whichever thread read it."""
    from workers.reader import ParquetSource

    path = write_files(tmp_path / "in", [4000], features=4, row_group_size=500, use_dictionary=dictionary)[0]
    read: list[int] = []
    calls: list[list[int]] = []
    real = workers.decode.iter_batches

    def iter_batches(parquet: Any, row_groups: tuple[int, int], *args: Any, **kwargs: Any) -> Any:
        batches = list(real(parquet, row_groups, *args, **kwargs))  # (each row group here is read whole)
        read.append(row_groups[0])
        return batches

    monkeypatch.setattr(workers.decode, "iter_batches", iter_batches)
    from basis.storage import resolve

    location = resolve(str(path))
    source = ParquetSource(location, location.path, str(path))
    features = [f"f{j:02d}" for j in range(4)]
    with workers.decode.decode(source, (0, 8), ["id", *features], 128, str(path), features=features,
                               list_column=False, width=4, check_invalid=True, threads=threads,
                               predict=lambda matrix, bad: matrix.sum(axis=1), stack_only=True,
                               on_decoded=lambda: calls.append(sorted(read))) as batches:
        rows = sum(item.batch.data.num_rows for item in batches)
    assert rows == 4000
    assert calls == [list(range(8))]


# --- a replica's bundle of big shards -------------------------------------------------------------------

ROWS, GROUP = 300, 100  # a shard of three row groups: two decoding threads, more rows than a batch (64)


def _replica(tmp_path: Path, files: int, cpus: float) -> tuple[Any, list[Any], Path]:
    from workers.replica import Replica
    from workers.replica_job import ReplicaJob

    for i in range(files):
        write_files(tmp_path / "in" / f"s{i}", [ROWS], features=4, row_group_size=GROUP, start=i * ROWS, seed=i,
                    use_dictionary=False)
    save_mlp(tmp_path / "m.pt", [4, 8, 1])
    out = tmp_path / "out"
    plan = pipelines.plan(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(out))
    job = ReplicaJob(model=str(tmp_path / "m.pt"), model_sha256=plan.model.sha256, input=str(tmp_path / "in"),
                     output=str(out), features=plan.columns.features, passthrough=plan.columns.passthrough,
                     list_column=False, width=4, prediction_column="prediction", keep_features=False, cpus=cpus,
                     job_digest="d" * 64, batch_size=64)
    replica = Replica(0, job, in_driver=True, numpy_forward=True)
    replica.forward  # loaded: a bundle after the load is staged overlapped
    return replica, list(plan.todo), out


def test_a_bundle_of_big_shards_overlaps_and_writes_what_one_at_a_time_writes(tmp_path: Path) -> None:
    one, shards, out_one = _replica(tmp_path / "one", 6, cpus=2)
    try:
        for shard in shards:
            for results in one.process_bundle([shard.to_task()]):
                assert all(r["status"] == "committed" for r in results)
    finally:
        one.close()
    replica, shards, out = _replica(tmp_path / "bundle", 6, cpus=2)
    results: list[dict[str, Any]] = []
    try:
        for done in replica.process_bundle([s.to_task() for s in shards]):
            results.extend(done)
        stats = replica.stats()
    finally:
        replica.close()
    assert [(r["id"], r["status"]) for r in results] == [(s.id, "committed") for s in shards]
    # the next shard began before the one before it was done
    assert any(b["started"] < a["finished"] for a, b in zip(results, results[1:])), results
    assert stats["busy_seconds"] <= results[-1]["finished"] - results[0]["started"] + 0.01  # not counted twice
    assert sorted(record["entry"]["id"] for _, record in commit_records(out)) == sorted(s.id for s in shards)
    for shard in shards:
        assert pq.read_table(out / shard.output).equals(pq.read_table(out_one / shard.output))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("cpus", [1, 2])
def test_a_big_shards_error_in_a_bundle_commits_nothing_after_it(tmp_path: Path, cpus: int) -> None:
    """A corrupt file fails its own shard only; an error that is not the data's (its output's directory is
    a file) ends the bundle there: no shard after it commits, and no temporary file is left, overlapped
    (two CPUs) or one at a time (one)."""
    replica, shards, out = _replica(tmp_path, 6, cpus=cpus)
    Path(shards[1].path).write_bytes(b"not parquet")
    blocked = out / Path(shards[3].output).parent
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("")
    results: list[dict[str, Any]] = []
    try:
        with pytest.raises((NotADirectoryError, FileExistsError)):  # (its directory made, or written into)
            for done in replica.process_bundle([s.to_task() for s in shards]):
                results.extend(done)
        overlapped = any(t.name.startswith("batch-infer-stage") for t in threading.enumerate())
        assert overlapped == (cpus > 1)
    finally:
        replica.close()
    assert [(r["id"], r["status"]) for r in results] == [(shards[0].id, "committed"), (shards[1].id, "failed"),
                                                         (shards[2].id, "committed")]
    assert shards[1].input in results[1]["error"]
    assert sorted(record["entry"]["id"] for _, record in commit_records(out)) == sorted([shards[0].id, shards[2].id])
    deadline = time.monotonic() + 30
    while any(p.name.endswith(".tmp") for p in out.rglob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet")) == sorted([shards[0].output,
                                                                                    shards[2].output])


# --- whole runs: the lane and Ray bundle big shards; kills lose and repeat nothing ----------------------

FILES, BIG_ROWS = 40, 30  # shard_rows 40: a 30-row file is a big shard (half of it or more), three row groups


def _big(tmp_path: Path, files: int = FILES) -> tuple[Path, Path]:
    write_files(tmp_path / "in", [BIG_ROWS] * files, features=4, row_group_size=10)
    save_mlp(tmp_path / "m.pt", [4, 8, 1])
    return tmp_path / "in", tmp_path / "m.pt"


def _calls(timeline: Path) -> list[int]:
    spans = [e for e in json.loads(timeline.read_text())["traceEvents"] if e["ph"] == "X"]
    counts: dict[tuple[int, int], int] = {}
    for e in spans:
        counts[(e["tid"], e["args"]["call"])] = counts.get((e["tid"], e["args"]["call"]), 0) + 1
    return sorted(counts.values())


def _exactly_once(out: Path, files: int = FILES) -> None:
    assert read_output(out)["id"].to_pylist() == list(range(files * BIG_ROWS))
    manifest = json.loads((out / MANIFEST).read_text())
    assert len(manifest["shards"]) == files and all(s["status"] == "committed" for s in manifest["shards"])
    assert pipelines.verify(str(out)).ok


@pytest.mark.parametrize("where", ["ray", "driver-lane"])
def test_big_shards_go_up_to_eight_a_call_to_a_replica_of_two_cpus(tmp_path: Path, where: str) -> None:
    source, model = _big(tmp_path)
    out, timeline = tmp_path / "out", tmp_path / "timeline.json"
    if where == "driver-lane":  # a fresh process: the run starts no Ray and runs its replica in the driver
        run = cli("run", "--model", str(model), "--input", str(source), "--output", str(out), "--json",
                  "--timeline", str(timeline), "--shard-rows", "40", "--batch-size", "8")
        assert run.returncode == 0, run.stderr[-3000:]
        report = json.loads(run.stdout)
        assert [r["node"] for r in report["replicas"]] == ["driver"]
    else:
        report = pipelines.run(model=str(model), input=str(source), output=str(out), timeline=str(timeline),
                               shard_rows=40, batch_size=8, replicas=1, cpus_per_replica=2,
                               progress=False).to_dict()
    assert report["status"] == "succeeded" and report["shards_done"] == FILES
    calls = _calls(timeline)
    assert sum(calls) == FILES and max(calls) == 8, calls
    _exactly_once(out)


def test_big_shards_go_one_a_call_to_a_replica_of_one_cpu(tmp_path: Path) -> None:
    source, model = _big(tmp_path, files=6)
    out, timeline = tmp_path / "out", tmp_path / "timeline.json"
    report = pipelines.run(model=str(model), input=str(source), output=str(out), timeline=str(timeline),
                           shard_rows=40, batch_size=8, replicas=2, cpus_per_replica=0.5, progress=False)
    assert report.status == "succeeded"
    assert _calls(timeline) == [1] * 6
    _exactly_once(out, files=6)


def test_a_replica_killed_mid_bundle_of_big_shards_loses_and_repeats_no_row(tmp_path: Path) -> None:
    source, model = _big(tmp_path, files=160)
    out = tmp_path / "out"
    report, killed = signal_a_busy_replica(
        lambda: pipelines.run(model=str(model), input=str(source), output=str(out), shard_rows=40, batch_size=8,
                              replicas=1, cpus_per_replica=2, progress=False),
        signal.SIGKILL, out=out, outputs=10)
    assert killed is not None, "the job ended before a replica could be killed; make it longer"
    assert isinstance(report, pipelines.RunReport)
    assert report.status == "succeeded" and (out / SUCCESS).exists()
    _exactly_once(out, files=160)
    manifest = json.loads((out / MANIFEST).read_text())
    assert max(s["attempts"] for s in manifest["shards"]) <= 2  # a lost bundle charges at most one of its shards


def test_a_driver_killed_with_big_shards_in_flight_then_rerun_loses_and_repeats_no_row(tmp_path: Path) -> None:
    source, model = _big(tmp_path, files=160)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "run", "--model", str(model), "--input", str(source), "--output",
         str(out), "--shard-rows", "40", "--batch-size", "8"],  # the driver lane: one replica, every CPU
        cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if len(commit_records(out)) >= 20:
                break
            time.sleep(0.01)
        assert process.poll() is None, "the run ended before it could be killed; make it longer"
    finally:
        _kill_group(process)
    assert not (out / SUCCESS).exists()
    again = pipelines.run(model=str(model), input=str(source), output=str(out), shard_rows=40, batch_size=8,
                          progress=False)
    assert again.status == "succeeded" and again.shards_done + again.shards_skipped == 160
    assert again.shards_skipped >= 20
    _exactly_once(out, files=160)


def test_take_keeps_a_small_shard_out_of_a_call_of_big_ones() -> None:
    from collections import deque

    from pipelines.bundle import _example

    pending = deque(_example([40, 20, 20, 5, 40, 30]))
    assert [[s.rows_in for s in take(pending, rows=40, big=8)] for _ in range(3)] == [[40, 20, 20], [5], [40, 30]]
    pending = deque(_example([40, 20, 20, 5]))
    assert [[s.rows_in for s in take(pending, rows=40, big=1)] for _ in range(3)] == [[40], [20, 20], [5]]
    pending = deque(_example([40] * 5))
    assert [len(take(pending, rows=40, big=8, most=2)) for _ in range(3)] == [2, 2, 1]
