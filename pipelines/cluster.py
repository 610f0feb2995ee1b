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
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from pipelines.config import JobConfig
from basis.errors import ClusterConnectError, ConfigError, ResourceError
from pipelines.autoscaler import autoscaler_launches, head_config_node_types, node_types
from workers.modelfile import forward_share

logger = logging.getLogger(__name__)

_TOKEN_HINT = (
    "If the cluster uses token authentication (Ray 2.60 turns it on for clusters it starts), set "
    "RAY_AUTH_MODE=token in this shell; the token is read from ~/.ray/auth_token (copy it from the head) "
    "or from RAY_AUTH_TOKEN."
)


@dataclass(frozen=True)
class Connection:
    """The Ray session a run uses."""

    where: str  # for people: "embedded local Ray", "Ray cluster at ..."
    embedded: bool  # started by this run: fixed, local, ours


@contextlib.contextmanager
def connect(cfg: JobConfig) -> Iterator[Connection]:
    """Connect to Ray for the length of a run."""
    import ray  # here, not at the top: planning and the driver lane run without it
    if ray.is_initialized():
        yield Connection("existing Ray session", embedded=False)
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
        yield Connection(where, embedded=not address)
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class ReplicaResources:
    """What each replica reserves, how many to start with, and how far the pool may grow.

    `count` replicas are started at once (those the nodes up now can hold; 0 when
    scaling from zero); on an elastic pool (`limit` above `count`, or `autoscaling`)
    more start as capacity appears, never more than `limit`.
    """

    count: int
    num_cpus: float
    num_gpus: float
    limit: int | None = None  # None: exactly `count`
    autoscaling: bool = False  # ask the autoscaler for replica-shaped capacity
    cpus_chosen: str = field(default="", repr=False, compare=False)  # why, when `cpus_per_replica` is auto

    @property
    def most(self) -> int:
        return self.count if self.limit is None else self.limit

    @property
    def shape(self) -> dict[str, float]:
        """One replica's bundle, as `request_resources` and the scheduler see it."""
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus > 0 else {})}


@dataclass(frozen=True)
class Node:
    """An alive node: where it runs and what it has."""

    id: str
    host: str
    total: dict[str, float]


