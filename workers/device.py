"""Running a model (an `MLP`, or a `.pt2` `Program`) over feature batches on one device, with reused host buffers.

Feature batches are stacked into a (width, rows) float32 host buffer that is
allocated once per slot and reused: a fresh buffer per batch costs a page
fault per 4 KiB on first touch, which showed up as a third of the stacking
time. Two slots alternate, so the next batch can be filled while the current
one is still in flight. A program with categorical inputs gets its (rows, k)
int64 codes the same way: a second pinned buffer per slot, uploaded on the
copy stream right after the features.

On CUDA the slots are pinned; each batch is copied host-to-device without
blocking on a side (copy) stream, multiplied on a compute stream, and its
predictions copied back into the slot's pinned output asynchronously.
`submit` returns a handle, and the caller collects the result later (the
replica: one batch later), so copies, math and the CPU's decoding of the next
batch overlap. Out-of-memory on the GPU halves the rows per forward pass and
retries.

What is shared between the streams and the CPU, and what guards it:

1. The device copy of a batch is allocated on the copy stream and read on the
   compute stream: `CudaStreams.upload` marks it with `record_stream`, so the
   caching allocator does not hand its memory to the next upload while the
   forward still reads it.
2. The forward reads that copy: the compute stream waits for the upload's
   event before the forward is queued (`CudaStreams.compute`).
3. A slot's pinned input is read by an asynchronous upload: before the CPU
   writes the slot again (`buffer`, or `submit` copying a foreign matrix in),
   it waits for the event of the upload that last read it (`_Slot.free_host`).
4. A slot's pinned output is written by an asynchronous device-to-host copy on
   the compute stream: the CPU reads it only after that batch's event, and
   before a later batch's copy may overwrite it, the earlier predictions are
   copied out (`_Slot.free_out`), however late the caller collects them.
5. The weights were uploaded (and cast) on the loading thread's stream, which
   the compute stream is not ordered after: `CudaStreams` synchronizes once.

Which event guards which slot is plain Python (`_Slot`, `_Result`), driven
through the `Streams` interface; tests drive it with a fake that runs each
stream's work as late or as early as the events allow, on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from workers.model import MLP
    from workers.program import Program

_MIN_GPU_ROWS = 1024
_CPU_ACTIVATION_BYTES = 4 << 20


class Event(Protocol):
    """What the bookkeeping needs of a stream event (`torch.cuda.Event` has it)."""

    def synchronize(self) -> None: ...


class Streams(Protocol):
    """Asynchronous upload and compute for `Forward` (`CudaStreams`, or a fake in tests)."""

    def upload(self, host: torch.Tensor) -> tuple[torch.Tensor, Event]:
        """Start copying `host` to the device; returns the device tensor and the copy's event."""
        ...

    def compute(self, work: Callable[[], None], after: Event) -> Event:
        """Queue `work` once `after` has happened; returns the event of its end."""
        ...


class CudaStreams:
    """A side stream for host-to-device copies and a compute stream for the forward and the copies back."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.copy = torch.cuda.Stream(device)
        self.compute_stream = torch.cuda.Stream(device)
        # (5) The MLP's weights were copied and cast on the loading thread's current stream; the compute
        # stream is not ordered after that stream, so wait for it once, here.
        torch.cuda.synchronize(device)

    def upload(self, host: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        with torch.cuda.stream(self.copy):
            features = host.to(self.device, non_blocking=True)  # allocated from the copy stream's pool
            uploaded = torch.cuda.Event()
            uploaded.record(self.copy)
        # (1) The forward on the compute stream reads `features`; when the caller drops it, the allocator
        # would otherwise return its block to the copy stream at once and the next upload could overwrite
        # it while that forward still runs. Marked, the block is reused only after the compute stream's
        # work queued so far is done.
        features.record_stream(self.compute_stream)
        return features, uploaded

    def compute(self, work: Callable[[], None], after: Event) -> torch.cuda.Event:
        with torch.cuda.stream(self.compute_stream):
            # (2) The forward reads the upload: ordered after its event, on the device (the CPU does not wait).
            self.compute_stream.wait_event(after)  # type: ignore[arg-type]
            work()  # activations are allocated, used and freed on this one stream: no marks needed
            done = torch.cuda.Event()
            done.record(self.compute_stream)
        return done


class _Slot:
    """One reusable pair of host buffers and the events of the asynchronous work that still uses them."""

    __slots__ = ("host", "out", "codes", "uploaded", "pending")

    def __init__(self, host: torch.Tensor, out: torch.Tensor, codes: torch.Tensor | None = None) -> None:
        self.host = host  # flat float32 (width * capacity,): features, pinned on CUDA
        self.out = out  # flat float32 (capacity * outputs,): predictions, pinned on CUDA
        self.codes = codes  # flat int64 (capacity * k,): categorical codes, pinned on CUDA (programs with k > 0)
        self.uploaded: Event | None = None  # the upload that last read `host`
        self.pending: _Result | None = None  # the result whose predictions still sit in `out`

    def free_host(self) -> None:
        """(3) Wait until no upload reads `host` any more, so the CPU may write it."""
        if self.uploaded is not None:
            self.uploaded.synchronize()
            self.uploaded = None

    def free_out(self) -> None:
        """(4) Copy the last predictions out of `out` (waiting for them), so a new batch may write it."""
        if self.pending is not None:
            self.pending()


class _Result:
    """Call for a submitted batch's (rows, outputs) float32 predictions; waits for them on first call."""

    __slots__ = ("_slot", "_outs", "_done", "_value")

    def __init__(self, slot: _Slot, outs: list[torch.Tensor], done: Event) -> None:
        self._slot, self._outs, self._done = slot, outs, done
        self._value: np.ndarray | None = None

    def __call__(self) -> np.ndarray:
        if self._value is None:
            self._done.synchronize()  # (4) the copy back into the pinned slot has landed
            # the slot is written again by a later batch: copied out (a set's models side by side)
            self._value = self._outs[0].numpy().copy() if len(self._outs) == 1 else \
                np.concatenate([out.numpy() for out in self._outs], axis=1)
            if self._slot.pending is self:
                self._slot.pending = None
        return self._value


