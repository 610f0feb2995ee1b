"""The run report (`--json`, `--report`, the return value of `run`) and driver progress."""

from __future__ import annotations

import array
import dataclasses
import io
import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunReport:
    """What one run did. Row counts and shard counts are for this run only.

    `status` is "succeeded" when no shard failed (including "nothing to do").
    """

    status: str
    output: str
    shards_total: int
    shards_done: int
    shards_skipped: int
    shards_failed: int
    rows_in: int
    rows_out: int
    rows_rejected: int
    seconds: float
    rows_per_second: float
    errors: list[dict[str, Any]]
    replicas: list[dict[str, Any]]
    complete: bool = False  # _SUCCESS written: every shard of the output is committed
    startup_seconds: float | None = None  # run start -> first committed shard
    capacity_wait_seconds: float = 0.0  # time with shards to run and no replica ready (scale-up, busy cluster)
    cpus_per_replica: float | None = None  # what each replica reserved (chosen when the config says auto)
    gpus_per_replica: float | None = None

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        """One paragraph for people (printed at the end of `batch-infer run`)."""
        text = (
            f"batch-infer {self.status}: {self.shards_done} shard(s) done, {self.shards_skipped} already committed, "
            f"{self.shards_failed} failed, of {self.shards_total}. Rows: {self.rows_in:,} in, {self.rows_out:,} out, "
            f"{self.rows_rejected:,} rejected, in {self.seconds:.1f} s ({self.rows_per_second:,.0f} rows/s) on "
            f"{len(self.replicas)} replica(s)"
            + (f" of {self.cpus_per_replica:g} CPU" if self.cpus_per_replica is not None else "")
            + (f" + {self.gpus_per_replica:g} GPU" if self.gpus_per_replica else "")
            + (f" (waited {self.capacity_wait_seconds:.0f} s for capacity)" if self.capacity_wait_seconds >= 1 else "")
            + f". Output: {self.output}"
            + (" (complete, _SUCCESS written)." if self.complete else " (incomplete: no _SUCCESS).")
        )
        for error in self.errors[:5]:  # a shard's failure, or (shard None) what keeps the output incomplete
            text += f"\n  failed {error['shard']}: {error['error']}" if error["shard"] else f"\n  {error['error']}"
        if len(self.errors) > 5:
            text += f"\n  ... and {len(self.errors) - 5} more failed shard(s); see the report or _manifest.json"
        return text


class Progress:
    """One driver progress bar (rows, rows/s, shards done/failed).

    On a terminal it is a tqdm bar on stderr; otherwise (cron, CI, logs) it logs
    a plain line every `interval` seconds. `enabled=False` silences it.
    """

    def __init__(self, total_rows: int, total_shards: int, *, enabled: bool = True, stream: TextIO | None = None,
                 interval: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.total_rows, self.total_shards = total_rows, total_shards
        self.rows = self.done = self.failed = 0
        self.started = time.monotonic()
        self.interval = interval
        self._last_log = self.started
        self._bar = None
        self.enabled = enabled and total_shards > 0
        if self.enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_rows, unit="row", unit_scale=True, file=self.stream, desc="batch-infer",
                             dynamic_ncols=True)

    def update(self, rows: int, failed: bool) -> None:
        self.rows += rows
        self.done += not failed
        self.failed += failed
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(rows)
            self._bar.set_postfix(shards=f"{self.done}/{self.total_shards}", failed=self.failed, refresh=False)
            return
        now = time.monotonic()
        if now - self._last_log >= self.interval or self.done + self.failed == self.total_shards:
            self._last_log = now
            elapsed = max(now - self.started, 1e-9)
            logger.info("progress: %d/%d shards (%d failed), %d/%d rows, %.0f rows/s", self.done + self.failed,
                        self.total_shards, self.failed, self.rows, self.total_rows, self.rows / elapsed)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class RunResults:
    """The run's shard results as the report and the timeline read them: sums over the committed ones, the
    failed ones whole, and with a timeline each one's span; no dict kept per committed shard (at 100,000
    shards those were ~100 MiB of the driver)."""

    _SPAN = ("id", "status", "replica", "started", "finished", "rows_in", "rows_out", "error", "call")

    def __init__(self, *, timeline: bool = False) -> None:
        self.committed = self.rows_in = self.rows_out = self.rows_rejected = 0
        self.failed: list[dict[str, Any]] = []  # id, input, error
        self.spans: Spans | None = Spans() if timeline else None  # `_SPAN`'s values, a tuple each as read

    def add(self, result: Mapping[str, Any], input_uri: str) -> None:
        if result["status"] == "committed":
            self.committed += 1
            self.rows_in += result["rows_in"]
            self.rows_out += result["rows_out"]
            self.rows_rejected += result["rows_rejected"]
        else:
            self.failed.append({"id": result["id"], "input": input_uri, "error": result["error"]})
        if self.spans is not None and "started" in result and "finished" in result:
            self.spans.append(result)


