"""The Python API: `plan` and `run`. Data flows config -> plan -> dispatch -> collect -> commit."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from pipelines.commit import (
    COMMITTED,
    FAILED,
    REJECTED_DIR,
    SUCCESS,
    Manifest,
    Reconciled,
    check_compatible,
    load_manifest,
    prediction_settings,
    reconcile,
    remove_success,
    reusable_spans,
)
from pipelines.config import JobConfig
from pipelines.errors import ConfigError, InputError, OutputConflictError
from pipelines.lock import OutputLock
from pipelines.plan import DEFAULT_SHARD_ROWS, Columns, InputFile, Shard, check_file, make_shards, resolve_columns, scan_inputs
from pipelines.report import Progress, RunReport
from pipelines.storage import (
    Location,
    existing_files,
    overlaps,
    relative_to,
    resolve,
    static_prefix,
    write_bytes_atomic,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Plan:
    """A validated job: what would run, what is already committed. Nothing written yet."""

    config: JobConfig
    model: Any  # workers.model.ModelSpec
    columns: Columns
    output: Location
    files: list[InputFile]
    shards: list[Shard]
    todo: list[Shard]
    skipped: list[Shard]
    previous: dict[str, Any] | None
    reconciled: Reconciled

    @property
    def rows_todo(self) -> int:
        return sum(s.rows_in for s in self.todo)

    def to_dict(self) -> dict[str, Any]:
        skipped = {s.id for s in self.skipped}
        return {
            "model": self.model.to_dict(),
            "features": list(self.columns.features),
            "passthrough": list(self.columns.passthrough),
            "files": len(self.files),
            "shards_total": len(self.shards),
            "shards_todo": len(self.todo),
            "shards_skipped": len(self.skipped),
            "rows_todo": self.rows_todo,
            "shards": [
                {"id": s.id, "input": s.input, "row_groups": list(s.row_groups), "rows_in": s.rows_in,
                 "output": self.output.display(self.output.join(s.output)),
                 "status": "skip" if s.id in skipped else ("fail" if s.error else "run"), "error": s.error}
                for s in self.shards
            ],
        }


def plan(config: JobConfig | None = None, /, **options: Any) -> Plan:
    """Validate a job and compute its shard plan; writes nothing.

    Example:
        >>> p = plan(model="m.pt", input="features/", output="preds/")  # doctest: +SKIP
        >>> len(p.todo), len(p.skipped)
        (16, 0)
    """
    cfg = _config(config, options)
    validated = _validate(cfg)
    return _reconcile(*validated)


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
    # Ray and torch are imported where they are used: `plan`, `status` and exit-2 paths stay light.
    from pipelines.cluster import cluster_totals, connect, size_replicas
    from workers.replica import ReplicaJob, replica_report

    cfg = _config(config, options)
    started = time.perf_counter()
    validated = _validate(cfg)
    output = validated[3]
    with OutputLock(output):
        p = _reconcile(*validated)
        manifest = Manifest(output, model={**p.model.to_dict(), "uri": cfg.model}, config=cfg.to_dict(),
                            settings=prediction_settings(cfg, p.columns), shards=p.shards, reconciled=p.reconciled)
        if not p.todo and _unchanged(p, manifest):
            logger.info("nothing to do: all %d shard(s) already committed", len(p.skipped))
            return _report(p, manifest, [], [], time.perf_counter() - started, complete=True)
        runnable = [s for s in p.todo if s.error is None]
        done: list[dict[str, Any]] = []
        started_writing: list[bool] = []

        def start() -> None:
            """The run's first writes; with shards to run, only once a replica is ready (exit 2 writes nothing)."""
            started_writing.append(True)
            for shard in p.todo:
                if shard.error is not None:
                    manifest.record(shard.id, status=FAILED, error=shard.error, attempts=0)
                    done.append({"id": shard.id, "input": shard.input, "status": FAILED, "error": shard.error})
            remove_success(output)
            manifest.flush(force=True)

        if not runnable:
            start()
        stats: list[dict[str, Any]] = []
        first_commit: list[float] = []
        if runnable:
            job = ReplicaJob(
                model=cfg.model, model_sha256=p.model.sha256, input=cfg.input, output=cfg.output,
                features=p.columns.features, passthrough=p.columns.passthrough, list_column=p.columns.list_column,
                width=p.columns.width, prediction_column=cfg.prediction_column, keep_features=cfg.keep_features,
                activation=cfg.activation, output_activation=cfg.output_activation, precision=cfg.precision,
                batch_size=cfg.batch_size, invalid_rows=cfg.invalid_rows, cpus=cfg.cpus_per_replica,
                rejected_dir=REJECTED_DIR,
            )
            bar = Progress(sum(s.rows_in for s in runnable), len(runnable), enabled=progress)

            def on_result(shard: Shard, result: dict[str, Any]) -> None:
                ok = result["status"] == COMMITTED
                if ok and not first_commit:
                    first_commit.append(time.perf_counter() - started)
                manifest.record(shard.id, **{k: result.get(k) for k in
                                             ("status", "rows_out", "rows_rejected", "rejected_output", "attempts", "error")})
                done.append({**result, "input": shard.input})
                bar.update(shard.rows_in, failed=not ok)

            try:
                with connect(cfg) as where:
                    from pipelines.schedule import Scheduler

                    totals, nodes = cluster_totals()
                    resources = size_replicas(cfg, len(runnable), totals, nodes)
                    logger.info("running %d shard(s) on %d replica(s) (%s)", len(runnable), resources.count, where)
                    scheduler = Scheduler(job, resources, max_attempts=cfg.max_attempts,
                                          shard_timeout=cfg.shard_timeout)
                    stats = scheduler.run(runnable, on_result, on_started=start)
            finally:
                bar.close()
                if started_writing:
                    manifest.flush(force=True)
        complete = manifest.finish()
        seconds = time.perf_counter() - started
        report = _report(p, manifest, done, replica_report(stats), seconds, complete=complete)
        report.startup_seconds = first_commit[0] if first_commit else None
        if timeline:
            _write_timeline(timeline, done)
        return report


