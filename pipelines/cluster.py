"""Connecting to Ray and sizing the replicas against what the cluster has.

Address resolution (SPEC `address`): the config key, else `RAY_ADDRESS` (set by
`ray job submit`), else a new embedded local Ray, never an implicit join of a
`ray start` cluster running on this machine. A Ray session the caller already
initialised is reused and left running.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import ray

from pipelines.config import JobConfig
from pipelines.errors import ClusterConnectError, ResourceError

logger = logging.getLogger(__name__)

_TOKEN_HINT = (
    "If the cluster uses token authentication (Ray 2.60 turns it on for clusters it starts), set "
    "RAY_AUTH_MODE=token in this shell; the token is read from ~/.ray/auth_token (copy it from the head) "
    "or from RAY_AUTH_TOKEN."
)


@contextlib.contextmanager
def connect(cfg: JobConfig) -> Iterator[str]:
    """Connect to Ray for the length of a run; yields a description of the cluster used."""
    if ray.is_initialized():
        yield "existing Ray session"
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
            where = f"Ray cluster at {address}"
        else:
            ray.init(address="local", dashboard_host="127.0.0.1", include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=True)
            where = "embedded local Ray"
    except Exception as exc:  # ConnectionError, RuntimeError, ... depending on what failed
        text = str(exc)
        hint = "Check the address, that the cluster is up, and that this Ray version matches the cluster's."
        if address and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            hint += " " + _TOKEN_HINT
        raise ClusterConnectError(
            f"cannot connect to Ray at {address or 'a new local instance'}: {text.strip().rstrip('.')}. {hint}"
        ) from exc
    try:
        yield where
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class ReplicaResources:
    """How many replicas to start and what each reserves."""

    count: int
    num_cpus: float
    num_gpus: float


def size_replicas(cfg: JobConfig, shards: int, totals: dict[str, float], node_totals: list[dict[str, float]]) -> ReplicaResources:
    """Pick the replica count and check the cluster can ever hold it (pure: no Ray calls).

    Example:
        >>> size_replicas(cfg, shards=10, totals={"CPU": 2.0}, node_totals=[{"CPU": 2.0}])  # doctest: +SKIP
        ReplicaResources(count=2, num_cpus=1.0, num_gpus=0.0)
    """
    cpus, gpus = totals.get("CPU", 0.0), totals.get("GPU", 0.0)
    per_gpu = cfg.gpus_per_replica if cfg.gpus_per_replica is not None else (1.0 if gpus > 0 else 0.0)
    per_cpu = cfg.cpus_per_replica
    if cfg.replicas is not None:
        count = cfg.replicas
    elif per_gpu > 0:
        count = int(math.floor(gpus / per_gpu + 1e-9))
    else:
        count = int(math.floor(cpus / per_cpu + 1e-9))
    count = max(1, min(count, max(shards, 1)))
    shortfalls = []
    if count * per_cpu > cpus + 1e-9:
        shortfalls.append(f"{count} replica(s) x {per_cpu:g} CPU = {count * per_cpu:g} CPU, but the cluster has {cpus:g} CPU")
    if per_gpu > 0 and count * per_gpu > gpus + 1e-9:
        shortfalls.append(f"{count} replica(s) x {per_gpu:g} GPU = {count * per_gpu:g} GPU, but the cluster has {gpus:g} GPU")
    fits_a_node = any(n.get("CPU", 0.0) >= per_cpu and n.get("GPU", 0.0) >= per_gpu for n in node_totals)
    if not shortfalls and not fits_a_node:
        shortfalls.append(f"one replica needs {per_cpu:g} CPU and {per_gpu:g} GPU on one node, and no node has that")
    if shortfalls:
        raise ResourceError(
            "the replicas can never be scheduled: " + "; ".join(shortfalls)
            + ". Lower 'replicas', 'cpus_per_replica' or 'gpus_per_replica', or add nodes."
        )
    return ReplicaResources(count, per_cpu, per_gpu)


def cluster_totals() -> tuple[dict[str, float], list[dict[str, float]]]:
    """Total resources, and per alive node."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return dict(ray.cluster_resources()), nodes
