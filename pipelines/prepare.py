"""Everything a job checks before the lock and before Ray, and the plan it makes: `prepare` -> `Plan`.

Model, inputs, columns and output are checked here (exit 2 before any work);
the plan says which shards run and which are committed already. `batch-infer
plan` prints it; `run` (`pipelines.job`) runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections import ChainMap
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from pipelines.commit import SUCCESS, Reconciled, State, foreign_files, prediction_settings, reconcile
from pipelines.config import JobConfig
from basis.errors import InputError, OutputConflictError
from pipelines.commit.journal import journal_names
from pipelines.commit.reconcile import output_files
from pipelines.plan import (
    DEFAULT_SHARD_ROWS,
    Columns,
    CommittedSpans,
    InputFiles,
    Shard,
    Shards,
    check_file,
    check_quarantine,
    make_shards,
    planning_memory,
    read_schema,
    resolve_columns,
    scan_source,
    settle_lazy,
)
from pipelines.tables import DataFiles, Source, catalog_record, open_source
from pipelines.tables.history import check_removals
from pipelines.tables.sink import Sink, open_sink, output_schema
from basis.storage import Location, absolute, check_output_path, output_refused, redact
from basis.listing import overlaps, search_root

logger = logging.getLogger(__name__)

# A fresh local input file of at most this many bytes is planned without its footer (`_plan`'s `lazy`): its
# replica reads it whole anyway (`workers.reader.SMALL_FILE_BYTES`) and checks and plans it there.
LAZY_FILE_BYTES = 2 << 20


@dataclasses.dataclass
class Plan:
    """A validated job: what would run, what is already committed. Nothing written yet."""

    config: JobConfig
    model: Any  # workers.model.ModelSpec
    columns: Columns
    source: Location
    output: Location
    base: str  # the input directory that output paths mirror
    files: InputFiles  # an `InputFile` made only for a file asked for (`pipelines.shards`)
    shards: Shards  # every planned shard, as columns: a `Shard` made only for one asked for
    todo: list[Shard]
    skipped: Sequence[Shard]
    state: State
    reconciled: Reconciled
    snapshot: tuple[Any, ...]  # the output's manifest + journal as planned from
    columns_source: list[str]  # [rel, fingerprint] of the file the columns were resolved from
    input: Source  # the input's format: its files, its snapshot, where replicas read it
    sink: Sink  # the output's format: where replicas write, what the run commits into

    @property
    def rows_todo(self) -> int:
        return sum(s.rows_in for s in self.todo)

    @property
    def header(self) -> dict[str, Any]:
        """What the manifest records about the job, beside its shards."""
        cfg = self.config
        return {  # URIs with their secrets redacted: the manifest is no place for credentials
            "model": self.model_record,
            "config": {k: redact(v) if isinstance(v, str) else v
                       for k, v in {**cfg.to_dict(), "catalog": catalog_record(cfg.catalog)}.items()},
            "settings": prediction_settings(cfg, self.columns),
            "columns": self.columns_record,
            "source": {**source_record(self.input, self.base), **self.input.record()},
        }

    @property
    def model_record(self) -> dict[str, Any]:
        """The manifest's `model`: one model's spec and URI, or a set's digest and each member's (`workers.modelset`)."""
        if self.config.model_set is not None:
            return self.model.to_dict(uri=redact)
        return {**self.model.to_dict(), "uri": redact(absolute(self.config.model))}

    @property
    def columns_record(self) -> dict[str, Any]:
        """How the columns were resolved, so an unchanged tick can reuse them without a footer."""
        return {**_column_keys(self.config), "resolved_features": list(self.columns.features),
                "resolved_passthrough": list(self.columns.passthrough), "list_column": self.columns.list_column,
                "width": self.columns.width, "source": self.columns_source}

    def to_dict(self) -> dict[str, Any]:
        skipped = {s.id for s in self.skipped}
        return {
            "model": self.model_record,
            "features": list(self.columns.features),
            "passthrough": list(self.columns.passthrough),
            "files": len(self.files),
            "shards_total": len(self.shards),
            "shards_todo": len(self.todo),
            "shards_skipped": len(self.skipped),
            "rows_todo": self.rows_todo,
            "stale_files": len(self.reconciled.stale),
            "shards": [
                {"id": s.id, "input": s.input, "row_groups": list(s.row_groups), "rows_in": s.rows_in,
                 "output": self.output.display(self.output.join(s.output)),
                 "status": "skip" if s.id in skipped else ("fail" if s.error else "run"), "error": s.error}
                for s in self.shards
            ],
        }


class Refusals:
    started = False


@contextlib.contextmanager
def refusals(output: Location) -> Iterator[Refusals]:
    """Storage that refuses the output (a file in the way, permissions, read-only, full, access denied)
    becomes `OutputAccessError` naming the path: exit 2 before any shard ran, 1 after."""
    refusals = Refusals()
    try:
        yield refusals
    except OSError as exc:
        raise output_refused(exc, output, started=refusals.started) from exc


def prepare(cfg: JobConfig, *, from_manifest: bool = True, on_work: Callable[..., None] | None = None,
             lazy: bool = False) -> Plan:
    """Everything checked before the lock and before Ray: model, inputs, columns, output; then the plan
    (`_plan`, its Arrow memory from `plan.planning_memory`)."""
    with planning_memory():
        return _plan(cfg, from_manifest=from_manifest, on_work=on_work, lazy=lazy)


def _plan(cfg: JobConfig, *, from_manifest: bool = True, on_work: Callable[..., None] | None = None,
          lazy: bool = False) -> Plan:
    """Everything checked before the lock and before Ray: model, inputs, columns, output; then the plan.

    A table whose snapshot is the one the complete output recorded is planned from the manifest
    (`from_manifest`: no file list, no footer); should that plan find work after all, it is planned again.
    `lazy` (a run; `plan` reads every footer, so what it prints is what its files hold): small fresh local
    files are planned without their footers, their replicas check and plan them (`plan.settle_lazy`,
    `workers.lazy`); footers are read only until one file fits, so a job no file fits is still exit 2.
    `on_work(model, source, sink, files)` is called once the listing shows work (`files` listed files
    not wholly committed), before the footers are read: a run starts its replicas then
    (`pipelines.startup`); a plan with no such file never calls it."""
    from workers.modelfile import inspect_model

    table, sink = open_source(cfg), open_sink(cfg)  # the input's and the output's formats, chosen once
    source, output = table.location, sink.location
    check_output_path(output)
    _check_overlap(cfg, source, output)
    if cfg.model_set is None:
        model = inspect_model(absolute(cfg.model))
    else:
        from workers.modelset import inspect_set

        model = inspect_set({name: absolute(uri) for name, uri in cfg.model_set.items()}, inspect_model)
    model.check_categorical(cfg.categorical or ())
    with refusals(output) as _:
        snapshot = output_snapshot(output)
        state = State.load(output)
        present = sink.present(state, output_files(output))  # a table: what it references, or we wrote
    foreign = foreign_files(state, present)
    if foreign and not state.found:
        raise OutputConflictError(
            f"output {output.uri!r} holds {len(foreign)} data file(s) not written by batch-infer and no manifest, "
            f"e.g. {output.display(output.join(foreign[0]))}; batch-infer never deletes or mixes with files it "
            f"did not write: choose an empty or new output directory, or move them away"
        )
    fast = False
    if not cfg.overwrite:
        recorded = dict(state.header.get("source") or {})
        fast = from_manifest and _complete(state, present) and table.unchanged(recorded)
        if fast:
            table.from_manifest(recorded, state.fingerprints())
        elif table.snapshot_record():  # a table follows its commits since the recorded snapshot
            committed = state.fingerprints()
            whole, _ = state.spans(committed)
            scored = {rel for rel, _ in whole}
            table.since(recorded, scored, {rel for rel, _ in committed} - scored)
    listings: list[DataFiles] = []

    def committed(listing: DataFiles) -> CommittedSpans:
        listings.append(listing)
        spans = CommittedSpans.none(len(listing)) if cfg.overwrite else state.committed_spans(listing)
        work = len(listing) - int(spans.whole.sum())
        if on_work is not None and work:
            on_work(model, table, sink, work)
        return spans

    avoid = os.path.realpath(output.path) if source.is_local and output.is_local else None
    base, files = scan_source(table, committed, avoid=avoid,
                              lazy_bytes=LAZY_FILE_BYTES if lazy and not sink.is_table else 0)
    listing = listings[0]
    columns, column_source, files = _columns(cfg, model, files, state, source)
    check_quarantine(columns, cfg.invalid_rows)  # also for columns reused from the manifest
    settings = prediction_settings(cfg, columns)
    if not cfg.overwrite:
        state.check_compatible(model.to_dict(), settings, source_record(table, base), output.uri)
    keep_vanished = not (cfg.prune or cfg.overwrite)
    claims = ChainMap(state.claims(listing.rel, keep_vanished=keep_vanished, covered=table.covered),  # a compaction's
                      {path: "" for path in foreign})  # covered predictions keep their names; foreign names never taken
    settle_lazy(files, claims, source, cfg.shard_rows or DEFAULT_SHARD_ROWS)
    for index, f in list(files.read.items()):  # a file planned from its committed spans alone fits: it did
        if (error := check_file(f, columns)) != f.error:
            files.read[index] = dataclasses.replace(f, error=error)
    _one_fits(files, columns, source)
    shards = make_shards(files, cfg.shard_rows or DEFAULT_SHARD_ROWS, claims)  # foreign names are never taken
    reconciled = reconcile(state, shards, present, cfg.overwrite, listed=listing.rel, prune=cfg.prune, foreign=foreign)
    check_removals(table, state.files, reconciled, listing.mapping() if table.removal_rewrites_rows else {},
                   prune=cfg.prune, overwrite=cfg.overwrite, output=output.uri)
    if fast and (reconciled.todo or reconciled.stale or reconciled.kept):
        # planned from the manifest, but there is work: plan the table
        return _plan(cfg, from_manifest=False, on_work=on_work, lazy=lazy)
    reconciled.todo = _name_outputs(sink, state, shards, reconciled)
    sink.check_schema(lambda: _output_schema(cfg, model, columns, files, source))
    return Plan(cfg, model, columns, source, output, base, files, shards, reconciled.todo, reconciled.skipped,
                state, reconciled, snapshot, column_source, table, sink)


def _one_fits(files: InputFiles, columns: Columns, source: Location) -> None:
    """Exit 2 (`InputError`) when no input file fits the model; files planned lazily have their footers
    read, in order, until one fits (normally the first: its footer gave the columns)."""
    if not len(files) or files.planned_whole.any() or any(f.error is None for f in files.read.values()):
        return
    for index in (np.flatnonzero(files.lazy) if files.lazy is not None else ()):
        f = read_schema(files[int(index)], source)
        files[int(index)] = f = dataclasses.replace(f, error=check_file(f, columns))
        if f.error is None:
            return
    raise InputError("no input file fits the model: " + "; ".join(f.error or "" for f in files[:3]))


def _name_outputs(sink: Sink, state: State, shards: Shards, reconciled: Reconciled) -> list[Shard]:
    """The shards to run, named as the sink names this run's files (a table's: with the run's generation,
    so that no file a table version references is ever rewritten in place)."""
    generation = state.next_generation  # the Recorder's: this run's
    todo = []
    for index, shard in zip(reconciled.todo_rows.tolist(), reconciled.todo):
        name = sink.data_name(shard.output, generation)
        if name != shard.output:
            shard = dataclasses.replace(shard, output=name)
            shards.rename(index, shard)
        todo.append(shard)
    return todo


def _output_schema(cfg: JobConfig, model: Any, columns: Columns, files: InputFiles, source: Location) -> Any:
    """The schema the replicas will write (`workers.writer`), from the first readable input file's footer."""
    for f in files:
        if f.error is None:
            f = read_schema(f, source)
        if f.schema is not None:
            written = [*columns.passthrough, *(columns.features if cfg.keep_features else ())]
            members = model.members if cfg.model_set is not None else ((cfg.prediction_column, model),)
            return output_schema(f.schema, written, [(name, spec.out_features) for name, spec in members])
    raise InputError(f"no readable Parquet input at {source.uri!r} to take the output table's columns from")


