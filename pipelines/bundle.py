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
from collections.abc import Container, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipelines.plan import Shard

if TYPE_CHECKING:
    from pipelines.shards import Shards

BUNDLE_SHARDS = 64  # at most this many shards in one call
_MAKE = 512  # a `ShardQueue` makes this many `Shard`s at a time


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


class ShardQueue(deque[Shard]):
    """The shards to run, a deque as `take`, the lane and the scheduler use one (`popleft`, `[0]`,
    `appendleft`/`extendleft` for a shard put back, `len`, truth, iteration), holding the plan's
    `indices` into its columnar `shards` rather than a `Shard` per shard: the front's `Shard`s are made
    `_MAKE` at a time as they are taken (100,000 tiny files: ~60 MiB of `Shard`s no longer held for the
    whole run). A shard put back goes in front, the very object; a lazy shard is made with its place in
    the plan (`Shard.at`), so `Shards.resolve` finds it.

        >>> from pipelines.shards import Shards
        >>> plan = Shards.of(_example([100] * 5 + [900, 100, 1000, 100]))
        >>> pending = ShardQueue(plan, np.arange(1, 9))
        >>> len(pending), pending.rows
        (8, 2500)
        >>> [[s.rows_in for s in take(pending, rows=1000, most=3)] for _ in range(2)]
        [[100, 100, 100], [100, 900]]
        >>> pending.appendleft(plan[1]); [s.id for s in pending]
        ['f1:0-1', 'f6:0-1', 'f7:0-1', 'f8:0-1']
    """

    def __init__(self, shards: Shards, indices: np.ndarray) -> None:
        super().__init__()
        self._shards = shards
        self._rest = np.asarray(indices, np.int64)  # the plan's shards not made yet, from `_next` on
        self._next = 0

    def _fill(self) -> None:
        if not super().__len__() and self._next < len(self._rest):
            batch = self._rest[self._next:self._next + _MAKE]
            self._next += len(batch)
            super().extend(self._shards.objects(batch, keep=False))

    def __len__(self) -> int:
        return super().__len__() + len(self._rest) - self._next

    def __bool__(self) -> bool:
        return len(self) > 0

    def popleft(self) -> Shard:
        self._fill()
        return super().popleft()

    def __getitem__(self, index: int) -> Shard:  # type: ignore[override]
        if index != 0:
            raise IndexError("a ShardQueue gives only its front shard, [0]")
        self._fill()
        return super().__getitem__(0)

    def __iter__(self) -> Iterator[Shard]:
        yield from list(super().__iter__())
        for start in range(self._next, len(self._rest), _MAKE):
            yield from self._shards.objects(self._rest[start:start + _MAKE], keep=False)

    def clear(self) -> None:
        super().clear()
        self._next = len(self._rest)

    @property
    def rows(self) -> int:
        """The rows of the shards left (a lazy shard's estimated)."""
        return int(self._shards.rows[self._rest[self._next:]].sum()) + sum(s.rows_in for s in super().__iter__())


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
