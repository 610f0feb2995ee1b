"""The driver lane: an embedded CPU run that one replica does as well is done in the driver process, no Ray.

An embedded Ray takes ~5-10 s to start and a replica ~2 s more. So a run that
would start its own embedded Ray with CPU replicas runs its shards on a
`Replica` in the driver process instead when Ray would run a single replica
anyway, whatever its size, and for any model when its work is at most
`LANE_MAX_ROWS` rows (an hourly tick with a few new files, a small job): the
rule and its measurements are in `pipelines.startup` (`lane_resources`).
Each shard is committed exactly as a Ray replica commits it (journal record,
then publish), so resume, exactly-once and `verify` do not depend on which ran
it; the report lists the lane as one replica on node `driver`. Small shards
go to it in bundles as they go to Ray replicas (`pipelines.bundle`): one
thread per bundle, a result per shard. An fp32 model of a run of at most
`LANE_MAX_ROWS` rows runs on numpy there (`workers.cpu_forward`): `import
torch` alone would be most of a small job's time (1.3-1.7 s of ~2 s); a
longer run loads torch while its first shard decodes (6.4M data-bound rows:
4.6 s of CPU on torch against 6.6 s on numpy, the import included).

(A lane running beside Ray's start-up, then handing over, was tried: on a busy
2-core machine it slowed both, and Ray's start took 24 s instead of about 8.)
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pipelines.attempts import STALLED, STORAGE, attempts_error, default_timeout
from pipelines.bundle import take
from basis.errors import StorageError
from pipelines.plan import DEFAULT_SHARD_ROWS, Shard
from workers.replica import Replica, ReplicaJob, State

logger = logging.getLogger(__name__)

LANE_INDEX = -1  # the lane's replica index in results and timelines (Ray replicas count from 0)
LANE_MAX_ROWS = DEFAULT_SHARD_ROWS  # a small job: at most one default shard's worth of rows


def run_in_driver(job: ReplicaJob, shards: Sequence[Shard], on_result: Callable[[Shard, dict[str, Any]], None],
                  *, max_attempts: int, shard_timeout: float | None = None,
                  bundle_rows: int = DEFAULT_SHARD_ROWS, numpy_forward: bool = True) -> list[dict[str, Any]]:
    """Process `shards` in order on a replica in this process; returns the lane's entries for the report.

    Shards run in bundles (`pipelines.bundle`, up to `bundle_rows` rows) on a thread of their
    own while this one keeps each shard's clock, from the moment the shard before it finished:
    a shard not done within `shard_timeout` (default as on Ray: max(600 s, 10 x the slowest
    seconds per row seen x its rows)) costs its replica, as a stalled Ray replica does: the
    replica is abandoned (its thread, stuck in a read, can never commit: `Replica.abandon`) and
    a fresh one retries the shard, up to `max_attempts`; then the shard fails and the lane goes
    on with the next. Storage errors are retried the same way on the same replica. The shards
    of a bundle after the one that stalled or failed start again in the next bundle, never
    charged. An error that is not the shard's (the model does not load here, a bug) fails the
    shard in hand and every shard after it with that error; the run ends with its report.
    Ctrl-C (or SIGTERM) stops the shard in hand before its commit and returns at once.
    `numpy_forward`: an fp32 model runs on numpy (`workers.cpu_forward`), no torch imported; else on torch.

    Example:
        >>> run_in_driver(job, plan.todo, on_result, max_attempts=3)[0]["shards"]  # doctest: +SKIP
        1
    """
    lane = _Lane(job, max_attempts, shard_timeout, numpy_forward)
    pending = collections.deque(shards)
    try:
        while pending:
            error = lane.run(take(pending, rows=bundle_rows), pending, on_result)
            if error:
                lane.ended = f"lost: {error}"
                while pending:
                    rest = pending.popleft()
                    on_result(rest, rest.failed(0, f"replica error: {error}"))
    except BaseException:
        lane.abandon("interrupted")  # a shard still in hand must not commit behind the caller's back
        raise
    finally:
        lane.close()
    return lane.records


class _Lane:
    """The driver's replica, replaced when it stalls; the records of every one that ran."""

    def __init__(self, job: ReplicaJob, max_attempts: int, shard_timeout: float | None,
                 numpy_forward: bool = True) -> None:
        self.job, self.max_attempts, self.shard_timeout = job, max_attempts, shard_timeout
        self.numpy_forward = numpy_forward
        self.replica = Replica(LANE_INDEX, job, in_driver=True, numpy_forward=numpy_forward)
        self.records: list[dict[str, Any]] = []
        self.ended = "finished"
        self._slowest = 0.0  # seconds per row of the slowest committed shard
        self._attempts: collections.Counter[str] = collections.Counter()
        self._kinds: dict[str, list[str]] = collections.defaultdict(list)  # shard id -> kind of each failed attempt

    def timeout(self, shard: Shard) -> float:
        return default_timeout(self.shard_timeout, self._slowest, shard.rows_in)

    def run(self, bundle: list[Shard], pending: collections.deque[Shard],
            on_result: Callable[[Shard, dict[str, Any]], None]) -> str:
        """One bundle on a thread of its own, each shard's result handed to `on_result` as it comes. A shard
        that stalls or meets a storage error ends the bundle: it goes back to the front of `pending` (or
        fails past `max_attempts`), and the shards after it too, uncharged. Returns the error that stops
        the lane ("" when it goes on)."""
        results: queue.SimpleQueue[tuple[dict[str, Any], BaseException | None]] = queue.SimpleQueue()
        replica, tasks = self.replica, [shard.to_task() for shard in bundle]

        def work() -> None:
            try:
                for done in replica.process_bundle(tasks):  # a list per shard
                    for result in done:
                        results.put((result, None))
            except BaseException as exc:  # noqa: BLE001 - handed to the lane
                results.put(({}, exc))

        threading.Thread(target=work, name=f"batch-infer-lane-{bundle[0].id}", daemon=True).start()
        for position, shard in enumerate(bundle):
            self._attempts[shard.id] += 1
            attempts, limit = self._attempts[shard.id], self.timeout(shard)
            try:
                result, error = results.get(timeout=limit)
            except queue.Empty:  # stalled: the replica goes, a fresh one retries the shard
                reason = f"the driver lane held it for more than {limit:g} s (shard_timeout)"
                logger.warning("driver lane stalled on shard %s: no result within the shard timeout of %g s; "
                               "abandoning its replica%s", shard.id, limit,
                               " and retrying the shard" if attempts < self.max_attempts else "")
                self.abandon(f"{STALLED}: {reason}")
                self.replica = Replica(LANE_INDEX, self.job, in_driver=True, numpy_forward=self.numpy_forward,
                                       storage=(self.replica.source, self.replica.output))
                self._again(bundle[position:], pending, on_result, STALLED, reason)
                return ""
            if isinstance(error, StorageError):  # transient storage: retried like on a Ray replica
                logger.warning("driver: storage error on shard %s (attempt %d): %s", shard.id, attempts, error)
                self._again(bundle[position:], pending, on_result, STORAGE, f"{error}")
                return ""
            if error is not None:  # not the shard's fault: the model does not load here, or a bug
                message = f"{type(error).__name__}: {error}"
                logger.error("driver: shard %s: %s", shard.id, message)
                on_result(shard, shard.failed(attempts, f"replica error: {message}"))
                pending.extendleft(reversed(bundle[position + 1:]))
                return message
            if result.get("status") == "committed" and "started" in result and "finished" in result:
                seconds = max(0.0, result["finished"] - result["started"])
                self._slowest = max(self._slowest, seconds / max(1, shard.rows_in))
            result["attempts"] = attempts
            on_result(shard, result)
        return ""

    def _again(self, left: list[Shard], pending: collections.deque[Shard],
               on_result: Callable[[Shard, dict[str, Any]], None], kind: str, reason: str) -> None:
        """`left[0]`'s attempt failed (`kind`): it goes first again, or fails past max_attempts; the shards
        after it in its bundle never started and go back uncharged."""
        shard, attempts = left[0], self._attempts[left[0].id]
        self._kinds[shard.id].append(kind)
        pending.extendleft(reversed(left[1:]))
        if attempts < self.max_attempts:
            pending.appendleft(shard)
        else:
            on_result(shard, shard.failed(attempts, attempts_error(self._kinds[shard.id], attempts, reason)))

    def abandon(self, why: str) -> None:
        """The replica is given up (stalled, or the run interrupted): it never commits again."""
        self.replica.abandon()
        self._record(f"lost: {why}")

    def close(self) -> None:
        if self.replica.state is State.READY:
            self.replica.close()
            self._record(self.ended)

    def _record(self, ended: str) -> None:
        stats = self.replica.stats()
        self.records.append({"node": stats["node"], "device": stats["device"], "gpu_ids": [],
                             "shards": stats["shards"], "rows": stats["rows"],
                             "busy_seconds": stats["busy_seconds"], "peak_rss_bytes": stats["peak_rss_bytes"],
                             "ended": ended})
