"""Many batches of varying sizes through a `workers.device.Forward`, against a plain torch forward.

The check of the GPU path's stream handling (issue 8): each batch is filled
into the Forward's reused host slot (every fifth is handed over as a foreign
matrix instead, to be copied in), submitted, and collected in one of three
orders: ``next`` (one batch later, as the replica does), ``end`` (all after the
last submit, so every slot is reused while its predictions wait) and
``shuffled`` (random subsets, in random order). Each batch's features carry a
batch-specific offset, so predictions that come from the wrong buffer (a copy
that overwrote memory still being read) differ far beyond any precision's
tolerance.

On real CUDA streams, `stream_delays` keeps the copy or the compute stream
busy before submits, so the CPU runs ahead of the device as far as the guards
allow, and `negative_controls` breaks one guard at a time to show that the
check sees the damage on this machine (it then expects wrong predictions).

Used by ``make gpu-check`` (``benchmarks/gpu_check.py``), ``tests/test_gpu.py``
(real CUDA streams) and ``tests/test_device.py`` (fake streams on the CPU).

Example:
    >>> layers = make_layers((8, 16, 1), seed=0)
    >>> fwd = Forward(MLP(layers, "sigmoid", "sigmoid", torch.device("cpu"), "fp32"), 8, 64, torch.device("cpu"))
    >>> check(fwd, layers, "fp32", batches=20, capacity=64)["ok"]
    True
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from workers import device
from workers.device import CudaStreams, Forward
from workers.model import MLP

PATTERNS = ("next", "end", "shuffled")
# Largest absolute difference allowed from the float64 reference, per precision (predictions are
# sigmoid outputs in (0, 1)); a batch computed from another batch's features is off by ~0.1 or more.
TOLERANCE = {"fp32": 1e-5, "tf32": 5e-3, "fp16": 5e-3, "bf16": 3e-2}


def make_layers(widths: tuple[int, ...], seed: int, gain: float = 2.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bias) per Linear layer; ``gain`` spreads the sigmoid outputs over (0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for n_in, n_out in itertools.pairwise(widths):
        weight = torch.randn(n_out, n_in, generator=generator) * (gain / n_in**0.5)
        layers.append((weight, torch.randn(n_out, generator=generator) * 0.1))
    return layers


def make_batch(index: int, capacity: int, width: int, seed: int) -> np.ndarray:
    """Batch ``index``: (rows, width) float32, rows in [1, capacity] (the first is full, the second one row)."""
    rng = np.random.default_rng([seed, index])
    rows = capacity if index == 0 else 1 if index == 1 else int(rng.integers(1, capacity + 1))
    return rng.standard_normal((rows, width), dtype=np.float32) + np.float32((index % 7 - 3) * 0.5)


def reference(layers: list[tuple[torch.Tensor, torch.Tensor]], x: np.ndarray) -> np.ndarray:
    """A plain torch forward in float64, sigmoid after every layer: (rows, outputs) float32."""
    h = torch.from_numpy(x).double()
    for weight, bias in layers:
        h = torch.sigmoid(torch.nn.functional.linear(h, weight.double(), bias.double()))
    return h.float().numpy()


def run_batches(
    forward: Forward,
    *,
    batches: int,
    capacity: int,
    pattern: str,
    seed: int = 0,
    before_submit: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Submit ``batches`` batches, collect them in ``pattern`` order; their predictions in submission order."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern {pattern!r}: choose from {', '.join(PATTERNS)}")
    order = random.Random(seed)
    waiting: dict[int, Callable[[], np.ndarray]] = {}
    got: dict[int, np.ndarray] = {}
    for i in range(batches):
        x = make_batch(i, capacity, forward.width, seed)
        if i % 5 == 4:
            matrix = x  # foreign: submit copies it into the slot
        else:
            buf = forward.buffer(len(x))  # (width, rows), the slot itself
            buf[...] = x.T
            matrix = buf.T
        if before_submit is not None:
            before_submit(i)
        waiting[i] = forward.submit(matrix)
        if pattern == "next" and i - 1 in waiting:
            got[i - 1] = waiting.pop(i - 1)()
        elif pattern == "shuffled":
            for j in order.sample(sorted(waiting), order.randint(0, len(waiting))):
                got[j] = waiting.pop(j)()
    rest = sorted(waiting)
    if pattern == "shuffled":
        order.shuffle(rest)
    for j in rest:
        got[j] = waiting.pop(j)()
    return [got[i] for i in range(batches)]


def check(
    forward: Forward,
    layers: list[tuple[torch.Tensor, torch.Tensor]],
    precision: str,
    *,
    batches: int = 200,
    capacity: int = 4096,
    patterns: tuple[str, ...] = PATTERNS,
    seed: int = 0,
    before_submit: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run every pattern and compare each batch with `reference`; a JSON-ready summary with ``ok``."""
    tolerance = TOLERANCE[precision]
    summary: dict[str, Any] = {"precision": precision, "batches": batches, "capacity": capacity,
                               "tolerance": tolerance, "patterns": {}}
    for pattern in patterns:
        predictions = run_batches(forward, batches=batches, capacity=capacity, pattern=pattern, seed=seed,
                                  before_submit=before_submit)
        worst, bad, rows = 0.0, [], 0
        for i, got in enumerate(predictions):
            x = make_batch(i, capacity, forward.width, seed)
            want = reference(layers, x)
            rows += len(x)
            error = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
            worst = max(worst, error)
            if not error <= tolerance:
                bad.append(i)
        summary["patterns"][pattern] = {"rows": rows, "max_abs_error": worst, "bad_batches": bad[:20],
                                        "bad_batch_count": len(bad), "ok": not bad}
    summary["ok"] = all(p["ok"] for p in summary["patterns"].values())
    return summary


