"""The autoscaler, seen from a run: what node types it can launch, and the capacity this run asks of it.

`node_types` / `head_config_node_types` / `autoscaler_launches` read what an
autoscaling cluster could grow into (for `cluster.observe`); `AutoscalerRequest`
is this run's standing `request_resources`, and `clear_stale_request` clears one
that a killed run left standing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

from pipelines.config import JobConfig
from basis.errors import ClusterConnectError
from basis.storage import Location, delete_file, read_bytes, write_bytes_atomic

logger = logging.getLogger(__name__)

NodeTypes = tuple[tuple[dict[str, float], ...], tuple[int | None, ...]]  # resources, most nodes (None: unbounded)


def node_types() -> NodeTypes | None:
    """Resources and most nodes of each node group in the GCS cluster config (autoscaler v2), or None."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # an older or newer Ray without it: treat as unknown
        return None
    if config is None or not config.node_group_configs:
        return None
    groups = [group for group in config.node_group_configs if group.max_count != 0]
    return (tuple({k: float(v) for k, v in group.resources.items()} for group in groups),
            tuple(group.max_count if group.max_count > 0 else None for group in groups))


def head_config_node_types(timeout: float = 60.0) -> NodeTypes | None:
    """The worker node types of the autoscaler config the head runs (autoscaler v1), or None.

    Ray 2.60's v1 autoscaler keeps its config to itself (the GCS cluster config
    stays empty): it is the file its monitor process was started with
    (`--autoscaling-config`; `ray up` puts it at `~/ray_bootstrap_config.yaml`,
    with the resources of each type filled in). A zero-CPU task on the head
    reads it; the driver need not run there.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next((n["NodeID"] for n in ray.nodes() if n.get("Alive") and _HEAD_RESOURCE in n.get("Resources", {})), None)
    if head is None:
        return None
    read = ray.remote(num_cpus=0, max_retries=0)(read_autoscaling_config).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False))
    try:
        config = ray.get(read.remote(), timeout=timeout)
    except Exception as exc:  # no worker on the head in time, or the task failed: the types stay unknown
        logger.info("could not read the autoscaler's config on the head: %s", exc)
        return None
    return config_node_types(config) if config else None


_HEAD_RESOURCE = "node:__internal_head__"


def read_autoscaling_config() -> dict[str, Any] | None:
    """The autoscaling config of this Ray cluster, read on its head (run there as a Ray task).

    The file named by the `--autoscaling-config` of the autoscaler monitor serving
    this cluster's GCS (matched by port), else `~/ray_bootstrap_config.yaml`.
    """
    import ray
    import yaml

    port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[-1]
    paths = []
    for pid in (name for name in os.listdir("/proc") if name.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:  # gone, or not ours to read
            continue
        if not any(arg.endswith("monitor.py") and "autoscaler" in arg for arg in args):
            continue
        options = dict(arg[2:].split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)
        if options.get("gcs-address", "").rsplit(":", 1)[-1] == port and options.get("autoscaling-config"):
            paths.append(options["autoscaling-config"])
    for path in [*paths, "~/ray_bootstrap_config.yaml"]:
        try:
            with open(os.path.expanduser(path)) as f:
                config = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(config, dict) and isinstance(config.get("available_node_types"), dict):
            return config
    return None


def config_node_types(config: dict[str, Any]) -> NodeTypes | None:
    """The worker node types of an autoscaling config (pure): resources and most nodes of each.

    None when a type does not give its resources (left for the cloud provider to
    fill in): what it holds is then not known here.

    Example:
        >>> config_node_types({"max_workers": 2, "head_node_type": "head", "available_node_types": {
        ...     "head": {"resources": {"CPU": 4}}, "gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 5}}})
        (({'CPU': 8.0, 'GPU': 1.0},), (2,))
    """
    overall = config.get("max_workers")
    types, most = [], []
    for name, spec in config["available_node_types"].items():
        if name == config.get("head_node_type"):
            continue  # up already: among the nodes
        if not isinstance(spec, dict) or not isinstance(spec.get("resources"), dict):
            return None
        cap = spec.get("max_workers", overall)
        cap = min(cap, overall) if cap is not None and overall is not None else cap
        if cap == 0:
            continue
        types.append({str(k): float(v) for k, v in spec["resources"].items()})
        most.append(None if cap is None else int(cap))
    return tuple(types), tuple(most)


def autoscaler_launches(node_ids: set[str]) -> bool | None:
    """Whether the cluster's autoscaler can launch nodes (from its status report), or None without a report.

    Every `ray start` head runs an autoscaler. On a cluster started by hand it is
    read-only: its node types are the nodes themselves, named `node_<node id>`.
    An autoscaler with a real provider (`ray up`, KubeRay, fake multi-node) names
    its types after the config's `available_node_types`. Which types can launch
    is not in the report until a launch was tried, so that is not asked.
    """
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(b"__autoscaling_status")
        report = json.loads(raw).get("autoscaler_report") if raw else None
    except Exception:  # no report (yet), or a format this Ray does not write
        return None
    if not report or not report.get("node_type_mapping"):
        return None
    types = set(report["node_type_mapping"].values())
    return not types <= {f"node_{node_id}" for node_id in node_ids}


REQUEST_FILE = "_AUTOSCALER_REQUEST"  # in the output: the request a run left standing (see AutoscalerRequest)
REQUEST_MOST = 256  # bundles: more replicas than any one run is asked to add at once (pending actors ask for more)
_REQUEST_KEY = b"autoscaler_resource_request"  # where `request_resources` keeps it (autoscaler v1)


class AutoscalerRequest:
    """This run's standing request for replica-shaped capacity (`ray.autoscaler.sdk.request_resources`).

    The request is one global slot per cluster (last writer wins, kept by the GCS
    until someone replaces it), so it asks only for the replicas this run can use
    next, at most `REQUEST_MOST`, and is cleared when the run ends, however it ends.
    A driver that is killed (SIGKILL, OOM, a lost host) cannot clear it: each ask
    is also written to `_AUTOSCALER_REQUEST` in the output, and the next run of that
    output, idle or not, clears the request if it is still the one recorded there
    (`clear_stale_request`).

    Example:
        >>> with AutoscalerRequest(enabled=True, output=resolve("preds/")) as request:  # doctest: +SKIP
        ...     request.ask({"CPU": 1, "GPU": 1}, 4)
    """

    def __init__(self, *, enabled: bool, output: Location | None = None) -> None:
        self.enabled = enabled
        self.output = output
        self.bundles = 0
        self._set = False

    def __enter__(self) -> AutoscalerRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()

    def ask(self, shape: dict[str, float], bundles: int) -> None:
        bundles = min(bundles, REQUEST_MOST)
        if not self.enabled or bundles == self.bundles:
            return
        from ray.autoscaler.sdk import request_resources

        request = [dict(shape) for _ in range(bundles)]
        if self.output is not None:  # first: a driver killed between the two leaves a record, not a request
            write_bytes_atomic(self.output.fs, self.output.join(REQUEST_FILE), json.dumps({"bundles": request}).encode())
        request_resources(bundles=request)
        self.bundles, self._set = bundles, True
        logger.info("asked the autoscaler for %d replica(s) of %s", bundles, shape)

    def clear(self) -> None:
        if not self._set:
            return
        from ray.autoscaler.sdk import request_resources

        with contextlib.suppress(Exception):  # Ray already shut down: nothing left to clear
            request_resources(bundles=[])
            if self.output is not None:
                delete_file(self.output.fs, self.output.join(REQUEST_FILE))
        self.bundles, self._set = 0, False


def clear_stale_request(cfg: JobConfig, output: Location) -> None:
    """Clear the autoscaler request a killed run of this output left standing (the caller holds its lock).

    Only when `_AUTOSCALER_REQUEST` is there (an idle tick otherwise connects to
    nothing), and only a request that is still the one recorded: another job's
    request since then is left alone. The record goes once the cluster was asked.
    """
    path = output.join(REQUEST_FILE)
    raw = read_bytes(output.fs, path)
    if raw is None:
        return
    try:
        recorded = json.loads(raw)["bundles"]
    except (ValueError, KeyError, TypeError):
        recorded = None
    import ray

    from pipelines.cluster import connect  # here: cluster imports this module for `observe`

    if not ray.is_initialized() and not (cfg.address or os.environ.get("RAY_ADDRESS")):
        return  # only an autoscaling cluster's run leaves one, and this run does not connect to a cluster
    try:
        with connect(cfg) if not ray.is_initialized() else contextlib.nullcontext():
            standing = _standing_request()
            if recorded is not None and standing is not None and _same_bundles(standing, recorded):
                from ray.autoscaler.sdk import request_resources

                request_resources(bundles=[])
                logger.warning("cleared the autoscaler request (%d replica(s)) left by an earlier run of this output "
                               "that ended without clearing it", len(recorded))
    except ClusterConnectError as exc:  # the cluster is down: no request stands there; look again next time
        logger.info("could not look for an autoscaler request left standing: %s", exc)
        return
    delete_file(output.fs, path)


def _standing_request() -> list[dict[str, float]] | None:
    """The cluster's standing `request_resources` bundles, or None when this Ray keeps it where we cannot read."""
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2():
            from ray._private.worker import global_worker
            from ray.autoscaler.v2.sdk import get_cluster_resource_state

            state = get_cluster_resource_state(global_worker.gcs_client)
            return [dict(item.request.resources_bundle) for constraint in state.cluster_resource_constraints[-1:]
                    for item in constraint.resource_requests for _ in range(item.count)]
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(_REQUEST_KEY)
        return list(json.loads(raw)) if raw else []
    except Exception as exc:  # a Ray that keeps it elsewhere: leave it
        logger.info("cannot read the autoscaler's standing request: %s", exc)
        return None


def _same_bundles(a: list[dict[str, float]], b: list[dict[str, float]]) -> bool:
    key = lambda bundle: sorted((str(k), float(v)) for k, v in bundle.items())  # noqa: E731
    return sorted(map(key, a)) == sorted(map(key, b))