class Forward:
    """Batched forward passes of one model (`MLP` or `Program`) on one device.

    Example:
        >>> fwd = Forward(mlp, width=2, capacity=4, device=torch.device("cpu"))  # doctest: +SKIP
        >>> buf = fwd.buffer(3)               # (2, 3) float32, fill row i with feature i
        >>> fwd.submit(buf.T)()               # (3, outputs) float32
    """

    def __init__(
        self, mlp: MLP | Program | Sequence[MLP | Program], width: int, capacity: int, device: torch.device, *,
        categories: int = 0, streams: Streams | None = None,
    ) -> None:
        """`mlp`: one model, or a model set's models (each batch is staged and uploaded once, and every
        model runs on that one copy; the result holds their outputs side by side, in order)."""
        self.models = list(mlp) if isinstance(mlp, Sequence) else [mlp]
        self.mlp = self.models[0]
        self.categories = categories
        self.width = width
        self.capacity = capacity
        self.device = device
        self.cuda = device.type == "cuda"
        self.streams: Streams | None = CudaStreams(device) if self.cuda and streams is None else streams
        self.each = [model.outputs for model in self.models]  # outputs per model
        outputs = sum(self.each)
        pin = self.cuda
        # Flat storage: the first width*rows values viewed as (width, rows) are contiguous for any rows.
        self._slots = [
            _Slot(torch.empty(width * capacity, dtype=torch.float32, pin_memory=pin),
                  torch.empty(capacity * outputs, dtype=torch.float32, pin_memory=pin),
                  torch.empty(capacity * categories, dtype=torch.int64, pin_memory=pin) if categories else None)
            for _ in range(2)
        ]
        self._next = 0
        self.outputs = outputs
        # Rows per forward pass. CPU: the widest activation stays ~4 MiB, in cache (measured
        # 2.4x faster than 256k-row passes for 64-256-256-1, ~1.3x for 64-16-1). CUDA: the
        # whole batch, halved on out-of-memory.
        cpu_rows = min(65_536, max(1_024, _CPU_ACTIVATION_BYTES // (4 * max(m.widest for m in self.models))))
        limits = [m.max_batch for m in self.models if m.max_batch]
        self.max_rows = min(capacity if self.cuda else cpu_rows, *limits, capacity)

    @property
    def concurrent(self) -> bool:
        """Whether several threads may `submit` at once, each computing in its own thread: the CPU path
        with one torch thread and models that hold no state between calls (`MLP`). A GPU's slots and
        streams serve one caller; with more torch threads, two callers would oversubscribe the cores."""
        return self._reentrant_cpu and torch.get_num_threads() == 1

    @property
    def _reentrant_cpu(self) -> bool:
        """The CPU path with models that hold no state between calls (threads may run them at once)."""
        return self.streams is None and all(getattr(model, "reentrant", False) for model in self.models)

    def side_by_side(self) -> bool:
        """Whether the calling thread may run passes beside other threads' (`concurrent`), its torch threads
        first made one where the models allow it: the CPU path and models that hold no state between calls.

        torch's thread count is the calling thread's own (and new threads start from the count last set
        anywhere), so a decoding thread sets its own rather than trusting what another thread set. Side by
        side, each decoding thread runs its own batches on one torch thread: the compute-bound
        64->256->256->1 on a 2-CPU replica, in process (`python -m benchmarks.steady --workload compute
        --cpus 2`), ran at 652-670k rows/s for 2.6-2.8 CPU s per million rows, against 422-502k rows/s and
        3.9-4.6 CPU s for one pass at a time on two torch threads (two threads of one matmul scale worse
        than two matmuls).
        """
        if not self._reentrant_cpu:
            return False
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        return True

    def buffer(self, rows: int) -> np.ndarray:
        """The next slot's host buffer as a contiguous (width, rows) float32 array, free to fill."""
        if rows > self.capacity:
            raise ValueError(f"batch of {rows} rows exceeds the buffer capacity {self.capacity}")
        slot = self._slots[self._next]
        slot.free_host()
        return slot.host[: self.width * rows].numpy().reshape(self.width, rows)

    def submit(self, matrix: np.ndarray, codes: np.ndarray | None = None) -> Callable[[], np.ndarray]:
        """Start the forward pass of a (rows, width) float32 batch; call the result for (rows, outputs).

        `matrix` is ideally `buffer(rows).T`; anything else is copied into the slot first.
        `codes`: the (rows, k) int64 categorical codes of a program that takes them.
        Results may be collected in any order, or not at all.
        """
        rows = matrix.shape[0]
        slot = self._slots[self._next]
        self._next = 1 - self._next
        if self.streams is None:  # CPU: synchronous, straight from the caller's matrix
            out = np.empty((rows, self.outputs), dtype=np.float32)
            self._run(torch.from_numpy(matrix), self._columns(torch.from_numpy(out)),
                      None if codes is None else torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int64)))
            return lambda: out
        if rows > self.capacity:
            raise ValueError(f"batch of {rows} rows exceeds the buffer capacity {self.capacity}")
        host = slot.host[: self.width * rows].view(self.width, rows)  # (width, rows), pinned
        source = matrix.T  # (width, rows)
        if not (source.flags.c_contiguous and source.ctypes.data == host.data_ptr()):
            slot.free_host()
            host.numpy()[...] = source
        staged = None
        if codes is not None and slot.codes is not None:
            slot.free_host()  # (3) the codes buffer is read by the same uploads as `host`
            staged = slot.codes[: rows * self.categories].view(rows, self.categories)  # pinned
            staged.numpy()[...] = codes
        slot.free_out()
        # pinned; one contiguous (rows, k) block per model, so each copy back is one plain copy
        outs, start = [], 0
        for k in self.each:
            outs.append(slot.out[start : start + rows * k].view(rows, k))
            start += rows * k
        features, slot.uploaded = self.streams.upload(host)  # (width, rows) on the device
        device_codes = None
        if staged is not None:  # same copy stream, after the features: its event covers both uploads
            device_codes, slot.uploaded = self.streams.upload(staged)
        # features.T: (rows, width), a transposed view, no copy
        done = self.streams.compute(lambda: self._run(features.T, outs, device_codes), slot.uploaded)
        slot.pending = result = _Result(slot, outs, done)
        return result

    def _columns(self, out: torch.Tensor) -> list[torch.Tensor]:
        """Each model's columns of a (rows, outputs) result."""
        views, start = [], 0
        for k in self.each:
            views.append(out[:, start : start + k])
            start += k
        return views

    def _run(self, features: torch.Tensor, outs: list[torch.Tensor], codes: torch.Tensor | None = None) -> None:
        """Forward (rows, width) features into each model's `outs` (rows, k), `max_rows` rows per pass
        (every model over a chunk before the next chunk: the chunk's features stay in cache).

        On CPU `max_rows` keeps activations in cache; on CUDA it starts at the
        whole batch and halves on out-of-memory (chunks already written are simply
        written again). Device results are copied into the pinned `out` without blocking.
        """
        if not self.cuda and codes is None and all(getattr(model, "by_columns", False) for model in self.models):
            columns = features.T  # (width, rows): the stacked buffer as it lies (`MLP.columns`)
            with torch.inference_mode():
                for start in range(0, len(features), self.max_rows):
                    stop = start + self.max_rows
                    for model, out in zip(self.models, outs):
                        out[start:stop].copy_(model.columns(columns[:, start:stop]).T)
            return
        while True:
            try:
                with torch.inference_mode():
                    for start in range(0, len(features), self.max_rows):
                        stop = start + self.max_rows
                        for model, out in zip(self.models, outs):
                            result = model(features[start:stop]) if codes is None else \
                                model(features[start:stop], codes[start:stop])
                            out[start:stop].copy_(result, non_blocking=self.cuda)
                return
            except torch.cuda.OutOfMemoryError:
                if self.max_rows <= _MIN_GPU_ROWS:
                    raise
                self.max_rows = max(_MIN_GPU_ROWS, self.max_rows // 2)
                torch.cuda.empty_cache()
