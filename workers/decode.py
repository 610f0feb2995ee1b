"""A shard's batches decoded, stacked, checked (and predicted) on several threads, handed out in order.

The reading itself (row groups -> record batches, retries) is `workers.reader`;
this is the threads around it: each decodes its own row groups, stacks the
feature columns into pooled buffers, finds invalid rows, runs the CPU forward
pass when given one, and helps another thread with its batches once its own
row groups are done (`workers.handoff`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import workers.reader as reader
from basis.retry import retry_transient
from workers.handoff import Offers, Slot
from workers.plain_pages import Plan, plain_columns
from workers.reader import Batch, ParquetSource, _decoded_bytes, _leaf_types, _leaves, iter_batches
from workers.stacking import Spares, bad_rows, stack_checked
from workers.threads import Call, start as start_thread

_ROW_GROUP_DONE = object()  # a decoding thread's marker: one row group's batches end here


class _Buffers:
    """The (width, batch_size) stacking buffers of a shard's decoding threads.

    Each thread has `own` buffers only it takes and a shared reserve all may borrow;
    a buffer goes back to where it came from. The consumer takes row groups in file
    order and hands each batch's buffer back before it takes the next batch, so when it
    waits on a thread, none of that thread's buffers is out and its own are free: the
    thread it waits on can always stack its next batch, whatever the other threads hold.
    (One pool shared by all deadlocked: with 5+ threads and row groups of 3+ batches,
    the threads the consumer did not wait on held every buffer.) Buffers are made on
    first use, so a short shard never allocates them all.
    """

    def __init__(self, shape: tuple[int, int], threads: int, own: int, shared: int, stop: threading.Event | _Flag,
                 spares: Spares | None = None, *, inline: bool = False) -> None:
        self.shape, self.own, self.shared = shape, own, shared
        self._stop = stop
        self._spares = spares
        # inline (a tiny shard decoded in its caller's thread): one thread takes and gives, never waits
        self._ready: threading.Condition | _Alone = _Alone() if inline else threading.Condition()
        self._free: list[list[np.ndarray]] = [[] for _ in range(threads + 1)]  # per thread; the last: shared
        self._made = [0] * (threads + 1)

    def take(self, thread: int, *, wait: bool = True) -> tuple[np.ndarray, int] | None:
        """A free buffer for `thread` and where it goes back (its own first); None once stopped, or
        (`wait` False) when none is free now."""
        with self._ready:
            while not self._stop.is_set():
                for home, limit in ((thread, self.own), (len(self._free) - 1, self.shared)):
                    if self._free[home]:
                        return self._free[home].pop(), home
                    if self._made[home] < limit:
                        self._made[home] += 1
                        spare = None if self._spares is None else self._spares.take(self.shape)
                        return (np.empty(self.shape, dtype=np.float32) if spare is None else spare), home
                if not wait:
                    return None
                self._ready.wait(0.1)
        return None

    def give(self, buffer: np.ndarray, home: int) -> None:
        with self._ready:
            self._free[home].append(buffer)
            self._ready.notify_all()

    def wake(self) -> None:
        with self._ready:
            self._ready.notify_all()

    def retire(self) -> None:
        """The shard is done (its threads joined): the free buffers go to the spares for the next one."""
        if self._spares is not None:
            with self._ready:
                free = [buffer for home in self._free for buffer in home]
                for home in self._free:
                    home.clear()
            self._spares.keep(free)


@dataclass
class Decoded:
    """One batch, decoded and stacked: its data, its (rows, width) feature matrix and bad-row mask,
    and what `decode`'s `predict` made of them in the decoding thread (None without one). Once
    predicted with no bad row, the matrix is not kept (None): its buffer went back at once."""

    batch: Batch
    matrix: np.ndarray | None
    bad: np.ndarray | None
    predicted: Any = None
    _buffer: np.ndarray | None = None
    _pool: _Buffers | None = None
    _home: int = 0

    def release(self) -> None:
        """The matrix is consumed (the forward pass has it): its buffer goes back to the pool."""
        if self._buffer is not None and self._pool is not None:
            self._pool.give(self._buffer, self._home)
            self._buffer = None


class _Flag:
    """`threading.Event`'s `set`/`is_set` for a decode used by one thread only (inline: a tiny shard)."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class _Alone:
    """`threading.Condition` for one thread, which never waits on it (`_Buffers` of an inline decode)."""

    def __enter__(self) -> _Alone:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def notify_all(self) -> None:
        return None

    def wait(self, timeout: float | None = None) -> bool:
        raise RuntimeError("an inline decode waited for a buffer: none is ever out when it takes one")


