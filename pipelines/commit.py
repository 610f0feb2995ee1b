"""The output's committed state: `_manifest.json` + `_journal/`, resume decisions and `_SUCCESS`.

The truth about an output is its manifest with its journal applied (`State`):
every data file under the output is described by exactly one shard entry
(with its rows, size and sha256) or is on the way out (`retiring`). Replicas
record their commits in the journal before they publish; the driver records
the run's header when it begins, then confirmations and failures as they
arrive, and rewrites the manifest once per run (compaction). Every entry
belongs to the job in the state's header (model sha256, prediction settings,
input): a commit record of another job is never committed, and a run that
begins with `overwrite` demotes every earlier entry. `_SUCCESS` is written
last, only when the output mirrors the current input: every planned shard
committed, rows reconciled, and every file of an older input version deleted.

    >>> state = State.load(resolve("preds/"))  # doctest: +SKIP
    >>> sorted(state.files)[:1]
    ['part-0000-00000.parquet']
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines.config import JobConfig
from basis.errors import OutputConflictError
from pipelines.journal import Journal, SegmentWriter, clear_journal, read_journal
from pipelines.manifest import COMMITTED, FAILED, FORMAT, MANIFEST, PENDING, SUPERSEDED, load_manifest
from pipelines.plan import Columns, Shard, Span
from basis.storage import (
    Location,
    delete_file,
    existing_infos,
    is_hidden,
    is_temp,
    relative_to,
    sweep_temps,
    write_bytes_atomic,
)

if TYPE_CHECKING:
    from pipelines.tables.sink import Sink

logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
REJECTED_DIR = "_rejected"

SpanMap = dict[tuple[str, str], list[Span]]  # (rel, fingerprint) -> committed spans of that file


def prediction_settings(cfg: JobConfig, columns: Columns) -> dict[str, Any]:
    """The config that changes what a shard's output holds (compared on resume)."""
    return {
        "features": list(columns.features),
        "passthrough": list(columns.passthrough),
        "keep_features": cfg.keep_features,
        "prediction_column": cfg.prediction_column,
        "activation": cfg.activation,
        "output_activation": cfg.output_activation,
        "precision": cfg.precision,
        "invalid_rows": cfg.invalid_rows,
        **({"categorical": list(columns.categorical)} if columns.categorical else {}),
        # A table output is another output than the directory of files under it (not recorded for Parquet,
        # so that manifests written before table outputs existed keep their identity).
        **({"output_format": cfg.output_format} if cfg.output_format not in ("auto", "parquet") else {}),
    }


SOURCE_IDENTITY = ("input", "base")  # what in the header's `source` names the input (a table's snapshot does not)