def source_record(source: Source, base: str) -> dict[str, str]:
    """Which input the manifest records (a table's snapshot beside it is not part of it): a run with another
    input is another job (exit 2 unless overwrite)."""
    return {"input": redact(source.uri), "base": base}  # no credentials in the manifest or journal


def _check_overlap(cfg: JobConfig, source: Location, output: Location) -> None:
    if type(source.fs) is not type(output.fs):
        return
    root = search_root(source)
    pairs = [(root, output.path)]
    if source.is_local:  # through symlinks too: compare where the paths really lead
        pairs.append((os.path.realpath(root), os.path.realpath(output.path)))
    if any(overlaps(a, b) for a, b in pairs):
        raise OutputConflictError(f"output {output.uri!r} overlaps input {source.uri!r}; write predictions elsewhere")


def _column_keys(cfg: JobConfig) -> dict[str, Any]:
    """The config that column resolution depends on."""
    return {"features": list(cfg.features) if cfg.features else None,
            "passthrough": list(cfg.passthrough) if cfg.passthrough else None,
            **({"categorical": list(cfg.categorical)} if cfg.categorical else {}),
            "keep_features": cfg.keep_features, "prediction_column": cfg.prediction_column,
            **({"prediction_columns": list(cfg.models)} if cfg.model_set is not None else {})}


