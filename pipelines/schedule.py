"""Dispatch: replicas pull shards; results are collected in completion order.

Each replica holds at most `in_flight` shards in dispatch order: the oldest is
executing (an actor runs one call at a time), the others wait behind it so the
replica never waits on the driver. Infrastructure failures cost only the
executing shard an attempt, up to `max_attempts`:

- a replica that dies (actor, worker process or node failure) is replaced;
- a replica that holds its executing shard past the shard timeout is killed
  and replaced (the clock starts when the shard was dispatched to an idle
  replica, or when the shard before it finished);
- a `StorageError` raised in `Replica.process` gives the shard back; the
  replica is healthy and stays.

Shards queued behind a lost replica's executing shard go back to the front of
the queue uncharged. Data errors come back as failed results, never retried.

Once a shard has been dispatched the run always returns: when no replica is
left (respawn budget spent) or none can be placed within `start_timeout`, the
shards not done are reported failed and the next run redoes them. Before
that, nothing has been written (`on_started` not yet called) and the same
conditions raise `ResourceError`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.exceptions

from pipelines.cluster import ReplicaResources
from pipelines.errors import ModelError, ResourceError, StorageError
from pipelines.metrics import RunMetrics
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
    ray.exceptions.ActorUnschedulableError,
)

# Default shard timeout: max(floor, factor x slowest observed seconds per row x the shard's rows).
# The floor covers a first shard that includes importing torch and loading the model.
TIMEOUT_FLOOR_SECONDS = 600.0
TIMEOUT_FACTOR = 10.0

DIED, STALLED, STORAGE = "replica died", "replica stalled", "storage error"

OnResult = Callable[[Shard, dict[str, Any]], None]


@dataclass
class _Slot:
    index: int
    actor: Any
    ready: bool = False
    alive: bool = True
    queue: list[tuple[Any, Shard]] = field(default_factory=list)  # (ObjectRef, shard), oldest (executing) first
    since: float = 0.0  # monotonic time the executing shard's clock started


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
        metrics: RunMetrics | None = None,
        _actor: type = Replica,
    ) -> None:
        self.job = job
        self.resources = resources
        self.max_attempts = max_attempts
        self.in_flight = in_flight
        self.start_timeout = start_timeout
        self.shard_timeout = shard_timeout  # None: derived from observed shard times
        self._remote = ray.remote(_actor)
        self._slots: list[_Slot] = []
        self._probes: dict[Any, _Slot] = {}  # readiness probe ObjectRef -> replica starting
        self._refs: dict[Any, _Slot] = {}  # shard ObjectRef -> replica holding it
        self._pending: collections.deque[Shard] = collections.deque()
        self._attempts: collections.Counter[str] = collections.Counter()
        self._failures: dict[str, list[str]] = collections.defaultdict(list)  # shard id -> kind of each failure
        self._respawns_left = resources.count * max_attempts
        self._losses = 0
        self._last_loss = ""
        self._slowest = 0.0  # seconds per row of the slowest committed shard
        self._started = False
        self._waiting_since: float | None = None  # since when no replica has been ready
        self._on_result: OnResult = lambda shard, record: None
        self.metrics = metrics if metrics is not None else RunMetrics()  # unstarted: counts, exports nothing

    def run(self, shards: Sequence[Shard], on_result: OnResult,
            on_started: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        """Process every shard; calls `on_result(shard, record)` as each finishes. Returns replica stats.

        `on_started()` is called once, when the first replica is ready and before the first
        shard is dispatched; a `ResourceError` is raised only before that.
        """
        self._pending = collections.deque(shards)
        self._on_result = on_result
        self._waiting_since = time.monotonic()
        try:
            for _ in range(self.resources.count):
                self._spawn()
            while self._pending or self._refs:
                self._dispatch(on_started)
                stuck = self._stuck()
                if stuck:
                    self._give_up(stuck)
                    break
                waiting = [*self._refs, *self._probes]
                if not waiting:  # cannot happen while a replica is alive; never spin
                    time.sleep(0.05)
                    continue
                done, _ = ray.wait(waiting, num_returns=1, timeout=self._next_deadline())
                if done:
                    self._collect(done[0])
                self._check_stalls()
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
        self._probes[actor.info.remote()] = slot
        self.metrics.replica_asked()

    def _dispatch(self, on_started: Callable[[], None] | None) -> None:
        ready = [s for s in self._slots if s.alive and s.ready]
        if not ready or not self._pending:
            return
        if not self._started:
            self._started = True
            if on_started is not None:
                on_started()
        now = time.monotonic()
        for slot in ready:
            while self._pending and len(slot.queue) < self.in_flight:
                shard = self._pending.popleft()
                self._attempts[shard.id] += 1  # refunded if the replica is lost before it starts this shard
                if not slot.queue:
                    slot.since = now
                ref = slot.actor.process.remote(shard.to_task())
                slot.queue.append((ref, shard))
                self._refs[ref] = slot

    def _collect(self, ref: Any) -> None:
        if ref in self._probes:
            slot = self._probes.pop(ref)
            try:
                value = ray.get(ref)
            except _INFRA_ERRORS as exc:
                self._lost(slot, DIED, _last_line(exc), exc)
                return
            slot.ready = True
            self._waiting_since = None
            self.metrics.replica_ready()
            logger.info("replica %d ready on %s (%s)", value["index"], value["host"], value["device"])
            return
        slot = self._refs[ref]
        try:
            value = ray.get(ref)
        except _INFRA_ERRORS as exc:
            self._lost(slot, DIED, _last_line(exc), exc)  # gives back every shard the replica held
            return
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            shard = self._finish(slot, ref)
            if isinstance(cause, ModelError):  # validated on the driver, unloadable here: the job stops
                self._abort(shard, f"a replica could not load the model: {_last_line(exc)}")
                return
            if isinstance(cause, StorageError):  # infrastructure: retry; the replica is healthy
                logger.warning("replica %d: storage error on shard %s (attempt %d): %s",
                               slot.index, shard.id, self._attempts[shard.id], _last_line(exc))
                self._retry(shard, STORAGE, _last_line(exc))
                return
            # A bug in the replica code, not a data error (those come back as failed results).
            self._on_result(shard, _failure(shard, self._attempts[shard.id], f"replica error: {_last_line(exc)}"))
            return
        shard = self._finish(slot, ref)
        if value.get("status") == "committed" and "started" in value and "finished" in value:
            per_row = max(0.0, value["finished"] - value["started"]) / max(1, shard.rows_in)
            self._slowest = max(self._slowest, per_row)
        value["attempts"] = self._attempts[shard.id]
        self._on_result(shard, value)

    def _finish(self, slot: _Slot, ref: Any) -> Shard:
        """The call `ref` returned: the next shard on the replica starts its clock now."""
        del self._refs[ref]
        position = next(i for i, (r, _) in enumerate(slot.queue) if r == ref)
        _, shard = slot.queue.pop(position)
        if position == 0:
            slot.since = time.monotonic()
        return shard

    def _check_stalls(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if not (slot.alive and slot.queue):
                continue
            ref, shard = slot.queue[0]
            limit = self._timeout(shard)
            if now - slot.since <= limit:
                continue
            if ray.wait([ref], num_returns=1, timeout=0)[0]:
                continue  # it just finished; collected on a next turn
            logger.warning("replica %d stalled on shard %s: no result within the shard timeout of %g s; "
                           "replacing the replica and retrying the shard", slot.index, shard.id, limit)
            self._lost(slot, STALLED, f"replica {slot.index} held it for more than {limit:g} s (shard_timeout)")

    def _timeout(self, shard: Shard) -> float:
        if self.shard_timeout is not None:
            return self.shard_timeout
        return max(TIMEOUT_FLOOR_SECONDS, TIMEOUT_FACTOR * self._slowest * shard.rows_in)

    def _next_deadline(self) -> float:
        """Seconds to wait for a result: at most 1 s, less when a shard's timeout is nearer."""
        now, wait = time.monotonic(), 1.0
        for slot in self._slots:
            if slot.alive and slot.queue:
                wait = min(wait, slot.since + self._timeout(slot.queue[0][1]) - now)
        return max(0.05, wait)

    def _lost(self, slot: _Slot, kind: str, reason: str, exc: Exception | None = None) -> None:
        """A replica died or stalled: kill it, give its shards back (the executing one charged), replace it."""
        if not slot.alive:
            return
        slot.alive = False
        self.metrics.replica_lost(slot.ready)
        with contextlib.suppress(Exception):  # frees its resources for the replacement; fine if already dead
            ray.kill(slot.actor, no_restart=True)
        if exc is not None and not slot.ready and not any(s.ready for s in self._slots) and "creation task" in str(exc):
            raise ModelError(f"replica {slot.index} failed to start: {reason}") from exc
        if kind == DIED:
            logger.warning("replica %d lost: %s", slot.index, reason)
        self._losses += 1
        self._last_loss = f"replica {slot.index}: {reason}"
        for probe in [r for r, s in self._probes.items() if s is slot]:
            del self._probes[probe]
        held, slot.queue = slot.queue, []
        for ref, _ in held:
            self._refs.pop(ref, None)
        for ref, shard in reversed(held[1:]):  # queued behind the executing shard: never started
            self._attempts[shard.id] -= 1
            self._pending.appendleft(shard)
        if held:
            self._retry(held[0][1], kind, reason)
        if self._respawns_left > 0 and self._pending:
            self._respawns_left -= 1
            self._spawn()

    def _retry(self, shard: Shard, kind: str, reason: str) -> None:
        """An attempt failed for infrastructure reasons: back to the front of the queue, or failed past max_attempts."""
        self._failures[shard.id].append(kind)
        attempts = self._attempts[shard.id]
        if attempts < self.max_attempts:
            self._pending.appendleft(shard)
            self.metrics.shard_retried()
            return
        kinds = list(dict.fromkeys(self._failures[shard.id]))
        if len(kinds) == 1:
            error = f"{kinds[0]} on each of {attempts} attempt(s): {reason}"
        else:
            error = f"{', '.join(kinds)} over {attempts} attempt(s) (last: {reason})"
        self._on_result(shard, _failure(shard, attempts, error))

    def _stuck(self) -> str | None:
        """Why no replica can run the remaining shards, or None while one can (or still may)."""
        if not self._pending or any(s.alive and s.ready for s in self._slots):
            return None
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
        if not any(s.alive for s in self._slots):
            return f"replicas died {self._losses} time(s) (last: {self._last_loss})"
        if now - self._waiting_since > self.start_timeout:
            why = (f"no replica became ready within {self.start_timeout:g} s: each asks for "
                   f"{self.resources.num_cpus:g} CPU and {self.resources.num_gpus:g} GPU; other jobs may hold them "
                   f"(see `ray status`)")
            if self._losses:
                why += f"; replicas died {self._losses} time(s) (last: {self._last_loss})"
            return why
        return None

    def _give_up(self, why: str) -> None:
        """Before any shard ran: exit 2, nothing written. After: the shards not done fail; the run returns."""
        if not self._started:
            raise ResourceError(f"no replica could run the job: {why}")
        logger.error("no replica left to run %d shard(s): %s", len(self._pending), why)
        while self._pending:
            shard = self._pending.popleft()
            self._on_result(shard, _failure(shard, self._attempts[shard.id], f"no replica left to run it: {why}"))

    def _abort(self, shard: Shard, why: str) -> None:
        """Stop the job after it started: every shard not done fails with `why` (the run exits 1, never 2)."""
        logger.error("stopping: %s", why)
        failed = [shard]
        for slot in self._slots:
            failed += [held for _, held in slot.queue]
            slot.queue = []
            if slot.alive:
                slot.alive = False
                with contextlib.suppress(Exception):
                    ray.kill(slot.actor, no_restart=True)
        self._refs.clear()
        self._probes.clear()
        failed += list(self._pending)
        self._pending.clear()
        for item in failed:
            self._on_result(item, _failure(item, self._attempts[item.id], why))

    def _collect_stats(self) -> list[dict[str, Any]]:
        live = [s for s in self._slots if s.alive and s.ready]
        refs = [s.actor.stats.remote() for s in live]
        try:
            return list(ray.get(refs, timeout=60))
        except (ray.exceptions.GetTimeoutError, *_INFRA_ERRORS) as exc:
            logger.warning("could not collect replica stats: %s", _last_line(exc))
            return []


def _failure(shard: Shard, attempts: int, error: str) -> dict[str, Any]:
    return {"id": shard.id, "status": "failed", "rows_in": shard.rows_in, "rows_out": 0, "rows_rejected": 0,
            "output": shard.output, "rejected_output": None, "attempts": attempts, "error": error}


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
