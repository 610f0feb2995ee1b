"""The driver lane: a small embedded run is done in the driver process, without starting Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, cli, lane_children, output_files, read_output, reference, save_mlp, write_files
from s3 import BUCKET, FaultProxy, S3Server, s3, s3_server  # noqa: F401 - fixtures

import pipelines
import pipelines.lane
import pipelines.lane_processes
import pipelines.startup
from pipelines.commit import SUCCESS
from pipelines.commit.recorder import Recorder
from basis.errors import ResourceError
from pipelines.lock import LOCK

_RUN_AND_SAY_IF_RAY_WAS_IMPORTED = """
import json, sys
import pipelines
options = dict(arg.split("=", 1) for arg in sys.argv[4:])
report = pipelines.run(model=sys.argv[1], input=sys.argv[2], output=sys.argv[3], progress=False, **options)
print(json.dumps({"report": report.to_dict(), "ray_imported": "ray" in sys.modules,
                  "torch_imported": "torch" in sys.modules}))
"""


def _run_in_a_fresh_process(model: Path, input: Path, output: Path, *options: str) -> dict:
    result = subprocess.run([sys.executable, "-c", _RUN_AND_SAY_IF_RAY_WAS_IMPORTED, str(model), str(input),
                             str(output), *options], capture_output=True, text=True, cwd=REPO, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_a_small_run_never_starts_ray_and_commits_like_a_replica_across_a_history(tmp_path: Path) -> None:
    model = save_mlp(tmp_path / "m.pt", [8, 16, 1])
    write_files(tmp_path / "in", [300, 200], features=8, row_group_size=100)
    first = _run_in_a_fresh_process(tmp_path / "m.pt", tmp_path / "in", tmp_path / "out")
    report = first["report"]
    assert not first["ray_imported"]  # no Ray started, not even imported
    assert not first["torch_imported"]  # fp32 on numpy (workers.cpu_forward): no 1.5 s torch import
    assert report["status"] == "succeeded" and report["complete"] and report["rows_out"] == 500
    assert [(r["node"], r["shards"], r["ended"]) for r in report["replicas"]] == [("driver", 2, "finished")]
    assert report["cpus_per_replica"] > 0 and report["gpus_per_replica"] == 0

    # A new file that is unreadable and one that is fine: the bad one fails alone (exit 1), nothing else is redone.
    (tmp_path / "in" / "part-0002.parquet").write_bytes(b"PAR1 truncated PAR1")
    write_files(tmp_path / "more", [150], features=8, row_group_size=100, start=500, seed=7)
    (tmp_path / "more" / "part-0000.parquet").rename(tmp_path / "in" / "part-0003.parquet")
    second = cli("run", "--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "out"), "--json")
    assert second.returncode == 1, second.stderr[-3000:]
    report = json.loads(second.stdout)
    assert report["shards_skipped"] == 2 and report["shards_done"] == 1 and report["shards_failed"] == 1
    assert "part-0002.parquet" in report["errors"][0]["input"] and not report["complete"]
    assert "driver process" in second.stderr

    # Fixed upstream: the next tick completes the output, every id exactly once, values as torch computes them.
    write_files(tmp_path / "fix", [50], features=8, row_group_size=100, start=650, seed=9)
    (tmp_path / "fix" / "part-0000.parquet").replace(tmp_path / "in" / "part-0002.parquet")
    third = cli("run", "--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "in"), "--output",
                str(tmp_path / "out"))
    assert third.returncode == 0, third.stderr[-3000:]
    assert cli("verify", str(tmp_path / "out"), "--sample", "50", "--checksums").returncode == 0
    out = read_output(tmp_path / "out").sort_by("id")
    assert out["id"].to_pylist() == list(range(700))
    inputs = pq.read_table(tmp_path / "in").sort_by("id")
    features = np.stack([inputs[f"f{j:02d}"].to_numpy() for j in range(8)], axis=1)
    np.testing.assert_allclose(out["prediction"].to_numpy(), reference(model, features)[:, 0], rtol=1e-5, atol=1e-6)


def test_a_small_run_that_can_never_fit_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    save_mlp(tmp_path / "m.pt", [8, 4, 1])
    write_files(tmp_path / "in", [100], features=8, row_group_size=100)
    with pytest.raises(ResourceError, match="64 CPU"):
        pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                      cpus_per_replica=64, progress=False)
    assert not (tmp_path / "out").exists()


def test_runs_above_the_lane_or_with_an_exact_replica_count_start_ray(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    save_mlp(tmp_path / "m.pt", [8, 4, 1])
    write_files(tmp_path / "in", [100, 100, 100], features=8, row_group_size=100)
    job = {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "cpus_per_replica": 0.5,
           "progress": False}
    monkeypatch.setattr(pipelines.lane, "LANE_MAX_ROWS", 250)  # three files of 100 rows are "too big" now
    big = pipelines.run(**job, output=str(tmp_path / "big"))
    assert big.complete and big.replicas and all(r["node"] != "driver" for r in big.replicas)
    monkeypatch.setattr(pipelines.lane, "LANE_MAX_ROWS", 10_000)
    exact = pipelines.run(**job, output=str(tmp_path / "exact"), replicas=1)
    assert exact.complete and [r["node"] != "driver" for r in exact.replicas] == [True]
    assert read_output(tmp_path / "big").sort_by("id").equals(read_output(tmp_path / "exact").sort_by("id"))


def test_a_small_run_in_bf16_takes_torch_in_the_lane(tmp_path: Path) -> None:
    model = save_mlp(tmp_path / "m.pt", [8, 16, 1])
    write_files(tmp_path / "in", [300], features=8, row_group_size=100)
    run = _run_in_a_fresh_process(tmp_path / "m.pt", tmp_path / "in", tmp_path / "out", "precision=bf16")
    assert run["torch_imported"] and not run["ray_imported"]
    assert run["report"]["status"] == "succeeded" and run["report"]["rows_out"] == 300
    out = read_output(tmp_path / "out").sort_by("id")
    inputs = pq.read_table(tmp_path / "in").sort_by("id")
    features = np.stack([inputs[f"f{j:02d}"].to_numpy() for j in range(8)], axis=1)
    np.testing.assert_allclose(out["prediction"].to_numpy(), reference(model, features)[:, 0], rtol=3e-2, atol=1e-2)


def test_many_tiny_files_run_on_one_child_replica_per_cpu_each_row_once(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15, item 4: a run of many tiny shards is bound by one interpreter's lock in the driver; it
    runs on a child process per CPU instead (`pipelines.lane_processes`), each committing its shards as
    any replica does; the driver records each result once, and no child outlives the run."""
    monkeypatch.setattr(pipelines.startup, "LANE_PROCESS_SHARDS", 20)  # what 2,000 files do, on 40
    model = save_mlp(tmp_path / "m.pt", [8, 16, 1])
    write_files(tmp_path / "in", [25] * 40, features=8, row_group_size=100)
    job = {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
           "progress": False}
    entries: list[dict] = []  # what the run keeps of each shard until its next checkpoint
    committed = Recorder.committed
    monkeypatch.setattr(Recorder, "committed", lambda self, entry, *rest: (entries.append(entry),
                                                                            committed(self, entry, *rest))[1])
    report = pipelines.run(**job)
    assert report.status == "succeeded" and report.complete and report.rows_out == 1000, (report.errors[:3],
                                                                                        report.replicas)
    lanes = report.replicas
    assert [(r["node"], r["ended"]) for r in lanes] == [("driver", "finished")] * 2, lanes
    assert sum(r["shards"] for r in lanes) == 40 and all(r["shards"] > 0 for r in lanes)  # both children worked
    assert report.cpus_per_replica == 1.0
    assert not lane_children(os.getpid())
    # Memory: an entry unpickled from a child holds no copies of its ~20 keys (1.5 KiB of objects per entry)
    assert len(entries) == 40 and len({id(key) for entry in entries for key in entry}) == len(entries[0])
    assert cli("verify", str(tmp_path / "out"), "--sample", "40", "--checksums").returncode == 0
    out = read_output(tmp_path / "out").sort_by("id")
    assert out["id"].to_pylist() == list(range(1000))  # each row once
    inputs = pq.read_table(tmp_path / "in").sort_by("id")
    features = np.stack([inputs[f"f{j:02d}"].to_numpy() for j in range(8)], axis=1)
    np.testing.assert_allclose(out["prediction"].to_numpy(), reference(model, features)[:, 0], rtol=1e-5, atol=1e-6)

    write_files(tmp_path / "more", [25] * 3, features=8, row_group_size=100, start=1000, seed=3)
    for index, path in enumerate(sorted((tmp_path / "more").iterdir())):
        path.rename(tmp_path / "in" / f"part-{100 + index:04d}.parquet")
    again = pipelines.run(**job)  # three new files: below the children's threshold, in the driver
    assert (again.shards_done, again.shards_skipped) == (3, 40)
    assert [r["node"] for r in again.replicas] == ["driver"]  # one replica, in the driver
    assert read_output(tmp_path / "out").sort_by("id")["id"].to_pylist() == list(range(1075))


