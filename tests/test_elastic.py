"""Elastic clusters, on one machine: Ray's fake multi-node autoscaler launches "GPU" nodes on demand.

The head is started here (`ray start --head --autoscaling-config` with the `fake_multinode`
provider, which needs port 6379), in its own process group, and stopped by that group alone.
Its node type `gpu` (1 CPU, 1 fake GPU) has `min_workers: 0, max_workers: 3`; idle nodes go
after a few seconds. The driver is `batch-infer run --address` in a process of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli, fake_autoscaler_config, read_output, save_mlp, stop_group, write_files

pytestmark = pytest.mark.cluster
RAY = str(Path(sys.executable).with_name("ray"))
ADDRESS = "127.0.0.1:6379"
ENV = {"RAY_AUTH_MODE": "token"}

AUTOSCALING = fake_autoscaler_config(ADDRESS, {
    "gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 3},
})


def _python(code: str) -> str:
    """Run a few lines as a driver of the fake cluster; returns what they print."""
    done = subprocess.run([sys.executable, "-c", "import ray; ray.init(address=%r, logging_level='ERROR', "
                           "log_to_driver=False)\n" % ADDRESS + code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **ENV, "RAY_SCHEDULER_EVENTS": "0"}, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def gpu_nodes() -> int:
    return int(_python("print(sum(1 for n in ray.nodes() if n['Alive'] and n['Resources'].get('GPU')))"))


def autoscaler_request() -> list[dict[str, float]]:
    """The cluster's standing `request_resources` (autoscaler v1 keeps it in the GCS key-value store)."""
    raw = _python("from ray.experimental.internal_kv import _internal_kv_get\n"
                  "print((_internal_kv_get(b'autoscaler_resource_request') or b'[]').decode())")
    return json.loads(raw or "[]")


