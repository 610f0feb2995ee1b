"""A node that leaves mid-run costs only the shards its replicas held.

`ray.cluster_utils.Cluster` on one machine: a head with no CPUs and three worker nodes with
one (fake) GPU each; the cluster is this module's, started and shut down here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ray
from conftest import read_output, save_mlp, write_files
from ray.cluster_utils import Cluster

import pipelines
from pipelines.commit import MANIFEST, SUCCESS

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(3):
        cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _a_worker_node(cluster: Cluster) -> object:
    """A worker node whose GPU a replica holds, and not the node this driver is attached to."""
    mine = ray.get_runtime_context().get_node_id()
    held = {actor["Address"]["NodeID"] for actor in ray._private.state.actors().values() if actor["State"] == "ALIVE"}
    return next(n for n in cluster.worker_nodes if n.node_id != mine and n.node_id in held)


def _remove_ungracefully(cluster: Cluster, node: object) -> None:
    """The node dies at once, with every process on it (as a host does), not only its raylet."""
    pids = [actor["Pid"] for actor in ray._private.state.actors().values()
            if actor["State"] == "ALIVE" and actor["Address"]["NodeID"] == node.node_id]
    cluster.remove_node(node, allow_graceful=False)
    for pid in pids:  # the replicas of that node: processes this test's cluster started
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _run_and(tmp_path: Path, files: int, rows: int, committed: int, act: Callable[[], object]) -> tuple[object, object]:
    """Run a GPU job in a thread; once `committed` shards are in place, `act()` once. Returns (report, act's value)."""
    write_files(tmp_path / "in", [rows] * files, features=16, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [16, 256, 256, 1])
    out = tmp_path / "out"
    result: dict[str, object] = {}
    job = threading.Thread(target=lambda: result.update(report=pipelines.run(
        model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(out), shard_rows=100,
        batch_size=25, gpus_per_replica=1, cpus_per_replica=0.5, progress=False)))
    job.start()
    deadline, acted = time.monotonic() + 180, None
    while job.is_alive() and time.monotonic() < deadline:
        if len(list(out.glob("*.parquet"))) >= committed:
            acted = act()
            break
        time.sleep(0.05)
    job.join(timeout=300)
    assert acted is not None, "the run ended before the test could act; make it longer"
    report = result["report"]
    assert isinstance(report, pipelines.RunReport)
    return report, acted


def test_node_lost_mid_run_costs_only_its_shards(cluster: Cluster, tmp_path: Path) -> None:
    def remove() -> object:
        node = _a_worker_node(cluster)  # holding a replica
        _remove_ungracefully(cluster, node)
        return node

    report, removed = _run_and(tmp_path, files=8, rows=2000, committed=160 // 5, act=remove)  # a fifth committed
    out = tmp_path / "out"
    assert report.status == "succeeded" and report.rows_out == 16_000 and (out / SUCCESS).exists()
    assert read_output(out)["id"].to_pylist() == list(range(16_000))  # every row exactly once, in order
    manifest = json.loads((out / MANIFEST).read_text())
    attempts = [s["attempts"] for s in manifest["shards"]]
    assert max(attempts) >= 2, (report.replicas, removed.node_id)  # what the lost node held ran again
    nodes = {r["node"] for r in report.replicas}
    assert len(nodes) >= 2 and all(r["gpu_ids"] for r in report.replicas)
    lost = [r for r in report.replicas if r["ended"].startswith("lost")]
    assert lost and all(r["node"] == removed.node_id for r in lost), report.replicas
    assert pipelines.verify(str(out)).ok


def test_replicas_on_a_draining_node_get_no_new_shards(cluster: Cluster, tmp_path: Path) -> None:
    from ray.core.generated import autoscaler_pb2

    def drain() -> str:
        node = _a_worker_node(cluster).node_id  # a spot preemption notice arrives
        accepted, why = ray._private.worker.global_worker.gcs_client.drain_node(
            node, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "spot notice",
            int(time.time() * 1000) + 3_600_000)
        assert accepted, why
        return node

    report, drained = _run_and(tmp_path, files=8, rows=4000, committed=20, act=drain)  # runs on well after it
    assert report.status == "succeeded" and report.rows_out == 32_000
    assert read_output(tmp_path / "out")["id"].to_pylist() == list(range(32_000))
    on_drained = [r for r in report.replicas if r["node"] == drained]
    assert on_drained and all(r["ended"] == "released: node draining" for r in on_drained), \
        [(r["ended"], r["shards"]) for r in report.replicas]
    # Released while the others went on: the rest of the shards ran elsewhere.
    assert any(r["node"] != drained and r["shards"] > 0 for r in report.replicas)
