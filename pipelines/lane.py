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
thread per bundle, a result per shard. A run of many tiny shards
(`pipelines.startup.lane_processes`) runs on one child replica process per
CPU instead (`pipelines.lane_processes`), each fed by a thread of the driver
with the same clock, retries and records. An fp32 model of a run of at most
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
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pipelines import interrupts
from pipelines.attempts import DIED, STALLED, STORAGE, attempts_error, default_timeout
from pipelines.bundle import BUNDLE_SHARDS, share, take
from pipelines.lane_processes import ProcessReplica, ReplicaDied
from basis.errors import StorageError
from pipelines.plan import DEFAULT_SHARD_ROWS, Shard
from workers.replica import Replica
from workers.replica_job import ReplicaJob, State

logger = logging.getLogger(__name__)

LANE_INDEX = -1  # the lane's replica index in results and timelines (Ray replicas count from 0)
LANE_MAX_ROWS = DEFAULT_SHARD_ROWS  # a small job: at most one default shard's worth of rows


def run_in_driver(job: ReplicaJob, shards: Sequence[Shard], on_result: Callable[[Shard, dict[str, Any]], None],
                  *, max_attempts: int, shard_timeout: float | None = None,
                  bundle_rows: int = DEFAULT_SHARD_ROWS, numpy_forward: bool = True,
                  processes: int = 0) -> list[dict[str, Any]]:
    """Process `shards` on a replica in this process; returns the lane's entries for the report.

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
    `processes` (2 or more): that many replicas, each in a child process (`pipelines.lane_processes`),
    each fed bundles by a thread of this process with the same clock and retries; results are handed
    to `on_result` one at a time (never from two threads at once), each shard's once.

    Example:
        >>> run_in_driver(job, plan.todo, on_result, max_attempts=3)[0]["shards"]  # doctest: +SKIP
        1
    """
    pending = shards if isinstance(shards, collections.deque) else collections.deque(shards)  # a deque: the caller's own
    if processes >= 2:
        return _run_on_processes(job, pending, on_result, max_attempts, shard_timeout, bundle_rows, numpy_forward,
                                 processes)
    lane = _Lane(job, max_attempts, shard_timeout, numpy_forward)
    try:
        _drive(lane, pending, on_result, bundle_rows, lanes=1, stop=[])
    except BaseException:
        lane.abandon("interrupted")  # a shard still in hand must not commit behind the caller's back
        raise
    finally:
        lane.close()
    return lane.records


def _drive(lane: _Lane, pending: collections.deque[Shard], on_result: Callable[[Shard, dict[str, Any]], None],
           bundle_rows: int, *, lanes: int, stop: list[str]) -> None:
    """Bundles from `pending` through `lane` until none is left or a lane met an error that stops them all
    (then every shard left fails with it). A lane of a child process keeps the next bundle queued in its
    child (`_Lane.run`'s `following`)."""
    calls = lanes * (2 if lane.processes else 1)  # bundles out at once: a child's lane queues one more

    def following() -> list[Shard] | None:
        with lane.lock:
            if stop or not pending:
                return None
            return take(pending, rows=bundle_rows, most=share(len(pending), calls) if lanes > 1 else BUNDLE_SHARDS)

    while True:
        interrupts.check()
        bundle, sent = lane.queued, lane.queued is not None  # sent to the child already: run it first
        lane.queued = None
        if bundle is None:
            bundle = following()
            if bundle is None:
                return
        error = lane.run(bundle, pending, on_result, sent=sent, following=following if lane.processes else None)
        if error:
            with lane.lock:
                lane.ended = f"lost: {error}"
                stop.append(error)
                while pending:
                    rest = pending.popleft()
                    on_result(rest, rest.failed(0, f"replica error: {error}"))
            return


