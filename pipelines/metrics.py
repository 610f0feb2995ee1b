"""Run metrics on Ray's metrics pipeline (`ray.util.metrics`), so a run shows on the cluster's dashboard.

The driver and the scheduler report events (a shard done, a replica asked for,
ready or lost, a shard given back); `RunMetrics` counts them locally (a lock and
a few additions: about 1 us) and a background thread hands the totals to Ray
once a second. Ray's core worker exports them to its node's metrics agent every
`metrics_report_interval_ms` (10 s by default) and once more as the driver
disconnects; the node serves them at `http://NODE:METRICS_EXPORT_PORT/metrics`
as `ray_batch_infer_<name>` (counters with `_total` after), each tagged with
the run's `output` beside Ray's own tags. Names and meanings: `COUNTERS` and
`GAUGES` below, and the README's "Metrics" section.

Metrics never break a run: if they cannot be exported, one warning is logged
and the run goes on without them.

Example:
    >>> metrics = RunMetrics("s3://predictions/ctr")
    >>> with metrics.exporting():  # doctest: +SKIP
    ...     metrics.replica_asked()
    ...     metrics.replica_ready()
    ...     metrics.shard_done(1000, committed=True)
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

PREFIX = "batch_infer_"
TAG = "output"

# name (before Ray's `ray_` prefix and the counter's `_total`) -> description
COUNTERS = {
    "rows": "Input rows of the shards committed.",
    "shards_committed": "Shards committed.",
    "shards_failed": "Shards failed: data errors, or infrastructure attempts used up.",
    "shards_retried": "Shard attempts given back for a retry: replica died or stalled, storage error.",
    "capacity_wait_seconds": "Seconds with shards to run and no replica ready (placement, start-up, model load).",
}
GAUGES = {
    "replicas_running": "Replicas ready and taking shards.",
    "replicas_pending": "Replicas asked for and not ready yet.",
}

# (name, description, tag_keys) -> a ray.util.metrics Counter or Gauge
Factory = Callable[[str, str, tuple[str, ...]], Any]


class RunMetrics:
    """One run's counters and gauges. Events are cheap; export is batched, once a second.

    Until `exporting()` is entered (after Ray is connected) events are only counted
    locally, so an unstarted `RunMetrics()` is also the do-nothing default.
    """

    def __init__(self, output: str = "", *, interval: float = 1.0) -> None:
        self.output = output
        self.interval = interval  # seconds between hand-overs to Ray
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTERS, 0.0)  # totals since the run began
        self._sent = dict.fromkeys(COUNTERS, 0.0)  # totals already handed to Ray
        self._running = self._pending = 0
        self._waiting_since: float | None = None  # monotonic; set while replicas are asked for and none is ready
        self._counters: dict[str, Any] = {}
        self._gauges: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._broken = False

    # -- events: called by the driver (job) and the scheduler --

    def shard_done(self, rows_in: int, *, committed: bool) -> None:
        with self._lock:
            if committed:
                self._counts["shards_committed"] += 1
                self._counts["rows"] += rows_in
            else:
                self._counts["shards_failed"] += 1

    def shard_retried(self) -> None:
        with self._lock:
            self._counts["shards_retried"] += 1

    def replica_asked(self) -> None:
        with self._lock:
            self._pending += 1
            self._set_waiting()

    def replica_ready(self) -> None:
        with self._lock:
            self._pending = max(0, self._pending - 1)
            self._running += 1
            self._set_waiting()

    def replica_lost(self, ready: bool) -> None:
        with self._lock:
            if ready:
                self._running = max(0, self._running - 1)
            else:
                self._pending = max(0, self._pending - 1)
            self._set_waiting()

    def _set_waiting(self) -> None:
        """Start or stop the capacity-wait clock (lock held): it runs while no replica is ready."""
        now = time.monotonic()
        if self._running == 0 and self._waiting_since is None:
            self._waiting_since = now
        elif self._running > 0 and self._waiting_since is not None:
            self._counts["capacity_wait_seconds"] += now - self._waiting_since
            self._waiting_since = None

    def snapshot(self) -> dict[str, float]:
        """The current values by name (counters as totals since the run began)."""
        with self._lock:
            self._tick()
            return {**self._counts, "replicas_running": self._running, "replicas_pending": self._pending}

    def _tick(self) -> None:
        """Bring the wait clock up to now (lock held)."""
        if self._waiting_since is not None:
            now = time.monotonic()
            self._counts["capacity_wait_seconds"] += now - self._waiting_since
            self._waiting_since = now

    # -- export --

    @contextlib.contextmanager
    def exporting(self, _factory: Factory | None = None) -> Iterator[RunMetrics]:
        """Export to Ray while inside; on the way out, zero the gauges and hand over the last values.

        Enter it only with Ray connected; leave it before `ray.shutdown()` (which exports once more).
        """
        self._start(_factory)
        try:
            yield self
        finally:
            self._close()

    def _start(self, factory: Factory | None) -> None:
        try:
            if factory is None:
                factory = _ray_factory()
            tags = (TAG,)
            self._counters = {n: factory(PREFIX + n, d, tags).set_default_tags({TAG: self.output})
                              for n, d in COUNTERS.items()}
            self._gauges = {n: factory(PREFIX + n, d, tags).set_default_tags({TAG: self.output})
                            for n, d in GAUGES.items()}
        except Exception as exc:  # noqa: BLE001 - metrics never break a run
            self._disable(exc)
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="batch-infer-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._flush()

    def _close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            self._tick()
            self._waiting_since = None  # the run is over: nothing waits any more
            self._running = self._pending = 0  # the scheduler has released its replicas
        self._flush()

    def _flush(self) -> None:
        """Hand the counts since the last flush and the gauges' values to Ray."""
        if self._broken or not self._counters:
            return
        with self._lock:
            self._tick()
            deltas = {n: self._counts[n] - self._sent[n] for n in COUNTERS}
            self._sent = dict(self._counts)
            gauges = {"replicas_running": self._running, "replicas_pending": self._pending}
        try:
            for name, delta in deltas.items():
                if delta > 0:  # Ray counters accept only increments > 0
                    self._counters[name].inc(delta)
            for name, value in gauges.items():
                self._gauges[name].set(value)
        except Exception as exc:  # noqa: BLE001 - metrics never break a run
            self._disable(exc)

    def _disable(self, exc: BaseException) -> None:
        if not self._broken:
            self._broken = True
            logger.warning("run metrics are not exported (%s: %s); the run goes on without them",
                           type(exc).__name__, exc)


def _ray_factory() -> Factory:
    """`ray.util.metrics` constructors by kind; refuses a Ray Client driver (its metrics go nowhere)."""
    import ray.util.client
    from ray.util.metrics import Counter, Gauge

    if ray.util.client.ray.is_connected():
        raise RuntimeError("a Ray Client (ray://) driver has no metrics agent to export to")

    def make(name: str, description: str, tags: tuple[str, ...]) -> Any:
        kind = Counter if name[len(PREFIX):] in COUNTERS else Gauge
        return kind(name, description=description, tag_keys=tags)

    return make
