"""Bundles: small shards handed to a replica several at a time, for Ray replicas and the driver lane alike.

A file of a hundred rows takes a replica a millisecond or two to read, predict
and commit; a call to a Ray replica, or a thread started for it in the driver
lane, cost about as much again. So shards go out in bundles: the next shard,
then the ones after it in plan order while the bundle holds at most `rows` rows
(the run's `shard_rows`: a call does about a default shard's work) and at most
`most` shards (`BUNDLE_SHARDS`, less near the end of the queue so every replica
gets a share). A shard of `rows` rows or more goes alone.

A bundle changes how shards travel, not how they commit: the replica commits
each shard on its own (its journal record, then its files) and its result
comes back on its own, so exactly-once, retries and attempt counting stay per
shard (`Replica.process_bundle`).

No Ray here: the driver lane runs without it.

    >>> from collections import deque
    >>> pending = deque(_example([100] * 5 + [900, 100, 1000, 100]))
    >>> [[s.rows_in for s in take(pending, rows=1000, most=3)] for _ in range(5)]
    [[100, 100, 100], [100, 100], [900, 100], [1000], [100]]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Sequence

from pipelines.plan import Shard

BUNDLE_SHARDS = 64  # at most this many shards in one call


def take(pending: deque[Shard], *, rows: int, most: int = BUNDLE_SHARDS, alone: Container[str] = ()) -> list[Shard]:
    """The next call's shards, taken from the front of `pending` (which must not be empty). A shard whose
    id is in `alone` goes in a call of its own."""
    bundle = [pending.popleft()]
    total = bundle[0].rows_in
    if bundle[0].id in alone:
        return bundle
    while pending and len(bundle) < most and total + pending[0].rows_in <= rows and pending[0].id not in alone:
        total += pending[0].rows_in
        bundle.append(pending.popleft())
    return bundle


def share(pending: int, calls: int) -> int:
    """Shards per bundle so that `pending` shards still fill `calls` calls (replicas x calls each), at most
    `BUNDLE_SHARDS`: near the end of a run the last shards spread over the replicas.

    >>> share(100_000, 4), share(100, 4), share(3, 4)
    (64, 25, 1)
    """
    return max(1, min(BUNDLE_SHARDS, -(-pending // max(1, calls))))


def _example(rows: Sequence[int]) -> list[Shard]:
    return [Shard(f"f{i}:0-1", f"f{i}", f"f{i}", f"f{i}", "", (0, 1), n, f"f{i}-00000.parquet")
            for i, n in enumerate(rows)]
