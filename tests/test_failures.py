"""Infrastructure failures: a replica killed or stalled mid-run costs only the shard it was executing; a run
that runs out of replicas still ends with its report; storage errors are retried, then reported as such."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import TEST_REPLICA, cli, read_output, save_mlp, write_files

import pipelines
from pipelines.cluster import ReplicaResources
from pipelines.commit import MANIFEST, SUCCESS
from basis.errors import ResourceError
from pipelines.plan import Shard
from pipelines.schedule import Scheduler
from workers.replica_job import ReplicaJob

pytestmark = pytest.mark.usefixtures("ray_shared")


def _busy_replica_pids() -> list[int]:
    """Replica processes running a shard right now (Ray titles them `ray::Replica.process`),
    descended from this test process (the Ray it started), nothing else."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if not handle.read().startswith(b"ray::Replica.process"):
                    continue
        except OSError:
            continue
        pid = int(entry)
        while pid > 1:
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    pid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                break
            if pid == me:
                found.append(int(entry))
                break
    return found


def signal_a_busy_replica(job: Callable[[], object], sig: int, *, out: Path | None = None,
                          outputs: int = 0) -> tuple[object, int | None]:
    """Run `job()` in a thread and send `sig` to a replica busy with a shard once `outputs` files
    are committed under `out`. Returns the job's result and the pid signalled (None if it ended first)."""
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.update(value=job()))
    thread.start()
    deadline, signalled = time.monotonic() + 120, None
    while thread.is_alive() and time.monotonic() < deadline:
        pids = _busy_replica_pids()
        if pids and (out is None or len(list(out.glob("*.parquet"))) >= outputs):
            signalled = pids[0]
            os.kill(signalled, sig)
            break
        time.sleep(0.02)
    thread.join(timeout=300)
    return result.get("value"), signalled


def test_killed_replica_shards_are_retried(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [5000] * 8, features=16, row_group_size=500)
    save_mlp(tmp_path / "m.pt", [16, 256, 256, 1])
    out = tmp_path / "out"
    report, killed = signal_a_busy_replica(
        lambda: pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(out),
                              shard_rows=500, batch_size=100, progress=False, **TEST_REPLICA),
        signal.SIGKILL, out=out, outputs=2)
    assert killed is not None, "the job ended before a replica could be killed; make it longer"
    assert isinstance(report, pipelines.RunReport)
    assert report.status == "succeeded" and report.rows_out == 40_000 and (out / SUCCESS).exists()
    assert read_output(out)["id"].to_pylist() == list(range(40_000))  # every row exactly once, in order
    manifest = json.loads((out / MANIFEST).read_text())
    assert max(s["attempts"] for s in manifest["shards"]) >= 2  # the shards the dead replica held ran again
    assert all(s["status"] == "committed" for s in manifest["shards"])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_stalled_replica_is_replaced_and_its_shard_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_files(tmp_path / "in", [2000] * 4, features=16, row_group_size=250)
    save_mlp(tmp_path / "m.pt", [16, 256, 256, 1])
    out = tmp_path / "out"
    stopped = None
    try:
        report, stopped = signal_a_busy_replica(  # alive and holding its shard, but never finishing it
            lambda: pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(out),
                                  shard_rows=250, batch_size=50, shard_timeout=6, progress=False, **TEST_REPLICA),
            signal.SIGSTOP, out=out, outputs=2)
        gone = time.monotonic() + 15  # ray.kill force-kills a process that can't exit gracefully after ~5 s
        while stopped is not None and _alive(stopped) and time.monotonic() < gone:
            time.sleep(0.1)
        killed_by_ray = stopped is not None and not _alive(stopped)
    finally:
        if stopped is not None and _alive(stopped):  # our own descendant, stopped by us
            os.kill(stopped, signal.SIGCONT)
            os.kill(stopped, signal.SIGKILL)
    assert stopped is not None, "the job ended before a replica could be stopped; make it longer"
    assert killed_by_ray  # the scheduler replaced the stalled replica with ray.kill
    assert isinstance(report, pipelines.RunReport)
    assert report.status == "succeeded" and report.rows_out == 8000 and (out / SUCCESS).exists()
    assert read_output(out)["id"].to_pylist() == list(range(8000))  # every row exactly once, in order
    manifest = json.loads((out / MANIFEST).read_text())
    assert all(s["status"] == "committed" for s in manifest["shards"])
    retried = [s["id"] for s in manifest["shards"] if s["attempts"] >= 2]
    assert retried  # the stalled shard ran again on a replacement replica
    warnings = [r.getMessage() for r in caplog.records if "stalled" in r.getMessage()]
    assert any(shard in line and "6 s" in line for line in warnings for shard in retried), warnings


