"""Start-up off the clock (issue 15, item 1): replicas start while the driver plans; the lane or Ray."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import cli, read_output, save_mlp, write_files

import pipelines
import pipelines.lane
from basis.errors import InputError
from pipelines.cluster import ClusterView, Node
from pipelines.config import JobConfig
from pipelines.startup import LANE_PROCESS_SHARDS, lane_on_numpy, lane_processes, lane_resources

DATA_BOUND = ((64, 16, True), (16, 1, True))  # the benchmark's data-bound model: the forward is a small share
COMPUTE_BOUND = ((64, 256, True), (256, 256, True), (256, 1, True))


def _cfg(**options: object) -> JobConfig:
    return JobConfig.from_dict({"model": "m.pt", "input": "in/", "output": "out/", **options})


def _machine(cpus: float, gpus: float = 0.0) -> ClusterView:
    return ClusterView((Node("n", "h", {"CPU": cpus, **({"GPU": gpus} if gpus else {})}),))


def test_the_lane_takes_every_embedded_cpu_run_ray_would_give_one_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's start is saved whenever one in-process replica does what Ray would run: on a machine of up to 4
    CPUs for any model; on more, several replicas (a forward-bound model, or more CPUs than one replica uses
    well) keep Ray for long runs."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    big, small = 32_000_000, 5_000
    lane = lane_resources(_cfg(), big, 16, DATA_BOUND, _machine(2))
    assert lane is not None and lane.num_cpus == 2.0  # one replica of every core, whatever the size
    lane = lane_resources(_cfg(), big, 4, COMPUTE_BOUND, _machine(2))  # Ray would run one per CPU: a lane
    assert lane is not None and lane.num_cpus == 2.0  # of both does as well without Ray's start
    assert lane_resources(_cfg(), big, 4, COMPUTE_BOUND, _machine(8)) is None  # eight 1-CPU replicas: Ray
    assert lane_resources(_cfg(), small, 1, COMPUTE_BOUND, _machine(2)) is not None  # a small job: no Ray
    assert lane_resources(_cfg(), big, 16, DATA_BOUND, _machine(16)) is None  # four replicas of four CPUs
    assert lane_resources(_cfg(), small, 16, DATA_BOUND, _machine(16)) is not None
    assert lane_resources(_cfg(cpus_per_replica=1), big, 16, DATA_BOUND, _machine(2)) is None  # two of 1 CPU
    for refused in (_cfg(replicas=1), _cfg(address="auto"), _cfg(gpus_per_replica=1)):  # Ray, as asked
        assert lane_resources(refused, small, 1, DATA_BOUND, _machine(2)) is None
    assert lane_resources(_cfg(), small, 1, DATA_BOUND, _machine(2, gpus=1)) is None  # a GPU is used
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert lane_resources(_cfg(), small, 1, DATA_BOUND, _machine(2)) is None
    # The lane's forward: numpy for a small job and for tiny files, torch for long runs of full batches.
    assert lane_on_numpy(small, 1, 65_536) and lane_on_numpy(2_000_000, 20_000, 65_536)
    assert not lane_on_numpy(6_400_000, 16, 65_536)


def test_a_run_above_the_small_job_runs_in_the_lane_on_torch_when_ray_would_run_one_replica(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    save_mlp(tmp_path / "m.pt", [8, 4, 1])
    write_files(tmp_path / "in", [200, 200, 200], features=8, row_group_size=100)
    monkeypatch.setattr(pipelines.lane, "LANE_MAX_ROWS", 250)  # 600 rows: above the small job now
    cpus = len(os.sched_getaffinity(0))  # one replica of every CPU: what Ray would run here too
    caplog.set_level(logging.INFO)
    report = pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                           cpus_per_replica=cpus, batch_size=100, progress=False)  # shards of two full batches
    assert report.complete and [(r["node"], r["shards"]) for r in report.replicas] == [("driver", 3)]
    assert "running 3 shard(s) in the driver process" in caplog.text
    assert "model loaded on" in caplog.text and "(cpu, numpy)" not in caplog.text  # torch: a long run
    assert read_output(tmp_path / "out")["id"].to_pylist() == list(range(600))


def test_many_tiny_shards_take_a_child_replica_per_cpu_and_small_or_big_runs_keep_it_in_the_driver() -> None:
    """Issue 15, item 4: on 2 CPUs a run of many 100-row files used one core (one interpreter's lock) unless
    the user passed `--cpus-per-replica 1` for Ray's two replicas; now the lane runs such a run on a child
    process per CPU, and keeps its one replica in the driver for a small job and for big files."""
    tiny = LANE_PROCESS_SHARDS
    assert lane_processes(2.0, tiny * 100, tiny, 65_536) == 2  # tiny files from the threshold on: every CPU
    assert lane_processes(4.0, 100_000 * 100, 100_000, 65_536) == 4
    assert lane_processes(2.0, (tiny - 1) * 100, tiny - 1, 65_536) == 0  # a few thousand files: no start
    assert lane_processes(2.0, 500, 5, 65_536) == 0  # the small job
    assert lane_processes(2.0, 32_000_000, 16, 65_536) == 0  # big files: one replica decodes on every core
    assert lane_processes(2.0, tiny * 70_000, tiny, 65_536) == 0  # shards of full forward batches
    assert lane_processes(1.0, 100_000 * 100, 100_000, 65_536) == 0  # one CPU: nothing to gain


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A Ray temp dir of its own (short: Ray's socket paths must fit 107 bytes), to find its processes."""
    path = Path(tempfile.mkdtemp(prefix="bi15-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _processes_under(path: Path) -> list[str]:
    """Command lines of the processes (Ray's raylet, GCS, workers) whose arguments name `path`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                line = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in line:
            found.append(f"{pid}: {line[:200]}")
    return found


def _sessions(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "ray").glob("session_2*")) if (path / "ray").exists() else []


def test_replicas_started_while_planning_are_stopped_by_a_refusal_and_an_idle_tick_starts_no_ray(
        tmp_path: Path, ray_tmp: Path) -> None:
    """A run sure to use Ray (an exact replica count) starts Ray and its replicas once the listing shows
    work; planning then refuses the input (exit 2): nothing is written, the replicas and the embedded Ray
    are stopped before the process exits (none of its processes is left). The same job with the right
    model runs on the replicas started while planning; its unchanged rerun starts no Ray at all."""
    save_mlp(tmp_path / "wide.pt", [6, 1])
    save_mlp(tmp_path / "m.pt", [4, 3, 1])
    write_files(tmp_path / "in", [100, 100], features=4, row_group_size=50)
    env = {"RAY_TMPDIR": str(ray_tmp)}
    job = ("run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--replicas", "1",
           "--cpus-per-replica", "0.5")

    refused = cli(*job, "--model", str(tmp_path / "wide.pt"), env=env)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "expects 6 input features" in refused.stderr and "Traceback" not in refused.stderr
    assert "stopped 1 replica(s) started while planning" in refused.stderr
    assert not (tmp_path / "out").exists()
    assert len(_sessions(ray_tmp)) == 1  # Ray was started while planning ...
    deadline = time.monotonic() + 60
    while _processes_under(ray_tmp) and time.monotonic() < deadline:  # ... and nothing of it outlives the run
        time.sleep(0.5)
    assert not _processes_under(ray_tmp), _processes_under(ray_tmp)

    ran = cli(*job, "--model", str(tmp_path / "m.pt"), env=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "1 started while planning" in ran.stderr
    assert sorted(read_output(tmp_path / "out")["id"].to_pylist()) == list(range(200))
    sessions = _sessions(ray_tmp)

    idle = cli(*job, "--model", str(tmp_path / "m.pt"), env=env)
    assert idle.returncode == 0 and "0 shard(s) done, 2 already committed" in idle.stdout, idle.stderr[-3000:]
    assert _sessions(ray_tmp) == sessions  # no Ray session started for an unchanged tick


@pytest.mark.usefixtures("ray_shared")
def test_in_a_ray_session_a_refusal_kills_the_replicas_it_started_while_planning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ray._private import state

    def replicas_alive() -> list[str]:
        return [actor_id for actor_id, actor in state.actors().items()
                if actor.get("ActorClassName", "").endswith("Replica") and actor.get("State") != "DEAD"]

    assert not replicas_alive()
    save_mlp(tmp_path / "wide.pt", [6, 1])
    write_files(tmp_path / "in", [100, 100, 100], features=4, row_group_size=50)
    caplog.set_level(logging.INFO)
    with pytest.raises(InputError, match="expects 6 input features"):
        pipelines.run(model=str(tmp_path / "wide.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                      replicas=2, cpus_per_replica=0.5, progress=False)
    assert "stopped 2 replica(s) started while planning" in caplog.text
    assert not (tmp_path / "out").exists()
    deadline = time.monotonic() + 60
    while replicas_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not replicas_alive()
    import ray

    assert ray.is_initialized()  # the session is the caller's: left running