def wait_for(predicate: object, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(2)


@pytest.fixture(scope="module")
def head() -> Iterator[None]:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 6379)) == 0:
            pytest.fail("port 6379 is taken: Ray's fake multi-node provider needs it; stop what uses it")
    root = Path(tempfile.mkdtemp(prefix="bi-fake-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    config = root / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(AUTOSCALING))
    env = {**os.environ, **ENV, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "PATH": f"{Path(RAY).parent}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--port=6379", "--node-ip-address=127.0.0.1", "--num-cpus=0",
         f"--autoscaling-config={config}", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={root / 'ray'}"],
        stdout=open(root / "head.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: _up() or process.poll() is not None, "the head to come up")
        assert process.poll() is None, (root / "head.log").read_text()[-3000:]
        yield
    finally:
        stop_group(process)
        shutil.rmtree(root, ignore_errors=True)


def _up() -> bool:
    with socket.socket() as probe:  # the GCS port first: a driver started before it waits a minute
        if probe.connect_ex(("127.0.0.1", 6379)) != 0:
            return False
    try:
        return "autoscaler_report" in _python(
            "from ray.experimental.internal_kv import _internal_kv_get\n"
            "print((_internal_kv_get(b'__autoscaling_status') or b'').decode())")
    except (AssertionError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def job(tmp_path: Path) -> list[str]:
    write_files(tmp_path / "in", [4000] * 6, features=16, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [16, 256, 256, 1])
    return ["--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "in"), "--address", ADDRESS,
            "--gpus-per-replica", "1", "--cpus-per-replica", "0.5", "--shard-rows", "100", "--batch-size", "20",
            "--shared-storage"]


def test_grows_with_the_autoscaler_from_one_node(head: None, job: list[str], tmp_path: Path) -> None:
    _python("from ray.autoscaler.sdk import request_resources\nrequest_resources(bundles=[{'GPU': 1}])")
    wait_for(lambda: gpu_nodes() >= 1, "one GPU node")
    result = cli("run", *job, "--output", str(tmp_path / "out"), "--report", str(tmp_path / "r.json"),
                 env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    nodes = {r["node"] for r in report["replicas"]}
    assert len(report["replicas"]) > 1 and len(nodes) > 1, report["replicas"]  # grew past the one node up
    assert all(r["gpu_ids"] for r in report["replicas"])
    assert read_output(tmp_path / "out")["id"].to_pylist() == list(range(24000))
    assert autoscaler_request() == []  # cleared when the run ended


def test_scales_from_zero_and_clears_its_request_on_failure_and_ctrl_c(head: None, job: list[str],
                                                                       tmp_path: Path) -> None:
    wait_for(lambda: gpu_nodes() == 0, "idle GPU nodes to be removed", timeout=180)
    (tmp_path / "in" / "part-0005.parquet").write_bytes(b"PAR1 not parquet PAR1")  # one shard fails: exit 1
    result = cli("run", *job, "--output", str(tmp_path / "out"), "--report", str(tmp_path / "r.json"),
                 env=ENV, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    nodes = {r["node"] for r in report["replicas"]}
    assert len(nodes) >= 2 and all(r["gpu_ids"] for r in report["replicas"]), report["replicas"]
    assert report["shards_done"] == 200 and report["shards_failed"] == 1 and report["startup_seconds"] > 0
    print(f"scale from zero: first committed shard after {report['startup_seconds']:.1f} s, "
          f"waited {report['capacity_wait_seconds']:.1f} s for capacity")
    assert autoscaler_request() == []

    # Ten times the shards, and a tight poll: the nodes are up now, so the small input could finish
    # between two polls and the signal would then land in interpreter shutdown instead of the run.
    write_files(tmp_path / "more", [4000] * 60, features=16, row_group_size=100)
    more = [str(tmp_path / "more") if arg == str(tmp_path / "in") else arg for arg in job]
    log = tmp_path / "interrupted.log"  # a file, not a pipe nobody reads while it runs (a full pipe blocks it)
    with log.open("w") as stderr:
        # Ctrl-C as in a terminal: SIGINT at its default disposition. A test runner started in the
        # background by a non-interactive shell (`nohup ... &`) ignores SIGINT, its children inherit
        # that, and Python then installs no KeyboardInterrupt handler: the signal would be lost.
        interrupted = subprocess.Popen([sys.executable, "-m", "pipelines", "run", *more, "--output",
                                        str(tmp_path / "again")], cwd=REPO, env={**os.environ, **ENV},
                                       stdout=subprocess.DEVNULL, stderr=stderr,
                                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while interrupted.poll() is None and not list((tmp_path / "again").glob("*.parquet")):
        assert time.monotonic() < deadline, "timed out waiting for a first committed shard"
        time.sleep(0.05)
    running = interrupted.poll() is None
    interrupted.send_signal(signal.SIGINT)
    code = interrupted.wait(timeout=120)
    text = log.read_text()
    assert code == 130 and not (tmp_path / "again" / "_SUCCESS").exists(), \
        (code, f"running when signalled: {running}", text[:1500], text[-3000:])
    assert autoscaler_request() == []  # Ctrl-C unwinds through the request too


def test_local_paths_on_nodes_of_two_hosts_are_refused(head: None, job: list[str], tmp_path: Path) -> None:
    # A node on "another host": its own UTS namespace and hostname, on this machine (so the disk is shared).
    other = subprocess.Popen(
        ["unshare", "--uts", "sh", "-c", f"hostname other-host && exec {RAY} start --address={ADDRESS} --block "
         "--num-cpus=1 --node-ip-address=127.0.0.1 --disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **ENV}, start_new_session=True)
    try:
        wait_for(lambda: "other-host" in _python("print([n['NodeManagerHostname'] for n in ray.nodes() "
                                                 "if n['Alive']])"), "the second host")
        local = [arg for arg in job if arg != "--shared-storage"]
        refused = cli("run", *local, "--output", str(tmp_path / "out"), "--gpus-per-replica", "0", env=ENV)
        assert refused.returncode == 2
        assert "are local paths" in refused.stderr and "2 hosts" in refused.stderr, refused.stderr
        assert str(tmp_path / "m.pt") in refused.stderr and str(tmp_path / "in") in refused.stderr
        assert "s3://" in refused.stderr and "shared_storage: true" in refused.stderr
        assert not (tmp_path / "out").exists()
    finally:
        stop_group(other)
