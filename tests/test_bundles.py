"""Tiny files bundled: several small shards per replica call, each still committed on its own (issue 15,
item 4), on Ray replicas and in the driver lane; exactly-once under a replica kill and a driver kill."""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, TEST_REPLICA, cli, read_output, save_mlp, write_files
from journal_files import commit_records
from test_failures import _schedule, signal_a_busy_replica
from test_histories import _kill_group

import pipelines
from pipelines.commit import MANIFEST, SUCCESS

pytestmark = pytest.mark.usefixtures("ray_shared")

FILES, ROWS = 48, 25  # many tiny files: 25 rows each, one row group, one shard


def _tiny(tmp_path: Path, files: int = FILES) -> tuple[Path, Path]:
    write_files(tmp_path / "in", [ROWS] * files, features=4, row_group_size=ROWS)
    save_mlp(tmp_path / "m.pt", [4, 8, 1])
    return tmp_path / "in", tmp_path / "m.pt"


def _calls(timeline: Path) -> collections.Counter[tuple[int, int]]:
    """Shards per (replica, call) in a run's timeline."""
    spans = [e for e in json.loads(timeline.read_text())["traceEvents"] if e["ph"] == "X"]
    return collections.Counter((e["tid"], e["args"]["call"]) for e in spans)


def _exactly_once(out: Path, files: int = FILES) -> None:
    assert read_output(out)["id"].to_pylist() == list(range(files * ROWS))  # every row once, in order
    manifest = json.loads((out / MANIFEST).read_text())
    assert len(manifest["shards"]) == files and all(s["status"] == "committed" for s in manifest["shards"])
    assert pipelines.verify(str(out)).ok


@pytest.mark.parametrize("where", ["ray", "driver-lane"])
def test_tiny_files_go_to_a_replica_several_per_call_and_commit_one_by_one(tmp_path: Path, where: str) -> None:
    source, model = _tiny(tmp_path)
    out, timeline = tmp_path / "out", tmp_path / "timeline.json"
    options: dict[str, Any] = dict(TEST_REPLICA) if where == "ray" else {}
    if where == "driver-lane":  # the lane runs only where the run would start its own Ray: in a fresh process
        run = cli("run", "--model", str(model), "--input", str(source), "--output", str(out), "--json",
                  "--timeline", str(timeline))
        assert run.returncode == 0, run.stderr[-3000:]
        report = json.loads(run.stdout)
        assert [r["node"] for r in report["replicas"]] == ["driver"]
    else:
        report = pipelines.run(model=str(model), input=str(source), output=str(out), timeline=str(timeline),
                               progress=False, **options).to_dict()
    assert report["status"] == "succeeded" and report["shards_done"] == FILES
    calls = _calls(timeline)
    assert sum(calls.values()) == FILES and max(calls.values()) >= 2, calls  # several shards in one call
    assert len(calls) < FILES
    journal_free = not (out / "_journal").exists() or not any((out / "_journal").iterdir())
    assert journal_free and (out / SUCCESS).exists()
    _exactly_once(out)


def test_a_bundle_is_cut_at_shard_rows(tmp_path: Path) -> None:
    """`shard_rows` bounds a call's rows: shards as large as it are never bundled."""
    source, model = _tiny(tmp_path, files=12)
    out, timeline = tmp_path / "out", tmp_path / "timeline.json"
    report = pipelines.run(model=str(model), input=str(source), output=str(out), timeline=str(timeline),
                           shard_rows=2 * ROWS, progress=False, **TEST_REPLICA)
    assert report.status == "succeeded"
    assert max(_calls(timeline).values()) == 2  # 25 + 25 rows; a third would pass 50
    _exactly_once(out, files=12)


def test_a_replica_killed_mid_bundle_loses_and_repeats_no_row(tmp_path: Path) -> None:
    source, model = _tiny(tmp_path, files=160)
    out = tmp_path / "out"
    report, killed = signal_a_busy_replica(
        lambda: pipelines.run(model=str(model), input=str(source), output=str(out), batch_size=8,
                              progress=False, **TEST_REPLICA),
        signal.SIGKILL, out=out, outputs=10)
    assert killed is not None, "the job ended before a replica could be killed; make it longer"
    assert isinstance(report, pipelines.RunReport)
    assert report.status == "succeeded" and report.rows_out == 160 * ROWS and (out / SUCCESS).exists()
    _exactly_once(out, files=160)
    manifest = json.loads((out / MANIFEST).read_text())
    assert max(s["attempts"] for s in manifest["shards"]) <= 2  # a lost bundle charges at most one of its shards


