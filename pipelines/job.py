"""The Python API: `plan` and `run`. Data flows config -> plan -> dispatch -> collect -> commit."""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import interrupts
from pipelines.bundle import ShardQueue
from pipelines.commit import COMMITTED, REJECTED_DIR, SUCCESS, Recorder, remove_success
from pipelines.config import JobConfig
from basis.errors import ConfigError
from pipelines.lock import OutputLock
from pipelines.plan import DEFAULT_SHARD_ROWS, Shard, resolve_failed
from pipelines.report import Progress, RunReport, RunResults, write_timeline
from pipelines.prepare import Plan, output_snapshot, prepare, refusals
from basis.storage import absolute, redact

logger = logging.getLogger(__name__)


def plan(config: JobConfig | None = None, /, **options: Any) -> Plan:
    """Validate a job and compute its shard plan; writes nothing.

    Example:
        >>> p = plan(model="m.pt", input="features/", output="preds/")  # doctest: +SKIP
        >>> len(p.todo), len(p.skipped)
        (16, 0)
    """
    return prepare(_config(config, options))


def run(
    config: JobConfig | None = None,
    /,
    *,
    timeline: str | None = None,
    progress: bool = True,
    **options: Any,
) -> RunReport:
    """Run a job: predict every uncommitted shard and commit the manifest.

    Any config key may be given as a keyword (or pass a `JobConfig`). Raises a
    `BatchInferError` subclass where the CLI exits 2 or 3; shard failures are in
    the returned report (`status == "failed"`).

    Example:
        >>> report = run(model="m.pt", input="features/", output="preds/")  # doctest: +SKIP
        >>> report.status, report.rows_out
        ('succeeded', 1000000)
    """
    cfg = _config(config, options)
    started = time.perf_counter()
    from pipelines.metrics import RunMetrics
    from pipelines.startup import Startup

    metrics = RunMetrics()
    # A run sure to use Ray starts it, and its replicas, while it plans (`pipelines.startup`); a refusal
    # stops them on the way out; a run that plans no work never starts it.
    with interrupts.remembered(), Startup(cfg, metrics=metrics) as startup:
        return _run(cfg, startup, metrics, started, timeline=timeline, progress=progress)


