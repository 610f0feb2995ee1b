"""The Forward's buffer and event bookkeeping, on the CPU.

`FakeStreams` stands in for CUDA streams: each stream's work runs in order,
and only when an event forces it (``lazy``), as soon as it is queued
(``eager``) or at random points in between (``random``). A missing wait on a
reused host slot shows up under ``lazy`` (the upload reads the slot after the
CPU refilled it), a missing copy-out of a reused output slot under ``eager``
(the next batch's predictions overwrite it before they are read): both as
wrong predictions.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

import numpy as np
import pytest
import torch

from benchmarks import forward_check
from workers import device
from workers.device import Forward
from workers.model import MLP


class _Op:
    def __init__(self, work: Callable[[], object], after: list[_Op]) -> None:
        self.work, self.after, self.done = work, after, False


class FakeEvent:
    def __init__(self, streams: FakeStreams, op: _Op) -> None:
        self.streams, self.op = streams, op

    def synchronize(self) -> None:
        self.streams.force(self.op)


class FakeStreams:
    """Two in-order CPU "streams" (copy, compute) whose work runs when the schedule says."""

    def __init__(self, schedule: str, seed: int = 0) -> None:
        self.schedule, self.rng = schedule, random.Random(seed)
        self.queues: dict[str, deque[_Op]] = {"copy": deque(), "compute": deque()}
        self.uploads = self.computes = 0

    def upload(self, host: torch.Tensor) -> tuple[torch.Tensor, FakeEvent]:
        features = torch.empty_like(host)
        self.uploads += 1
        return features, self._queue("copy", _Op(lambda: features.copy_(host), []))

    def compute(self, work: Callable[[], None], after: FakeEvent) -> FakeEvent:  # type: ignore[override]
        self.computes += 1
        return self._queue("compute", _Op(work, [after.op]))

    def _queue(self, stream: str, op: _Op) -> FakeEvent:
        self.queues[stream].append(op)
        if self.schedule == "eager":
            self.force(op)
        elif self.schedule == "random":
            for name in self.rng.sample(sorted(self.queues), 2):
                for _ in range(self.rng.randint(0, len(self.queues[name]))):
                    self._step(name)
        return FakeEvent(self, op)

    def force(self, op: _Op) -> None:
        stream = next(name for name, ops in self.queues.items() if op in ops) if not op.done else None
        while stream is not None and not op.done:
            self._step(stream)

    def _step(self, stream: str) -> None:
        op = self.queues[stream].popleft()
        for before in op.after:  # a stream waits on another stream's event
            self.force(before)
        op.work()
        op.done = True


def _forward(widths: tuple[int, ...], capacity: int, precision: str = "fp32", streams: object = None) -> Forward:
    layers = forward_check.make_layers(widths, seed=1)
    mlp = MLP(layers, "sigmoid", "sigmoid", torch.device("cpu"), precision)
    return Forward(mlp, widths[0], capacity, torch.device("cpu"), streams=streams)  # type: ignore[arg-type]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("pattern", forward_check.PATTERNS)
def test_cpu_path_matches_plain_torch(precision: str, pattern: str) -> None:
    """The CPU path (what CI and most users run): many batches of 1..capacity rows."""
    fwd = _forward((16, 32, 8, 1), capacity=700, precision=precision)
    layers = forward_check.make_layers((16, 32, 8, 1), seed=1)
    result = forward_check.check(fwd, layers, precision, batches=60, capacity=700, patterns=(pattern,))
    assert result["ok"], result


@pytest.mark.parametrize("schedule", ["lazy", "eager", "random"])
@pytest.mark.parametrize("pattern", forward_check.PATTERNS)
def test_stream_path_matches_plain_torch(schedule: str, pattern: str) -> None:
    """The CUDA path's code, with fake streams: same predictions whenever the queued work runs."""
    streams = FakeStreams(schedule, seed=3)
    fwd = _forward((16, 32, 8, 2), capacity=500, streams=streams)
    layers = forward_check.make_layers((16, 32, 8, 2), seed=1)
    result = forward_check.check(fwd, layers, "fp32", batches=60, capacity=500, patterns=(pattern,))
    assert result["ok"], result
    assert streams.uploads == streams.computes == 60
    # every queued copy and forward has run by the time the last result was collected
    assert not any(op for ops in streams.queues.values() for op in ops if not op.done)


