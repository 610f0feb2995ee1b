"""A real `ray start --head` on 127.0.0.1: `--address`, token auth, and `ray job submit`.

The head is started here, in its own process group, and stopped by that group
id alone (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, cli, read_output, save_mlp, stop_group, write_files
from test_failures import _busy_replica_pids

pytestmark = pytest.mark.cluster
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Head:
    def __init__(self, gcs: int, dashboard: int, metrics: int, process: subprocess.Popen[bytes]) -> None:
        self.address = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        self.metrics = f"http://127.0.0.1:{metrics}/metrics"  # the head's Prometheus endpoint
        self.process = process


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    """A `ray start --head` of its own on 127.0.0.1, stopped after the module. A head that exits while it
    starts (a port `_free_ports` found free taken in between) is started once more on other ports; its
    output is kept so that a head that never comes up says why."""
    temp = tempfile.mkdtemp(prefix="bi-ray-", dir="/tmp")
    try:
        for attempt in range(2):
            process, dash, gcs, metrics = _start_head(temp, attempt)
            try:
                if _came_up(process, dash, attempt == 1, Path(temp) / f"head-{attempt}.log"):
                    yield Head(gcs, dash, metrics, process)
                    return
            finally:
                stop_group(process)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _start_head(temp: str, attempt: int) -> tuple[subprocess.Popen[bytes], int, int, int]:
    gcs, dash, agent, agent_grpc, client, metrics, env_agent, node_mgr, obj_mgr = _free_ports(9)
    low = 40000 + (os.getpid() % 100 + 100 * attempt) * 100
    # As with an activated venv: the head (and so the job driver) finds `batch-infer` and `python` on PATH.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{Path(RAY).parent}{os.pathsep}{os.environ['PATH']}"}
    with open(Path(temp) / f"head-{attempt}.log", "wb") as log:
        process = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--ray-client-server-port={client}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
             f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
             f"--min-worker-port={low}", f"--max-worker-port={low + 99}", f"--temp-dir={temp}",
             "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    return process, dash, gcs, metrics


def _came_up(process: subprocess.Popen[bytes], dash: int, last: bool, log: Path) -> bool:
    """Whether the head's dashboard answers within 120 s; False if it exited first and `last` is not set."""
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2):
                return True
        except urllib.error.HTTPError:  # 401 without a token: the dashboard is up
            return True
        except OSError:
            if process.poll() is not None:
                if not last:
                    return False
            elif time.monotonic() <= deadline:
                time.sleep(1)
                continue
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"ray start --head did not come up (exit {process.poll()}):\n{tail}") from None


@pytest.fixture
def job(tmp_path: Path) -> list[str]:
    write_files(tmp_path / "in", [300, 200], features=4, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [4, 8, 1])
    return ["--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "in"), "--cpus-per-replica", "0.5",
            "--shard-rows", "100"]


