"""The output lock under contention: one winner per stale lock, no torn file, a lost lock is noticed."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
from conftest import REPO, read_output, save_mlp, write_files
from lock_contenders import BARRIER_TIMEOUT, churn, take_over_rounds

from basis.errors import ConfigError, LockHeldError
from pipelines.lock import LOCK, OutputLock
from basis.storage import Location, resolve

CONTENDERS = 10


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped (pid_max is far from wrapping in a test)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _plant(out: Path, **record: Any) -> None:
    """A lock file as another run would leave it, written whole (rename) like ours."""
    out.mkdir(parents=True, exist_ok=True)
    (out / ".planted").write_text(json.dumps(record))
    os.replace(out / ".planted", out / LOCK)


def _stale(out: Path) -> None:
    """A lock left by a killed run on this host: its process is gone, its heartbeat an hour old."""
    _plant(out, token="killed-run", pid=_dead_pid(), host=socket.gethostname(), started="earlier",
           heartbeat=time.time() - 3600)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name == LOCK or p.name.startswith(f".{LOCK}"))


def test_ten_cli_runs_on_a_stale_lock_one_wins_nine_exit_3(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [150, 150], features=4, row_group_size=50)
    save_mlp(tmp_path / "m.pt", [4, 3, 1])
    out = tmp_path / "out"
    _stale(out)
    args = [sys.executable, "-m", "pipelines", "run", "--model", str(tmp_path / "m.pt"), "--input",
            str(tmp_path / "in"), "--output", str(out), "--replicas", "1", "--cpus-per-replica", "0.5"]
    logs = [tmp_path / f"run{i}.log" for i in range(CONTENDERS)]
    runs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log.open("w")) for log in logs]
    codes = [run.wait(timeout=240) for run in runs]
    errors = [log.read_text() for log in logs]
    assert sorted(codes) == [0] + [3] * (CONTENDERS - 1), errors
    assert all("another run holds the lock" in err for code, err in zip(codes, errors) if code == 3)
    ids = read_output(out).column("id").to_pylist()
    assert ids == list(range(300))  # every row exactly once, in input order
    assert (out / "_SUCCESS").exists() and _leftovers(out) == []


def test_exactly_one_process_takes_over_a_stale_lock(tmp_path: Path) -> None:
    out, rounds = tmp_path / "out", 4
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(CONTENDERS + 1), ctx.Queue()
    procs = [ctx.Process(target=take_over_rounds, args=(str(out), rounds, barrier, results))
             for _ in range(CONTENDERS)]
    for proc in procs:
        proc.start()
    try:
        for round_ in range(rounds):
            _stale(out)
            barrier.wait(BARRIER_TIMEOUT)  # go
            barrier.wait(BARRIER_TIMEOUT)  # all decided
            outcomes = [results.get(timeout=BARRIER_TIMEOUT) for _ in range(CONTENDERS)]
            assert {r for r, _ in outcomes} == {round_}
            assert sum(won for _, won in outcomes) == 1, f"round {round_}: {outcomes}"
            barrier.wait(BARRIER_TIMEOUT)  # the winner released
            assert _leftovers(out) == []  # no lock, no temp file left by any contender
    finally:
        for proc in procs:
            proc.join(timeout=BARRIER_TIMEOUT)
            if proc.is_alive():
                proc.kill()
    assert [proc.exitcode for proc in procs] == [0] * CONTENDERS


def test_lock_file_is_never_empty_or_torn(tmp_path: Path) -> None:
    out, seconds, ttl = tmp_path / "out", 2.0, 0.2  # heartbeats every 50 ms
    out.mkdir()
    ctx = multiprocessing.get_context("spawn")
    barrier, acquired = ctx.Barrier(5), ctx.Value("i", 0)
    # Two contenders create and release as fast as they can, two hold the lock through heartbeats.
    holds = [0.0, 0.0, ttl * 0.6, ttl * 0.6]
    procs = [ctx.Process(target=churn, args=(str(out), seconds, ttl, hold, barrier, acquired)) for hold in holds]
    for proc in procs:
        proc.start()
    barrier.wait(BARRIER_TIMEOUT)
    reads, bad = 0, []
    while any(proc.is_alive() for proc in procs):
        try:
            data = (out / LOCK).read_bytes()
        except FileNotFoundError:
            continue
        reads += 1
        try:
            assert json.loads(data)["token"]
        except (ValueError, KeyError, AssertionError):
            bad.append(data)
    assert [proc.exitcode for proc in procs] == [0] * 4
    assert bad == []
    assert acquired.value >= 10 and reads >= 100  # the loop really watched the lock change hands
    assert _leftovers(out) == []


@pytest.mark.parametrize("record, stale", [
    ({"token": "t", "pid": os.getpid(), "host": socket.gethostname(), "heartbeat": time.time() + 3600}, False),
    ({"token": "t", "pid": 2**22 + 7, "host": "elsewhere", "heartbeat": time.time() + 3600}, False),
    ({"token": "t", "pid": os.getpid(), "host": socket.gethostname(), "heartbeat": 0.0}, True),
    ({"token": "t", "pid": 2**22 + 7, "host": socket.gethostname(), "heartbeat": time.time() + 3600}, True),
    ({"token": "t", "pid": 2**22 + 7, "host": "elsewhere", "heartbeat": "yesterday"}, True),
    (None, True),  # an empty (torn) file
], ids=["live", "other-host-fresh", "old-heartbeat", "pid-gone", "bad-heartbeat", "empty"])
def test_staleness(tmp_path: Path, record: dict[str, Any] | None, stale: bool) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text("" if record is None else json.dumps(record))
    lock = OutputLock(resolve(str(out)))
    if not stale:
        with pytest.raises(LockHeldError, match="another run holds the lock"):
            lock.acquire()
        assert (out / LOCK).read_text() == json.dumps(record) and _leftovers(out) == [LOCK]
        return
    with lock:
        assert json.loads((out / LOCK).read_text())["token"] == lock.token and lock.held
    assert _leftovers(out) == []


def test_check_raises_once_the_lock_is_replaced_and_the_heartbeat_leaves_it_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    lock = OutputLock(resolve(str(out)), ttl=0.2)
    lock.acquire()
    lock.check()
    assert lock.held
    _plant(out, token="usurper", pid=os.getpid(), host=socket.gethostname(), started="now", heartbeat=time.time())
    with pytest.raises(LockHeldError, match="lost the lock.*taken over"):
        lock.check()
    time.sleep(0.3)  # a heartbeat or more (every 50 ms) has run since
    assert json.loads((out / LOCK).read_text())["token"] == "usurper" and not lock.held
    lock.release()
    assert json.loads((out / LOCK).read_text())["token"] == "usurper"


def test_check_raises_once_the_lock_is_deleted(tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    lock = OutputLock(resolve(str(out)))
    lock.acquire()
    (out / LOCK).unlink()
    with pytest.raises(LockHeldError, match="was deleted"):
        lock.check()
    lock.release()
    assert _leftovers(out) == []


def test_check_raises_once_the_heartbeat_fails(tmp_path: Path) -> None:
    # A real failure, even as root (where a read-only directory would not stop the write): no free
    # file descriptors, so the heartbeat can't create its temporary file.
    out = tmp_path / "out"
    lock = OutputLock(resolve(str(out)), ttl=0.2)
    lock.acquire()
    lowest_free = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest_free)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        deadline = time.monotonic() + 5
        while lock._thread is not None and lock._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert json.loads((out / LOCK).read_text())["token"] == lock.token  # still ours on disk
    with pytest.raises(LockHeldError, match="heartbeat failed.*Too many open files"):
        lock.check()
    assert not lock.held
    lock.release()
    assert _leftovers(out) == []


def test_check_raises_when_the_heartbeat_is_overdue(tmp_path: Path) -> None:
    # Another process description holding the flock stalls the heartbeat past the TTL.
    out = tmp_path / "out"
    with OutputLock(resolve(str(out)), ttl=0.2) as lock:
        fd = os.open(out / LOCK, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            time.sleep(0.35)
            with pytest.raises(LockHeldError, match="last heartbeat was"):
                lock.check()
        finally:
            os.close(fd)
        deadline = time.monotonic() + 5
        while not lock.held and time.monotonic() < deadline:
            time.sleep(0.01)  # the stalled heartbeat goes through once the flock is gone
        lock.check()


def test_a_refused_run_leaves_no_directory_behind(tmp_path: Path) -> None:
    with pytest.raises(ConfigError), OutputLock(resolve(str(tmp_path / "a" / "b" / "out"))):
        assert (tmp_path / "a" / "b" / "out" / LOCK).exists()
        raise ConfigError("refused after the lock")  # as an exit-2 check inside `with OutputLock(...)`
    assert list(tmp_path.iterdir()) == []  # acquire made a/, a/b/ and out/: all gone
    (tmp_path / "kept").mkdir()
    with pytest.raises(ConfigError), OutputLock(resolve(str(tmp_path / "kept"))):
        raise ConfigError("refused")
    assert (tmp_path / "kept").is_dir()  # not made by acquire: kept
    with pytest.raises(ConfigError), OutputLock(resolve(str(tmp_path / "written"))):
        (tmp_path / "written" / "part-0.parquet").write_bytes(b"rows")
        raise ConfigError("refused")
    assert sorted(p.name for p in (tmp_path / "written").iterdir()) == ["part-0.parquet"]  # not empty: kept
    with OutputLock(resolve(str(tmp_path / "ok"))):
        pass
    assert list((tmp_path / "ok").iterdir()) == []  # a run that ended normally keeps its directory


def test_object_store_lock_is_written_and_read_back(tmp_path: Path) -> None:
    # A filesystem that is not LocalFileSystem takes the object-store path (best effort, no flock).
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    output = Location(fs, "out", "mock://out", "mock")
    with OutputLock(output, ttl=1.0) as lock:
        first = json.loads((tmp_path / "out" / LOCK).read_text())
        assert first["token"] == lock.token and lock.held
        with pytest.raises(LockHeldError, match="another run holds the lock on 'mock://out'"):
            OutputLock(output).acquire()
        time.sleep(0.4)  # a heartbeat every 0.25 s
        assert json.loads((tmp_path / "out" / LOCK).read_text())["heartbeat"] > first["heartbeat"]
        lock.check()
        _plant(tmp_path / "out", token="usurper", pid=os.getpid(), host=socket.gethostname(), heartbeat=time.time())
        with pytest.raises(LockHeldError, match="lost the lock.*taken over"):
            lock.check()
    assert json.loads((tmp_path / "out" / LOCK).read_text())["token"] == "usurper"
    _stale(tmp_path / "out")
    with OutputLock(output):
        pass
    assert _leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("after", ["create", "heartbeat"])
def test_an_interrupt_while_the_lock_is_taken_leaves_no_lock_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: str) -> None:
    """Ctrl-C or SIGTERM (a KeyboardInterrupt) right after the lock file is written, before `with` holds the
    lock, left the file behind (`__exit__` never ran): the history machine's SIGTERM as a run took its lock.
    A live run's lock is never touched by a refused one."""
    import pipelines.lock

    out = tmp_path / "out"
    if after == "create":  # the file is written, `create` has not returned
        create = pipelines.lock._LocalLockFile.create

        def interrupted(self: Any, *args: Any) -> Any:
            create(self, *args)
            raise KeyboardInterrupt

        monkeypatch.setattr(pipelines.lock._LocalLockFile, "create", interrupted)
    else:  # `acquire` went as far as starting the heartbeat
        monkeypatch.setattr(pipelines.lock.threading.Thread, "start", lambda self: (_ for _ in ()).throw(
            KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        with OutputLock(resolve(str(out))):
            raise AssertionError("never held")
    assert not (out / LOCK).exists()
    monkeypatch.undo()
    with OutputLock(resolve(str(out))):  # the next run takes it
        with pytest.raises(LockHeldError):
            with OutputLock(resolve(str(out))):  # and a second one is refused, leaving the first's alone
                pass
        assert (out / LOCK).exists()
