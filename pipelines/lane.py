"""The driver lane: a small embedded run is done in the driver process, without starting Ray.

An embedded Ray takes ~5 s to start and a replica ~2 s more, while a job of a
hundred thousand rows takes a fraction of a second. So a run that would start
its own embedded Ray with CPU replicas, and whose work is at most
`LANE_MAX_ROWS` rows (an hourly tick with a few new files, a small job), runs
its shards one after another on a `Replica` in the driver process instead.
Each shard is committed exactly as a Ray replica commits it (journal record,
then publish), so resume, exactly-once and `verify` do not depend on which ran
it; the report lists the lane as one replica on node `driver`. An fp32 model
runs on numpy there (`workers.cpu_forward`): `import torch` alone would be
most of a small job's time (1.3-1.7 s of ~2 s).

Longer runs start Ray as before. (A lane running beside Ray's start-up, then
handing over, was tried: on a busy 2-core machine it slowed both, and Ray's
start took 24 s instead of about 8.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from pipelines.errors import StorageError
from pipelines.plan import DEFAULT_SHARD_ROWS, Shard
from workers.replica import Replica, ReplicaJob

logger = logging.getLogger(__name__)

LANE_INDEX = -1  # the lane's replica index in results and timelines (Ray replicas count from 0)
LANE_MAX_ROWS = DEFAULT_SHARD_ROWS  # at most one default shard's worth of rows


def run_in_driver(job: ReplicaJob, shards: Sequence[Shard], on_result: Callable[[Shard, dict[str, Any]], None],
                  *, max_attempts: int) -> dict[str, Any]:
    """Process `shards` in order on a replica in this process; returns the lane's entry for the report.

    Storage errors are retried up to `max_attempts` like on a Ray replica. An
    error that is not the shard's (the model does not load here, a bug) fails
    the shard in hand and every shard after it with that error; the run ends
    with its report. Ctrl-C stops the shard in hand before its commit.

    Example:
        >>> run_in_driver(job, plan.todo, on_result, max_attempts=3)["shards"]  # doctest: +SKIP
        1
    """
    replica = Replica(LANE_INDEX, job, in_driver=True, numpy_forward=True)
    ended = "finished"
    try:
        for position, shard in enumerate(shards):
            result, error = _process(replica, shard, max_attempts)
            on_result(shard, result)
            if error:
                ended = f"lost: {error}"
                for rest in shards[position + 1:]:
                    on_result(rest, rest.failed(0, f"replica error: {error}"))
                break
    finally:
        replica.close()
    stats = replica.stats()
    return {"node": stats["node"], "device": stats["device"], "gpu_ids": [], "shards": stats["shards"],
            "rows": stats["rows"], "busy_seconds": stats["busy_seconds"], "peak_rss_bytes": stats["peak_rss_bytes"],
            "ended": ended}


def _process(replica: Replica, shard: Shard, max_attempts: int) -> tuple[dict[str, Any], str]:
    """One shard's result, and the error that stops the lane ("" when it goes on)."""
    attempts = 0
    while True:
        attempts += 1
        try:
            result = replica.process(shard.to_task())
        except StorageError as exc:  # transient storage: retried like on a Ray replica
            logger.warning("driver: storage error on shard %s (attempt %d): %s", shard.id, attempts, exc)
            if attempts < max_attempts:
                continue
            return shard.failed(attempts, f"storage error: {exc}"), ""
        except Exception as exc:  # not the shard's fault: the model does not load here, or a bug
            error = f"{type(exc).__name__}: {exc}"
            logger.error("driver: shard %s: %s", shard.id, error)
            return shard.failed(attempts, f"replica error: {error}"), error
        result["attempts"] = attempts
        return result, ""