def _run_on_processes(job: ReplicaJob, pending: collections.deque[Shard],
                      on_result: Callable[[Shard, dict[str, Any]], None], max_attempts: int,
                      shard_timeout: float | None, bundle_rows: int, numpy_forward: bool,
                      processes: int) -> list[dict[str, Any]]:
    """`run_in_driver` on `processes` child replicas, one feeding thread each (see there)."""
    lock = threading.RLock()  # `pending`, `on_result` and the stop list: one lane at a time
    interrupted = threading.Event()
    stop: list[str] = []

    def one_at_a_time(shard: Shard, result: dict[str, Any]) -> None:
        with lock:
            if not interrupted.is_set():  # after Ctrl-C the caller has moved on: nothing more is recorded
                on_result(shard, result)

    # the children are started from this thread, which outlives them (they die with it: PR_SET_PDEATHSIG)
    lanes: list[_Lane] = []
    for k in range(processes):
        lanes.append(_Lane(job, max_attempts, shard_timeout, numpy_forward, index=LANE_INDEX - k, processes=True,
                           lock=lock, sibling=lanes[0] if lanes else None))
    failures: list[BaseException] = []

    def feed(lane: _Lane) -> None:
        try:
            _drive(lane, pending, one_at_a_time, bundle_rows, lanes=len(lanes), stop=stop)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            failures.append(exc)
            with lock:
                stop.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=feed, args=(lane,), name=f"batch-infer-lane-feed-{k}", daemon=True)
               for k, lane in enumerate(lanes)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)  # short waits: Ctrl-C reaches this thread between them
                interrupts.check()
        if failures:
            raise failures[0]
    except BaseException:
        interrupted.set()
        for lane in lanes:
            lane.abandon("interrupted")  # killed: a shard in hand never commits
        raise
    finally:
        for lane in lanes:
            lane.close()
    return [record for lane in lanes for record in lane.records]


def share_strings(result: dict[str, Any], shard: Shard) -> None:
    """A child's result is unpickled: its entry, which the run keeps until the next checkpoint, would hold
    its own copy of every key (~20) and of its shard's strings. It takes the interned keys and the shard's
    own strings instead (measured: 1.5 KiB of Python objects per entry fewer)."""
    entry = result.get("entry")
    if entry is not None:
        entry = result["entry"] = {sys.intern(key): value for key, value in entry.items()}
    for record in (result, entry) if entry is not None else (result,):
        for key in ("id", "input", "rel", "fingerprint", "output"):
            value = getattr(shard, key)
            if record.get(key) == value:
                record[key] = value