def job_digest(header: Mapping[str, Any]) -> str:
    """The identity of the job that makes an output's predictions: model sha256, prediction settings, input.

    A run's replicas write it into each commit record; `State` commits a record only
    when it matches the header of the run that wrote it.
    """
    source = header.get("source") or {}  # which input; a table's snapshot scored is no part of the job
    key = {"model": (header.get("model") or {}).get("sha256"), "settings": header.get("settings"),
           "source": {k: source.get(k) for k in SOURCE_IDENTITY}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def shard_entry(shard: Shard) -> dict[str, Any]:
    """A shard's manifest entry before it has run."""
    return {
        "id": shard.id,
        "input": shard.input,
        "rel": shard.rel,
        "fingerprint": shard.fingerprint,
        "file_row_groups": shard.file_row_groups,
        "row_groups": list(shard.row_groups),
        "rows_in": shard.rows_in,
        "rows_out": 0,
        "rows_rejected": 0,
        "output": shard.output,
        "bytes": None,
        "sha256": None,
        "rejected_output": None,
        "rejected_bytes": None,
        "rejected_sha256": None,
        "status": PENDING,
        "attempts": 0,
        "error": shard.error,
    }


@dataclass
class State:
    """An output's committed state: its manifest with the journal applied."""

    header: dict[str, Any] = field(default_factory=dict)  # model, config, settings, columns, source
    generation: int = 0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # output path -> entry whose file it is
    others: dict[str, dict[str, Any]] = field(default_factory=dict)  # shard id -> entry with no file
    retiring: set[str] = field(default_factory=set)  # files no entry describes: deleted when a run completes
    journal: Journal = field(default_factory=Journal)
    found: bool = False  # a manifest or a journal exists
    interrupted: bool = False  # the header is that of a run whose journal was never compacted

    @property
    def digest(self) -> str | None:
        """`job_digest` of the header, None for an output no run has begun."""
        return job_digest(self.header) if self.header.get("model") else None

    @classmethod
    def load(cls, output: Location) -> State:
        """Read the manifest and apply the journal (reading the files of unconfirmed commits)."""
        manifest = load_manifest(output)
        state = cls(found=manifest is not None)
        if manifest is not None:
            state.header = {k: manifest.get(k) for k in ("model", "config", "settings", "columns", "source")}
            state.generation = int(manifest.get("generation", 0))
            state.retiring = set(manifest.get("retiring", []))
            for entry in manifest.get("shards", []):
                entry = {**_V1_DEFAULTS, **entry}
                if entry["status"] == COMMITTED:
                    state.files[entry["output"]] = entry
                elif entry["status"] == SUPERSEDED:  # never reused: its files go when a run completes
                    state.retiring.update(path for path, _, _ in _files_of(entry))
                else:
                    state.others[entry["id"]] = entry
        state.journal = read_journal(output, after=state.generation)
        state.found = state.found or bool(state.journal.files)
        state._apply(output, state.journal)
        return state

    def _apply(self, output: Location, journal: Journal) -> None:
        for generation in sorted(journal.generations):
            records = journal.generations[generation]
            job = None  # the digest of the run that wrote this generation, from its header record
            confirmed = set()
            for op in records.ops:
                if op["op"] == "begin":
                    self.begin(op["header"], overwrite=bool(op.get("overwrite")))
                    self.interrupted = True
                    job = self.digest
                elif op["op"] == "confirm" and op["token"] in records.commits:
                    entry = {**_V1_DEFAULTS, **records.commits[op["token"]], "attempts": op["attempts"]}
                    if job is not None and records.jobs.get(op["token"]) == job:
                        self.commit(entry)
                    else:
                        self.settle(output, entry, trusted=False)
                    confirmed.add(op["token"])
                elif op["op"] == "fail":
                    self.fail(op["entry"])
                elif op["op"] == "retire":
                    for path in op["paths"]:
                        self.retire(path)
            for token, entry in records.commits.items():
                if token not in confirmed:
                    trusted = job is not None and records.jobs.get(token) == job
                    self.settle(output, {**_V1_DEFAULTS, **entry}, trusted=trusted)

    def begin(self, header: Mapping[str, Any], *, overwrite: bool) -> None:
        """A run began with this header: with `overwrite` (the only way another job gets in) every
        earlier entry is demoted; its files are deleted when a run completes, and never reused."""
        if overwrite or (self.digest is not None and job_digest(header) != self.digest):
            for path in list(self.files):
                self.retire(path)
            self.others.clear()
        self.header = dict(header)

    def settle(self, output: Location, entry: Mapping[str, Any], *, trusted: bool = True) -> None:
        """A commit record nobody confirmed (its replica or the driver died), or one of another job
        (`trusted` False): the files decide. Another job's published files are retired, never committed."""
        held = self.files.get(entry["output"])
        if held is not None and held.get("sha256") == entry.get("sha256") and held["id"] == entry["id"]:
            return  # already described (another attempt of the same shard, same bytes)
        published = [published_as_recorded(output, path, size, sha) for path, size, sha in _files_of(entry)]
        if trusted and all(published):
            self.commit(entry)
        elif any(published):  # another job's files, or killed between publishing its files: not ours, or not whole
            for path, _, _ in _files_of(entry):
                self.retire(path)

    def commit(self, entry: Mapping[str, Any]) -> None:
        """A shard's files are published: its entry now describes them."""
        entry = {**entry, "status": COMMITTED, "error": None}
        old = self.files.get(entry["output"])
        if old is not None and old.get("rejected_output") not in (None, entry.get("rejected_output")):
            self.retiring.add(old["rejected_output"])  # the older version's quarantine file is stale now
        self.files[entry["output"]] = entry
        self.others.pop(entry["id"], None)
        self.retiring.discard(entry["output"])
        if entry.get("rejected_output"):
            self.retiring.discard(entry["rejected_output"])

    def fail(self, entry: Mapping[str, Any]) -> None:
        """A shard failed (its earlier files, if any, stay on disk until a run completes)."""
        held = self.files.get(entry["output"])
        if held is not None and held["id"] == entry["id"] and held["fingerprint"] == entry["fingerprint"]:
            if held.get("generation") == entry.get("generation"):
                return  # another attempt of the same run committed it
            self.retire(entry["output"])  # an earlier run's entry: this run was told not to trust it
        self.others[entry["id"]] = {**entry, "status": FAILED}

    def retire(self, path: str) -> None:
        """`path` is no longer described by any entry; it is deleted when a run completes."""
        holder = self.files.pop(path, None)
        if holder is None:
            holder = next((e for e in self.files.values() if e.get("rejected_output") == path), None)
            if holder is not None:
                self.files.pop(holder["output"])
        for p in [path, *(p for p, _, _ in _files_of(holder or {}))]:
            self.retiring.add(p)

    def spans(self, listed: Iterable[tuple[str, str]]) -> tuple[SpanMap, SpanMap]:
        """For the listed (rel, fingerprint) pairs: the committed spans of files they cover entirely
        (such a file needs no footer to be planned), and for the other files every committed span
        (checked against the file's footer when it is read)."""
        wanted = set(listed)
        partial: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for entry in self.files.values():
            key = (entry["rel"], entry["fingerprint"])
            if key in wanted:
                partial.setdefault(key, []).append(entry)
        covered = {}
        for key, entries in partial.items():
            entries.sort(key=lambda e: e["row_groups"][0])
            total = entries[0]["file_row_groups"]
            bounds = [tuple(e["row_groups"]) for e in entries]
            if (total is not None and all(e["file_row_groups"] == total for e in entries)
                    and bounds[0][0] == 0 and bounds[-1][1] == total
                    and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))):
                covered[key] = entries
        return ({key: [_span(e) for e in entries] for key, entries in covered.items()},
                {key: [_span(e) for e in entries] for key, entries in partial.items() if key not in covered})

    def claims(self, listed_rels: set[str], *, keep_vanished: bool) -> dict[str, str]:
        """Output names held by inputs that are still listed and, with `keep_vanished`, by the kept
        predictions of inputs that vanished (a new input never takes their names). Without it a
        vanished input's names are free: its files go when the run completes."""
        names = {}
        for entry in [*self.files.values(), *self.others.values()]:
            if entry["rel"] in listed_rels or (keep_vanished and self.files.get(entry["output"]) is entry):
                names.setdefault(entry["output"], entry["rel"])
        return names

    def check_compatible(self, model: Mapping[str, Any], settings: Mapping[str, Any], source: Mapping[str, Any],
                         where: str) -> None:
        """Refuse to mix outputs of different models, prediction settings or inputs (exit 2).

        `model` is the manifest's `model` record of this run (one model's, or a model set's: a set's
        `sha256` covers its names and members, so adding, removing, replacing or renaming one is a change).
        `source` is the input as the header records it (`input`, and `base`, the directory
        output paths mirror): another input would silently replace other inputs' predictions.
        """
        if not self.header.get("model"):
            return
        problems = []
        if self.header["model"]["sha256"] != model["sha256"]:
            from workers.modelset import describe_change

            problems.extend(describe_change(self.header["model"], model))
        old = self.header.get("settings") or {}
        for key, value in settings.items():
            if old.get(key) != value:
                problems.append(f"{key}: {old.get(key)!r} -> {value!r}")
        recorded = self.header.get("source") or {}
        for key in SOURCE_IDENTITY:
            if recorded.get(key) is not None and recorded[key] != source.get(key):
                problems.append(f"{key}: {recorded[key]!r} -> {source.get(key)!r}")
        if problems:
            what = "an interrupted run's work" if self.interrupted else "predictions"
            raise OutputConflictError(
                f"{where} holds {what} made with a different model or config ({'; '.join(problems)}); "
                f"set overwrite to recompute everything, or write to a new output"
            )