def test_no_replica_left_fails_the_rest_then_a_rerun_resumes(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [1000] * 4, features=16, row_group_size=250)
    save_mlp(tmp_path / "m.pt", [16, 256, 256, 1])
    out = tmp_path / "out"
    stop, killed = threading.Event(), []

    def watcher() -> None:  # kills every replica it sees at work, until the run gives up
        while not stop.is_set():
            for pid in _busy_replica_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.01)

    thread = threading.Thread(target=watcher)
    thread.start()
    try:
        run = cli("run", "--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "in"), "--output", str(out),
                  "--shard-rows", "250", "--batch-size", "50", "--replicas", "1", "--cpus-per-replica", "0.5",
                  "--max-attempts", "1", "--report", str(tmp_path / "report.json"), "--json", timeout=120)
    finally:
        stop.set()
        thread.join()
    assert run.returncode == 1, run.stderr  # the run ended with its report: not exit 2, nothing raised
    report = json.loads((tmp_path / "report.json").read_text())
    assert json.loads(run.stdout) == report  # Ray's "a worker died" lines went to stderr, not into the JSON
    assert report["status"] == "failed" and len(killed) >= 2
    errors = [e["error"] for e in report["errors"]]
    assert any(e.startswith("replica died on each of 1 attempt(s)") for e in errors), errors
    assert any(e.startswith("no replica left to run it: replicas died 2 time(s)") for e in errors), errors
    assert report["shards_done"] + report["shards_failed"] == 16 and not (out / SUCCESS).exists()

    again = pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(out),
                          shard_rows=250, batch_size=50, progress=False, **TEST_REPLICA)
    assert again.status == "succeeded" and again.shards_done == report["shards_failed"]
    assert again.shards_skipped == report["shards_done"] and (out / SUCCESS).exists()
    assert read_output(out)["id"].to_pylist() == list(range(4000))


# -- The scheduler's bookkeeping, on a real Ray with a tiny actor that has Replica's interface. --

def _test_replica() -> type:
    """Defined in a function so Ray ships the class by value (worker processes cannot import tests/).

    Each shard's id says what `process` does: `ok`, `die` (the worker process exits),
    `storage` (a StorageError every time) or `flaky` (a StorageError until its `path` exists).
    Replicas with an index >= the job's `width` never finish starting.
    """

    class TestReplica:
        def __init__(self, index: int, job: ReplicaJob) -> None:
            import time

            self.index, self.shards = index, 0
            if index >= job.width:
                time.sleep(3600)

        def info(self) -> dict[str, Any]:
            import os

            return {"index": self.index, "host": "localhost", "device": "cpu", "pid": os.getpid()}

        def stats(self) -> dict[str, Any]:
            return {**self.info(), "shards": self.shards}

        def process(self, task: dict[str, Any]) -> dict[str, Any]:
            import os
            import time

            from basis.errors import ModelError, StorageError

            started = time.time()
            kind = task["id"].split("-")[0]
            if kind == "model":
                raise ModelError(f"model 'm.pt' changed since the run was planned ({task['id']})")
            if kind == "die":
                time.sleep(0.5)
                os._exit(1)
            if kind == "storage" or (kind == "flaky" and not os.path.exists(task["path"])):
                if kind == "flaky":
                    open(task["path"], "w").close()
                raise StorageError(f"s3://bucket/{task['id']}: 503 SlowDown after 5 retries")
            self.shards += 1
            return {"id": task["id"], "replica": self.index, "status": "committed", "rows_in": task["rows_in"],
                    "rows_out": task["rows_in"], "rows_rejected": 0, "output": task["output"],
                    "rejected_output": None, "started": started, "finished": time.time()}

        def process_bundle(self, tasks: list[dict[str, Any]], every: float = 0.0) -> Any:
            for task in tasks:
                yield [self.process(task)]

    return TestReplica


