"""Writing one shard's output file, atomically.

The file is written under a hidden temporary name (`basis.storage.StagedFile`),
hashed on the way out, and appears under its final name whole or not at all.
Only string-like columns are dictionary-encoded; compression is snappy.
"""

from __future__ import annotations

import collections
import contextlib
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import _parquet

from basis.storage import Location, StagedFile
from workers import threads


def prediction_type(outputs: int) -> pa.DataType:
    """`float32`, or `fixed_size_list<float32>[k]` for k > 1 outputs."""
    return pa.float32() if outputs == 1 else pa.list_(pa.float32(), outputs)


def prediction_array(predictions: np.ndarray) -> pa.Array:
    """(rows, k) float32 -> an Arrow column (zero-copy for k == 1)."""
    rows, outputs = predictions.shape
    if outputs == 1:
        return pa.array(np.ascontiguousarray(predictions[:, 0]), type=pa.float32())
    flat = pa.array(np.ascontiguousarray(predictions).reshape(rows * outputs), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, outputs)


def output_schema(source: pa.Schema, columns: Sequence[str], extra: Sequence[pa.Field]) -> pa.Schema:
    """The written schema: `columns` as typed in the input, then the extra fields."""
    return pa.schema([source.field(name) for name in columns] + list(extra))


class ShardWriter:
    """Streams record batches into one Parquet file, staged under a hidden temporary name.

    `finish()` completes the file and returns its (size, sha256); the caller
    records the commit, then `publish()` puts it under its final name. Leaving
    the `with` block without publishing discards the temporary file, so no
    reader ever sees a partial file.

    Example:
        >>> with ShardWriter(location, "out/part-0-00000.parquet", schema) as w:  # doctest: +SKIP
        ...     w.write(batch)
        ...     size, sha256 = w.finish()
        ...     w.publish()
    """

    def __init__(self, location: Location, path: str, schema: pa.Schema, *, in_memory: bool = False) -> None:
        """`in_memory`: the file is made in memory and staged in one write by `finish()` (a tiny shard's
        output, at most a forward batch: no stream, no hashing wrapper, no Python call per chunk)."""
        self.location = location
        self.path = path
        self.schema = schema
        self.rows = 0
        self.in_memory = in_memory
        self._staged: StagedFile | None = None
        self._memory: pa.BufferOutputStream | None = None
        self._writer: pq.ParquetWriter | _parquet.ParquetWriter | None = None
        self._published = False

    def __enter__(self) -> ShardWriter:
        sink: pa.NativeFile | pa.PythonFile
        if self.in_memory:
            sink = self._memory = pa.BufferOutputStream()
        else:
            self._staged = StagedFile(self.location.fs, self.path)
            sink = self._staged.stream
        # Dictionary encoding pays off for repeated strings; on floats and unique ids it
        # only costs time (measured: it doubled the write time of an id + prediction file).
        if self.in_memory:  # `pq.ParquetWriter`'s own writer with its settings, without its per-file wrapping
            self._writer = _parquet.ParquetWriter(sink, self.schema, use_dictionary=_dictionary(self.schema),
                                                  **_WRITER_SETTINGS)
        else:
            self._writer = pq.ParquetWriter(sink, self.schema, compression=_WRITER_SETTINGS["compression"],
                                            use_dictionary=_dictionary(self.schema))
        return self

    def write(self, batch: pa.RecordBatch) -> None:
        if self._writer is None:
            raise RuntimeError("ShardWriter.write called outside its `with` block")
        if self.in_memory:
            if not batch.schema.equals(self.schema):  # as `pq.ParquetWriter.write_batch` checks
                raise ValueError(f"batch schema does not match the file's:\n{batch.schema}\nvs.\n{self.schema}")
            self._writer.write_table(pa.Table.from_batches([batch]))
        else:
            self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def finish(self) -> tuple[int, str]:
        """Complete the file (footer included); returns (size in bytes, sha256 hex)."""
        if self._writer is None:
            raise RuntimeError("ShardWriter.finish called outside its `with` block")
        self._writer.close()
        if self._memory is not None:
            self._staged = StagedFile.of_bytes(self.location.fs, self.path, self._memory.getvalue())
            self._memory = None
        if self._staged is None:
            raise RuntimeError("ShardWriter.finish called outside its `with` block")
        return self._staged.finish()

    def publish(self) -> None:
        """Put the finished file under its final name (replacing an earlier version)."""
        if self._staged is None:
            raise RuntimeError("ShardWriter.publish called before finish")
        self._staged.publish()
        self._published = True

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._published:
            with contextlib.suppress(Exception):
                if self._writer is not None:
                    self._writer.close()
            self._memory = None
            if self._staged is not None:
                self._staged.discard()


class Background:
    """Runs calls one at a time, in order, on a thread of its own (or in line when disabled).

    At most one call waits behind the running one, so memory stays bounded; an error
    in a call is raised by the next `run` or by `wait`. The thread is a reused one
    (`workers.threads`): a replica's writer keeps its allocator's memory between shards.

    Example:
        >>> with Background(enabled=True) as background:  # doctest: +SKIP
        ...     background.run(writer.write, batch)
        ...     background.wait()
    """

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._thread: threads.Call | None = None
        self._futures: collections.deque[Future[object]] = collections.deque()
        if enabled:  # (a tiny shard's, in line, makes no queue)
            self._queue: queue.SimpleQueue[tuple[Callable[..., object], tuple[object, ...], Future[object]] | None] \
                = queue.SimpleQueue()
            self._thread = threads.start("write", self._loop)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args, future = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # the caller's next run() or wait() raises it
                    future.set_exception(exc)
            del fn, args, future  # the batch is not kept alive by an idle thread

    def run(self, fn: Callable[..., object], *args: object) -> None:
        if self._thread is None:
            fn(*args)
            return
        while len(self._futures) >= 2:
            self._futures.popleft().result()
        future: Future[object] = Future()
        self._futures.append(future)
        self._queue.put((fn, args, future))

    def wait(self) -> None:
        """Every call done (raising the first error)."""
        while self._futures:
            self._futures.popleft().result()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            for future in self._futures:
                future.cancel()
            self._queue.put(None)
            self._thread.join()
            self._thread = None


# What `pq.ParquetWriter` (pyarrow 26) passes its `_parquet.ParquetWriter` for compression="snappy" and its other
# defaults; the rest of the writer's arguments default to the same there. A tiny shard's file (`in_memory`) is
# written by that writer directly: the same bytes (tests/test_tiny_path.py), ~10 us less a file.
_WRITER_SETTINGS: dict[str, object] = {"compression": "snappy", "version": "2.6", "write_statistics": True,
                                       "use_deprecated_int96_timestamps": False, "writer_engine_version": "V2",
                                       "data_page_version": "1.0", "use_compliant_nested_type": True,
                                       "store_schema": True, "write_page_index": False, "write_page_checksum": False}
_last_dictionary: tuple[pa.Schema, list[str]] | None = None  # `_dictionary`'s last answer


def _dictionary(schema: pa.Schema) -> list[str]:
    """The columns of `schema` to dictionary-encode (kept for the next file: a replica's tiny shards share
    one output schema object)."""
    global _last_dictionary
    last = _last_dictionary
    if last is not None and last[0] is schema:
        return last[1]
    names = [f.name for f in schema if _wants_dictionary(f.type)]
    _last_dictionary = (schema, names)
    return names


def _wants_dictionary(kind: pa.DataType) -> bool:
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_dictionary(kind))