@pytest.mark.parametrize(
    "broken, schedule, pattern",
    [("free_host", "lazy", "end"), ("free_out", "eager", "end")],
)
def test_fake_streams_catch_a_missing_wait(monkeypatch: pytest.MonkeyPatch, broken: str, schedule: str,
                                           pattern: str) -> None:
    """The fake is strict enough: without either guard the predictions come out wrong."""
    monkeypatch.setattr(device._Slot, broken, lambda self: None)
    fwd = _forward((16, 32, 1), capacity=300, streams=FakeStreams(schedule))
    layers = forward_check.make_layers((16, 32, 1), seed=1)
    result = forward_check.check(fwd, layers, "fp32", batches=30, capacity=300, patterns=(pattern,))
    assert not result["ok"]
    assert result["patterns"][pattern]["bad_batch_count"] >= 10


def test_reused_slot_waits_for_the_upload_that_read_it() -> None:
    """`buffer` hands a slot back to the CPU only after the event of the upload that last read it."""
    streams = FakeStreams("lazy")
    fwd = _forward((4, 3, 1), capacity=8, streams=streams)
    first = fwd.buffer(5)
    first[...] = 1.0
    handle = fwd.submit(first.T)
    fwd.submit(np.zeros((2, 4), dtype=np.float32))  # the other slot, a foreign matrix
    upload = streams.queues["copy"][0]
    assert not upload.done
    again = fwd.buffer(3)  # slot 0 again
    assert upload.done and np.shares_memory(again, first)
    # its forward was not forced: only the copy it depends on
    assert not streams.queues["compute"][0].done
    again[...] = 7.0
    expected = forward_check.reference(forward_check.make_layers((4, 3, 1), seed=1), np.ones((5, 4), np.float32))
    np.testing.assert_allclose(handle(), expected, atol=1e-6)
    assert handle() is handle()  # collected once, then cached


def test_reused_output_slot_copies_the_waiting_predictions_out() -> None:
    """Submitting into a slot whose predictions were never collected copies them out first."""
    streams = FakeStreams("eager")
    fwd = _forward((4, 3, 1), capacity=8, streams=streams)
    layers = forward_check.make_layers((4, 3, 1), seed=1)
    xs = [np.full((6, 4), v, dtype=np.float32) for v in (-2.0, 0.0, 2.0)]
    handles = [fwd.submit(x) for x in xs]  # the third reuses the first's output slot
    for x, handle in zip(xs, handles, strict=True):
        np.testing.assert_allclose(handle(), forward_check.reference(layers, x), atol=1e-6)


def test_submit_refuses_more_rows_than_the_slots_hold() -> None:
    fwd = _forward((4, 3, 1), capacity=8, streams=FakeStreams("eager"))
    with pytest.raises(ValueError, match="capacity 8"):
        fwd.submit(np.zeros((9, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="capacity 8"):
        fwd.buffer(9)


@pytest.mark.parametrize("schedule", [None, "lazy", "eager"])
def test_submit_is_done_with_the_callers_matrix_when_it_returns(schedule: str | None) -> None:
    """The replica hands the decoded matrix back to its pool right after `submit`: overwriting it then is safe."""
    streams = FakeStreams(schedule) if schedule else None
    fwd = _forward((4, 3, 2), capacity=8, streams=streams)
    layers = forward_check.make_layers((4, 3, 2), seed=1)
    pool = np.arange(24, dtype=np.float32).reshape(6, 4) / 10  # (rows, width), as the reader stacks it
    expected = forward_check.reference(layers, pool.copy())
    handle = fwd.submit(pool)
    pool[...] = np.nan  # the pool's next batch lands here
    np.testing.assert_allclose(handle(), expected, atol=1e-6)
