"""Dispatch: replicas pull shards; results are collected in completion order.

Shards go out in calls of one or more (`pipelines.bundle`: small files are
bundled up to `bundle_rows` rows), and each call streams back its shards'
results as the replica commits them, a list every `REPORT_SECONDS` (a Ray
item per file cost more CPU than a tiny file's work). Each replica holds at
most `in_flight` calls in dispatch order: the oldest is executing (an actor
runs one call at a time, its shards one after another), the others wait
behind it so the replica never waits on the driver. Infrastructure failures
cost only the executing shard an attempt, up to `max_attempts`:

- a replica that dies (actor, worker process or node failure) is replaced;
- a replica that holds its executing shard past the shard timeout is killed
  and replaced (the clock starts when the shard was dispatched to an idle
  replica, or when the shard before it, in its call or the call before,
  finished);
- a `StorageError` raised in `Replica.process` gives the shard back; the
  replica is healthy and stays.

Shards behind the executing one (in its call or in calls queued behind it) go
back to the front of the queue uncharged when the replica is lost or the call
ends in an error. Which shard a lost replica was executing is known when one
shard of its call was left without a result; when several were (their results
not sent yet), none is charged: they go back uncharged, each to run in a call
of its own, where a loss is charged to it. Data errors come back as failed
results, never retried.

The replicas themselves (starting, growing with the cluster, draining,
releasing) are the `ReplicaPool`'s business.

Once a shard has been dispatched the run always returns: when no replica is
left (the pool's loss budget spent) or none can be placed within
`start_timeout`, the shards not done are reported failed and the next run
redoes them. Before that, nothing has been written (`on_started` not yet
called) and the same conditions raise `ResourceError`.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
import ray.exceptions

from pipelines import interrupts
from pipelines.attempts import DIED, STALLED, STORAGE, attempts_error, default_timeout
from pipelines.bundle import share, take
from pipelines.autoscaler import AutoscalerRequest
from pipelines.cluster import ReplicaResources
from basis.errors import ModelError, ResourceError, StorageError
from pipelines.metrics import RunMetrics
from pipelines.plan import DEFAULT_SHARD_ROWS, Shard
from pipelines.pool import Call, ReplicaPool, Slot
from workers.replica import Replica
from workers.replica_job import ReplicaJob

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


OnResult = Callable[[Shard, dict[str, Any]], None]

REPORT_SECONDS = 0.05  # a replica sends the results of its call's shards done so far at most this often


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
        bundle_rows: int = DEFAULT_SHARD_ROWS,
        request: AutoscalerRequest | None = None,
        metrics: RunMetrics | None = None,
        pool: ReplicaPool | None = None,
        _actor: type = Replica,
    ) -> None:
        """`pool`: replicas started while the run planned (`pipelines.startup`), taken over with this job."""
        self.job = job
        self.resources = resources
        self.max_attempts = max_attempts
        self.in_flight = in_flight
        self.start_timeout = start_timeout
        self.shard_timeout = shard_timeout  # None: derived from observed shard times
        self.bundle_rows = bundle_rows  # small shards are bundled into calls of up to this many rows
        self.metrics = metrics if metrics is not None else RunMetrics()  # without one: counted, not exported
        if pool is not None:
            self.pool = pool.adopt(job, resources, request=request, metrics=self.metrics)
        else:
            self.pool = ReplicaPool(job, resources, max_attempts=max_attempts, actor=ray.remote(_actor),
                                    request=request, metrics=self.metrics)
        self._refs: dict[Any, Slot] = {}  # call's ObjectRefGenerator -> replica holding it
        self._pending: collections.deque[Shard] = collections.deque()
        self._attempts: collections.Counter[str] = collections.Counter()
        self._failures: dict[str, list[str]] = collections.defaultdict(list)  # shard id -> kind of each failure
        self._alone: set[str] = set()  # shards of a lost call that may have been executing: each in a call alone
        self._slowest = 0.0  # seconds per row of the slowest committed shard
        self._started = False
        self._on_result: OnResult = lambda shard, record: None

    def run(self, shards: Sequence[Shard], on_result: OnResult,
            on_started: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        """Process every shard; calls `on_result(shard, record)` as each finishes. Returns replica stats.

        `on_started()` is called once, when the first replica is ready and before the first
        shard is dispatched; a `ResourceError` is raised only before that.
        """
        self._pending = shards if isinstance(shards, collections.deque) else collections.deque(shards)
        self._on_result = on_result
        try:
            self.pool.start()
            while self._pending or self._refs:
                interrupts.check()  # a Ctrl-C that Ray's finalizer of a dropped stream swallowed
                self.pool.maintain(queued=len(self._pending))
                self._dispatch(on_started)
                stuck = self._stuck()
                if stuck:
                    self._give_up(stuck)
                    break
                waiting = [*self._refs, *self.pool.probes]
                if not waiting:  # cannot happen while a replica is alive; never spin
                    time.sleep(0.05)
                    continue
                done, _ = ray.wait(waiting, num_returns=1, timeout=self._next_deadline())
                if done:
                    self._collect(done[0])
                self._check_stalls()
            self.pool.close()  # collects the stats of the replicas still up
            return self.pool.records()
        finally:
            self.pool.close()

    def _dispatch(self, on_started: Callable[[], None] | None) -> None:
        ready = self.pool.ready()
        if not ready or not self._pending:
            return
        if not self._started:
            self._started = True
            if on_started is not None:
                on_started()
        now = time.monotonic()
        starting = len(self.pool.starting())
        # The replicas that ran least first (a replica just ready gets a shard before an idle one that
        # ran some); a shard waits behind another on a replica only when no starting replica is left
        # without one, so the pool started no replica for nothing.
        calls = max(1, len(self.pool.alive())) * self.in_flight
        for slot in sorted(ready, key=lambda s: (bool(s.queue), s.shards)):
            while self._pending and len(slot.queue) < (self.in_flight if len(self._pending) > starting else 1):
                shards = take(self._pending, rows=self.bundle_rows, most=share(len(self._pending), calls),
                              alone=self._alone)
                for shard in shards:
                    self._attempts[shard.id] += 1  # refunded if the replica is lost before it starts this shard
                if not slot.queue:
                    slot.since = now
                ref = slot.actor.process_bundle.options(num_returns="streaming").remote(
                    [s.to_task() for s in shards], REPORT_SECONDS)
                slot.queue.append(Call(ref, shards))
                self._refs[ref] = slot

    def _collect(self, ref: Any) -> None:
        if ref in self.pool.probes:
            slot = self.pool.probes.pop(ref)
            try:
                value = ray.get(ref)
            except _INFRA_ERRORS as exc:
                self._lost(slot, DIED, _last_line(exc), exc)
                return
            self.pool.became_ready(slot, value)
            return
        slot = self._refs[ref]
        call = next(c for c in slot.queue if c.ref is ref)
        try:
            values = ray.get(next(ref))
        except StopIteration:  # the call ended short of its shards (never from `Replica.process_bundle`)
            shard = self._finish(slot, call, ended=True)
            self._on_result(shard, shard.failed(self._attempts[shard.id], "replica error: no result came back"))
            return
        except _INFRA_ERRORS as exc:
            self._lost(slot, DIED, _last_line(exc), exc)  # gives back every shard the replica held
            return
        except ray.exceptions.RayTaskError as exc:  # the call ends here; the shards after this one never ran
            cause = getattr(exc, "cause", None)
            shard = self._finish(slot, call, ended=True)
            if isinstance(cause, ModelError):  # validated on the driver, unloadable here: the job stops
                self._abort(shard, f"a replica could not load the model: {_last_line(exc)}")
                return
            if isinstance(cause, StorageError):  # infrastructure: retry; the replica is healthy
                logger.warning("replica %d: storage error on shard %s (attempt %d): %s",
                               slot.index, shard.id, self._attempts[shard.id], _last_line(exc))
                self._retry(shard, STORAGE, _last_line(exc))
                return
            # A bug in the replica code, not a data error (those come back as failed results).
            self._on_result(shard, shard.failed(self._attempts[shard.id], f"replica error: {_last_line(exc)}"))
            return
        for value in values:  # the call's next shards, in order
            shard = self._finish(slot, call)
            if value.get("status") == "committed" and "started" in value and "finished" in value:
                seconds = max(0.0, value["finished"] - value["started"])
                rows = value.get("rows_in", shard.rows_in)  # as read: a lazy shard's planned rows are an estimate
                self._slowest = max(self._slowest, seconds / max(1, rows))
                slot.shards, slot.rows = slot.shards + len(value.get("parts") or (value,)), slot.rows + rows
                slot.busy_seconds += seconds
            value["attempts"] = self._attempts[shard.id]
            self._on_result(shard, value)

    def _finish(self, slot: Slot, call: Call, *, ended: bool = False) -> Shard:
        """The executing shard of `call` is done: the next shard on the replica starts its clock now.

        A call done with its last shard, or `ended` short of it (an error), leaves the replica; the
        shards after an error never ran and go back to the queue uncharged."""
        shard = call.executing
        call.done += 1
        self._alone.discard(shard.id)
        if call is slot.queue[0]:
            slot.since = time.monotonic()
        if ended or call.done == len(call.shards):
            slot.queue.remove(call)
            del self._refs[call.ref]
            self._give_back(call.shards[call.done:])
        return shard

    def _give_back(self, shards: Sequence[Shard]) -> None:
        """Shards a replica never started: to the front of the queue, in order, their attempt refunded."""
        for shard in reversed(shards):
            self._attempts[shard.id] -= 1
            self._pending.appendleft(shard)

    def _check_stalls(self) -> None:
        now = time.monotonic()
        for slot in self.pool.alive():
            if not slot.queue:
                continue
            call = slot.queue[0]
            shard = call.executing
            limit = self._timeout(shard)
            if now - slot.since <= limit:
                continue
            if ray.wait([call.ref], num_returns=1, timeout=0)[0]:
                continue  # it just finished; collected on a next turn
            logger.warning("replica %d stalled on shard %s: no result within the shard timeout of %g s; "
                           "replacing the replica and retrying the shard", slot.index, shard.id, limit)
            self._lost(slot, STALLED, f"replica {slot.index} held it for more than {limit:g} s (shard_timeout)")

    def _timeout(self, shard: Shard) -> float:
        return default_timeout(self.shard_timeout, self._slowest, shard.rows_in)

    def _next_deadline(self) -> float:
        """Seconds to wait for a result: at most 1 s, less when a shard's timeout is nearer."""
        now, wait = time.monotonic(), 1.0
        for slot in self.pool.alive():
            if slot.queue:
                wait = min(wait, slot.since + self._timeout(slot.queue[0].executing) - now)
        return max(0.05, wait)

    def _lost(self, slot: Slot, kind: str, reason: str, exc: Exception | None = None) -> None:
        """A replica died or stalled: give its shards back (the executing one charged); the pool replaces it."""
        if not self.pool.lost(slot, reason, exc):
            return
        if kind == DIED:
            logger.warning("replica %d lost: %s", slot.index, reason)
        held, slot.queue = slot.queue, []
        for call in held:
            self._refs.pop(call.ref, None)
        if not held:
            return
        first = held[0]
        self._give_back([s for call in held[1:] for s in call.shards])  # queued behind its call: never started
        unsure = first.shards[first.done:]
        if len(unsure) == 1:  # it was executing that one
            self._retry(unsure[0], kind, reason)
            return
        # Any of them may have been executing (the ones before it done, their results not sent yet):
        # none is charged; each runs alone next, where a loss is charged to it.
        logger.warning("replica %d was lost with %d shard(s) of its call without a result; each runs in a call "
                       "of its own next", slot.index, len(unsure))
        self._give_back(unsure)
        self._alone.update(s.id for s in unsure)
        self.pool.allowed_losses += 1  # a loss charged to no shard does not count against the replacements

    def _retry(self, shard: Shard, kind: str, reason: str) -> None:
        """An attempt failed for infrastructure reasons: back to the front of the queue, or failed past max_attempts."""
        self._failures[shard.id].append(kind)
        self._alone.discard(shard.id)
        attempts = self._attempts[shard.id]
        if attempts < self.max_attempts:
            self._pending.appendleft(shard)
            self.metrics.shard_retried()
            return
        self._on_result(shard, shard.failed(attempts, attempts_error(self._failures[shard.id], attempts, reason)))

    def _stuck(self) -> str | None:
        """Why no replica can run the remaining shards, or None while one can (or still may)."""
        pool = self.pool
        if not self._pending or pool.ready():
            return None
        if not pool.alive():
            return f"replicas died {pool.losses} time(s) (last: {pool.last_loss})"
        since = pool.waiting_since
        if since is not None and time.monotonic() - since > self.start_timeout:
            shape = " and ".join(f"{v:g} {k}" for k, v in self.resources.shape.items())
            asked = " (asked the autoscaler for them)" if self.resources.autoscaling else ""
            why = (f"no replica became ready within {self.start_timeout:g} s: each asks for {shape}{asked}; "
                   f"other jobs may hold them or no node can be added (see `ray status`)")
            if pool.losses:
                why += f"; replicas died {pool.losses} time(s) (last: {pool.last_loss})"
            return why
        return None

    def _give_up(self, why: str) -> None:
        """Before any shard ran: exit 2, nothing written. After: the shards not done fail; the run returns."""
        if not self._started:
            raise ResourceError(f"no replica could run the job: {why}")
        logger.error("no replica left to run %d shard(s): %s", len(self._pending), why)
        while self._pending:
            shard = self._pending.popleft()
            self._on_result(shard, shard.failed(self._attempts[shard.id], f"no replica left to run it: {why}"))

    def _abort(self, shard: Shard, why: str) -> None:
        """Stop the job after it started: every shard not done fails with `why` (the run exits 1, never 2)."""
        logger.error("stopping: %s", why)
        failed = [shard]
        for slot in self.pool.alive():
            failed += [held for call in slot.queue for held in call.shards[call.done:]]
            slot.queue = []
            self.pool.lost(slot, why)
        self._refs.clear()
        failed += list(self._pending)
        self._pending.clear()
        for item in failed:
            self._on_result(item, item.failed(self._attempts[item.id], why))


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
