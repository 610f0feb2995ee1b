"""What a shard's attempts may cost, for Ray replicas (`pipelines.schedule`) and the driver lane alike.

No Ray here: the driver lane (`pipelines.lane`) runs without it.

    >>> default_timeout(None, slowest=0.001, rows=1_000_000)
    10000.0
    >>> attempts_error(["replica stalled", "replica stalled"], 2, "held it for more than 60 s")
    'replica stalled on each of 2 attempt(s): held it for more than 60 s'
"""

from __future__ import annotations

from collections.abc import Sequence

# Default shard timeout: max(floor, factor x slowest observed seconds per row x the shard's rows).
# The floor covers a first shard that includes importing torch and loading the model.
TIMEOUT_FLOOR_SECONDS = 600.0
TIMEOUT_FACTOR = 10.0

DIED, STALLED, STORAGE = "replica died", "replica stalled", "storage error"


def default_timeout(shard_timeout: float | None, slowest: float, rows: int) -> float:
    """Seconds a replica may hold a shard of `rows` rows: `shard_timeout` when configured, else
    scaled from the slowest seconds per row seen so far."""
    if shard_timeout is not None:
        return shard_timeout
    return max(TIMEOUT_FLOOR_SECONDS, TIMEOUT_FACTOR * slowest * rows)


def attempts_error(kinds: Sequence[str], attempts: int, reason: str) -> str:
    """The error of a shard whose attempts all failed for infrastructure reasons (`kinds`, one per attempt)."""
    distinct = list(dict.fromkeys(kinds))
    if len(distinct) == 1:
        return f"{distinct[0]} on each of {attempts} attempt(s): {reason}"
    return f"{', '.join(distinct)} over {attempts} attempt(s) (last: {reason})"