def test_a_driver_killed_with_bundles_in_flight_then_rerun_loses_and_repeats_no_row(tmp_path: Path) -> None:
    source, model = _tiny(tmp_path, files=160)
    out, journal = tmp_path / "out", tmp_path / "out" / "_journal"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "run", "--model", str(model), "--input", str(source), "--output",
         str(out), "--batch-size", "8", "--replicas", "2", "--cpus-per-replica", "0.5"],
        cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if len(commit_records(out)) >= 20:
                break  # commit records of several calls' shards written, more calls in flight
            time.sleep(0.01)
        assert process.poll() is None, "the run ended before it could be killed; make it longer"
    finally:
        _kill_group(process)
    assert not (out / SUCCESS).exists()
    again = pipelines.run(model=str(model), input=str(source), output=str(out), progress=False, **TEST_REPLICA)
    assert again.status == "succeeded" and again.shards_done + again.shards_skipped == 160
    assert again.shards_skipped >= 20  # what the killed run committed stays committed
    _exactly_once(out, files=160)


def test_a_replica_lost_mid_bundle_is_charged_to_a_shard_only_when_it_is_known(tmp_path: Path) -> None:
    """A bundle's results come back in order: when the replica dies with one shard of its call left, that
    one was executing and is charged; with several left, none is charged and each runs alone next, so
    a shard that kills replicas fails on its own attempts and the others never fail for it."""
    # [ok-0, ok-1, die-2] then [ok-3, ok-4]: die-2 is the call's last shard without a result.
    known, _, _ = _schedule(tmp_path, ["ok-0", "ok-1", "die-2", "ok-3", "ok-4"], replicas=1, max_attempts=1,
                            bundle_rows=1000)
    # [die-0, ok-1] then [ok-2, ok-3]: die-0 or ok-1 may have been executing.
    unsure, _, _ = _schedule(tmp_path, ["die-0", "ok-1", "ok-2", "ok-3"], replicas=1, max_attempts=1,
                             bundle_rows=1000)
    for results, bad in ((known, "die-2"), (unsure, "die-0")):
        assert results[bad]["status"] == "failed" and results[bad]["attempts"] == 1
        assert results[bad]["error"].startswith("replica died on each of 1 attempt(s)")
        assert all((r["status"], r["attempts"]) == ("committed", 1) for i, r in results.items() if i != bad)


@pytest.mark.parametrize("cpus, local", [(1, True), (2, True), (2, False)])
def test_a_bundle_commits_in_order_and_nothing_after_a_shard_that_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpus: int, local: bool) -> None:
    """A replica with several CPUs on an object store stages a bundle's tiny shards side by side (read,
    predicted, written under temporary names) but commits them in bundle order, as one CPU does (and any
    replica on local files): a shard's data problem fails that shard only; an error that is not the data's
    ends the bundle at its shard, and no shard after it commits (no journal record, no file, no temporary
    file left). `local=False`: staged side by side as on a store (`STAGE_LOCAL`), over these local files."""
    import threading

    import workers.replica
    from workers.replica import Replica
    from workers.replica_job import ReplicaJob

    monkeypatch.setattr(workers.replica, "STAGE_LOCAL", not local)

    for i in range(6):
        write_files(tmp_path / "in" / f"s{i}", [ROWS], features=4, row_group_size=ROWS, start=i * ROWS, seed=i)
    save_mlp(tmp_path / "m.pt", [4, 8, 1])
    out = tmp_path / "out"
    plan = pipelines.plan(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(out))
    shards = plan.todo
    assert [Path(s.path).parent.name for s in shards] == [f"s{i}" for i in range(6)]
    Path(shards[1].path).write_bytes(b"not parquet")  # the shard's own data problem
    blocked = out / Path(shards[3].output).parent  # a file where its output's directory goes: OSError
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("")
    job = ReplicaJob(model=str(tmp_path / "m.pt"), model_sha256=plan.model.sha256, input=str(tmp_path / "in"),
                     output=str(out), features=plan.columns.features, passthrough=plan.columns.passthrough,
                     list_column=False, width=4, prediction_column="prediction", keep_features=False, cpus=cpus,
                     job_digest="d" * 64)
    replica = Replica(0, job, in_driver=True, numpy_forward=True)
    replica.forward  # loaded: the first bundle after the load is staged side by side
    results: list[dict[str, Any]] = []
    try:
        with pytest.raises(NotADirectoryError):
            for done in replica.process_bundle([s.to_task() for s in shards]):
                results.extend(done)
        side_by_side = any(t.name.startswith("batch-infer-stage") for t in threading.enumerate())
        assert side_by_side == (cpus > 1 and not local)
    finally:
        replica.close()
    assert [(r["id"], r["status"]) for r in results] == [(shards[0].id, "committed"), (shards[1].id, "failed"),
                                                         (shards[2].id, "committed")]
    assert "not parquet" in results[1]["error"] or shards[1].input in results[1]["error"]
    records = [record["entry"]["id"] for _, record in commit_records(out)]
    assert sorted(records) == sorted([shards[0].id, shards[2].id])
    deadline = time.monotonic() + 30  # stagings still running when the bundle ended drop their files when done
    while any(p.name.endswith(".tmp") for p in out.rglob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    published = sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet"))
    assert published == sorted([shards[0].output, shards[2].output])