def _run(cfg: JobConfig, startup: Any, metrics: Any, started: float, *, timeline: str | None,
         progress: bool) -> RunReport:
    p = prepare(cfg, on_work=startup.begin, lazy=True)
    metrics.output = p.output.uri
    with refusals(p.output) as refused, OutputLock(p.output) as lock:
        if output_snapshot(p.output) != p.snapshot:  # another run committed between planning and the lock
            p = prepare(cfg, on_work=startup.begin, lazy=True)
        from pipelines.autoscaler import clear_stale_request

        clear_stale_request(cfg, p.output)  # a killed run's autoscaler request: cleared by the next tick, idle or not
        if not p.todo and _unchanged(p):
            logger.info("nothing to do: all %d shard(s) already committed", len(p.skipped))
            return _report(p, RunResults(), [], time.perf_counter() - started, complete=True)
        recorder = Recorder(p.output, p.state, header=p.header, shards=p.shards, check_lock=lock.check,
                            kept=p.reconciled.kept, foreign=p.reconciled.foreign, sink=p.sink)
        from pipelines.lane import run_in_driver
        from pipelines.lane import share_strings
        from pipelines.startup import lane_on_numpy, lane_processes, lane_resources
        from workers.replica_job import ReplicaJob, default_batch_size

        # the shards to run, handed over to the lane or the scheduler: each made as it is taken, dropped once
        # its result is in
        runnable = _runnable(p)
        done = RunResults(timeline=timeline is not None)
        first_commit: list[float] = []

        def begin() -> None:
            """The run's first writes, once a replica is ready (so a refused start writes nothing)."""
            remove_success(p.output)
            # The journal says whose work follows, before any of it, and which entries are stale.
            recorder.begin(overwrite=cfg.overwrite, stale=p.reconciled.stale)
            for shard in p.todo:
                if shard.error is not None:
                    recorder.failed(shard, shard.error, 0)
                    metrics.shard_done(shard.rows_in, committed=False)
                    done.add({"id": shard.id, "status": "failed", "error": shard.error, "rows_in": shard.rows_in,
                              "rows_out": 0, "rows_rejected": 0}, shard.input)
            recorder.flush(force=True)
            refused.started = True  # shards run from here: a refusal now leaves committed work behind
            # Only `runnable` holds the shards to run from here, as the plan's columns (100,000 tiny files:
            # ~60 MiB of `Shard`s freed).
            p.todo = p.reconciled.todo = []
            p.shards.release()

        replicas: list[dict[str, Any]] = []
        waited = 0.0
        chosen: list[float] = []  # the CPUs and GPUs each replica reserved
        if runnable:
            members = p.model.members if cfg.model_set is not None else ()
            job = ReplicaJob(
                model=members[0][1].uri if members else absolute(cfg.model), model_sha256=p.model.sha256,
                input=p.input.replica_uri,
                output=p.sink.uri, features=p.columns.features, passthrough=p.columns.passthrough,
                list_column=p.columns.list_column, width=p.columns.width,
                prediction_column=cfg.prediction_column or "",
                keep_features=cfg.keep_features, activation=cfg.activation, output_activation=cfg.output_activation,
                precision=cfg.precision, batch_size=cfg.batch_size, invalid_rows=cfg.invalid_rows,
                cpus=cfg.cpus_per_replica or 1.0, rejected_dir=REJECTED_DIR, generation=recorder.generation,
                categorical=p.columns.categorical, job_digest=recorder.digest,
                models=tuple((name, spec.uri, spec.sha256) for name, spec in members),
            )
            rows = runnable.rows if isinstance(runnable, ShardQueue) else sum(s.rows_in for s in runnable)
            bar = Progress(rows, len(runnable), enabled=progress)

            def on_result(shard: Shard, result: dict[str, Any]) -> None:
                spans = result.get("spans")
                if spans is not None:  # a file planned by its replica (`workers.lazy`): its shards now known
                    for piece, part in zip(p.shards.resolve(shard, spans, result["file_row_groups"]), result["parts"]):
                        share_strings(part, piece)
                        record(piece, {**part, "attempts": result["attempts"],
                                       **({"call": result["call"]} if "call" in result else {})})
                elif shard.lazy and result["status"] != COMMITTED:  # failed before its replica planned it
                    for piece in resolve_failed(p.shards, shard, p.source, p.columns):
                        record(piece, {**result, "id": piece.id, "rows_in": piece.rows_in, "output": piece.output})
                else:
                    record(shard, result)

            def record(shard: Shard, result: dict[str, Any]) -> None:
                if result.get("error"):  # recorded in the journal and the report: no secret in it
                    result = {**result, "error": redact(result["error"])}
                ok = result["status"] == COMMITTED
                if ok:
                    if not first_commit:
                        first_commit.append(time.perf_counter() - started)
                    recorder.committed(result["entry"], result["token"], result["attempts"])
                else:
                    recorder.failed(shard, result["error"], result["attempts"])
                done.add(result, shard.input)  # what the report and the timeline read (the entry is the manifest's now)
                bar.update(shard.rows_in, failed=not ok)
                metrics.shard_done(shard.rows_in, committed=ok)

            bundle_rows = cfg.shard_rows or DEFAULT_SHARD_ROWS  # small shards go out in calls of about a shard
            # rows: a lazy shard's estimated
            # an embedded CPU run that one replica does as well as Ray: refused here, or run in the driver
            local = None if startup.started else lane_resources(cfg, rows, len(runnable), p.model.layers)
            try:
                if local is not None:
                    batch_rows = cfg.batch_size or default_batch_size(p.columns.width, on_gpu=False)
                    processes = lane_processes(local.num_cpus, rows, len(runnable), batch_rows)
                    job = dataclasses.replace(job, cpus=1.0 if processes else local.num_cpus)
                    chosen[:] = [job.cpus, 0.0]
                    logger.info("running %d shard(s) in the driver process%s: %d row(s) need no Ray started",
                                len(runnable), f" and {processes} of its children" if processes else "", rows)
                    begin()
                    replicas = run_in_driver(job, runnable, on_result, max_attempts=cfg.max_attempts,
                                             shard_timeout=cfg.shard_timeout, bundle_rows=bundle_rows,
                                             numpy_forward=lane_on_numpy(rows, len(runnable), batch_rows),
                                             processes=processes)
                else:
                    replicas, waited = _run_on_ray(cfg, p, job, startup, runnable, on_result, begin, metrics, chosen,
                                                   bundle_rows)
            finally:
                bar.close()
                recorder.flush(force=True)
        else:
            begin()
        interrupts.check()  # a signal whose KeyboardInterrupt was swallowed: no `_SUCCESS` after it
        complete = recorder.finish()
        seconds = time.perf_counter() - started
        report = _report(p, done, replicas, seconds, complete=complete)
        report.startup_seconds = first_commit[0] if first_commit else None
        report.capacity_wait_seconds = round(waited, 3)
        if chosen:
            report.cpus_per_replica, report.gpus_per_replica = chosen
        if timeline:
            write_timeline(timeline, done.spans or [])
        return report