def _schedule(tmp_path: Path, ids: list[str], *, replicas: int, max_attempts: int, starting: int | None = None,
              start_timeout: float = 60.0, started: list[int] | None = None, bundle_rows: int = 10,
              ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], list[int]]:
    """Run shards named `ids` (10 rows each: one per call unless `bundle_rows` is larger) on `replicas`
    test replicas (only the first `starting` replicas ever start).

    Returns the results by shard id, the replica stats and, in `started`, the number of results
    recorded when `on_started` was called (once: `[0]`)."""
    job = ReplicaJob(model="m.pt", model_sha256="0", input=str(tmp_path), output=str(tmp_path), features=("f",),
                     passthrough=(), list_column=False, width=1 << 20 if starting is None else starting,
                     prediction_column="prediction", keep_features=False)
    shards = [Shard(id=i, input=i, path=str(tmp_path / f"{i}.marker"), rel=i, fingerprint="", row_groups=(0, 1),
                    rows_in=10, output=f"{i}.parquet") for i in ids]
    results: dict[str, dict[str, Any]] = {}
    started = [] if started is None else started
    scheduler = Scheduler(job, ReplicaResources(replicas, 0.5, 0.0), max_attempts=max_attempts,
                          start_timeout=start_timeout, bundle_rows=bundle_rows, _actor=_test_replica())
    stats = scheduler.run(shards, lambda shard, record: results.__setitem__(shard.id, record),
                          on_started=lambda: started.append(len(results)))
    assert sorted(results) == sorted(ids)
    return results, stats, started


def test_only_the_executing_shard_is_charged_an_attempt(tmp_path: Path) -> None:
    # One replica holds `die-0` (executing) and `ok-1` (queued behind it) when its process exits.
    results, _, started = _schedule(tmp_path, ["die-0", "ok-1", "ok-2"], replicas=1, max_attempts=1)
    assert started == [0]
    assert results["die-0"]["status"] == "failed" and results["die-0"]["attempts"] == 1
    assert results["die-0"]["error"].startswith("replica died on each of 1 attempt(s)")
    for ok in ("ok-1", "ok-2"):  # never started on the dead replica: not charged, so it still ran
        assert (results[ok]["status"], results[ok]["attempts"]) == ("committed", 1)


def test_storage_errors_are_retried_then_reported_as_storage_errors(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    results, stats, _ = _schedule(tmp_path, ["storage-0", "flaky-1", "ok-2", "ok-3"], replicas=2, max_attempts=3)
    assert results["storage-0"]["status"] == "failed" and results["storage-0"]["attempts"] == 3
    assert results["storage-0"]["error"].startswith("storage error on each of 3 attempt(s): ")
    assert "503 SlowDown" in results["storage-0"]["error"]
    assert (results["flaky-1"]["status"], results["flaky-1"]["attempts"]) == ("committed", 2)
    assert all(results[ok]["status"] == "committed" for ok in ("ok-2", "ok-3"))
    # The replicas stayed (a storage error is not theirs): those that committed the 3 shards are still alive.
    assert sum(s["shards"] for s in stats) == 3
    assert "storage error on shard storage-0" in caplog.text and " lost: " not in caplog.text


def test_no_replacement_placed_fails_the_rest_instead_of_waiting(tmp_path: Path) -> None:
    # Replica 0 dies on its first shard; its replacement never becomes ready.
    begun = time.monotonic()
    results, _, started = _schedule(tmp_path, ["die-0", "ok-1", "ok-2"], replicas=1, max_attempts=2,
                                    starting=1, start_timeout=2.0)
    assert started == [0] and time.monotonic() - begun < 30
    assert all(r["status"] == "failed" for r in results.values())
    assert results["die-0"]["attempts"] == 1 and results["ok-1"]["attempts"] == 0
    assert all(r["error"].startswith("no replica left to run it: no replica became ready within 2 s")
               for r in results.values())


def test_no_replica_ever_ready_is_a_resource_error_before_any_write(tmp_path: Path) -> None:
    started: list[int] = []
    with pytest.raises(ResourceError, match="no replica became ready within 1 s"):
        _schedule(tmp_path, ["ok-0"], replicas=1, max_attempts=1, starting=0, start_timeout=1.0, started=started)
    assert started == []  # on_started never ran: the caller has written nothing (exit 2)


def test_a_model_that_fails_to_load_after_the_start_ends_the_run_with_its_report(tmp_path: Path) -> None:
    # Validated on the driver, unloadable in the replica (changed since planning): once the run has
    # started, it never exits 2; every shard not done fails with the reason and the run returns.
    results, _, started = _schedule(tmp_path, ["model-0", "ok-1", "ok-2"], replicas=1, max_attempts=3)
    assert started == [0]
    assert results["model-0"]["status"] == "failed"
    assert "could not load the model" in results["model-0"]["error"] and "changed since" in results["model-0"]["error"]
    assert all(r["status"] == "failed" and "could not load the model" in r["error"] for r in results.values())
