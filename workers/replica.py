"""The `Replica` actor: one model replica that reads, predicts and writes shards.

The driver creates it with `ray.remote(Replica).options(num_cpus=..., num_gpus=...)`
and sends it `process(task)` calls; each call reads one shard from storage,
runs batched forward passes and commits one output file. Only small dicts of
metadata cross the process boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import logging
import os
import resource
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from basis.errors import ModelError, ShardDataError
from basis.masks import decode as decode_mask
from basis.record import CommitLog
from basis.storage import Location, resolve, unique_suffix
from workers.categorical import category_codes, merge_invalid
from workers.decode import decode
from workers.fit import footer_error
from workers.lazy import plan_file
from workers.reader import SMALL_FILE_BYTES, Spares, describe_invalid, open_parquet
from workers.replica_job import Abandoned, ReplicaJob, State, default_batch_size, torch_threads
from workers.staging import commit_in_order
from workers.threads import cores
from workers.writer import Background, ShardWriter, output_schema, prediction_array, prediction_type

if TYPE_CHECKING:
    from workers.cpu_forward import NumpyForward
    from workers.device import Forward

logger = logging.getLogger(__name__)
STAGE_LOCAL = False  # stage tiny shards side by side on local files too (`process_bundle`; tests set it)


@dataclasses.dataclass
class _Staged:
    """A shard read, predicted and written under hidden temporary names: its manifest entry and its files."""

    entry: dict[str, Any]
    writer: ShardWriter
    rejected: ShardWriter | None


class Replica:
    """Holds one model replica; `process` turns a shard into one committed output file."""

    def __init__(self, index: int, job: ReplicaJob, *, in_driver: bool = False, numpy_forward: bool = False,
                 storage: tuple[Location, Location] | None = None) -> None:
        """`in_driver`: a CPU replica in the driver process, no Ray. `numpy_forward`: with it, an fp32
        model whose weights `read_weights` can read runs on numpy (`workers.cpu_forward`), no torch.
        `storage`: the (input, output) locations to use, already resolved; the driver lane's replacement
        for a stalled replica takes its predecessor's, as pyarrow cannot build an S3 client in a process
        while a request of another one hangs (it waits for it)."""
        self.index = index
        self.job = job
        if in_driver:  # the driver lane (pipelines.lane): a CPU replica in the driver process, no Ray
            self.gpu_ids: list[str] = []
            self.node = "driver"
        else:
            import ray  # the actor runs inside Ray; imported here so the class is usable without it

            self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
            self.node = ray.get_runtime_context().get_node_id()
            pa.set_cpu_count(cores(job.cpus))  # its own process: its CPUs are its threads
        self.batch_size = job.batch_size or default_batch_size(job.width, bool(self.gpu_ids))
        self.source, self.output = storage or (resolve(job.input), resolve(job.output))
        self.host = socket.gethostname()
        self.device = "cuda" if self.gpu_ids else "cpu"  # confirmed once torch is loaded
        self.shards = 0
        self.rows = 0
        self.calls = 0  # `process_bundle` calls
        self.busy_seconds = 0.0
        self._torch_threads = 0  # torch's threads before this replica set its own (CPU)
        self._forward_threads = 0  # `torch_threads` for the loaded model(s) on the CPU (0: not loaded, or a GPU)
        self._few_groups = False  # the shard being decoded has fewer row groups than decoding threads (`_predict`)
        self._numpy_forward = numpy_forward and in_driver
        self._category_limits: tuple[int | None, ...] = ()  # per categorical column, from the loaded program
        self._forward_lock = threading.Lock()  # shards staged side by side (`process_bundle`) share the forward
        self._stagers: ThreadPoolExecutor | None = None  # their threads, made on first use
        self._spares = Spares()  # stacking buffers kept from shard to shard (no fresh pages per shard)
        self._shard_columns: tuple[ReplicaJob, list[str], list[str]] | None = None  # `_columns`
        self._schemas: tuple[Any, ...] | None = None  # `_output_schema`'s last answer
        self._fitted: tuple[ReplicaJob, pa.Schema] | None = None  # the last schema `workers.fit.misfit` passed
        # Importing torch and loading the model take ~1 s; they run in the background so
        # the first shard's file is opened and decoded meanwhile (pyarrow releases the GIL).
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-infer-load")
        self._model: Future[Forward | NumpyForward] = self._loader.submit(self._load)
        self._loaded: Forward | NumpyForward | None = None  # its result, once `forward` had it
        self._loader.shutdown(wait=False)
        self.state = State.READY

    def _load(self) -> Forward | NumpyForward:
        if self._numpy_forward and self.job.precision in ("fp32", "tf32") and not self.job.categorical:
            lite = self._load_without_torch()
            if lite is not None:
                return lite
        import torch

        from workers.device import Forward
        from workers.model import load_model

        job = self.job
        device = torch.device("cuda" if self.gpu_ids and torch.cuda.is_available() else "cpu")
        if self.gpu_ids and device.type != "cuda":
            logger.warning("[replica %d] assigned GPU(s) %s but CUDA is not available; using the CPU",
                           self.index, self.gpu_ids)
        if device.type == "cuda" and job.precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
        loaded = []
        for _, uri, sha256 in job.members:  # a set's models on the same device: one upload feeds them all
            spec, model = load_model(uri, activation=job.activation, output_activation=job.output_activation,
                                     device=device, precision=job.precision)
            self._check_unchanged(uri, sha256, spec.sha256)
            spec.check_categorical(job.categorical)  # as the driver checked: the same bytes
            loaded.append((spec, model))
        if len(loaded) == 1:
            spec = loaded[0][0]
            self._category_limits = getattr(spec, "category_limits", ())
        else:
            from workers.modelset import ModelSet

            spec = ModelSet(tuple((member[0], each) for member, (each, _) in zip(job.members, loaded)))
            self._category_limits = spec.category_limits
        if device.type == "cpu":
            self._torch_threads = torch.get_num_threads()  # put back on close (the driver lane's are its caller's)
            self._forward_threads = torch_threads(cores(job.cpus), spec.layers)
            torch.set_num_threads(self._forward_threads)
        self.device = str(device)
        logger.info("[replica %d] %s model loaded on %s (%s), batch_size=%d", self.index, spec.format, self.host,
                    device, self.batch_size)
        models = [model for _, model in loaded]
        return Forward(models if len(models) > 1 else models[0], job.width, self.batch_size, device,
                       categories=len(job.categorical))

    def _load_without_torch(self) -> NumpyForward | None:
        """The driver lane's forward pass on numpy (`workers.cpu_forward`), or None when only torch can load it.

        `import torch` is most of a small job's time; fp32 on the CPU needs only the weights.
        """
        from workers.cpu_forward import NumpyForward
        from workers.modelfile import read_model_bytes, read_weights

        job = self.job
        stacks = []
        for _, uri, sha256 in job.members:
            data = read_model_bytes(uri)
            self._check_unchanged(uri, sha256, hashlib.sha256(data).hexdigest())
            layers = read_weights(data, uri)
            if layers is None:  # every model of a set on numpy, or all on torch
                return None
            stacks.append(layers)
        logger.info("[replica %d] %d model(s) loaded on %s (cpu, numpy), batch_size=%d", self.index, len(stacks),
                    self.host, self.batch_size)
        return NumpyForward(stacks[0], job.activation, job.output_activation, more=stacks[1:])

    def _predict(self, matrix: np.ndarray, bad: np.ndarray | None) -> Callable[[], np.ndarray] | None:
        """A batch's CPU forward pass in its decoding thread (`decode`'s `predict`), so a replica's threads
        run it side by side; None leaves it to the shard's loop (a GPU, several torch threads, rows that
        fail the shard)."""
        forward = self.forward
        if bad is not None and self.job.invalid_rows == "fail":
            return None
        if self._few_groups and self._forward_threads > 1:
            return None  # one decoding thread has all the rows: the loop's torch threads take the forward
        if not forward.side_by_side():
            return None
        return forward.submit(matrix if bad is None else matrix[~bad])

    def _loop_threads(self) -> None:
        """This thread's torch threads for a forward of a shard of few row groups (torch's count is per thread)."""
        import torch

        if torch.get_num_threads() != self._forward_threads:
            torch.set_num_threads(self._forward_threads)

    def _check_unchanged(self, uri: str, planned: str, sha256: str) -> None:
        if sha256 != planned:
            raise ModelError(f"model {uri!r} changed since the run was planned (sha256 {sha256[:12]}...)")

    @property
    def forward(self) -> Forward | NumpyForward:
        """The loaded model (waits for the background load; raises its error)."""
        loaded = self._loaded
        if loaded is None:
            loaded = self._loaded = self._model.result()  # then no lock per shard
        return loaded

    def configure(self, job: ReplicaJob) -> None:
        """The planned job, for a replica started before the plan was done (`pipelines.startup`)."""
        if job.provisional or not job.same_start(self.job):
            raise ModelError(f"replica {self.index} was started for another job than the one planned")
        self.job = job

    def info(self) -> dict[str, Any]:
        """Where this replica runs (a readiness probe: the actor is up; the model may still be loading)."""
        return {"index": self.index, "node": self.node, "host": self.host, "pid": os.getpid(),
                "device": self.device, "gpu_ids": self.gpu_ids, "batch_size": self.batch_size}

    def stats(self) -> dict[str, Any]:
        """Counters for the run report."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return {**self.info(), "shards": self.shards, "rows": self.rows,
                "busy_seconds": round(self.busy_seconds, 3), "peak_rss_bytes": peak}

    def close(self) -> None:
        self.state = State.CLOSED
        if self._stagers is not None:
            self._stagers.shutdown(wait=False, cancel_futures=True)
        self._spares.clear()
        if self._torch_threads:
            import torch

            torch.set_num_threads(self._torch_threads)
        if self._model.done() and self._model.exception() is None and self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def abandon(self) -> None:
        """Given up by the driver lane (it stalled past `shard_timeout`, or the run was interrupted) while a
        shard may still run on it in another thread: that shard never commits, as if its process had
        been killed. Checked before the journal record and before each publish."""
        self.close()

    def _check_ready(self, uri: str) -> None:
        if self.state is not State.READY:
            raise Abandoned(f"replica {self.index} was given up while it held {uri}; nothing committed")

    def process(self, task: dict[str, Any]) -> dict[str, Any]:
        """Read, predict and commit one shard; returns its metadata record.

        The commit is recorded in the output's journal (rows, size and sha256 of
        each file) before the files are published, so a file under its final name
        is always described by a record. Data problems (unreadable file, schema
        mismatch, invalid rows with `invalid_rows: fail`) come back as
        `status: failed` with the file named; an exception escaping here is a
        bug or an infrastructure failure.
        """
        log = CommitLog(self.output, self.job.generation)
        try:
            return self._process(task, log)
        finally:
            log.seal()

    def _process(self, task: dict[str, Any], log: CommitLog, parquet: Any = None) -> dict[str, Any]:
        """`process`, its commit record written to `log` (`parquet`: the shard's file, opened already)."""
        if self.state is not State.READY:
            raise RuntimeError(f"replica {self.index} is {self.state.value}")
        if self.job.provisional:  # never written with a guessed job: the plan's columns, generation, digest
            raise RuntimeError(f"replica {self.index} was given no planned job (Replica.configure)")
        started = time.time()
        if task.get("lazy"):
            return self._process_file(task, log, started)
        try:
            with contextlib.ExitStack() as files:
                entry, token = self._commit(task, self._stage(task, files, parquet), log)
        except ShardDataError as exc:
            return self._result(task, started, error=str(exc))
        return self._result(task, started, entry=entry, token=token)

    def _process_file(self, task: dict[str, Any], log: CommitLog, started: float) -> dict[str, Any]:
        """A small file the driver planned without opening it (`workers.lazy`): checked and split here,
        each of its shards committed on its own; the result holds theirs (`parts`) and its `spans`."""
        try:
            parquet = open_parquet(self.source, task["path"], task["input"])
        except ShardDataError as exc:  # as the driver's plan fails it: row groups (0, 0), no rows
            return self._result({**task, "rows_in": 0}, started, error=footer_error(task["input"], exc.__cause__ or exc))
        schema, job, fitted = parquet.schema_arrow, self.job, self._fitted
        known = fitted is not None and fitted[0] is job and fitted[1].equals(schema)  # many tiny files, one schema
        shards = plan_file(parquet, task, job, fits=known)
        if isinstance(shards, str):
            return self._result({**task, "rows_in": 0}, started, error=shards)
        self._fitted = (job, schema)
        parts = [self._process(shard, log, parquet) for shard in shards]
        failed = [part["error"] for part in parts if part["status"] != "committed"]
        return {"id": task["id"], "replica": self.index, "started": started, "finished": parts[-1]["finished"],
                "status": "failed" if failed else "committed", "error": failed[0] if failed else None,
                "rows_in": sum(part["rows_in"] for part in parts), "rows_out": sum(part["rows_out"] for part in parts),
                "rows_rejected": sum(part["rows_rejected"] for part in parts), "output": task["output"],
                "rejected_output": None, "parts": parts, "file_row_groups": shards[0]["file_row_groups"],
                "spans": [(*shard["row_groups"], shard["rows_in"], shard["output"]) for shard in shards]}

    def _result(self, task: dict[str, Any], started: float, *, entry: dict[str, Any] | None = None,
                token: str = "", error: str = "") -> dict[str, Any]:
        """A shard's result record: committed (`entry`, `token`) or failed (`error`)."""
        result: dict[str, Any] = {"id": task["id"], "replica": self.index, "started": started,
                                  "rows_in": task["rows_in"], "rows_out": 0, "rows_rejected": 0,
                                  "output": task["output"], "rejected_output": None}
        if entry is not None:
            result.update(status="committed", entry=entry, token=token, rows_out=entry["rows_out"],
                          rows_rejected=entry["rows_rejected"], rejected_output=entry["rejected_output"])
            self.shards += 1
            self.rows += task["rows_in"]
        else:
            result.update(status="failed", error=error)
        finished = time.time()
        self.busy_seconds += finished - started
        result["finished"] = finished
        return result

    def process_bundle(self, tasks: list[dict[str, Any]], every: float = 0.0) -> Iterator[list[dict[str, Any]]]:
        """Several shards in one call (small files): each read, predicted and committed on its own, as
        `process` does (its journal record, then its files); yields their results in order, in lists.

        A list goes out once `every` seconds have passed since the last one (0: after each shard),
        so a streaming Ray call sends a result per ~`every` seconds, not per file (each item costs
        ~0.3 ms of CPU between the two processes). An exception ends the bundle at the shard that
        raised it, after the results committed before it are yielded: the driver always knows
        which shard raised.

        Tiny shards (each at most one forward batch) of a replica with several CPUs reading or writing
        an object store are staged side by side (`_staged_ahead`: read, predicted and written under
        temporary names on `cores` threads, so one file's round trips wait while another's run) and
        committed here one after the other in bundle order, so a shard after one that raised never
        commits. On local files they go one at a time: side by side was no faster there (quiet 2-core
        box, 10,000 files of 100 rows: 612 against 643 shards/s) for 35% more CPU per file.
        """
        self.calls += 1
        call, results, last = self.calls, [], time.monotonic()
        if self.source.is_local and len(tasks) > 1:  # the kernel reads the files ahead while the first is done
            paths = list(dict.fromkeys(str(task["path"]) for task in tasks[1:]))
            threading.Thread(target=will_need, args=(paths,), name="batch-infer-readahead", daemon=True).start()
        log = CommitLog(self.output, self.job.generation)  # the bundle's commit records, in one file
        ahead = self._staged_ahead(tasks, log)
        try:
            for task in tasks:
                try:
                    result = self._process(task, log) if ahead is None else next(ahead)()
                    result["call"] = call  # which of this replica's calls (a bundle); the result is ours
                    results.append(result)
                except BaseException:
                    if results:
                        yield results
                    raise
                if time.monotonic() - last >= every:
                    yield results
                    results, last = [], time.monotonic()
            if results:
                yield results
        finally:
            if ahead is not None:
                ahead.close()
            log.seal()  # after the last commit of this call: nothing more is ever appended to its file

    def _staged_ahead(self, tasks: list[dict[str, Any]],
                      log: CommitLog) -> Generator[Callable[[], dict[str, Any]], None, None] | None:
        """Per task, in order, a call that commits it once staged and returns its result (as `process`);
        the stagings run up to `cores` ahead on threads of their own. None when the bundle is better done
        one shard at a time: one CPU, a GPU, a shard of more than a forward batch, a forward that keeps
        its state between calls."""
        workers = min(cores(self.job.cpus), len(tasks))
        if workers < 2 or self.gpu_ids or any(task["rows_in"] > self.batch_size or task.get("lazy") for task in tasks):
            return None
        if self.source.is_local and self.output.is_local and not STAGE_LOCAL:
            return None  # measured on a quiet 2-core box, 10,000 local files: no faster than one at a time, +35% CPU
        if not self._model.done() or self._model.exception() is not None:
            return None  # the first bundle waits on the model in line (and raises its error there)
        from workers.cpu_forward import NumpyForward

        forward = self.forward
        if not (isinstance(forward, NumpyForward) or forward.concurrent):
            return None
        if self.state is not State.READY or self.job.provisional:
            return None  # `process` raises the error
        if self._stagers is None:
            self._stagers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch-infer-stage")

        def commit(task: dict[str, Any], started: float, staged: _Staged | str) -> dict[str, Any]:
            if isinstance(staged, str):  # the shard's own data problem
                return self._result(task, started, error=staged)
            entry, token = self._commit(task, staged, log)
            return self._result(task, started, entry=entry, token=token)

        return commit_in_order(tasks, self._stagers, workers, self._stage, commit)

    def _stage(self, task: dict[str, Any], files: contextlib.ExitStack, parquet: Any = None) -> _Staged:
        """Read, predict and write one shard's files under hidden temporary names (entered in `files`, which
        discards them unless `_commit` publishes them); nothing is visible yet."""
        job, uri = self.job, task["input"]
        parquet = parquet if parquet is not None else open_parquet(self.source, task["path"], uri)
        schema = parquet.schema_arrow
        columns, written = self._columns()
        fitted = self._fitted
        if fitted is None or fitted[0] is not job or not (fitted[1] is schema or fitted[1].equals(schema)):
            # (else `misfit` passed this schema)
            names = schema.names
            missing = [c for c in columns if c not in names]
            if missing:
                raise ShardDataError(f"{uri}: missing column(s) {missing}")
        rejected_rel = f"{job.rejected_dir}/{task['output']}"
        rejected: ShardWriter | None = None
        rows_out = rows_rejected = 0
        # A shard of one forward pass (a tiny file) has nothing to overlap: decoded and written in line,
        # as threads started for it cost more than its work.
        tiny = task["rows_in"] <= self.batch_size
        threads = 1 if tiny else cores(job.cpus)  # the CPUs it reserved, as far as this process may use them
        first_group, stop_group = task["row_groups"]
        self._few_groups = stop_group - first_group < threads  # read by `_predict` in the decoding threads
        batches = decode(parquet, tuple(task["row_groups"]), columns, self.batch_size, uri, features=job.features,
                         list_column=job.list_column, width=job.width, check_invalid=job.invalid_rows != "keep",
                         threads=threads, inline=tiny,
                         deleted=decode_mask(task["deleted"]) if task.get("deleted") else None,
                         predict=self._predict if threads >= 2 and not job.categorical else None,
                         spares=self._spares, stack_only=not set(job.features) & set(written))
        pending: tuple[pa.RecordBatch, Callable[[], np.ndarray]] | None = None
        with batches:
            items = iter(batches)
            # The first batch is decoded (inline for a tiny shard) before the model is waited for: the
            # first shard decodes while torch and the model load.
            first = next(items, None) if self._loaded is None and not self._model.done() else None
            forward = self.forward
            if self._few_groups and self._forward_threads > 1:  # the forward runs here: on its torch threads
                self._loop_threads()
            out_schema, splits = self._output_schema(schema, written, forward)
            writer = files.enter_context(ShardWriter(self.output, self.output.join(task["output"]), out_schema,
                                                           in_memory=tiny))
            # With several CPUs the output is encoded and compressed on a thread of its own, overlapping
            # the next batch's forward pass; with one, in line.
            background = files.enter_context(Background(enabled=threads >= 2))

            def write(data: pa.RecordBatch, result: Callable[[], np.ndarray]) -> int:
                arrays = [data.column(name) for name in written]
                values = result()  # (rows, outputs): each model's columns side by side
                arrays += [prediction_array(values[:, a:b]) for a, b in zip(splits[:-1], splits[1:])]
                batch = pa.RecordBatch.from_arrays(arrays, schema=out_schema)
                background.run(writer.write, batch)
                return data.num_rows

            for item in items if first is None else itertools.chain((first,), items):
                data, matrix, bad = item.batch.data, item.matrix, item.bad
                reasons = [] if bad is None else describe_invalid(matrix, bad, job.features, job.list_column)
                codes = None
                if job.categorical:  # null, negative or beyond its embedding table: an invalid row
                    codes, wrong, why = category_codes(data, job.categorical, self._category_limits)
                    if wrong is not None and job.invalid_rows == "keep":
                        row = item.batch.first_row + int(np.argmax(wrong))
                        raise ShardDataError(f"{uri}: row {row} (row group {item.batch.row_group}): {why[0]}; "
                                             f"invalid_rows: keep cannot predict it (the program has no embedding "
                                             f"for it): use quarantine or fail")
                    bad, reasons = merge_invalid(data.num_rows, bad, reasons, wrong, why)
                if bad is not None:
                    if job.invalid_rows == "fail":
                        row = item.batch.first_row + int(np.argmax(bad))
                        raise ShardDataError(
                            f"{uri}: row {row} (row group {item.batch.row_group}): {reasons[0]} (invalid_rows: fail)"
                        )
                    if rejected is None:
                        rejected_schema = output_schema(schema, columns, [pa.field("reason", pa.string())])
                        rejected = files.enter_context(
                            ShardWriter(self.output, self.output.join(rejected_rel), rejected_schema, in_memory=tiny)
                        )
                    bad_rows = data.filter(pa.array(bad)).select(columns)
                    rejected.write(pa.RecordBatch.from_arrays(
                        [*bad_rows.columns, pa.array(reasons, pa.string())], schema=rejected.schema))
                    rows_rejected += len(reasons)
                    data = data.filter(pa.array(~bad))
                    if item.predicted is None:
                        matrix = matrix[~bad]
                        codes = None if codes is None else codes[~bad]
                handle = item.predicted  # the CPU forward pass, run in the decoding thread (`_predict`)
                if handle is None:  # on GPU this returns at once; collected one batch later
                    with self._forward_lock:  # a bundle's shards staged side by side share the forward
                        handle = (forward.submit(matrix) if codes is None
                                  else forward.submit(matrix, codes))  # type: ignore[call-arg]
                item.release()  # submit has consumed (CPU) or copied (GPU) the stacked features
                if pending is not None:
                    rows_out += write(*pending)
                    pending = None
                if item.predicted is not None:  # predicted in its decoding thread: written now, not a batch
                    rows_out += write(data, handle)  # later (the writer ended each shard a batch behind)
                else:  # a submitted pass (a GPU's runs on): collected once the next batch is submitted
                    pending = (data, handle)
            if pending is not None:
                rows_out += write(*pending)
            background.wait()
            size, sha256 = writer.finish()
            entry = {key: task[key] for key in ("id", "input", "rel", "fingerprint", "file_row_groups", "rows_in",
                                                "output")}
            entry.update(row_groups=list(task["row_groups"]), rows_out=rows_out, rows_rejected=rows_rejected,
                         bytes=size, sha256=sha256, rejected_output=None, rejected_bytes=None, rejected_sha256=None,
                         status="committed", attempts=0, error=None, generation=job.generation)
            if rejected is not None:
                entry["rejected_bytes"], entry["rejected_sha256"] = rejected.finish()
                entry["rejected_output"] = rejected_rel
        return _Staged(entry, writer, rejected)

    def _columns(self) -> tuple[list[str], list[str]]:
        """The columns a shard reads and the input columns it writes (the job's; kept while it is the same)."""
        job = self.job
        if self._shard_columns is None or self._shard_columns[0] is not job:
            columns = list(dict.fromkeys([*job.passthrough, *job.features, *job.categorical]))
            written = [*job.passthrough, *(job.features if job.keep_features else ())]
            self._shard_columns = (job, columns, written)
        return self._shard_columns[1], self._shard_columns[2]

    def _output_schema(self, schema: pa.Schema, written: list[str],
                       forward: Forward | NumpyForward) -> tuple[pa.Schema, np.ndarray]:
        """The output file's schema for an input of `schema`, and where each model's columns start and end in
        the forward pass's outputs; kept from the shard before when its input schema and job were the same
        (many tiny files: one schema)."""
        kept = self._schemas
        if kept is not None and kept[0] is self.job and kept[1] is forward and kept[2].equals(schema, check_metadata=True):
            return kept[3], kept[4]
        predictions = [pa.field(column, prediction_type(k)) for (column, _, _), k in zip(self.job.members,
                                                                                       forward.each)]
        out_schema = output_schema(schema, written, predictions)
        splits = np.cumsum([0, *forward.each])
        self._schemas = (self.job, forward, schema, out_schema, splits)
        return out_schema, splits

    def _commit(self, task: dict[str, Any], staged: _Staged, log: CommitLog) -> tuple[dict[str, Any], str]:
        """Commit a staged shard: its journal record (in `log`), then its files under their final names."""
        job, uri, entry = self.job, task["input"], staged.entry
        token = unique_suffix()  # no `getrandom` per shard
        self._check_ready(uri)  # a replica the driver lane gave up never commits
        # Recorded before anything is visible, with the job that made it (another model's is never taken).
        log.write(token, entry, job.job_digest)
        if staged.rejected is not None:
            self._check_ready(uri)
            staged.rejected.publish()  # the quarantine file first: a record is whole once its output is in place
        self._check_ready(uri)
        staged.writer.publish()
        return entry, token


def will_need(paths: list[str]) -> None:
    """Ask the kernel to start reading each of these local files of at most `SMALL_FILE_BYTES`
    (`POSIX_FADV_WILLNEED`), so a bundle's reads do not each wait on the disk in turn.

    Measured: 100,000 files of 100 rows with nothing in the page cache (after `drop_caches`; `make
    bench`'s earlier jobs evict them the same way) ran at 1,477 shards/s against 2,415 with the files
    cached, the CPUs idle a third of the time, waiting on one read after another. A file that cannot
    be opened is left to the shard's own read, which reports it.
    """
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_size <= SMALL_FILE_BYTES:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