class decode:  # noqa: N801 - used like a generator function
    """A shard's batches decoded, stacked and checked on `threads` threads, handed out in order.

    Row groups are dealt round-robin to the threads, each with its own file handle;
    each thread decodes its row group's batches (pyarrow releases the GIL), stacks
    the feature columns into a pooled (width, batch_size) buffer and finds invalid
    rows in the same pass (`workers.stacking.stack_checked`), up to `depth` batches ahead. The consumer
    takes row group after row group in file order; an item's matrix is valid until its `release()` or until the next item
    is taken (which releases it). Memory is bounded by the stacking buffers (threads x
    depth + 2, see `_Buffers`: no arrangement of them can deadlock) and by
    `DECODE_BUDGET_BYTES` of decoded row groups, whatever the shard's size. With one
    thread this is the old prefetch: decoding a batch ahead of the forward pass.
    `inline` (only for a shard of about one batch: a tiny file) decodes it all in the
    caller's thread instead: starting a thread cost more than such a shard's decoding.
    `spares` (a replica's `Spares`) lends it the stacking buffers an earlier shard left, and takes
    them back at `close()`. Always `close()` it (or use `with`).

    `predict(matrix, bad)`, when given, runs in the decoding thread right after the check
    and its return value is the item's `predicted` (the replica's CPU forward pass, so the
    threads run it side by side instead of queueing it for the one consumer). A batch so
    predicted, with no bad row, gives its stacking buffer back at once (its item keeps no
    matrix), and a thread may then queue a whole row group's batches (`depth` at least the
    batches of the shard's largest row group): with 2 batches, a thread whose row group the
    consumer had not reached yet stopped after 2 of its 4, idle while the consumer was still
    on the other thread's (250,000-row row groups of 65,536-row batches, the data-bound job:
    its steady state went from 0.235 to 0.201 wall and 0.363 to 0.330 CPU seconds per million rows).
    With `predict` and 2+ threads, a row group read whole is offered batch by batch (`workers.handoff`):
    a thread with no row group of its own left stacks and predicts batches of another's (a shard's last
    row group was one thread's alone while the other waited), taking one only with a buffer free at once;
    its owner queues every batch's slot in order, so the order and the buffer guarantees are unchanged.
    `stack_only` (the features are written nowhere, only predicted): a file's flat float32 feature
    columns are decoded from their PLAIN pages straight into a row group's matrix (`workers.plain_pages`),
    whose batches are then views of it with no stacking buffer; a row group it cannot decode goes to pyarrow.

    Example:
        >>> with decode(parquet, (0, 4), cols, 65536, uri, features=f, list_column=False, width=64,
        ...             check_invalid=True, threads=2) as batches:  # doctest: +SKIP
        ...     for item in batches:
        ...         handle = forward.submit(item.matrix); item.release()
    """

    def __init__(self, parquet: pq.ParquetFile, row_groups: tuple[int, int], columns: Sequence[str],
                 batch_size: int, uri: str, *, features: Sequence[str], list_column: bool, width: int,
                 check_invalid: bool, threads: int = 1, depth: int = 2, deleted: np.ndarray | None = None,
                 inline: bool = False,
                 predict: Callable[[np.ndarray, np.ndarray | None], Any] | None = None,
                 spares: Spares | None = None, stack_only: bool = False) -> None:
        self.row_groups = row_groups
        # inline: one thread does all (no Event's Condition and lock made per tiny file, ~2-3 us)
        self._stop: threading.Event | _Flag = _Flag() if inline else threading.Event()
        count = max(1, min(threads, row_groups[1] - row_groups[0]))
        self._inline: Callable[[], None] | None = None
        self._tiny = inline and not list_column  # stacked by `_tensor` (see there)
        if inline:  # a tiny shard: decoded whole in the caller's thread on the first `next`; no thread started
            count, depth = 1, 1 << 20  # the queue and the buffers take all its batches (made on first use)
        if count > 1 and not isinstance(parquet, ParquetSource):
            count = 1  # a plain ParquetFile cannot open a second handle
        elif predict is not None and not inline:  # predicted items hold no buffer: a whole row group may wait
            meta = parquet.metadata
            largest = max((meta.row_group(i).num_rows for i in range(*row_groups)), default=0)
            depth = max(depth, -(-largest // batch_size))
        # Two buffers of its own per thread (one stacking while the consumer has the other), the rest of
        # threads x depth + 2 shared; a deeper queue than the buffers allows just fills with borrowed ones.
        own = 2
        if inline:  # a buffer of its rows, not of batch_size: 8 MiB made and handed back (madvise) per tiny file
            meta = parquet.metadata
            batch_size = min(batch_size, max(1, sum(meta.row_group(i).num_rows for i in range(*row_groups))))
        self._pool = _Buffers((width, batch_size), count, own, max(0, count * depth + 2 - own * count), self._stop,
                              None if inline else spares, inline=inline)
        # predicted batches of a row group read whole may be taken by a thread with none of its own left
        self._offers = Offers(count) if predict is not None and not inline and count > 1 else None
        # with offers, room for a row group's end marker too: a thread whose whole last row group waits in
        # its queue gets on to help the others instead of waiting to queue the marker (it holds no buffer)
        self._queues: list[queue.Queue[object]] = ([_InlineQueue()] if inline else  # type: ignore[list-item]
                                                   [queue.Queue(maxsize=depth + (self._offers is not None))
                                                    for _ in range(count)])
        self._threads: list[Call] = []
        # once per shard, not per row group; an inline shard's row groups (at most a batch each, so one batch
        # whether read whole or streamed) are read whole without sizing them: no leaves, 0 bytes
        leaves = [] if inline else _leaves(parquet.metadata, columns)
        types = [] if inline else _leaf_types(parquet)
        # features needed only stacked, of a file of flat float32 columns: decoded straight into their matrix
        plan = None
        if stack_only and not inline and not list_column and isinstance(parquet, ParquetSource):
            plan = plain_columns(parquet.metadata, parquet.schema_arrow, features, check=check_invalid)
        self._feature_fields = [] if plan is None else [parquet.schema_arrow.field(name) for name in features]
        for k in range(count):
            handle = parquet if k == 0 else _second_handle(parquet)
            mine = range(row_groups[0] + k, row_groups[1], count)
            args = (k, handle, mine, self._queues[k], columns, batch_size, uri, features, list_column, width,
                    check_invalid, count == 1 and threads >= 2, reader.DECODE_BUDGET_BYTES // (2 * count), leaves,
                    types, deleted, predict, plan)
            if inline:
                self._inline = functools.partial(self._produce, *args)  # run by the first `next`, in its thread
                continue
            # a reused thread (workers.threads): its allocator's memory stays warm from shard to shard
            self._threads.append(start_thread("decode", self._produce, *args))

    def _produce(self, k: int, parquet: pq.ParquetFile, mine: range, out: queue.Queue[object], columns: Sequence[str],
                 batch_size: int, uri: str, features: Sequence[str], list_column: bool, width: int,
                 check_invalid: bool, use_threads: bool, whole_bytes: int, leaves: list[int],
                 types: list[tuple[pa.DataType, int] | None], deleted: np.ndarray | None,
                 predict: Callable[[np.ndarray, np.ndarray | None], Any] | None, plan: Plan | None) -> None:
        offers, done = self._offers, False
        try:
            for rg in mine:
                batches: Iterable[Batch | Slot[Decoded]] = iter_batches(
                    parquet, (rg, rg + 1), columns, batch_size, uri, use_threads=use_threads,
                    whole_bytes=whole_bytes, leaves=leaves, types=types, deleted=deleted, plain=plan)
                if offers is not None and _decoded_bytes(parquet.metadata.row_group(rg), leaves, types) <= whole_bytes:
                    slots = [Slot[Decoded](batch) for batch in batches]  # read whole: its batches are slices of it
                    offers.offer(k, slots)
                    batches = slots
                for batch in batches:
                    if isinstance(batch, Slot):  # queued in order; stacked here unless a thread took it meanwhile
                        slot = batch
                        if not self._put(out, slot):
                            return
                        if not offers.claim(k, slot):  # type: ignore[union-attr]
                            continue
                        try:
                            direct = list_column or slot.batch.stacked is not None  # no buffer to stack into
                            taken = None if direct else self._pool.take(k)
                            if taken is None and not direct:
                                return  # stopped
                            slot.fill(self._stack(slot.batch, taken, features, list_column, width, check_invalid,
                                                  predict))
                        except BaseException as exc:
                            slot.fail(exc)
                            raise
                        continue
                    if self._tiny:  # a tiny shard: one batch, stacked by Arrow in one call when it can
                        stacked = _tensor(batch.data, features, check_invalid)
                        if stacked is not None:
                            matrix, bad = stacked
                            predicted = None if predict is None else predict(matrix, bad)
                            if not self._put(out, Decoded(batch, matrix, bad, predicted)):
                                return
                            continue
                    taken = None
                    if not list_column and batch.stacked is None:
                        taken = self._pool.take(k)
                        if taken is None:
                            return  # stopped
                    if not self._put(out, self._stack(batch, taken, features, list_column, width, check_invalid,
                                                      predict)):
                        return
                if not self._put(out, _ROW_GROUP_DONE):
                    return
            if offers is not None:
                offers.done(k)
                done = True
                self._steal(k, offers, features, list_column, width, check_invalid, predict)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(out, exc)
        finally:
            if offers is not None and not done:
                offers.done(k)
            if k > 0 and isinstance(parquet, ParquetSource):  # a second handle, opened for this thread
                with contextlib.suppress(Exception):
                    parquet.handle.close()

    def _stack(self, batch: Batch, taken: tuple[np.ndarray | None, int] | None, features: Sequence[str],
               list_column: bool, width: int, check_invalid: bool,
               predict: Callable[[np.ndarray, np.ndarray | None], Any] | None) -> Decoded:
        """One batch stacked into the `taken` buffer (none for a list column), checked and predicted."""
        if batch.stacked is not None:
            return self._stacked(batch, batch.stacked, taken, check_invalid, predict)
        buffer, home = (None, 0) if taken is None else taken
        view = None if buffer is None else buffer[:, : batch.data.num_rows]
        matrix, bad = stack_checked(batch.data, features, list_column, width, view, check=check_invalid)
        predicted = None if predict is None else predict(matrix, bad)
        if predicted is not None and bad is None and buffer is not None:
            self._pool.give(buffer, home)  # consumed by the forward pass: nothing reads it again
            buffer, matrix = None, None
        return Decoded(batch, matrix, bad, predicted, buffer, self._pool, home)

    def _stacked(self, batch: Batch, stacked: np.ndarray, taken: tuple[np.ndarray | None, int] | None,
                 check_invalid: bool, predict: Callable[[np.ndarray, np.ndarray | None], Any] | None) -> Decoded:
        """A batch whose features came stacked from their pages (`workers.plain_pages`): checked from its
        row sums and predicted. A row it rejects gets its features back in the batch's data (the rejected
        rows' file holds them): float32 values without a null, so the matrix holds them exactly."""
        if taken is not None and taken[0] is not None:  # a buffer a helping thread took before it saw the batch
            self._pool.give(taken[0], taken[1])
        matrix = stacked.T  # (rows, width), column-major view
        bad = bad_rows(matrix, batch.sums) if check_invalid and batch.sums is not None else None
        if bad is not None:
            schema = pa.schema([*batch.data.schema, *self._feature_fields])
            data = pa.RecordBatch.from_arrays([*batch.data.columns, *map(pa.array, stacked)], schema=schema)
            batch = dataclasses.replace(batch, data=data)
        predicted = None if predict is None else predict(matrix, bad)
        return Decoded(batch, None if predicted is not None and bad is None else matrix, bad, predicted)

    def _steal(self, k: int, offers: Offers, features: Sequence[str], list_column: bool, width: int,
               check_invalid: bool, predict: Callable[[np.ndarray, np.ndarray | None], Any] | None) -> None:
        """Thread `k` has no row group left: it stacks and predicts other threads' offered batches until all
        are done. It takes one only with a buffer free at once (`_Buffers.take(wait=False)`), never waiting
        while it holds a slot; the slot's owner queued it in order, so the consumer's order is unchanged."""
        def ready() -> tuple[np.ndarray | None, int] | None:
            return (None, 0) if list_column else self._pool.take(k, wait=False)

        while (got := offers.steal(k, ready, self._stop)) is not None:
            slot, taken = got
            try:
                slot.fill(self._stack(slot.batch, taken, features, list_column, width, check_invalid, predict))
            except BaseException as exc:  # raised by the consumer when it reaches this batch
                slot.fail(exc)
                return

    def _put(self, out: queue.Queue[object], item: object) -> bool:
        while not self._stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Decoded]:
        if self._inline is not None:
            self._inline()  # `_produce` here, to its end
            self._inline = None
        previous: Decoded | None = None
        for index in range(self.row_groups[1] - self.row_groups[0]):
            source = self._queues[index % len(self._queues)]
            while True:
                if previous is not None:  # its buffer goes back before we wait on the next (see _Buffers)
                    previous.release()
                    previous = None
                item = source.get()
                if item is _ROW_GROUP_DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Slot):  # a row group read whole: filled by its owner or a thread helping it
                    item = item.wait(self._stop)
                previous = item  # type: ignore[assignment]
                yield item  # type: ignore[misc]

    def close(self) -> None:
        if self._tiny:  # no thread, nothing waits: only its buffers (if it made any) to hand back
            self._pool.retire()
            return
        self._stop.set()
        self._pool.wake()
        for thread in self._threads:
            thread.join()
        self._pool.retire()

    def __enter__(self) -> decode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _InlineQueue(collections.deque):  # type: ignore[type-arg]
    """A tiny shard's queue: filled whole and then emptied by the same thread (`decode` inline), so none
    of `queue.Queue`'s locks and conditions (~10 us a file); never full, never waited on."""

    def put(self, item: object, timeout: float | None = None) -> None:
        self.append(item)

    def get(self) -> object:
        return self.popleft()