def stream_delays(forward: Forward, *, cycles: int = 10_000_000, only: str | None = None,
                  seed: int = 0) -> Callable[[int], None]:
    """A ``before_submit`` hook for a CUDA `Forward`: spin the copy or the compute stream before a submit.

    ``cycles`` GPU clock cycles (10M: ~5-7 ms at 1.5-2 GHz) queued ahead of the
    batch's upload (``copy``) or forward (``compute``), chosen at random per batch
    (a third of the batches get no delay) unless ``only`` names one stream.
    """
    streams = forward.streams
    if not isinstance(streams, CudaStreams):
        raise TypeError("stream_delays needs a Forward on CUDA streams")
    rng = random.Random(seed)
    choices = (only,) if only else ("copy", "compute", None)

    def delay(index: int) -> None:
        which = rng.choice(choices)
        if which is not None:
            with torch.cuda.stream(streams.copy if which == "copy" else streams.compute_stream):
                torch.cuda._sleep(cycles)

    return delay


class _NoRecordStream(CudaStreams):
    """Broken on purpose: the upload is not marked for the compute stream (guard 1)."""

    def upload(self, host: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        with torch.cuda.stream(self.copy):
            features = host.to(self.device, non_blocking=True)
            uploaded = torch.cuda.Event()
            uploaded.record(self.copy)
        return features, uploaded


class _NoWaitEvent(CudaStreams):
    """Broken on purpose: the forward does not wait for its upload (guard 2)."""

    def compute(self, work: Callable[[], None], after: Any) -> torch.cuda.Event:
        with torch.cuda.stream(self.compute_stream):
            work()
            done = torch.cuda.Event()
            done.record(self.compute_stream)
        return done


@contextlib.contextmanager
def _without_free_host() -> Iterator[None]:
    """Broken on purpose, for the duration: a reused host slot is refilled without waiting (guard 3)."""
    original = device._Slot.free_host
    device._Slot.free_host = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        device._Slot.free_host = original  # type: ignore[method-assign]


def negative_controls(widths: tuple[int, ...] = (64, 32, 1), *, batches: int = 60,
                      capacity: int = 32_768) -> dict[str, Any]:
    """Break one stream guard at a time on CUDA; each should give wrong predictions (``detected``).

    A control that is not detected means the check cannot see that kind of race
    on this machine (timing too forgiving), not that the real code is wrong.
    """
    cuda = torch.device("cuda")
    layers = make_layers(widths, seed=5)
    # (name, streams, the stream to delay, collection order, what else is broken). A missing host-slot
    # wait needs "end": collecting one batch later (as the replica does) already waits for the upload.
    controls: list[tuple[str, type[CudaStreams], str, str, contextlib.AbstractContextManager[None]]] = [
        ("no_record_stream", _NoRecordStream, "compute", "next", contextlib.nullcontext()),
        ("no_wait_event", _NoWaitEvent, "copy", "next", contextlib.nullcontext()),
        ("no_free_host", CudaStreams, "copy", "end", _without_free_host()),
    ]
    summary: dict[str, Any] = {}
    for name, streams, delayed, pattern, broken in controls:
        forward = Forward(MLP(layers, "sigmoid", "sigmoid", cuda, "fp32"), widths[0], capacity, cuda,
                          streams=streams(cuda))
        with broken:
            result = check(forward, layers, "fp32", batches=batches, capacity=capacity, patterns=(pattern,),
                           before_submit=stream_delays(forward, only=delayed))
        torch.cuda.synchronize()
        bad = result["patterns"][pattern]["bad_batch_count"]
        summary[name] = {"delayed_stream": delayed, "pattern": pattern, "batches": batches,
                         "bad_batch_count": bad, "detected": bad > 0}
    return summary