def test_a_child_replica_that_dies_costs_only_its_shard_which_a_fresh_child_retries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC: a replica that dies costs at most the shards it held, retried elsewhere. A child killed (as the
    OOM killer would) after the run's 5th commit: a fresh child takes its shard and the ones after it; the run
    succeeds, each row once; the report lists the lost child."""
    import signal

    monkeypatch.setattr(pipelines.startup, "LANE_PROCESS_SHARDS", 20)
    # each result sent as it comes, so the child is still in its bundle at the 5th commit (batched, a child
    # is up to 50 ms ahead of what the driver has recorded: all 20 shards of its bundle)
    monkeypatch.setattr(pipelines.lane_processes, "SEND_EVERY", 0.0)
    save_mlp(tmp_path / "m.pt", [8, 16, 1])
    write_files(tmp_path / "in", [25] * 40, features=8, row_group_size=100)
    killed: list[int] = []
    recorded = [0]
    committed = Recorder.committed

    def kill_a_child_once(self: Recorder, entry: dict, *rest: object) -> object:
        done = committed(self, entry, *rest)
        recorded[0] += 1
        if recorded[0] == 5 and not killed:
            children = lane_children(os.getpid())
            assert children, "no child replica to kill"
            os.kill(children[0], signal.SIGKILL)
            killed.append(children[0])
        return done

    monkeypatch.setattr(Recorder, "committed", kill_a_child_once)
    _run_losing_one_child(tmp_path, killed)
    assert cli("verify", str(tmp_path / "out"), "--sample", "40", "--checksums").returncode == 0


def test_a_child_replica_killed_while_it_starts_is_replaced_and_the_run_succeeds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child killed before it was ready (the OOM killer while it imports; a busy machine starts one child
    seconds after the other) is a dead replica, not a replica that cannot start: a fresh child takes its
    bundle and the run succeeds, each row once (it failed every shard left: "did not start ... (exit -9)")."""
    import signal

    monkeypatch.setattr(pipelines.startup, "LANE_PROCESS_SHARDS", 20)
    save_mlp(tmp_path / "m.pt", [8, 16, 1])
    write_files(tmp_path / "in", [25] * 40, features=8, row_group_size=100)
    started = pipelines.lane_processes.ProcessReplica.__init__
    killed: list[int] = []

    def kill_the_first_at_start(self: pipelines.lane_processes.ProcessReplica, *args: object, **kw: object) -> None:
        started(self, *args, **kw)
        if not killed:
            os.kill(self.process.pid, signal.SIGKILL)
            killed.append(self.process.pid)

    monkeypatch.setattr(pipelines.lane_processes.ProcessReplica, "__init__", kill_the_first_at_start)
    _run_losing_one_child(tmp_path, killed)


