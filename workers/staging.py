"""A bundle's tiny shards staged side by side and committed in order (`Replica.process_bundle`).

Staging a shard (read, predict, write its files under hidden temporary names) runs on
a pool's threads, up to `workers` + 1 shards ahead: pyarrow's decoding and encoding and
the file system's calls release the GIL, so a replica with several CPUs keeps them busy
on files of a hundred rows. Committing (the journal record, then the files under their
final names) stays in the caller's thread, one shard after the other in bundle order, so
a shard after one that raised never commits: when the caller stops early, the stagings
still queued are cancelled and those running drop their temporary files when done.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from basis.errors import ShardDataError

Staged = TypeVar("Staged")
_Outcome = tuple[float, contextlib.ExitStack, Any]  # (started, its files, what was staged or the data's error)


def commit_in_order(tasks: list[dict[str, Any]], pool: ThreadPoolExecutor, workers: int,
                    stage: Callable[[dict[str, Any], contextlib.ExitStack], Staged],
                    commit: Callable[[dict[str, Any], float, Staged | str], dict[str, Any]],
                    ) -> Generator[Callable[[], dict[str, Any]], None, None]:
    """Per task, in order, a call that commits it once staged and returns its result.

    `stage(task, files)` enters what it writes in `files` (closing it discards them) and raises
    `ShardDataError` for the shard's own data problem; `commit(task, started, staged)` gets that
    problem's message in place of `staged`. Anything else `stage` raises is raised by the call.
    """

    def run(task: dict[str, Any]) -> _Outcome:
        started = time.time()
        files = contextlib.ExitStack()
        try:
            return started, files, stage(task, files)
        except ShardDataError as exc:
            files.close()
            return started, files, str(exc)
        except BaseException:
            files.close()
            raise

    def discard(future: Future[_Outcome]) -> None:
        if not future.cancelled() and future.exception() is None:
            future.result()[1].close()  # its temporary files go

    queued: collections.deque[tuple[dict[str, Any], Future[_Outcome]]] = collections.deque()
    waiting = iter(tasks)
    try:
        for task in itertools.islice(waiting, workers + 1):
            queued.append((task, pool.submit(run, task)))
        while queued:
            task, future = queued.popleft()
            for more in itertools.islice(waiting, 1):
                queued.append((more, pool.submit(run, more)))

            def call(task: dict[str, Any] = task, future: Future[_Outcome] = future) -> dict[str, Any]:
                started, files, staged = future.result()  # raises what staging raised (not the data's)
                with files:  # published by the commit, else discarded
                    return commit(task, started, staged)

            yield call
    finally:  # ended early (a shard raised, the call was dropped): the stagings left commit nothing
        for _, future in queued:
            future.cancel()
            future.add_done_callback(discard)
