"""The replica pool on a fixed cluster: no replica is started for a shard another one will run.

`ray.cluster_utils.Cluster` on one machine: one head with 2 CPUs and 2 (fake) GPUs, this module's,
started and shut down here. A replica on a fake GPU gets `gpu_ids` and runs on the CPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from conftest import read_output, save_mlp, write_files
from ray.cluster_utils import Cluster

import pipelines

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2, "include_dashboard": False})
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _replicas_created() -> int:
    """Every `Replica` actor this cluster ever created, alive or dead (the GCS actor table)."""
    return sum(1 for actor in ray._private.state.actors().values() if actor["ActorClassName"].endswith("Replica"))


def test_no_replica_is_started_for_a_shard_another_replica_runs(cluster: Cluster, tmp_path: Path) -> None:
    write_files(tmp_path / "in", [3000] * 4, features=8, row_group_size=500)
    save_mlp(tmp_path / "m.pt", [8, 16, 1])
    before = _replicas_created()
    report = pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                           gpus_per_replica=0.5, cpus_per_replica=0.25, progress=False)
    assert report.succeeded and report.shards_done == 4, report.errors
    assert read_output(tmp_path / "out")["id"].to_pylist() == list(range(12000))
    assert report.gpus_per_replica == 0.5 and all(r["gpu_ids"] for r in report.replicas), report.replicas
    started = _replicas_created() - before
    # 4 shards: never more than 4 replicas, and each one that became ready ran a shard
    # (before: 6 started, 4 of them "released: no shards left" without running one).
    assert started <= 4, (started, report.replicas)
    assert sum(r["shards"] for r in report.replicas) == 4
    assert all(r["shards"] > 0 for r in report.replicas), report.replicas


def test_the_autoscaler_request_is_capped_and_recorded_in_the_output(cluster: Cluster, tmp_path: Path) -> None:
    """Issue 12, item 13: never one bundle per shard (100k shards asked for 100k bundles, re-sent as each
    finished); the pool is capped by what the node types can ever hold, the request by REQUEST_MOST."""
    from ray.experimental.internal_kv import _internal_kv_get

    from pipelines.autoscaler import REQUEST_FILE, REQUEST_MOST, AutoscalerRequest
    from pipelines.cluster import ClusterView, Node, plan_replicas
    from pipelines.config import JobConfig
    from basis.storage import resolve

    cfg = JobConfig.from_dict({"model": "m", "input": "i", "output": "o"})
    head = (Node("head", "h", {"CPU": 2.0}),)
    typed = ClusterView(head, autoscaling=True, node_types=({"CPU": 8.0, "GPU": 2.0},), type_max=(3,))
    assert plan_replicas(cfg, 100_000, typed).most == 6  # 3 nodes x 2 GPU replicas
    unbounded = ClusterView(head, autoscaling=True, node_types=({"CPU": 8.0, "GPU": 2.0},), type_max=(None,))
    assert plan_replicas(cfg, 100_000, unbounded).most == 100_000

    standing = lambda: json.loads(_internal_kv_get(b"autoscaler_resource_request") or b"[]")  # noqa: E731
    with AutoscalerRequest(enabled=True, output=resolve(str(tmp_path))) as request:
        request.ask({"CPU": 1.0, "GPU": 1.0}, 100_000)
        assert len(standing()) == REQUEST_MOST
        assert json.loads((tmp_path / REQUEST_FILE).read_text())["bundles"] == standing()
    assert standing() == [] and not (tmp_path / REQUEST_FILE).exists()