class _Lane:
    """The driver's replica, replaced when it stalls; the records of every one that ran."""

    def __init__(self, job: ReplicaJob, max_attempts: int, shard_timeout: float | None,
                 numpy_forward: bool = True, *, index: int = LANE_INDEX, processes: bool = False,
                 lock: Any = None, sibling: _Lane | None = None) -> None:
        """`sibling`: a lane sharing this one's queue, whose attempt counts this one shares (a shard retried
        on another lane still counts its attempts)."""
        self.job, self.max_attempts, self.shard_timeout = job, max_attempts, shard_timeout
        self.numpy_forward, self.index, self.processes = numpy_forward, index, processes
        self.lock = lock if lock is not None else threading.RLock()  # `pending` is shared with other lanes
        self.replica: Any = self._fresh()
        self.records: list[dict[str, Any]] = []
        self.ended = "finished"
        self._slowest = 0.0  # seconds per row of the slowest committed shard
        self._attempts: collections.Counter[str] = collections.Counter() if sibling is None else sibling._attempts
        # shard id -> kind of each failed attempt
        self._kinds: dict[str, list[str]] = collections.defaultdict(list) if sibling is None else sibling._kinds
        self.queued: list[Shard] | None = None  # a bundle queued in the child behind the one `run` has in hand

    def _fresh(self, before: Any = None) -> Any:
        """A new replica: in this process (taking `before`'s storage clients), or in a child process."""
        if self.processes:
            return ProcessReplica(self.index, self.job, numpy_forward=self.numpy_forward)
        storage = (before.source, before.output) if before is not None else None
        return Replica(self.index, self.job, in_driver=True, numpy_forward=self.numpy_forward, storage=storage)

    def timeout(self, shard: Shard) -> float:
        return default_timeout(self.shard_timeout, self._slowest, shard.rows_in)

    def run(self, bundle: list[Shard], pending: collections.deque[Shard],
            on_result: Callable[[Shard, dict[str, Any]], None], *, sent: bool = False,
            following: Callable[[], list[Shard] | None] | None = None) -> str:
        """One bundle on a thread of its own, each shard's result handed to `on_result` as it comes. A shard
        that stalls, meets a storage error or loses its child process ends the bundle: it goes back to the
        front of `pending` (or fails past `max_attempts`), and the shards after it too, uncharged. Returns
        the error that stops the lane ("" when it goes on).

        A child's lane (`sent`: the bundle is queued in the child already) queues the bundle `following`
        gives behind this one (`queued`, run next), so the child never waits for the driver between two
        bundles. When this one ends early, the child never starts that one (killed, or it drops the bundles
        behind one that raised: `pipelines.lane_processes`) and its shards go back to `pending`, uncharged."""
        results: queue.SimpleQueue[tuple[dict[str, Any], BaseException | None]] = queue.SimpleQueue()
        replica, tasks = self.replica, [] if sent else [shard.to_task() for shard in bundle]
        if self.processes and not sent:
            try:
                replica.wait_ready()  # a child's start (imports) is not its first shard's time
            except ReplicaDied as exc:  # killed while it started: as a dead replica, a fresh one takes the bundle
                self._attempts[bundle[0].id] += 1  # charged, so a child killed at every start cannot loop
                logger.warning("driver lane: %s; a fresh one takes its bundle", exc)
                self._replace(bundle, pending, on_result, DIED, f"{exc}")
                return ""
            except RuntimeError as exc:  # it never started: as a replica error, it ends the lane
                message = f"{type(exc).__name__}: {exc}"
                logger.error("driver: %s", message)
                with self.lock:
                    on_result(bundle[0], bundle[0].failed(0, f"replica error: {message}"))
                    pending.extendleft(reversed(bundle[1:]))
                return message

        after = self.queued = following() if following is not None else None

        def work() -> None:
            try:
                if self.processes:  # send this bundle (unless queued already) and the one after it
                    if not sent:
                        replica.send(tasks)
                    if after is not None:
                        replica.send([shard.to_task() for shard in after])
                    stream = replica.receive()
                else:
                    stream = replica.process_bundle(tasks)
                for done in stream:  # a list per shard
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
                self._replace(bundle[position:], pending, on_result, STALLED, reason)
                return ""
            if isinstance(error, ReplicaDied):  # a child killed: as a dead Ray replica, a fresh one retries
                logger.warning("driver lane: %s; shard %s is retried on a fresh one%s", error, shard.id,
                               "" if attempts < self.max_attempts else " (no: it has had max_attempts)")
                self._replace(bundle[position:], pending, on_result, DIED, f"{error}")
                return ""
            if isinstance(error, StorageError):  # transient storage: retried like on a Ray replica
                logger.warning("driver: storage error on shard %s (attempt %d): %s", shard.id, attempts, error)
                self._give_back_queued(pending)
                self._again(bundle[position:], pending, on_result, STORAGE, f"{error}")
                return ""
            if error is not None:  # not the shard's fault: the model does not load here, or a bug
                message = f"{type(error).__name__}: {error}"
                logger.error("driver: shard %s: %s", shard.id, message)
                on_result(shard, shard.failed(attempts, f"replica error: {message}"))
                self._give_back_queued(pending)
                with self.lock:
                    pending.extendleft(reversed(bundle[position + 1:]))
                return message
            if result.get("status") == "committed" and "started" in result and "finished" in result:
                seconds = max(0.0, result["finished"] - result["started"])
                self._slowest = max(self._slowest, seconds / max(1, shard.rows_in))
            result["attempts"] = attempts
            if self.processes:
                share_strings(result, shard)
            on_result(shard, result)
            self._attempts.pop(shard.id, None)  # done: nothing kept per shard (a retry never comes now)
            self._kinds.pop(shard.id, None)
        return ""

    def _give_back_queued(self, pending: collections.deque[Shard]) -> None:
        """The bundle queued behind the one that ended early never starts (its child was killed, or drops it:
        it raised): its shards go back, uncharged, behind that one's, which the caller puts in front of them."""
        queued, self.queued = self.queued, None
        if queued:
            with self.lock:
                pending.extendleft(reversed(queued))

    def _replace(self, left: list[Shard], pending: collections.deque[Shard],
                 on_result: Callable[[Shard, dict[str, Any]], None], kind: str, reason: str) -> None:
        """The replica is lost (`kind`) with `left[0]` in hand: given up, a fresh one takes its place, and
        the shards go back as `_again` says."""
        self.abandon(f"{kind}: {reason}")
        self._give_back_queued(pending)  # once the child is killed: it can start nothing more
        self.replica = self._fresh(self.replica)
        self._again(left, pending, on_result, kind, reason)

    def _again(self, left: list[Shard], pending: collections.deque[Shard],
               on_result: Callable[[Shard, dict[str, Any]], None], kind: str, reason: str) -> None:
        """`left[0]`'s attempt failed (`kind`): it goes first again, or fails past max_attempts; the shards
        after it in its bundle never started and go back uncharged."""
        shard, attempts = left[0], self._attempts[left[0].id]
        self._kinds[shard.id].append(kind)
        with self.lock:
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