def _config(config: JobConfig | None, options: Mapping[str, Any]) -> JobConfig:
    if config is None:
        return JobConfig.from_dict(options, source="run() arguments")
    if not isinstance(config, JobConfig):
        raise ConfigError(f"expected a JobConfig or keyword arguments, got {type(config).__name__}")
    return config.replace(**options) if options else config


def _validate(cfg: JobConfig) -> tuple[JobConfig, Any, Columns, Location, list[InputFile]]:
    """Everything that can be checked before the lock and before Ray: model, inputs, columns, output."""
    from workers.model import inspect_model

    source, output = resolve(cfg.input), resolve(cfg.output)
    if type(source.fs) is type(output.fs) and overlaps(static_prefix(source.path), output.path):
        raise OutputConflictError(f"output {cfg.output!r} overlaps input {cfg.input!r}; write predictions elsewhere")
    model = inspect_model(cfg.model)
    _, files = scan_inputs(source)
    readable = [f for f in files if f.error is None]
    if not readable:
        raise InputError(f"no readable Parquet input at {cfg.input!r}: " + "; ".join(f.error or "" for f in files[:3]))
    columns = resolve_columns(readable[0].schema, cfg, model.in_features, readable[0].uri)
    checked = [dataclasses.replace(f, error=check_file(f, columns)) for f in files]
    if all(f.error is not None for f in checked):
        raise InputError("no input file fits the model: " + "; ".join(f.error or "" for f in checked[:3]))
    return cfg, model, columns, output, checked


def _reconcile(cfg: JobConfig, model: Any, columns: Columns, output: Location, files: list[InputFile]) -> Plan:
    previous = load_manifest(output)
    if previous is not None and not cfg.overwrite:
        check_compatible(previous, model.sha256, prediction_settings(cfg, columns), output.uri)
    reuse = {} if cfg.overwrite else reusable_spans(previous)
    shards = make_shards(files, cfg.shard_rows or DEFAULT_SHARD_ROWS, reuse)
    existing = {relative_to(output.path, p) for p in existing_files(output.fs, output.path)} if previous else set()
    reconciled = reconcile(shards, previous, existing, cfg.overwrite)
    return Plan(cfg, model, columns, output, files, shards, reconciled.todo, reconciled.skipped, previous, reconciled)


def _unchanged(p: Plan, manifest: Manifest) -> bool:
    """Nothing to run and nothing to record: a rerun then writes no file at all."""
    if p.previous is None or not p.previous.get("complete"):
        return False
    if p.reconciled.superseded or p.output.fs.get_file_info(p.output.join(SUCCESS)).type.name != "File":
        return False
    return p.previous.get("shards") == manifest.to_dict()["shards"]


def _report(p: Plan, manifest: Manifest, done: list[dict[str, Any]], replicas: list[dict[str, Any]],
            seconds: float, *, complete: bool) -> RunReport:
    ok = [r for r in done if r["status"] == COMMITTED]
    failed = [r for r in done if r["status"] != COMMITTED]
    rows_out = sum(r["rows_out"] for r in ok)
    return RunReport(
        status="failed" if failed else "succeeded",
        output=p.output.uri,
        shards_total=len(p.shards) + len(manifest.kept),
        shards_done=len(ok),
        shards_skipped=len(p.skipped),
        shards_failed=len(failed),
        rows_in=sum(r["rows_in"] for r in ok),
        rows_out=rows_out,
        rows_rejected=sum(r["rows_rejected"] for r in ok),
        seconds=round(seconds, 3),
        rows_per_second=round(sum(r["rows_in"] for r in ok) / seconds, 1) if seconds > 0 else 0.0,
        errors=[{"shard": r["id"], "input": r["input"], "error": r["error"]} for r in failed],
        replicas=replicas,
        complete=complete,
    )


def _write_timeline(path: str, results: list[dict[str, Any]]) -> None:
    """A Chrome trace (chrome://tracing, Perfetto): one span per shard, one row per replica."""
    spans = [r for r in results if "started" in r and "finished" in r]
    origin = min((r["started"] for r in spans), default=0.0)
    events = [
        {"name": r["id"], "cat": r["status"], "ph": "X", "pid": 0, "tid": r["replica"],
         "ts": round((r["started"] - origin) * 1e6), "dur": round((r["finished"] - r["started"]) * 1e6),
         "args": {"rows_in": r["rows_in"], "rows_out": r["rows_out"], "error": r.get("error")}}
        for r in spans
    ]
    events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": t, "args": {"name": f"replica {t}"}}
               for t in sorted({r["replica"] for r in spans})]
    location = resolve(path)
    write_bytes_atomic(location.fs, location.path, json.dumps({"traceEvents": events}).encode())