def _tensor(data: pa.RecordBatch, features: Sequence[str], check: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A tiny batch's (rows, width) float32 feature matrix and bad-row mask (as `stack_checked`), stacked by
    Arrow in one call (`RecordBatch.to_tensor`: ~10 us against ~30 us a column at a time for 8 columns of
    100 rows); None when Arrow cannot, or stacks to another type than float32 (a float64 or int32 column:
    its values are then converted by `stack_checked`, rounding each once, as for any other shard).

    Columns that stack to float32 hold float32 values or small integers (float16, int8/16, uint8/16),
    converted exactly either way; nulls become NaN (invalid rows), as `stack_checked` makes them.
    """
    try:
        matrix = np.asarray(data.select(features).to_tensor(null_to_nan=True, row_major=False))
    except (pa.ArrowException, TypeError, ValueError, KeyError):  # a type it cannot stack: `stack_checked` says
        return None
    if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[1] != len(features):
        return None
    if not check:
        return matrix, None
    finite = np.isfinite(matrix)  # a few hundred values: one pass, no sums (nor their warnings to silence)
    if finite.all():
        return matrix, None
    bad = ~finite.all(axis=1)
    return matrix, bad


def _second_handle(parquet: pq.ParquetFile) -> pq.ParquetFile:
    """Another handle on the same file for another decoding thread (its footer reused)."""
    if not isinstance(parquet, ParquetSource):
        raise TypeError(f"a second handle needs a ParquetSource, got {type(parquet).__name__}")
    return retry_transient(lambda: type(parquet)(parquet.location, parquet.path, parquet.uri,
                                                 metadata=parquet.metadata), what=f"opening {parquet.uri}")