def test_a_child_killed_before_it_was_ready_is_dead_even_before_its_exit_can_be_read(tmp_path: Path) -> None:
    """A killed process's files close before the kernel reports its exit. A child killed before the lane
    waited for it (ci49: killed at the run's 5th commit, before its lane's first bundle) was polled in that
    gap, read as "still running", and called one that did not start: the lane ended, failing 19 shards.
    Its exit is waited for: a dead replica, which a fresh child replaces."""
    import signal

    from workers.replica_job import ReplicaJob

    save_mlp(tmp_path / "m.pt", [4, 8, 1])
    write_files(tmp_path / "in", [20], features=4, row_group_size=20)
    plan = pipelines.plan(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    job = ReplicaJob(model=str(tmp_path / "m.pt"), model_sha256=plan.model.sha256, input=str(tmp_path / "in"),
                     output=str(tmp_path / "out"), features=plan.columns.features,
                     passthrough=plan.columns.passthrough, list_column=False, width=4,
                     prediction_column="prediction", keep_features=False, cpus=1.0, job_digest="d" * 64)
    child = pipelines.lane_processes.ProcessReplica(0, job, numpy_forward=True)
    try:
        os.kill(child.process.pid, signal.SIGKILL)
        child.process.poll = lambda: None  # type: ignore[method-assign] - the gap: files closed, no exit yet
        with pytest.raises(pipelines.lane_processes.ReplicaDied, match="killed by signal 9 before it was ready"):
            child.wait_ready()
    finally:
        child.abandon()
    assert child.process.returncode == -signal.SIGKILL


def _run_losing_one_child(tmp_path: Path, killed: list[int]) -> None:
    """Run the job in `tmp_path` (1,000 rows), during which a test kills one lane child: the run succeeds,
    one replica is lost as dead and two finish, each row is written once, and no child is left running."""
    report = pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                           progress=False)
    assert killed
    assert report.status == "succeeded" and report.complete and report.rows_out == 1000, (report.errors[:3],
                                                                                        report.replicas)
    ended = [r["ended"] for r in report.replicas]
    assert sum(e.startswith("lost: replica died") for e in ended) == 1 and ended.count("finished") == 2, ended
    assert read_output(tmp_path / "out").sort_by("id")["id"].to_pylist() == list(range(1000))  # each row once
    assert not lane_children(os.getpid())


