"""GPUs and the autoscaler, on one machine: Ray's fake multi-node autoscaler with only GPU node types.

The head is started here (`ray start --head --autoscaling-config` with the `fake_multinode`
provider) on free ports, in its own process group, and stopped by that group alone; this test
process is a driver of it (`pipelines.run` uses that Ray session). Its one worker node type
`gpu` (1 CPU, 1 fake GPU) has `min_workers: 0, max_workers: 3`: no GPU node is up until a run
asks for one, and idle ones go after a few seconds. The autoscaler re-reads its config file on
each update, so a test can change the node types.
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
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from conftest import REPO, cli, fake_autoscaler_config, read_output, save_mlp, stop_group, write_files
from ray.experimental.internal_kv import _internal_kv_get

import pipelines
from pipelines.autoscaler import REQUEST_FILE

pytestmark = pytest.mark.cluster
RAY = str(Path(sys.executable).with_name("ray"))
ENV = {"RAY_AUTH_MODE": "disabled"}  # `ray start` turns token auth on; this process's Ray is set up without it
GPU_TYPE = {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 3}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Head:
    def __init__(self, address: str, config: Path) -> None:
        self.address, self.config = address, config

    def node_types(self, worker_types: dict[str, Any]) -> None:
        """Replace the worker node types (the autoscaler reads the file again on its next update)."""
        self.config.write_text(yaml.safe_dump(fake_autoscaler_config(self.address, worker_types)))


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def gpu_nodes() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU"))


def standing_request() -> list[dict[str, float]]:
    """The cluster's `request_resources` bundles (autoscaler v1 keeps them in the GCS key-value store)."""
    return json.loads(_internal_kv_get(b"autoscaler_resource_request") or b"[]")


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    root = Path(tempfile.mkdtemp(prefix="bi-as-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    head = Head(f"127.0.0.1:{port}", root / "autoscaling.yaml")
    head.node_types({"gpu": GPU_TYPE})
    env = {**os.environ, **ENV, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "PATH": f"{Path(RAY).parent}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
         f"--autoscaling-config={head.config}", "--include-dashboard=false", "--disable-usage-stats",
         f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
         f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={root / 'ray'}"],
        stdout=open(root / "head.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # the GCS port first: a driver started before it waits a minute
            assert process.poll() is None, (root / "head.log").read_text()[-3000:]
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the head did not come up"
            time.sleep(1)
        ray.init(address=head.address, logging_level="WARNING", log_to_driver=False)
        wait_for(lambda: b"autoscaler_report" in (_internal_kv_get(b"__autoscaling_status") or b""),
                 "the autoscaler's first report")
        yield head
    finally:
        ray.shutdown()
        stop_group(process)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.pt"
    save_mlp(path, [8, 16, 1])
    return path


def _run(model: Path, tmp_path: Path, files: int, **options: Any) -> pipelines.RunReport:
    write_files(tmp_path / "in", [400] * files, features=8, row_group_size=100)
    return pipelines.run(model=str(model), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                         shard_rows=200, batch_size=50, shared_storage=True, progress=False, **options)


def test_scale_from_zero_gives_gpu_replicas_and_asks_only_for_what_the_pool_can_use(head: Head, model: Path,
                                                                                   tmp_path: Path) -> None:
    """Issue 12, items 11 and 13: no GPU node up, only GPU node types: the default is GPU replicas
    (before: CPU replicas on the GPU nodes, `gpu_ids: []`), and the autoscaler is asked for at
    most the 3 replicas the node types can ever hold (before: one bundle per shard not done, 12)."""
    wait_for(lambda: gpu_nodes() == 0, "no GPU node up")
    asked: list[int] = []
    running = threading.Event()

    def watch() -> None:
        while not running.wait(0.2):
            asked.append(len(standing_request()))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        report = _run(model, tmp_path, 6)  # 12 shards
    finally:
        running.set()
        watcher.join()
    assert report.succeeded and report.shards_done == 12, report.errors
    assert read_output(tmp_path / "out")["id"].to_pylist() == list(range(2400))
    assert report.gpus_per_replica == 1.0, report.to_dict()
    assert report.replicas and all(r["gpu_ids"] for r in report.replicas), report.replicas
    assert report.cpus_per_replica == 1.0  # auto: the GPU node type's CPU, shared by its one GPU replica
    assert max(asked) >= 1, asked  # it did ask, from zero
    assert max(asked) <= 3, asked
    assert standing_request() == [] and not (tmp_path / "out" / REQUEST_FILE).exists()


def _killed_while_asking(head: Head, output: Path) -> None:
    """A driver that asks the autoscaler for replicas for `output` and is SIGKILLed before it can clear them."""
    code = (
        "import os, signal, ray\n"
        "from pipelines.autoscaler import AutoscalerRequest\n"
        "from basis.storage import resolve\n"
        f"ray.init(address={head.address!r}, logging_level='ERROR', log_to_driver=False)\n"
        f"AutoscalerRequest(enabled=True, output=resolve({str(output)!r})).ask({{'CPU': 1.0, 'GPU': 1.0}}, 2)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **ENV}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def test_a_tick_clears_the_request_a_killed_run_left_standing(head: Head, model: Path, tmp_path: Path) -> None:
    """Issue 12, item 13: the request survives a killed driver; the next tick, even an idle one, clears it
    (before: it stood until some other run replaced it), but never another job's request."""
    report = _run(model, tmp_path, 1, gpus_per_replica=0, cpus_per_replica=0.5)
    assert report.succeeded and report.complete
    out = tmp_path / "out"
    _killed_while_asking(head, out)
    assert standing_request() == [{"CPU": 1.0, "GPU": 1.0}] * 2 and (out / REQUEST_FILE).exists()
    idle = cli("run", "--model", str(model), "--input", str(tmp_path / "in"), "--output", str(out),
               "--shard-rows", "200", "--address", head.address, env=ENV)
    assert idle.returncode == 0 and "nothing to do" in idle.stderr, idle.stderr[-3000:]
    assert standing_request() == [] and not (out / REQUEST_FILE).exists(), idle.stderr[-3000:]

    _killed_while_asking(head, out)
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"CPU": 1.0}])  # another job's, since: not ours to clear
    try:
        idle = cli("run", "--model", str(model), "--input", str(tmp_path / "in"), "--output", str(out),
                   "--shard-rows", "200", "--address", head.address, env=ENV)
        assert idle.returncode == 0, idle.stderr[-3000:]
        assert standing_request() == [{"CPU": 1.0}] and not (out / REQUEST_FILE).exists()
    finally:
        request_resources(bundles=[])


def test_cpu_replicas_only_when_no_node_type_has_a_gpu(head: Head, model: Path, tmp_path: Path) -> None:
    """Issue 12, item 11: the fallback: node types without GPUs give CPU replicas, with no wait for a GPU."""
    head.node_types({"cpu": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}})
    wait_for(lambda: gpu_nodes() == 0, "the GPU nodes to go")
    report = _run(model, tmp_path, 2, start_timeout=300)
    assert report.succeeded and report.shards_done == 4, report.errors
    assert report.gpus_per_replica == 0.0 and not any(r["gpu_ids"] for r in report.replicas), report.replicas
    assert standing_request() == []