class Spans:
    """The timeline's spans, kept as columns: each id's UTF-8 bytes in one buffer, the status as a code,
    the times and counts in typed arrays, an error only where there is one (~90 bytes a shard, not a
    tuple of objects' ~200, nor three lists of objects' ~150; 100,000 shards: ~6 MiB of the driver fewer
    than those lists); read back as `RunResults._SPAN` tuples, in order."""

    def __init__(self) -> None:
        self._ids = bytearray()  # every id's UTF-8 bytes, one after another
        self._id_ends = array.array("q")  # where each id's bytes end in `_ids`
        self._status = array.array("H")  # an index into `_statuses`
        self._statuses: list[Any] = []  # each status seen, once
        self._errors: dict[int, Any] = {}  # span index -> its error (none for most)
        self._times = array.array("d")  # started, finished: two a span
        self._counts = array.array("q")  # replica, rows_in, rows_out, call: four a span
        self._big: dict[int, tuple[Any, ...]] = {}  # a span whose id or counts do not fit the columns, whole

    def append(self, result: Mapping[str, Any]) -> None:
        index = len(self._id_ends)
        status = result.get("status")
        if status not in self._statuses:
            self._statuses.append(status)
        self._status.append(self._statuses.index(status))
        error = result.get("error")
        if error is not None:
            self._errors[index] = error
        self._times.extend((result["started"], result["finished"]))
        counts = [result.get(key) for key in ("replica", "rows_in", "rows_out", "call")]
        span_id = result.get("id")
        if type(span_id) is str and all(type(value) is int for value in counts):
            self._ids += span_id.encode()
            self._counts.extend(counts)
        else:  # a failed shard with no call, say: kept whole
            self._counts.extend((0, 0, 0, 0))
            self._big[index] = tuple(result.get(k) for k in RunResults._SPAN)
        self._id_ends.append(len(self._ids))

    def __len__(self) -> int:
        return len(self._id_ends)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        ids, ends, codes, statuses = self._ids, self._id_ends, self._status, self._statuses
        times, counts, errors = self._times, self._counts, self._errors
        start = 0
        for i in range(len(ends)):
            end = ends[i]
            if i in self._big:
                yield self._big[i]
            else:
                replica, rows_in, rows_out, call = counts[4 * i:4 * i + 4]
                yield (ids[start:end].decode(), statuses[codes[i]], replica, times[2 * i], times[2 * i + 1],
                       rows_in, rows_out, errors.get(i), call)
            start = end


def write_timeline(path: str, spans: Iterable[tuple[Any, ...]]) -> None:
    """A Chrome trace (chrome://tracing, Perfetto): one span per shard (`RunResults.spans`), one row per
    replica. Made an event at a time from the spans' tuples: no dict kept per span or per event, and each
    span's event formatted as `json.dumps` would write its dict (100,000 spans: ~0.5 s of the driver fewer)."""
    names = RunResults._SPAN
    at = {name: names.index(name) for name in names}
    origin, replicas = 0.0, set()
    for n, span in enumerate(spans):  # one pass: where the time starts, and the replicas' rows
        origin = span[at["started"]] if n == 0 else min(origin, span[at["started"]])
        replicas.add(span[at["replica"]])

    def events() -> Iterator[str]:
        for span in spans:
            started, finished = span[at["started"]], span[at["finished"]]
            yield _SPAN_EVENT % (_json(span[at["id"]]), _json(span[at["status"]]), _json(span[at["replica"]]),
                                 round((started - origin) * 1e6), round((finished - started) * 1e6),
                                 _json(span[at["rows_in"]]), _json(span[at["rows_out"]]), _json(span[at["error"]]),
                                 _json(span[at["call"]]))
        for t in sorted(replicas):
            yield json.dumps({"name": "thread_name", "ph": "M", "pid": 0, "tid": t, "args": {"name": f"replica {t}"}})

    from basis.storage import StagedFile, resolve, retry_transient

    location = resolve(path)

    def attempt() -> None:  # streamed a chunk at a time (100,000 shards: ~25 MB of JSON never held whole)
        staged = StagedFile(location.fs, location.path)
        try:
            out = io.BytesIO()
            out.write(b'{"traceEvents":[')
            for n, event in enumerate(events()):
                out.write((b"," if n else b"") + event.encode())
                if out.tell() >= _CHUNK:
                    staged.stream.write(out.getvalue())
                    out = io.BytesIO()
            out.write(b"]}")
            staged.stream.write(out.getvalue())
            staged.finish()
            staged.publish()
        except BaseException:
            staged.discard()
            raise

    retry_transient(attempt, what=f"writing {path}")


_CHUNK = 1 << 20  # bytes of the timeline's JSON written at a time
# a span's event as `json.dumps` writes its dict (the same keys, in the same order, the same separators)
_SPAN_EVENT = ('{"name": %s, "cat": %s, "ph": "X", "pid": 0, "tid": %s, "ts": %d, "dur": %d, '
               '"args": {"rows_in": %s, "rows_out": %s, "error": %s, "call": %s}}')


def _json(value: Any) -> str:
    """`json.dumps(value)`, quicker for the common values (None, an int, a string)."""
    if value is None:
        return "null"
    if type(value) is int:
        return int.__repr__(value)
    if type(value) is str:
        return _encode_string(value)
    return json.dumps(value)


_encode_string = json.encoder.encode_basestring_ascii  # what `json.dumps` uses for a string (ensure_ascii)
