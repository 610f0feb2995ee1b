"""RunMetrics without Ray: what the events add up to, what reaches the exporter, and that a broken
exporter never breaks a run. (The real export to a head's Prometheus endpoint is in test_cluster.py.)"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from pipelines.metrics import COUNTERS, GAUGES, PREFIX, RunMetrics


class FakeMetric:
    """The slice of `ray.util.metrics.Counter/Gauge` that RunMetrics uses."""

    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...], *, fail: bool = False) -> None:
        self.name, self.description, self.tag_keys, self.fail = name, description, tag_keys, fail
        self.tags: dict[str, str] = {}
        self.calls: list[float] = []

    def set_default_tags(self, tags: dict[str, str]) -> FakeMetric:
        self.tags = tags
        return self

    def inc(self, value: float) -> None:
        if self.fail:
            raise RuntimeError("metrics agent unreachable")
        assert value > 0  # as Ray's Counter.inc insists
        self.calls.append(value)

    def set(self, value: float) -> None:
        if self.fail:
            raise RuntimeError("metrics agent unreachable")
        self.calls.append(value)


def _factory(made: dict[str, FakeMetric], *, fail: bool = False) -> Any:
    def make(name: str, description: str, tags: tuple[str, ...]) -> FakeMetric:
        made[name[len(PREFIX):]] = FakeMetric(name, description, tags, fail=fail)
        return made[name[len(PREFIX):]]
    return make


def test_events_add_up_and_reach_the_exporter_as_increments() -> None:
    made: dict[str, FakeMetric] = {}
    metrics = RunMetrics("s3://preds/ctr", interval=3600)  # no periodic flush: the test drives it
    with metrics.exporting(_factory(made)):
        assert sorted(made) == sorted([*COUNTERS, *GAUGES])
        assert all(m.tags == {"output": "s3://preds/ctr"} and m.description for m in made.values())
        metrics.replica_asked()
        metrics.replica_asked()
        time.sleep(0.05)
        metrics.replica_ready()  # the wait for capacity ends with the first ready replica
        metrics.replica_lost(ready=False)  # the second never started
        metrics.shard_done(100, committed=True)
        metrics.shard_retried()
        metrics.shard_done(50, committed=True)
        metrics.shard_done(70, committed=False)
        metrics._flush()
        assert made["replicas_running"].calls == [1] and made["replicas_pending"].calls == [0]
        metrics.shard_done(30, committed=True)
        metrics._flush()  # only what changed since the last flush is sent
        values = metrics.snapshot()
    assert made["rows"].calls == [150, 30] and made["shards_committed"].calls == [2, 1]
    assert made["shards_failed"].calls == [1] and made["shards_retried"].calls == [1]
    assert 0.05 <= sum(made["capacity_wait_seconds"].calls) < 1.0
    assert made["replicas_running"].calls[-1] == 0  # the run is over: zeroed on the way out
    assert values["rows"] == 180 and values["replicas_running"] == 1 and values["replicas_pending"] == 0


def test_the_capacity_wait_clock_runs_only_while_no_replica_is_ready() -> None:
    metrics = RunMetrics()
    metrics.replica_asked()
    time.sleep(0.05)
    metrics.replica_ready()
    time.sleep(0.1)  # a replica is ready: not waiting
    waited = metrics.snapshot()["capacity_wait_seconds"]
    assert 0.05 <= waited < 0.1
    metrics.replica_lost(ready=True)  # the only replica is gone: waiting again, until its replacement
    metrics.replica_asked()
    time.sleep(0.05)
    assert metrics.snapshot()["capacity_wait_seconds"] >= waited + 0.05


def test_an_exporter_that_fails_logs_once_and_the_run_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    made: dict[str, FakeMetric] = {}
    metrics = RunMetrics("out", interval=0.01)
    with caplog.at_level(logging.WARNING, logger="pipelines.metrics"), metrics.exporting(_factory(made, fail=True)):
        for _ in range(20):
            metrics.shard_done(10, committed=True)
            time.sleep(0.005)
    assert metrics.snapshot()["shards_committed"] == 20
    assert [r.getMessage() for r in caplog.records].count(
        "run metrics are not exported (RuntimeError: metrics agent unreachable); the run goes on without them") == 1

    def refuse(name: str, description: str, tags: tuple[str, ...]) -> Any:
        raise RuntimeError("a Ray Client (ray://) driver has no metrics agent to export to")

    caplog.clear()
    client = RunMetrics("out")
    with caplog.at_level(logging.WARNING, logger="pipelines.metrics"), client.exporting(refuse):
        client.shard_done(10, committed=True)
    assert len(caplog.records) == 1 and "Ray Client" in caplog.text


def test_events_are_cheap() -> None:
    metrics = RunMetrics("out", interval=3600)
    with metrics.exporting(_factory({})):
        begun = time.perf_counter()
        for _ in range(10_000):
            metrics.shard_done(100, committed=True)
        per_call = (time.perf_counter() - begun) / 10_000
    assert per_call < 50e-6  # about 1 us on a 2-core machine; the driver records up to ~500 shards/s