def _columns(
    cfg: JobConfig, model: Any, files: InputFiles, state: State, source: Location
) -> tuple[Columns, list[str], InputFiles]:
    """Resolve features and passthrough from the first readable file in path order.

    A first file planned from the manifest (committed, unchanged) needs no footer
    when the manifest resolved the columns from that same file with the same keys.
    """
    recorded = state.header.get("columns") or {}
    for index, f in enumerate(files):
        if f.error is not None:
            continue
        if f.schema is None:
            same_keys = {k: recorded.get(k) for k in _column_keys(cfg)} == _column_keys(cfg)
            if recorded.get("source") == [f.rel, f.fingerprint] and same_keys and recorded["width"] == model.in_features:
                columns = Columns(tuple(recorded["resolved_features"]), tuple(recorded["resolved_passthrough"]),
                                  recorded["list_column"], recorded["width"], cfg.prediction_column or "",
                                  cfg.keep_features, tuple(cfg.categorical or ()))
                return columns, [f.rel, f.fingerprint], files
            read = read_schema(f, source)
            if read.schema is None:
                if not f.committed:  # planned lazily: it fails as the eager plan fails it
                    files[index] = read
                continue  # unreadable now; a committed one stays planned from its committed shards
            f = files[index] = read
        return resolve_columns(f.schema, cfg, model.in_features, f.uri), [f.rel, f.fingerprint], files
    same_keys = {k: recorded.get(k) for k in _column_keys(cfg)} == _column_keys(cfg)
    if not files and recorded.get("source") and same_keys and recorded["width"] == model.in_features:
        # a table whose every file a compaction group holds (nothing to score): the columns stay as resolved
        return (Columns(tuple(recorded["resolved_features"]), tuple(recorded["resolved_passthrough"]),
                        recorded["list_column"], recorded["width"], cfg.prediction_column or "", cfg.keep_features,
                        tuple(cfg.categorical or ())), list(recorded["source"]), files)
    raise InputError(f"no readable Parquet input at {source.uri!r}: "
                     + "; ".join(f.error or "" for f in files[:3] if f.error))


def output_snapshot(output: Location) -> tuple[Any, ...]:
    """Cheap identity of an output's committed state (manifest + journal file names)."""
    info = output.fs.get_file_info(output.join("_manifest.json"))
    return (info.mtime_ns, info.size, tuple(sorted(journal_names(output))))


def _complete(state: State, present: Mapping[str, int]) -> bool:
    """The output is complete as its manifest was written: `_SUCCESS`, nothing pending or on its way out."""
    return SUCCESS in present and state.journal.empty and not state.others and not state.retiring