def _span(entry: Mapping[str, Any]) -> Span:
    return Span(entry["row_groups"][0], entry["row_groups"][1], entry["rows_in"], entry["output"])


_V1_DEFAULTS = {"file_row_groups": None, "bytes": None, "sha256": None, "rejected_bytes": None,
                "rejected_sha256": None, "rejected_output": None, "attempts": 0, "error": None, "generation": None}


def _files_of(entry: Mapping[str, Any]) -> list[tuple[str, int | None, str | None]]:
    """(path, bytes, sha256) of each file an entry describes, the quarantine file first (published first)."""
    files = []
    if entry.get("rejected_output"):
        files.append((entry["rejected_output"], entry.get("rejected_bytes"), entry.get("rejected_sha256")))
    if entry.get("output") and entry.get("status", COMMITTED) in (COMMITTED, SUPERSEDED):
        files.append((entry["output"], entry.get("bytes"), entry.get("sha256")))
    return files


def published_as_recorded(output: Location, path: str, size: int | None, sha256: str | None) -> bool:
    """Whether the file at `path` (relative) holds exactly the recorded bytes."""
    info = output.fs.get_file_info(output.join(path))
    if info.type.name != "File" or (size is not None and info.size != size):
        return False
    if sha256 is None:
        return True
    return file_sha256(output, path) == sha256


