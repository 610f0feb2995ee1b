"""Dispatch: replicas pull shards; results are collected in completion order.

Each replica holds at most `in_flight` shards (one running, the next queued so
it never waits on the driver). A replica that dies (actor, worker process or
node failure) costs only the shards it held: they go back to the front of the
queue, up to `max_attempts` attempts each, and a replacement replica starts.
Data errors come back as failed results and are never retried.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.exceptions

from pipelines.cluster import ReplicaResources
from pipelines.errors import ModelError, ResourceError
from pipelines.plan import Shard
from workers.replica import Replica, ReplicaJob

logger = logging.getLogger(__name__)

# Errors meaning the replica (or its node) is gone, not that the shard is bad.
_INFRA_ERRORS = (
    ray.exceptions.RayActorError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OwnerDiedError,
)


@dataclass
class _Slot:
    index: int
    actor: Any
    ready: bool = False
    alive: bool = True
    tasks: set[Any] = field(default_factory=set)  # ObjectRefs of shards in flight


@dataclass
class _Ref:
    slot: _Slot
    shard: Shard | None  # None for the readiness probe


class Scheduler:
    """Runs shards on a pool of `Replica` actors.

    Example:
        >>> Scheduler(job, ReplicaResources(2, 1.0, 0.0), max_attempts=3).run(shards, on_result)  # doctest: +SKIP
    """

    def __init__(
        self,
        job: ReplicaJob,
        resources: ReplicaResources,
        *,
        max_attempts: int,
        in_flight: int = 2,
        start_timeout: float = 300.0,
        shard_timeout: float | None = None,
    ) -> None:
        self.job = job
        self.resources = resources
        self.max_attempts = max_attempts
        self.in_flight = in_flight
        self.start_timeout = start_timeout
        self.shard_timeout = shard_timeout
        self._on_started: Callable[[], None] | None = None
        self._remote = ray.remote(Replica)
        self._slots: list[_Slot] = []
        self._refs: dict[Any, _Ref] = {}
        self._respawns_left = resources.count * max_attempts

    def run(self, shards: Sequence[Shard], on_result: Callable[[Shard, dict[str, Any]], None],
            on_started: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        """Process every shard; calls `on_result(shard, record)` as each finishes. Returns replica stats.

        `on_started` is called once, when the first replica is ready, before any shard is dispatched.
        """
        self._on_started = on_started
        pending = collections.deque(shards)
        attempts: dict[str, int] = collections.Counter()
        begun = time.monotonic()
        try:
            for _ in range(self.resources.count):
                self._spawn()
            while pending or any(r.shard for r in self._refs.values()):
                self._dispatch(pending, attempts)
                if not self._refs:
                    raise ResourceError("no replica is left to run the remaining shards")
                done, _ = ray.wait(list(self._refs), num_returns=1, timeout=1.0)
                if not done:
                    self._check_start(begun)
                    continue
                ref = done[0]
                entry = self._refs.pop(ref)
                entry.slot.tasks.discard(ref)
                try:
                    value = ray.get(ref)
                except _INFRA_ERRORS as exc:
                    self._lost(entry.slot, entry.shard, exc, pending, attempts, on_result)
                    continue
                except ray.exceptions.RayTaskError as exc:  # a bug in the replica code, not a data error
                    if isinstance(getattr(exc, "cause", None), ModelError):
                        raise exc.cause from None  # the replica could not load the model: the whole job stops
                    if entry.shard is None:
                        raise
                    on_result(entry.shard, _failure(entry.shard, attempts, f"replica error: {_last_line(exc)}"))
                    continue
                if entry.shard is None:
                    entry.slot.ready = True
                    logger.info("replica %d ready on %s (%s)", value["index"], value["host"], value["device"])
                else:
                    value["attempts"] = attempts[entry.shard.id]
                    on_result(entry.shard, value)
            return self._collect_stats()
        finally:
            for slot in self._slots:
                if slot.alive:
                    ray.kill(slot.actor, no_restart=True)

    def _spawn(self) -> None:
        index = len(self._slots)
        actor = self._remote.options(
            num_cpus=self.resources.num_cpus,
            num_gpus=self.resources.num_gpus,
            max_restarts=0,
            max_task_retries=0,
        ).remote(index, self.job)
        slot = _Slot(index, actor)
        self._slots.append(slot)
        self._refs[actor.info.remote()] = _Ref(slot, None)

    def _dispatch(self, pending: collections.deque[Shard], attempts: collections.Counter[str]) -> None:
        if self._on_started is not None and any(slot.ready for slot in self._slots):
            started, self._on_started = self._on_started, None
            started()
        for slot in self._slots:
            while slot.alive and slot.ready and pending and len(slot.tasks) < self.in_flight:
                shard = pending.popleft()
                attempts[shard.id] += 1
                ref = slot.actor.process.remote(shard.to_task())
                slot.tasks.add(ref)
                self._refs[ref] = _Ref(slot, shard)

    def _lost(self, slot: _Slot, shard: Shard | None, exc: Exception, pending: collections.deque[Shard],
              attempts: collections.Counter[str], on_result: Callable[[Shard, dict[str, Any]], None]) -> None:
        """A replica died: give its shards back (or fail them past max_attempts) and replace it."""
        reason = _last_line(exc)
        if slot.alive:
            slot.alive = False
            if not slot.ready and not any(s.ready for s in self._slots) and "creation task" in str(exc):
                raise ModelError(f"replica {slot.index} failed to start: {reason}") from exc
            logger.warning("replica %d lost: %s", slot.index, reason)
        held = [r for r, e in self._refs.items() if e.slot is slot]
        others = [self._refs.pop(r).shard for r in held]
        slot.tasks.clear()
        lost = [s for s in [shard, *others] if s is not None]
        for item in reversed(lost):
            self._give_back(item, reason, pending, attempts, on_result)
        if self._respawns_left > 0 and (pending or lost):
            self._respawns_left -= 1
            self._spawn()

    def _give_back(self, shard: Shard, reason: str, pending: collections.deque[Shard],
                   attempts: collections.Counter[str], on_result: Callable[[Shard, dict[str, Any]], None]) -> None:
        if attempts[shard.id] < self.max_attempts:
            pending.appendleft(shard)
        else:
            on_result(shard, _failure(shard, attempts, f"replica died on each of {attempts[shard.id]} attempt(s): {reason}"))

    def _check_start(self, begun: float) -> None:
        if not any(s.ready for s in self._slots) and time.monotonic() - begun > self.start_timeout:
            raise ResourceError(
                f"no replica started within {self.start_timeout:.0f} s: each asks for "
                f"{self.resources.num_cpus:g} CPU and {self.resources.num_gpus:g} GPU; other jobs may hold them "
                f"(see `ray status`)"
            )

    def _collect_stats(self) -> list[dict[str, Any]]:
        live = [s for s in self._slots if s.alive and s.ready]
        refs = [s.actor.stats.remote() for s in live]
        try:
            return list(ray.get(refs, timeout=60))
        except (ray.exceptions.GetTimeoutError, *_INFRA_ERRORS) as exc:
            logger.warning("could not collect replica stats: %s", _last_line(exc))
            return []


def _failure(shard: Shard, attempts: collections.Counter[str], error: str) -> dict[str, Any]:
    return {"id": shard.id, "status": "failed", "rows_in": shard.rows_in, "rows_out": 0, "rows_rejected": 0,
            "output": shard.output, "rejected_output": None, "attempts": attempts[shard.id], "error": error}


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