def _run_on_ray(cfg: JobConfig, p: Plan, job: Any, startup: Any, runnable: Sequence[Shard], on_result: Any, begin: Any,
                metrics: Any, chosen: list[float], bundle_rows: int) -> tuple[list[dict[str, Any]], float]:
    """The shards on Ray replicas (those started while planning, if any); returns their records and the
    seconds spent waiting for capacity."""
    from pipelines.autoscaler import AutoscalerRequest
    from pipelines.cluster import plan_replicas
    from pipelines.schedule import Scheduler

    ray_session, view, early = startup.wait(p.model, p.input, p.sink, len(runnable))
    with metrics.exporting():
        resources = plan_replicas(cfg, len(runnable), view, p.model.layers)
        job = dataclasses.replace(job, cpus=resources.num_cpus)
        chosen[:] = [resources.num_cpus, resources.num_gpus]
        if resources.cpus_chosen:
            logger.info("cpus_per_replica auto: %s", resources.cpus_chosen)
        logger.info("running %d shard(s) on %d replica(s)%s (%s%s)", len(runnable), resources.count,
                    f", up to {resources.most} as capacity appears" if resources.most > resources.count else "",
                    ray_session.where, f"; {len(early.slots)} started while planning" if early else "")
        start_timeout = cfg.start_timeout or (600.0 if resources.autoscaling else 300.0)
        with AutoscalerRequest(enabled=resources.autoscaling, output=p.output) as request:
            scheduler = Scheduler(job, resources, max_attempts=cfg.max_attempts, request=request,
                                  start_timeout=start_timeout, shard_timeout=cfg.shard_timeout,
                                  bundle_rows=bundle_rows, metrics=metrics, pool=early)
            startup.pool = None  # the scheduler's now: it stops them, however the run ends
            return scheduler.run(runnable, on_result, on_started=begin), scheduler.pool.waited_seconds


def _runnable(p: Plan) -> collections.deque[Shard]:
    """The plan's shards to run (those not failing at planning), as a queue that makes each `Shard` from the
    plan's columns when it is taken (`pipelines.bundle.ShardQueue`)."""
    rows = p.reconciled.todo_rows
    if p.todo is not p.reconciled.todo or len(rows) != len(p.todo):  # not the plan's own rows: as they are
        return collections.deque(s for s in p.todo if s.error is None)
    return ShardQueue(p.shards, rows[~p.shards.failing()[rows]])


def _config(config: JobConfig | None, options: Mapping[str, Any]) -> JobConfig:
    if config is None:
        return JobConfig.from_dict(options, source="run() arguments")
    if not isinstance(config, JobConfig):
        raise ConfigError(f"expected a JobConfig or keyword arguments, got {type(config).__name__}")
    return config.replace(**options) if options else config


def _unchanged(p: Plan) -> bool:
    """Nothing to run and nothing to record: a rerun then writes no file at all."""
    state = p.state
    if not state.journal.empty or state.retiring or p.reconciled.stale or p.reconciled.foreign:
        return False
    if (state.header.get("source") or {}) != p.header["source"]:
        return False  # a table's new snapshot (a compaction, nothing to score): the manifest records it
    if state.others and pc.any(pc.is_in(pa.array(list(state.others), pa.string()), value_set=p.shards.ids())).as_py():
        return False  # a failed or pending entry of a planned shard: the manifest records how it stands
    return p.output.fs.get_file_info(p.output.join(SUCCESS)).type.name == "File"


def _report(p: Plan, done: RunResults, replicas: list[dict[str, Any]], seconds: float, *, complete: bool) -> RunReport:
    foreign = [p.output.display(p.output.join(path)) for path in p.reconciled.foreign]
    errors = [{"shard": r["id"], "input": r["input"], "error": r["error"]} for r in done.failed]
    if foreign:  # the run's work is done, but the output is not what _SUCCESS promises
        errors.append({"shard": None, "input": None, "error": (
            f"{', '.join(foreign[:3])}{f' and {len(foreign) - 3} more' if len(foreign) > 3 else ''}: data "
            f"file(s) not written by batch-infer (no manifest entry describes them) sit in the output; no _SUCCESS "
            f"while they are there: move them out of the output and rerun")})
    return RunReport(
        status="failed" if errors else "succeeded",
        output=p.output.uri,
        shards_total=len(p.shards),
        shards_done=done.committed,
        shards_skipped=len(p.skipped),
        shards_failed=len(done.failed),
        rows_in=done.rows_in,
        rows_out=done.rows_out,
        rows_rejected=done.rows_rejected,
        seconds=round(seconds, 3),
        rows_per_second=round(done.rows_in / seconds, 1) if seconds > 0 else 0.0,
        errors=errors,
        replicas=replicas,
        complete=complete,
    )
