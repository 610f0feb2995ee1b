"""The replica pool: the `Replica` actors of one run, as they start, grow, drain and go.

The pool starts with the replicas the nodes up now can hold. An elastic pool
(`replicas: auto` on a cluster that can grow, or an exact count larger than
what is up) asks the autoscaler for replica-shaped capacity and starts more
replicas as it appears, a couple at a time. Never more than `resources.most`,
nor more than the busy replicas plus the shards not handed out yet: a replica
is started only for a shard no idle or starting replica will take, and idle or
starting replicas no shard is left for are released (the request lowered with
them), so the autoscaler can scale down. Replicas on
a node being drained (a spot preemption notice, a scale-down) get no new
shards and are released once idle. Every replica that ever ran is recorded
for the report: where it ran, what it did and how it ended.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.exceptions

from pipelines.autoscaler import AutoscalerRequest
from pipelines.cluster import ReplicaResources, draining_nodes
from basis.errors import ModelError
from pipelines.metrics import RunMetrics
from pipelines.plan import Shard
from workers.replica_job import ReplicaJob

logger = logging.getLogger(__name__)

PENDING_LIMIT = 2  # replicas waiting for capacity at once on an elastic pool (the request asks for the rest)
LOOK_SECONDS = 0.5  # how often the pool looks at draining nodes and resizes its request
FINISHED, RELEASED = "finished", "released"


@dataclass
class Call:
    """One call on a replica: a bundle of shards (`pipelines.bundle`), whose results come back one by one."""

    ref: Any  # the call's ObjectRefGenerator: a result per shard, in order
    shards: list[Shard]
    done: int = 0  # shards whose result came back

    @property
    def executing(self) -> Shard:
        """The shard the replica is on (or will start with) once this call runs."""
        return self.shards[self.done]


@dataclass
class Slot:
    """One replica: its actor, the shards it holds, and what the report says about it."""

    index: int
    actor: Any
    ready: bool = False
    alive: bool = True
    draining: bool = False
    queue: list[Call] = field(default_factory=list)  # calls sent, oldest (executing) first
    since: float = 0.0  # monotonic time the executing shard's clock started
    info: dict[str, Any] = field(default_factory=dict)  # node, host, device, gpu_ids (from its readiness probe)
    shards: int = 0
    rows: int = 0
    busy_seconds: float = 0.0
    peak_rss_bytes: int | None = None
    ended: str | None = None  # None while it runs; "finished", "released: ...", "lost: ..."


class ReplicaPool:
    """The run's replicas.

    Example:
        >>> pool = ReplicaPool(job, ReplicaResources(2, 1.0, 0.0), max_attempts=3, actor=ray.remote(Replica))  # doctest: +SKIP
        >>> pool.start(); pool.maintain(queued=10)
    """

    def __init__(self, job: ReplicaJob, resources: ReplicaResources, *, max_attempts: int, actor: Any,
                 request: AutoscalerRequest | None = None, metrics: RunMetrics | None = None) -> None:
        self.job = job
        self.resources = resources
        self.request = request or AutoscalerRequest(enabled=False)
        self.slots: list[Slot] = []
        self.probes: dict[Any, Slot] = {}  # readiness probe ObjectRef -> replica starting
        self.losses = 0
        self.last_loss = ""
        self.max_attempts = max_attempts
        self.allowed_losses = max(1, resources.most) * max_attempts  # replacements before the run gives up
        self.waited_seconds = 0.0  # time with shards to run and no replica ready
        self.waiting_since: float | None = time.monotonic()
        self._actor = actor
        self._looked = 0.0
        self.metrics = metrics if metrics is not None else RunMetrics()

    @property
    def elastic(self) -> bool:
        return self.resources.autoscaling or self.resources.most > self.resources.count

    def start(self) -> None:
        """The replicas the nodes up now can hold (at least one, waiting for capacity, when none can);
        nothing when replicas were started already (`pipelines.startup`, while the driver planned)."""
        if self.slots:
            return
        for _ in range(max(self.resources.count, 1 if self.resources.most else 0)):
            self.spawn()

    def adopt(self, job: ReplicaJob, resources: ReplicaResources, *, request: AutoscalerRequest | None = None,
              metrics: RunMetrics | None = None) -> ReplicaPool:
        """Take over for the run the replicas started while it planned (`pipelines.startup`), with the
        planned job and resources: each replica is sent the job before any shard (`Replica.configure`;
        an actor runs one caller's calls in order). One started for another shape or model (never,
        barring a bug) is released, and `maintain` starts what the run needs."""
        fits = job.same_start(self.job) and resources.shape == self.resources.shape
        for slot in self.alive():
            if fits:
                slot.actor.configure.remote(job)
            else:
                self.release(slot, "started for another job")
        self.job, self.resources = job, resources
        self.allowed_losses = max(1, resources.most) * self.max_attempts
        if request is not None:
            self.request = request
        if metrics is not None and metrics is not self.metrics:
            for slot in self.alive():  # counted where they were asked for
                metrics.replica_asked()
            self.metrics = metrics
        return self

    def spawn(self) -> Slot:
        actor = self._actor.options(
            num_cpus=self.resources.num_cpus,
            num_gpus=self.resources.num_gpus,
            max_restarts=0,
            max_task_retries=0,
        ).remote(len(self.slots), self.job)
        slot = Slot(len(self.slots), actor)
        self.slots.append(slot)
        self.probes[actor.info.remote()] = slot
        self.metrics.replica_asked()
        return slot

    def alive(self) -> list[Slot]:
        return [s for s in self.slots if s.alive]

    def ready(self) -> list[Slot]:
        """Replicas that may take shards: up, and not on a draining node."""
        return [s for s in self.slots if s.alive and s.ready and not s.draining]

    def became_ready(self, slot: Slot, info: dict[str, Any]) -> None:
        slot.ready, slot.info = True, info
        self.metrics.replica_ready()
        if self.waiting_since is not None:
            self.waited_seconds += time.monotonic() - self.waiting_since
            self.waiting_since = None
        logger.info("replica %d ready on %s (%s%s)", slot.index, info.get("host"), info.get("device"),
                    f", GPU {','.join(info['gpu_ids'])}" if info.get("gpu_ids") else "")

    def lost(self, slot: Slot, reason: str, exc: Exception | None = None) -> bool:
        """A replica died or stalled: kill it (freeing its resources) and count the loss.

        Returns False when it was already gone. A replica that fails in its creation
        task before any replica was ever ready means the model cannot load: ModelError.
        """
        if not slot.alive:
            return False
        slot.alive, slot.ended = False, f"lost: {reason}"
        self.metrics.replica_lost(slot.ready)
        with contextlib.suppress(Exception):  # fine if it is dead already
            ray.kill(slot.actor, no_restart=True)
        if exc is not None and not slot.ready and not any(s.ready for s in self.slots) and "creation task" in str(exc):
            raise ModelError(f"replica {slot.index} failed to start: {reason}") from exc
        self.losses += 1
        self.last_loss = f"replica {slot.index}: {reason}"
        for probe in [r for r, s in self.probes.items() if s is slot]:
            del self.probes[probe]
        return True

    def starting(self) -> list[Slot]:
        """Replicas asked for and not ready yet (not on a draining node: those are never asked for)."""
        return [s for s in self.slots if s.alive and not s.ready]

    def maintain(self, *, queued: int) -> None:
        """Resize the pool to the work left: `queued` shards not handed to a replica yet.

        A replica is worth having while it holds shards or one of the queued shards
        is left for it, so the pool never holds more replicas than the busy ones plus
        the queued shards: it starts replicas (replacing lost ones, within the loss
        budget, and growing an elastic pool as capacity appears) only for queued
        shards no idle or starting replica will take, and releases the idle and
        starting ones that no queued shard is left for (a starting one first: its
        model load and CUDA context are not paid yet). Replicas on draining nodes
        get no new shards and go once idle.
        """
        now = time.monotonic()
        for slot in self.alive():
            if slot.draining and not slot.queue:  # its last shard is done: let the node go
                self.release(slot, "node draining")
        alive = [s for s in self.alive() if not s.draining]
        busy = [s for s in alive if s.queue]
        if now - self._looked >= LOOK_SECONDS:
            self._looked = now
            self._drain(draining_nodes())
            self.request.ask(self.resources.shape, min(self.resources.most, len(busy) + queued))
        if self.ready() or not (queued or busy):
            self.waiting_since = None
        elif self.waiting_since is None:
            self.waiting_since = now
        idle = [s for s in alive if s.ready and not s.queue]
        starting = [s for s in alive if not s.ready]
        spare = len(idle) + len(starting) - queued  # replicas no queued shard is left for
        for slot in [*reversed(starting), *idle][:max(0, spare)]:
            self.release(slot, "no shards left")
        alive = [s for s in alive if s.alive]
        starting = [s for s in starting if s.alive]
        wanted = min(self.resources.most - len(alive), -spare)  # queued shards no replica will take yet
        while wanted > 0 and self.losses <= self.allowed_losses:
            if self.elastic and len(starting) >= PENDING_LIMIT and len(alive) >= self.resources.count:
                break  # the autoscaler request asks for the rest; more actors only queue
            starting.append(self.spawn())
            alive.append(starting[-1])
            wanted -= 1

    def _drain(self, draining: set[str]) -> None:
        for slot in self.alive():
            if slot.ready and not slot.draining and slot.info.get("node") in draining:
                slot.draining = True
                logger.warning("replica %d: node %s is draining; it gets no new shards", slot.index,
                               slot.info.get("node"))

    def release(self, slot: Slot, why: str) -> None:
        """Stop a replica that holds no shard; its stats are kept for the report."""
        if slot.ready:
            self._fetch_stats([slot])
        slot.alive, slot.ended = False, f"{RELEASED}: {why}"
        self.metrics.replica_lost(slot.ready)
        for probe in [r for r, s in self.probes.items() if s is slot]:
            del self.probes[probe]
        with contextlib.suppress(Exception):
            ray.kill(slot.actor, no_restart=True)

    def close(self) -> None:
        """Collect the stats of the replicas still up and idle, then stop them all.

        A replica still holding shards (the run was interrupted or gave up) is stopped without
        them: its stats call would wait behind its shards, and Kubernetes kills a pod 30 s
        after SIGTERM."""
        live = [s for s in self.slots if s.alive and s.ready and not s.queue]
        self._fetch_stats(live)
        for slot in self.slots:
            if slot.alive:
                slot.alive = False
                slot.ended = slot.ended or FINISHED
                self.metrics.replica_lost(slot.ready)
                with contextlib.suppress(Exception):
                    ray.kill(slot.actor, no_restart=True)

    def _fetch_stats(self, slots: list[Slot]) -> None:
        try:
            stats = ray.get([s.actor.stats.remote() for s in slots], timeout=60)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as exc:
            logger.warning("could not collect replica stats: %s", exc)
            return
        for slot, value in zip(slots, stats):
            slot.peak_rss_bytes = value.get("peak_rss_bytes")

    def records(self) -> list[dict[str, Any]]:
        """Every replica that ever ran, in start order: where, what it did, how it ended."""
        return [
            {"node": s.info.get("node"), "device": s.info.get("device"), "gpu_ids": list(s.info.get("gpu_ids") or []),
             "shards": s.shards, "rows": s.rows, "busy_seconds": round(s.busy_seconds, 3),
             "peak_rss_bytes": s.peak_rss_bytes, "ended": s.ended or FINISHED}
            for s in self.slots if s.ready
        ]