@dataclass(frozen=True)
class ClusterView:
    """What the cluster has now and whether it can grow.

    `autoscaling` is True when an autoscaler can launch nodes, False on a fixed
    cluster (an embedded Ray, a `ray start` cluster without an autoscaling
    config) and None when Ray does not say. `node_types` lists the resources of
    each node type the autoscaler can launch, where Ray exposes them (in Ray
    2.60 the GCS cluster config is often empty: then None).
    """

    nodes: tuple[Node, ...]
    autoscaling: bool | None = False
    node_types: tuple[dict[str, float], ...] | None = None
    type_max: tuple[int | None, ...] | None = None  # most nodes of each node type (None: no limit known)

    @property
    def totals(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for node in self.nodes:
            for key, value in node.total.items():
                totals[key] = totals.get(key, 0.0) + value
        return totals

    @property
    def hosts(self) -> list[str]:
        return sorted({node.host for node in self.nodes})


def plan_replicas(cfg: JobConfig, shards: int, view: ClusterView,
                  layers: tuple[tuple[int, int, bool], ...] = ()) -> ReplicaResources:
    """Pick each replica's resources, the replicas to start with and the most the pool may hold
    (pure: no Ray calls). Refuses (ResourceError) only what can never run.

    On a fixed cluster the pool is judged by the nodes present; an exact `replicas`
    count must fit them. On an autoscaling cluster (or one that does not say) the
    run starts with what fits and asks for the rest; it refuses only when Ray lists
    the node types and none can host one replica.

    Example:
        >>> view = ClusterView((Node("n1", "h", {"CPU": 2.0}),))
        >>> plan_replicas(JobConfig.from_dict({"model": "m", "input": "i", "output": "o"}), 10, view)
        ReplicaResources(count=1, num_cpus=2.0, num_gpus=0.0, limit=1, autoscaling=False)
    """
    totals = view.totals
    types_with_gpus = any(t.get("GPU", 0.0) > 0 for t in view.node_types or ())
    per_gpu = cfg.gpus_per_replica
    if per_gpu is None:
        per_gpu = 1.0 if totals.get("GPU", 0.0) > 0 or types_with_gpus else 0.0
    per_cpu, chosen = (cfg.cpus_per_replica, "") if cfg.cpus_per_replica is not None else auto_cpus(view, per_gpu,
                                                                                                  layers)
    fits_now = sum(_fits(node.total, per_cpu, per_gpu) for node in view.nodes)
    growable = view.autoscaling is not False and not (
        view.node_types is not None and not any(_fits(t, per_cpu, per_gpu) for t in view.node_types))
    shortfalls = []
    if not growable:
        if fits_now == 0:
            shortfalls.append(f"one replica needs {per_cpu:g} CPU and {per_gpu:g} GPU on one node, and no node "
                              f"{'type ' if view.node_types is not None else ''}has that")
        elif cfg.replicas is not None and min(cfg.replicas, max(shards, 1)) > fits_now:
            count = min(cfg.replicas, max(shards, 1))
            shortfalls.append(f"{count} replica(s) x {per_cpu:g} CPU"
                              + (f" + {per_gpu:g} GPU" if per_gpu else "")
                              + f", but the cluster's nodes hold {fits_now} (it has {totals.get('CPU', 0.0):g} CPU"
                              + f" and {totals.get('GPU', 0.0):g} GPU)")
    if shortfalls:
        raise ResourceError(
            "the replicas can never be scheduled: " + "; ".join(shortfalls)
            + ". Lower 'replicas', 'cpus_per_replica' or 'gpus_per_replica', or add nodes."
        )
    if cfg.replicas is not None:
        limit = min(cfg.replicas, max(shards, 1))
    elif growable:
        limit = min(cfg.max_replicas or max(shards, 1), max(shards, 1), _most_ever(view, per_cpu, per_gpu, fits_now))
    else:
        limit = min(fits_now, cfg.max_replicas or fits_now, max(shards, 1))
    return ReplicaResources(min(limit, fits_now), per_cpu, per_gpu, limit=limit, autoscaling=growable,
                            cpus_chosen=chosen)


def _most_ever(view: ClusterView, per_cpu: float, per_gpu: float, fits_now: int) -> int:
    """The most replicas an autoscaling cluster can ever hold: those the nodes up now hold, plus
    what every node type holds times its most nodes (no bound when a type's most is not known)."""
    if view.node_types is None or view.type_max is None or None in view.type_max:
        return sys.maxsize
    added = sum(_fits(t, per_cpu, per_gpu) * (most or 0) for t, most in zip(view.node_types, view.type_max))
    return max(1, fits_now + added)


_CPU_REPLICA_MOST = 4  # CPUs of one CPU replica under `cpus_per_replica: auto`


def auto_cpus(view: ClusterView, per_gpu: float, layers: tuple[tuple[int, int, bool], ...] = ()) -> tuple[float, str]:
    """`cpus_per_replica: auto`: the CPUs each replica reserves, and why (pure).

    A GPU replica is fed only as fast as its own threads decode, so GPU replicas
    share their node's CPUs, less one left to Ray's own processes on nodes of 4
    or more CPUs; with several kinds of GPU node, the smallest share, so one
    replica shape fits them all.

    CPU replicas depend on the model (`layers`): when the forward pass is most
    of the work (64->256->256->1), one CPU each (on 2 CPUs two such replicas
    took 14.1 s where one of two CPUs took 16.0 s); otherwise each node's CPUs
    are split into replicas of at most 4, which decode on all their CPUs (on
    the data-bound 64->16->1 job one 2-CPU replica took 12.2 s where two 1-CPU
    ones took 13.6 s, and it holds one model instead of two). Past 4 threads a
    replica's serial parts (the write, the Python loop) would cap it.

    Example:
        >>> view = ClusterView((Node("head", "h", {"CPU": 8.0}), Node("g", "h", {"CPU": 16.0, "GPU": 2.0})))
        >>> auto_cpus(view, 1.0)[0]
        7.0
    """
    shapes = [node.total for node in view.nodes] + list(view.node_types or ())
    if per_gpu <= 0 and layers and forward_share(layers) > 0.5:
        return 1.0, "1 CPU per CPU replica: the forward pass is most of this model's work"
    if per_gpu <= 0:
        shares = [cpus / math.ceil(cpus / _CPU_REPLICA_MOST) for shape in shapes if (cpus := shape.get("CPU", 0.0)) > 0]
        most = min((float(math.floor(share)) if share >= 1 else share for share in shares), default=1.0)
        return most, f"{most:g} CPU per CPU replica: each node's CPUs split into replicas of at most {_CPU_REPLICA_MOST}"
    shares = []
    for shape in shapes:
        replicas = _fits({"GPU": shape.get("GPU", 0.0)}, 0.0, per_gpu)
        if replicas == 0:
            continue
        cpus = shape.get("CPU", 0.0)
        share = (cpus - (1.0 if cpus >= 4 else 0.0)) / replicas
        shares.append(float(math.floor(share)) if share >= 1 else math.floor(share * 100) / 100)
    if not shares:
        return 1.0, "1 CPU: no node that can hold a GPU replica is up or known yet (set cpus_per_replica to size it)"
    most = min(shares)
    return most, f"{most:g} CPU per GPU replica: its node's CPUs shared among its GPU replicas"


def _fits(resources: dict[str, float], per_cpu: float, per_gpu: float) -> int:
    """How many replicas one node (or node type) holds."""
    by_cpu = resources.get("CPU", 0.0) / per_cpu if per_cpu > 0 else math.inf
    by_gpu = resources.get("GPU", 0.0) / per_gpu if per_gpu > 0 else math.inf
    most = min(by_cpu, by_gpu)
    return 0 if math.isinf(most) else int(math.floor(most + 1e-9))


def observe(*, embedded: bool, settle: float = 6.0) -> ClusterView:
    """The alive nodes and whether the cluster can grow (Ray calls; the driver only).

    An embedded Ray is fixed. Otherwise the GCS cluster config (autoscaler v2)
    gives the node types; failing that, the autoscaler's status report says
    whether it can launch nodes at all, waiting up to `settle` seconds for its
    first report after a cluster starts.
    """
    import ray

    nodes = tuple(
        Node(n["NodeID"], n.get("NodeManagerHostname", ""), {k: float(v) for k, v in n["Resources"].items()})
        for n in ray.nodes() if n.get("Alive")
    )
    if embedded:
        return ClusterView(nodes, autoscaling=False)
    types = node_types()
    if types is not None:
        return ClusterView(nodes, autoscaling=True, node_types=types[0], type_max=types[1])
    deadline = time.monotonic() + settle
    while True:
        launches = autoscaler_launches({node.id for node in nodes})
        if launches is not None or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    types = head_config_node_types() if launches else None
    if types is not None:
        return ClusterView(nodes, autoscaling=True, node_types=types[0], type_max=types[1])
    return ClusterView(nodes, autoscaling=launches)


def local_view() -> ClusterView:
    """This machine as the one node of an embedded Ray (no Ray calls: for checks before Ray starts).

    CPUs are those this process may run on; GPUs count when NVIDIA devices are
    present and `CUDA_VISIBLE_DEVICES` does not hide them (their number is not
    needed: a run that may use GPUs does not start the driver lane).
    """
    cpus = float(len(os.sched_getaffinity(0)))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = 0.0 if visible is not None and visible.strip() in ("", "-1") else float(
        len([d for d in os.listdir("/dev") if d.startswith("nvidia") and d[6:].isdigit()]) if os.path.isdir("/dev")
        else 0)
    return ClusterView((Node("driver", socket.gethostname(), {"CPU": cpus, **({"GPU": gpus} if gpus else {})}),))


def draining_nodes() -> set[str]:
    """Ids of the nodes being drained (spot preemption notices, scale-down): no new shards go there."""
    try:
        from ray._private.state import state

        return set(state.get_draining_nodes())
    except Exception as exc:  # not available in this Ray: nothing is known to drain
        logger.debug("cannot tell which nodes are draining: %s", exc)
        return set()


def check_shared_storage(cfg: JobConfig, view: ClusterView, paths: dict[str, str]) -> None:
    """Refuse local paths when the nodes are on more than one host, unless declared shared (exit 2)."""
    hosts = view.hosts
    if cfg.shared_storage or len(hosts) < 2:
        return
    local = [f"{key} {value!r}" for key, value in paths.items() if "://" not in value or value.startswith("file://")]
    if local:
        raise ConfigError(
            f"{', '.join(local)} {'is a local path' if len(local) == 1 else 'are local paths'}, but the cluster's "
            f"nodes are on {len(hosts)} hosts ({', '.join(hosts[:4])}{', ...' if len(hosts) > 4 else ''}): replicas "
            f"on the other hosts cannot read them. Use an object-store URI (s3://, gs://) or a shared mount, and "
            f"declare a shared mount with shared_storage: true"
        )