def test_run_against_ray_start_head(head: Head, job: list[str], tmp_path: Path) -> None:
    result = cli("run", *job, "--output", str(tmp_path / "out"), "--address", head.address, "--json",
                 env={"RAY_AUTH_MODE": "token"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["status"] == "succeeded" and report["rows_out"] == 500 and report["shards_done"] == 5
    assert read_output(tmp_path / "out")["id"].to_pylist() == list(range(500))


def test_missing_token_is_a_clear_message_not_a_trace(head: Head, job: list[str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    result = subprocess.run([sys.executable, "-m", "pipelines", "run", *job, "--output", str(tmp_path / "out"),
                             "--address", head.address], capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 2
    assert "RAY_AUTH_MODE=token" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.parquet"))


def test_ray_job_submit(head: Head, job: list[str], tmp_path: Path) -> None:
    command = [RAY, "job", "submit", "--address", head.dashboard, "--working-dir", str(REPO), "--",
               "batch-infer", "run", *job, "--output", str(tmp_path / "out")]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    for _ in range(10):  # the job agent can lag the dashboard by a few seconds after start-up
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
        if "No available agent" not in result.stderr + result.stdout:
            break
        time.sleep(3)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "batch-infer succeeded" in result.stdout
    assert read_output(tmp_path / "out")["id"].to_pylist() == list(range(500))


def test_relative_paths_resolve_on_the_driver_not_in_the_replicas(head: Head, tmp_path: Path) -> None:
    # The cluster was started from another directory: replicas run elsewhere, so `m.pt`, `in` and
    # `out` must be resolved once, where the user typed them.
    write_files(tmp_path / "in", [300], features=4, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [4, 8, 1])
    result = subprocess.run(
        [sys.executable, "-m", "pipelines", "run", "--model", "m.pt", "--input", "in", "--output", "out",
         "--address", head.address, "--cpus-per-replica", "0.5", "--shard-rows", "100", "--json"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["rows_out"] == 300
    assert read_output(tmp_path / "out")["id"].to_pylist() == list(range(300))
    assert cli("verify", str(tmp_path / "out")).returncode == 0


def _scrape(url: str, output: str) -> dict[str, float]:
    """Our samples on a Prometheus endpoint whose `output` tag is `output`, summed by name."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except urllib.error.URLError:  # the head's metrics agent comes up a few seconds after its dashboard
        return {}
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"(ray_batch_infer_\w+)\{(.*)\} (\S+)$", line)
        if match and dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[2])).get("output") == output:
            found[match[1]] = found.get(match[1], 0.0) + float(match[3])
    return found


def test_run_metrics_on_the_heads_prometheus_endpoint(head: Head, tmp_path: Path) -> None:
    # A replica stopped mid-run holds the run open until the shard timeout: a window to scrape the
    # metrics while the run goes on, whatever the machine's speed. The driver exports every second
    # here (Ray's default is every 10 s; the driver process reads `RAY_metrics_report_interval_ms`).
    write_files(tmp_path / "in", [2000] * 4, features=16, row_group_size=250)
    save_mlp(tmp_path / "m.pt", [16, 256, 256, 1])
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_metrics_report_interval_ms": "1000"}
    stopped, during, seen = None, {}, {}
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipelines", "run", "--model", str(tmp_path / "m.pt"), "--input",
             str(tmp_path / "in"), "--output", str(out), "--address", head.address, "--cpus-per-replica", "0.5",
             "--replicas", "2", "--shard-rows", "250", "--batch-size", "50", "--shard-timeout", "12", "--json"],
            stdout=stdout, stderr=stderr, env=env, cwd=REPO)
        try:
            deadline = time.monotonic() + 240
            while process.poll() is None and time.monotonic() < deadline:
                if stopped is None and len(list(out.glob("*.parquet"))) >= 2 and (pids := _busy_replica_pids()):
                    stopped = pids[0]
                    os.kill(stopped, signal.SIGSTOP)  # alive, holding its shard, never finishing it
                seen = _scrape(head.metrics, str(out))
                # Replicas running >= 1 comes only from an export made while the run goes on: the
                # driver's last export, as it disconnects, has the gauges at 0.
                if not during and seen.get("ray_batch_infer_replicas_running", 0) >= 1 and seen.get(
                        "ray_batch_infer_shards_committed_total", 0) > 0:
                    during = seen
                time.sleep(0.1)
            assert process.wait(timeout=240) == 0, (tmp_path / "stderr").read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
            if stopped is not None and _busy_replica_pids().count(stopped):  # ours, stopped by us
                os.kill(stopped, signal.SIGKILL)
    assert stopped is not None, "the job ended before a replica could be stopped; make it longer"
    report = json.loads((tmp_path / "stdout").read_text())
    assert report["shards_done"] == 32 and report["rows_in"] == 8000
    # While it ran: the pool up, shards committed, the wait for the first replica counted. (Not "fewer than
    # all": on a busy machine the head's metrics can lag by more than the run's 12 s window, and a scrape
    # made while the run went on has then seen all 32 committed: a fresh-clone CI run did, once in eight.)
    assert during, f"no progress with this output's tag while the run was going; last scrape: {seen}"
    assert 1 <= during["ray_batch_infer_replicas_running"] <= 2
    assert 0 < during["ray_batch_infer_shards_committed_total"] <= 32, during
    assert during["ray_batch_infer_rows_total"] == 250 * during["ray_batch_infer_shards_committed_total"]
    assert during["ray_batch_infer_capacity_wait_seconds_total"] > 0
    # After it: the driver's last export (on disconnect) leaves the counters exact on the head.
    deadline = time.monotonic() + 30
    while (final := _scrape(head.metrics, str(out))).get("ray_batch_infer_shards_committed_total") != 32:
        assert time.monotonic() < deadline, final
        time.sleep(0.5)
    assert final["ray_batch_infer_rows_total"] == 8000
    assert final["ray_batch_infer_shards_retried_total"] >= 1  # the stalled shard, given back
    assert "ray_batch_infer_shards_failed_total" not in final
    assert final.get("ray_batch_infer_replicas_running", 0) == 0  # zeroed as the run ends (later: aged out)
    assert final.get("ray_batch_infer_replicas_pending", 0) == 0