def test_a_child_drops_the_bundle_queued_behind_one_that_raised_and_takes_the_next_epochs(tmp_path: Path) -> None:
    """A lane keeps a second bundle queued in its child (`pipelines.lane_processes`). When the first raises
    (here an OSError: a file where its second shard's output directory goes), the child must not start the
    one queued behind it, whose shards the lane puts back for a retry: it drops it, and runs the bundle sent
    after the driver saw the error. Nothing of the dropped bundle is written; the first shard stays committed."""
    from journal_files import commit_records

    from workers.replica_job import ReplicaJob

    for i in range(6):
        write_files(tmp_path / "in" / f"s{i}", [20], features=4, row_group_size=20, start=i * 20, seed=i)
    save_mlp(tmp_path / "m.pt", [4, 8, 1])
    out = tmp_path / "out"
    plan = pipelines.plan(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(out))
    shards = plan.todo
    assert [Path(s.path).parent.name for s in shards] == [f"s{i}" for i in range(6)]
    blocked = out / Path(shards[1].output).parent
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("")
    job = ReplicaJob(model=str(tmp_path / "m.pt"), model_sha256=plan.model.sha256, input=str(tmp_path / "in"),
                     output=str(out), features=plan.columns.features, passthrough=plan.columns.passthrough,
                     list_column=False, width=4, prediction_column="prediction", keep_features=False, cpus=1.0,
                     job_digest="d" * 64)
    child = pipelines.lane_processes.ProcessReplica(0, job, numpy_forward=True)
    try:
        child.wait_ready()
        child.send([s.to_task() for s in shards[0:2]])
        child.send([s.to_task() for s in shards[2:4]])  # queued behind the first, in the same epoch
        first: list[dict] = []
        with pytest.raises(NotADirectoryError):
            for done in child.receive():
                first.extend(done)
        assert [(r["id"], r["status"]) for r in first] == [(shards[0].id, "committed")]
        child.send([s.to_task() for s in shards[4:6]])  # the next epoch
        after = [r for done in child.receive() for r in done]
        assert [(r["id"], r["status"]) for r in after] == [(shards[4].id, "committed"), (shards[5].id, "committed")]
        assert child.stats()["shards"] == 3
    finally:
        child.close()
    records = sorted(record["entry"]["id"] for _, record in commit_records(out))
    assert records == sorted([shards[0].id, shards[4].id, shards[5].id])
    published = sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet"))
    assert published == sorted([shards[0].output, shards[4].output, shards[5].output])
    assert child.process.returncode is not None