def file_sha256(output: Location, path: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with output.fs.open_input_stream(output.join(path)) as stream:
            while chunk := stream.read(8 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def is_data_file(path: str) -> bool:
    """Whether a file under the output (relative path) is one readers see as data: a visible file, or
    one under `_rejected/` (the manifest, journal, lock, `_SUCCESS` and temporary files are not)."""
    if is_temp(path):
        return False
    if path.startswith(REJECTED_DIR + "/"):
        return not is_hidden(path[len(REJECTED_DIR) + 1:])
    return not is_hidden(path)


def described_files(state: State) -> set[str]:
    """The files an entry describes (a committed shard's output and quarantine file) or that are retiring."""
    described = set(state.retiring)
    for entry in state.files.values():
        described.update(path for path, _, _ in _files_of(entry))
    return described


def foreign_files(state: State, present: Iterable[str]) -> list[str]:
    """Data files under the output that no entry describes and none is retiring: not written by batch-infer
    (an old dataset, a copy). Never deleted or overwritten; no `_SUCCESS` while one is there."""
    described = described_files(state)
    return sorted(path for path in present if is_data_file(path) and path not in described)


@dataclass
class Reconciled:
    """What a run has to do, given the plan and the output's committed state."""

    todo: list[Shard]
    skipped: list[Shard]
    stale: list[str]  # files of older input versions (or of vanished inputs, with prune): deleted when a run completes
    kept: set[str] = field(default_factory=set)  # files of vanished inputs, kept (without prune): still committed
    foreign: list[str] = field(default_factory=list)  # data files batch-infer did not write: no _SUCCESS beside them


def reconcile(state: State, shards: Sequence[Shard], present: Mapping[str, int], overwrite: bool, *,
              listed: set[str] | None = None, prune: bool = False) -> Reconciled:
    """Split the plan into shards to run and shards already committed; find stale files.

    `present` maps each file under the output to its size. A shard is skipped
    when its output file is described by a committed entry for the same input
    fingerprint and row groups, and the file is still there with the recorded
    size. An entry whose file was deleted or altered behind our back is dropped
    (what is left of it retires) and its shard runs again. Entries of inputs
    no longer `listed` (rels) are kept unless `prune` or `overwrite` is set.
    """
    for path in list(state.files):
        entry = state.files[path]
        files = _files_of(entry)
        if all(present.get(p) is not None and (size is None or present[p] == size) for p, size, _ in files):
            continue
        state.files.pop(path)
        state.retiring.update(p for p, _, _ in files if p in present)
    state.retiring.intersection_update(present)
    result = Reconciled([], [], [], foreign=foreign_files(state, present))
    planned = set()
    for shard in shards:
        entry = state.files.get(shard.output)
        if not overwrite and entry is not None and _describes(entry, shard):
            result.skipped.append(shard)
            planned.add(shard.output)
        else:
            result.todo.append(shard)
    if listed is not None and not (prune or overwrite):
        result.kept = {path for path, entry in state.files.items()
                       if path not in planned and entry["rel"] not in listed}
    result.stale = sorted(path for path in state.files if path not in planned and path not in result.kept)
    return result


def _describes(entry: Mapping[str, Any], shard: Shard) -> bool:
    return (entry["id"] == shard.id and entry["fingerprint"] == shard.fingerprint
            and tuple(entry["row_groups"]) == shard.row_groups and entry["status"] == COMMITTED)


class Recorder:
    """Records one run's outcomes: journal segments as shards finish, the manifest once at the end.

    `check_lock` is called before anything is written that claims the output
    (a journal segment, the manifest, `_SUCCESS`); it raises when the lock was lost.
    """

    def __init__(
        self,
        output: Location,
        state: State,
        *,
        header: Mapping[str, Any],
        shards: Sequence[Shard],
        check_lock: Callable[[], None],
        kept: Iterable[str] = (),
        foreign: Sequence[str] = (),
        flush_seconds: float = 1.0,
        sink: Sink | None = None,
    ) -> None:
        self.output = output
        self.state = state
        self.header = dict(header)
        self.shards = {s.id: s for s in shards}
        self.order = [s.id for s in shards]
        self.digest = job_digest(self.header)  # what this run's replicas write into their commit records
        self.kept = set(kept)  # files of vanished inputs that stay committed (no prune)
        self.foreign = list(foreign)  # data files batch-infer did not write: the output is not complete
        self.generation = max(state.generation, state.journal.newest) + 1
        self.segments = SegmentWriter(output, self.generation)
        self.check_lock = check_lock
        self.flush_seconds = flush_seconds
        self.sink = sink  # a table output: the run's files are committed into it (`pipelines.tables.sink`)
        self._last_flush = time.monotonic()
        self._confirmed: set[str] = set()

    def begin(self, *, overwrite: bool, stale: Sequence[str] = ()) -> None:
        """The run's first records, before any shard is dispatched: its header (and whether it overwrites,
        which demotes every earlier entry), then the entries it found stale (an older version of an input
        file): never reused, even when this run stops short."""
        self.state.begin(self.header, overwrite=overwrite)
        self.segments.add({"op": "begin", "header": self.header, "overwrite": overwrite})
        self._retire([path for path in stale if path in self.state.files])

    def _retire(self, paths: Sequence[str]) -> None:
        """Entries never reused again: journalled, then their files go when a run completes."""
        if paths:
            self.segments.add({"op": "retire", "paths": list(paths)})
            for path in paths:
                self.state.retire(path)

    def committed(self, entry: Mapping[str, Any], token: str, attempts: int) -> None:
        self.state.commit({**entry, "attempts": attempts})
        self._confirmed.add(token)
        self.segments.add({"op": "confirm", "token": token, "attempts": attempts})
        self.flush()

    def failed(self, shard: Shard, error: str, attempts: int) -> None:
        entry = {**shard_entry(shard), "attempts": attempts, "error": error, "generation": self.generation}
        self.state.fail(entry)
        self.segments.add({"op": "fail", "entry": {**entry, "status": FAILED}})
        self.flush()

    def flush(self, *, force: bool = False) -> None:
        if self.segments.buffer and (force or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.check_lock()
            self.segments.flush()
            self._last_flush = time.monotonic()

    @property
    def complete(self) -> bool:
        """Every planned shard committed with its rows reconciled, and nothing else under the output
        but the kept predictions of vanished inputs."""
        return (self._planned_complete() and all(self._current(path) for path in self.state.files)
                and not self.state.retiring and not self.foreign)

    def finish(self) -> bool:
        """Compact the manifest; when the run is complete delete stale files and write `_SUCCESS` last."""
        self._settle_unconfirmed()
        self._retire([p for p in self.state.files if not self._current(p)])
        planned = self._planned_complete()
        if planned and self.sink is not None and self.sink.is_table:
            self._commit_table()
        if planned and self.state.retiring:
            self.flush(force=True)  # the journal says they go before they go
            for path in sorted(self.state.retiring):
                if self.sink is None or not self.sink.is_table or path.startswith(REJECTED_DIR + "/"):
                    delete_file(self.output.fs, self.output.join(path))
                # a table's own data files stay: older versions of the table still reference them, and the
                # table's maintenance (VACUUM, expire_snapshots / remove_orphan_files) removes them
            self.state.retiring.clear()
        complete = self.complete
        if complete:
            sweep_temps(self.output.fs, self.output.path)
        self.check_lock()
        write_bytes_atomic(self.output.fs, self.output.join(MANIFEST), self.manifest_bytes(complete))
        clear_journal(self.output)
        if complete:
            self.check_lock()
            write_bytes_atomic(self.output.fs, self.output.join(SUCCESS), b"")
        return complete

    def _commit_table(self) -> None:
        """The table commit (`TableSink.publish`), after the journal holds every file's commit record: a
        driver killed after it and before the manifest leaves a state the next run recognises."""
        assert self.sink is not None
        self.flush(force=True)
        self.check_lock()
        self.sink.publish(self.output, self.state.files, self.state.retiring, self.generation)  # type: ignore

    def _current(self, path: str) -> bool:
        entry = self.state.files[path]
        shard = self.shards.get(entry["id"])
        if shard is None and path in self.kept:
            return True  # a vanished input's kept predictions
        return shard is not None and shard.output == path and _describes(entry, shard)

    def _planned_complete(self) -> bool:
        return all(
            (e := self.state.files.get(s.output)) is not None and _describes(e, s) and s.error is None
            and e["rows_in"] == e["rows_out"] + e["rows_rejected"]
            for s in self.shards.values()
        )

    def _settle_unconfirmed(self) -> None:
        """Commits of this run that nobody confirmed (killed attempts): the files decide."""
        journal = read_journal(self.output, after=self.generation - 1, skip=self._confirmed)
        records = journal.generations.get(self.generation)
        if records is None:
            return
        for token, entry in records.commits.items():
            if token not in self._confirmed:
                trusted = records.jobs.get(token) == self.digest
                self.state.settle(self.output, {**_V1_DEFAULTS, **entry}, trusted=trusted)

    def manifest(self, complete: bool) -> dict[str, Any]:
        entries = []
        for entry in self.state.files.values():
            entries.append({**entry, "status": COMMITTED})
        held = {e["id"] for e in entries}
        for shard_id in self.order:
            if shard_id in held:
                continue
            other = self.state.others.get(shard_id)
            shard = self.shards[shard_id]
            if other is not None and other["fingerprint"] == shard.fingerprint:
                entries.append(other)
            else:
                entries.append(shard_entry(shard))
        entries.sort(key=lambda e: (e["rel"], e["row_groups"][0], e["status"] != COMMITTED))
        done = [e for e in entries if e["status"] == COMMITTED]
        return {
            "format": FORMAT,
            "generation": self.generation,
            **self.header,
            "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "complete": complete,
            "rows_in": sum(e["rows_in"] for e in done),
            "rows_out": sum(e["rows_out"] for e in done),
            "rows_rejected": sum(e["rows_rejected"] for e in done),
            "retiring": sorted(self.state.retiring),
            "shards": entries,
        }

    def manifest_bytes(self, complete: bool) -> bytes:
        return json.dumps(self.manifest(complete), separators=(",", ":")).encode()


def remove_success(output: Location) -> None:
    """A run that will process shards removes a stale `_SUCCESS` first."""
    delete_file(output.fs, output.join(SUCCESS))


def output_listing(output: Location) -> dict[str, int]:
    """Relative path -> size of every file under the output (one listing)."""
    return {relative_to(output.path, info.path): info.size for info in existing_infos(output.fs, output.path)}