def test_an_error_in_a_childs_bundle_gives_back_the_bundle_queued_behind_it_and_nothing_is_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child's bundle that raises (here an OSError: a file where one shard's output directory goes, which is
    no shard's data problem, so it ends the lane) ends there; the bundle queued behind it in that child is
    dropped there and goes back to the queue, so it fails with the rest instead of vanishing or committing
    behind the driver's back. Every shard is accounted for once, as committed or failed, and what committed
    is in the output once."""
    monkeypatch.setattr(pipelines.startup, "LANE_PROCESS_SHARDS", 20)
    save_mlp(tmp_path / "m.pt", [8, 16, 1])
    for i in range(40):
        write_files(tmp_path / "in" / f"s{i:02d}", [25], features=8, row_group_size=100, start=25 * i, seed=i)
    out = tmp_path / "out"
    plan = pipelines.plan(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(out))
    # Made a file once the run has begun (its journal written, no shard sent yet), so the run's start, which
    # refuses files it did not write, has passed, and no child can have made the directory first: s20's
    # bundle raises NotADirectoryError. (Made at the first commit, it raced the children, who were already
    # writing s20's bundle: CI on 22e26c1.)
    blocked = out / Path(plan.todo[20].output).parent
    begin = Recorder.begin

    def begin_then_block(self: Recorder, *args: object, **kwargs: object) -> object:
        began = begin(self, *args, **kwargs)
        blocked.write_text("")
        return began

    monkeypatch.setattr(Recorder, "begin", begin_then_block)
    report = pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(out),
                           progress=False)
    assert report.status == "failed" and report.shards_done + report.shards_failed == 40, report.to_dict()
    assert report.shards_failed >= 2  # the shard that raised, and at least the bundle queued behind it
    assert any("NotADirectoryError" in e["error"] for e in report.errors), report.errors
    manifest = json.loads((out / "_manifest.json").read_text())
    committed = [e["id"] for e in manifest["shards"] if e["status"] == "committed"]
    assert len(committed) == len(set(committed)) == report.shards_done
    ids = read_output(out)["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 25 * report.shards_done  # each committed row once, nothing else
    assert not lane_children(os.getpid())


def _lane_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("batch-infer-lane-")]


@pytest.mark.parametrize("children", [False, True], ids=["in-driver", "child-processes"])
def test_a_read_that_hangs_in_the_lane_costs_its_shard_after_shard_timeout(
    tmp_path: Path, s3: FaultProxy, s3_server: S3Server, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, children: bool,
) -> None:
    """Issue 12, item 9: a stuck read (here a real S3 endpoint that never answers the row group's
    GETs, as a hung mount or store does) hung the driver lane for good, lock held. Now the shard is
    retried on a fresh replica after `shard_timeout`, then fails; the run ends (exit 1) with its
    report, and the abandoned attempts never commit, even once the read comes back. The same with
    the lane's replicas in child processes (many tiny shards): a stalled child is killed."""
    if children:
        monkeypatch.setattr(pipelines.startup, "LANE_PROCESS_SHARDS", 2)  # two tiny files: two child replicas
    model = tmp_path / "m.pt"
    save_mlp(model, [4, 8, 1])
    for index, start in enumerate((0, 300)):
        table = pa.table({"id": np.arange(start, start + 300),
                          **{f"f{j}": np.ones(300, np.float32) * j for j in range(4)}})
        with s3_server.filesystem().open_output_stream(f"{BUCKET}/lane/part-{index}.parquet") as sink:
            pq.write_table(table, sink, row_group_size=100)
    # Footers are read from byte 0 in files this small: only part-0's row group reads hang.
    release = s3.stall("GET", r"/lane/part-0\.parquet", header=("Range", r"^bytes=[1-9]"))
    out = tmp_path / "out"
    began = time.monotonic()
    report = pipelines.run(model=str(model), input=s3.uri("lane/"), output=str(out), shard_timeout=2,
                           max_attempts=2, progress=False)
    took = time.monotonic() - began
    assert report.status == "failed" and (report.shards_done, report.shards_failed) == (1, 1), report.to_dict()
    assert "part-0.parquet" in report.errors[0]["input"]
    assert "replica stalled on each of 2 attempt(s)" in report.errors[0]["error"], report.errors
    assert "shard_timeout" in report.errors[0]["error"]
    assert took < 120, took  # two 2-second timeouts and one quick shard, on a loaded machine
    assert not (out / LOCK).exists() and not (out / SUCCESS).exists()
    ended = [r["ended"].split(":")[0] for r in report.replicas]
    assert sorted(ended) == (["finished", "finished", "lost", "lost"] if children else ["finished", "lost", "lost"])
    assert all(r["node"] == "driver" for r in report.replicas)
    assert not lane_children(os.getpid())
    assert any("stalled on shard" in r.getMessage() for r in caplog.records)
    assert read_output(out)["id"].to_pylist() == list(range(300, 600))
    before = output_files(out)

    release.set()  # the hung reads come back: the abandoned attempts decode, predict ... and must not commit
    deadline = time.monotonic() + 60
    while _lane_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _lane_threads(), "the abandoned attempts did not end once their reads came back"
    # no output or journal record from them; their temp files (opened before the reads hung) are gone
    assert output_files(out) == {name: mtime for name, mtime in before.items() if not name.endswith(".tmp")}

    again = cli("run", "--model", str(model), "--input", s3.uri("lane/"), "--output", str(out), "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["shards_done"] == 1
    assert read_output(out)["id"].to_pylist() == list(range(300)) + list(range(300, 600))  # each row once


def test_a_child_sends_the_results_before_a_shard_that_hangs_so_only_that_shard_is_charged(
    tmp_path: Path, s3: FaultProxy, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child sends its results in lists (`workers.lane_child._Outbox`), yet none is held back behind a shard
    that hangs: in a bundle of part-0 then part-1, whose reads hang, part-0's result reaches the driver, which
    charges the stall to part-1 alone (held back, part-0 would be charged too, lost a third child and
    committed on its second attempt)."""
    monkeypatch.setattr(pipelines.startup, "LANE_PROCESS_SHARDS", 2)  # four tiny files: two child replicas
    monkeypatch.setattr(pipelines.lane_processes, "SEND_EVERY", 0.2)
    model = tmp_path / "m.pt"
    save_mlp(model, [4, 8, 1])
    for index in range(4):
        table = pa.table({"id": np.arange(index * 300, index * 300 + 300),
                          **{f"f{j}": np.ones(300, np.float32) * j for j in range(4)}})
        with s3_server.filesystem().open_output_stream(f"{BUCKET}/lane/part-{index}.parquet") as sink:
            pq.write_table(table, sink, row_group_size=100)
    release = s3.stall("GET", r"/lane/part-1\.parquet", header=("Range", r"^bytes=[1-9]"))
    out = tmp_path / "out"
    try:
        report = pipelines.run(model=str(model), input=s3.uri("lane/"), output=str(out), shard_timeout=5,
                               max_attempts=2, progress=False)
    finally:
        release.set()
    assert report.status == "failed" and (report.shards_done, report.shards_failed) == (3, 1), report.to_dict()
    assert "part-1.parquet" in report.errors[0]["input"]
    ended = sorted(r["ended"].split(":")[0] for r in report.replicas)
    assert ended == ["finished", "finished", "lost", "lost"], report.replicas  # part-1's two attempts, no more
    manifest = json.loads((out / "_manifest.json").read_text())
    attempts = {entry["rel"]: entry["attempts"] for entry in manifest["shards"] if entry["status"] == "committed"}
    assert attempts == {"part-0.parquet": 1, "part-2.parquet": 1, "part-3.parquet": 1}, attempts
    assert read_output(out).sort_by("id")["id"].to_pylist() == list(range(300)) + list(range(600, 1200))


def test_the_lanes_default_shard_timeout_is_the_schedulers() -> None:
    from pipelines import attempts, schedule

    assert pipelines.lane.default_timeout is schedule.default_timeout is attempts.default_timeout  # one policy
    assert attempts.default_timeout(None, 0.0, 1000) == attempts.TIMEOUT_FLOOR_SECONDS == 600.0
    assert attempts.default_timeout(None, 0.01, 10_000) == attempts.TIMEOUT_FACTOR * 0.01 * 10_000 == 1000.0
    assert attempts.default_timeout(7.0, 0.01, 10_000) == 7.0


def test_a_bundle_of_local_files_asks_the_kernel_to_read_the_rest_ahead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing in the page cache, 100,000 files of 100 rows went at 1,477 shards/s (2,415 cached): each
    read waited on the disk in turn. A bundle hints every file but its first (read at once), each file once;
    a file over `SMALL_FILE_BYTES` or one that cannot be opened is left alone, and nothing raises."""
    import os

    import workers.replica
    from workers.reader import SMALL_FILE_BYTES

    hinted: list[tuple[str, int]] = []
    advise = os.posix_fadvise

    def seen(fd: int, offset: int, length: int, advice: int) -> None:
        hinted.append((os.readlink(f"/proc/self/fd/{fd}"), advice))
        advise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", seen)
    small = [tmp_path / f"small-{i}" for i in range(2)]
    for path in small:
        path.write_bytes(b"x" * 100)
    big = tmp_path / "big"
    big.write_bytes(b"x" * (SMALL_FILE_BYTES + 1))
    workers.replica.will_need([str(small[0]), str(big), str(tmp_path / "gone"), str(small[1])])
    assert hinted == [(str(small[0]), os.POSIX_FADV_WILLNEED), (str(small[1]), os.POSIX_FADV_WILLNEED)]

    bundles: list[list[str]] = []
    will_need = workers.replica.will_need
    monkeypatch.setattr(workers.replica, "will_need", lambda paths: (bundles.append(paths), will_need(paths)))
    save_mlp(tmp_path / "m.pt", [4, 8, 1])
    write_files(tmp_path / "in", [20] * 6, features=4, row_group_size=20)
    report = pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                           progress=False)
    assert report.succeeded and report.rows_out == 120
    inputs = sorted(str(p) for p in (tmp_path / "in").rglob("*.parquet"))
    assert bundles and all(len(set(b)) == len(b) for b in bundles), bundles
    # one bundle of the six files in the driver lane: the five after its first are hinted
    assert sorted(p for b in bundles for p in b) == inputs[1:], (bundles, inputs)
