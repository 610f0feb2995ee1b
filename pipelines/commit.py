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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.checkpoint import committed_rows, write_checkpoint
from pipelines.config import JobConfig
from basis.errors import OutputConflictError
from pipelines.entries import PLANNING, Claims, Entries
from pipelines.journal import Journal, SegmentWriter, clear_journal, read_journal
from pipelines.manifest import COMMITTED, FAILED, MANIFEST, PENDING, SUPERSEDED, load_manifest
from pipelines.segments import SCHEMA, entries_table, read_segments, table_entries
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
    files: Entries = field(default_factory=Entries)  # output path -> entry whose file it is (columns as loaded)
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
        """Read the manifest (its entries inline, or its segments) and apply the journal (reading the files
        of unconfirmed commits)."""
        manifest = load_manifest(output)
        state = cls(found=manifest is not None)
        if manifest is not None:
            state.header = {k: manifest.get(k) for k in ("model", "config", "settings", "columns", "source")}
            state.generation = int(manifest.get("generation", 0))
            state.retiring = set(manifest.get("retiring", []))
            shards = manifest.get("shards", [])
            where = output.display(output.join(MANIFEST))
            if isinstance(shards, dict):  # format 3: the entries are in Parquet segments
                refs = shards["segments"]
                tables = read_segments(output, refs, where, PLANNING)
                table = pa.concat_tables(tables) if tables else SCHEMA.empty_table().select([*PLANNING, "status"])
                del tables
            else:
                refs, table = None, entries_table({**_V1_DEFAULTS, **e} for e in shards)
            committed = pc.equal(table["status"], COMMITTED).to_numpy(zero_copy_only=False)
            rest = np.flatnonzero(~committed)
            if len(rest) and refs is not None:  # entries not committed: read whole (the few segments holding them)
                others = read_segments(output, [refs[i] for i in sorted(set(np.searchsorted(
                    np.cumsum([r["entries"] for r in refs]), rest, side="right").tolist()))], where)
                rest_table = pa.concat_tables(others)
                rest_table = rest_table.filter(pc.not_equal(rest_table["status"], COMMITTED))
            else:
                rest_table = table.take(pa.array(rest, pa.int64())) if len(rest) else None
            for entry in table_entries(rest_table) if rest_table is not None else ():
                if entry["status"] == SUPERSEDED:  # never reused: its files go when a run completes
                    state.retiring.update(path for path, _, _ in _files_of(entry))
                else:
                    state.others[entry["id"]] = entry
            if refs is None:
                state.files = Entries(table, alive=committed)
            else:  # only what planning needs stays in memory; an entry's other fields are read when it is
                state.files = Entries(table.select(list(PLANNING)), alive=committed, refs=refs,
                                      full=lambda number: read_segments(output, [refs[number]], where)[0])
                del table
                pa.default_memory_pool().release_unused()  # the segments' read buffers
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
            holder = self.files.holding_rejected(path)
            if holder is not None:
                self.files.pop(holder["output"])
        for p in [path, *(p for p, _, _ in _files_of(holder or {}))]:
            self.retiring.add(p)

    def spans(self, listed: Iterable[tuple[str, str]]) -> tuple[SpanMap, SpanMap]:
        """For the listed (rel, fingerprint) pairs: the committed spans of files they cover entirely
        (such a file needs no footer to be planned), and for the other files every committed span
        (checked against the file's footer when it is read). Keyed by the very pairs given."""
        listed = listed if isinstance(listed, list) else list(listed)
        table, _ = self.files.live(["rel", "fingerprint", "first", "stop", "file_row_groups", "rows_in", "output"])
        if not listed or not table.num_rows:
            return {}, {}
        wanted = pc.binary_join_element_wise(pa.array([rel for rel, _ in listed], pa.string()),
                                             pa.array([fp for _, fp in listed], pa.string()), "\x00")
        found = pc.index_in(pc.binary_join_element_wise(table["rel"], table["fingerprint"], "\x00"),
                            value_set=wanted)
        rows = np.flatnonzero(found.is_valid().to_numpy(zero_copy_only=False))
        if not len(rows):
            return {}, {}
        key = found.to_numpy(zero_copy_only=False)[rows].astype(np.int64)
        first = table["first"].to_numpy()[rows]
        order = np.lexsort((first, key))
        rows, key, first = rows[order], key[order], first[order]
        stop = table["stop"].to_numpy()[rows]
        total = pc.fill_null(table["file_row_groups"], -1).to_numpy()[rows]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        ends = np.r_[starts[1:], len(key)]
        same = np.r_[key[1:] == key[:-1], False]  # the next row is of the same file
        broken = same & ((stop != np.r_[first[1:], 0]) | (total != np.r_[total[1:], 0]))
        covered = ((total[starts] >= 0) & (first[starts] == 0) & (stop[ends - 1] == total[starts])
                   & (np.add.reduceat(broken.astype(np.int64), starts) == 0))
        take = pa.array(rows, pa.int64())
        made = list(map(Span, first.tolist(), stop.tolist(), table["rows_in"].take(take).to_pylist(),
                        table["output"].take(take).to_pylist()))
        whole: SpanMap = {}
        partial: SpanMap = {}
        for start, end, index, full in zip(starts.tolist(), ends.tolist(), key[starts].tolist(), covered.tolist()):
            (whole if full else partial)[listed[index]] = tuple(made[start:end])
        return whole, partial

    def fingerprints(self) -> list[tuple[str, str]]:
        """The (rel, fingerprint) of every committed entry."""
        table, _ = self.files.live(["rel", "fingerprint"])
        return list(zip(table["rel"].to_pylist(), table["fingerprint"].to_pylist()))

    def claims(self, listed_rels: set[str], *, keep_vanished: bool) -> Mapping[str, str]:
        """Output names held by inputs that are still listed and, with `keep_vanished`, by the kept
        predictions of inputs that vanished (a new input never takes their names). Without it a
        vanished input's names are free: its files go when the run completes."""
        table, _ = self.files.live(["output", "rel"])
        if not keep_vanished and table.num_rows:
            table = table.filter(pc.is_in(table["rel"], value_set=pa.array(list(listed_rels), pa.string())))
        others = {}
        for entry in self.others.values():
            if entry["rel"] in listed_rels:
                others.setdefault(entry["output"], entry["rel"])
        return Claims(table, others)

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
    table, _ = state.files.live(["output", "rejected_output"])
    described = set(state.retiring)
    described.update(table["output"].to_pylist())
    if table["rejected_output"].null_count < table.num_rows:
        described.update(p for p in table["rejected_output"].to_pylist() if p is not None)
    return described


def foreign_files(state: State, present: Mapping[str, int], listing: Listing | None = None) -> list[str]:
    """Data files under the output that no entry describes and none is retiring: not written by batch-infer
    (an old dataset, a copy). Never deleted or overwritten; no `_SUCCESS` while one is there."""
    listing = listing or Listing(present)
    table, _ = state.files.live(["output", "rejected_output"])
    candidates = listing.paths
    if table.num_rows:
        described = pc.or_(pc.is_in(candidates, value_set=table["output"]),
                           pc.is_in(candidates, value_set=table["rejected_output"].drop_null()))
        candidates = candidates.filter(pc.invert(described))
    return sorted(path for path in candidates.to_pylist() if is_data_file(path) and path not in state.retiring)


class Listing:
    """The files under an output (path -> size) as two columns, for questions about every entry at once."""

    def __init__(self, present: Mapping[str, int]) -> None:
        self.paths = pa.array(list(present), pa.string())
        self.sizes = pa.array(list(present.values()), pa.int64()).to_numpy()

    def intact(self, table: pa.Table, path: str, size: str) -> np.ndarray:
        """Per row: its file (column `path`; null: none) is listed with the size recorded (`size`; null: any)."""
        found = pc.fill_null(pc.index_in(table[path], value_set=self.paths), -1).to_numpy()
        listed = self.sizes[np.maximum(found, 0)] if len(self.sizes) else np.zeros(len(found), np.int64)
        recorded = pc.fill_null(table[size], -1).to_numpy()
        none = table[path].is_null().to_numpy(zero_copy_only=False)
        return none | ((found >= 0) & ((recorded < 0) | (listed == recorded)))


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
    Every entry is looked at as columns (`Entries.live`): a million of them take a second or two.
    """
    files, listing = state.files, Listing(present)
    table, rows = files.live(["output", "bytes", "rejected_output", "rejected_bytes"])
    if table.num_rows:
        bad = np.flatnonzero(~(listing.intact(table, "output", "bytes")
                               & listing.intact(table, "rejected_output", "rejected_bytes")))
        if len(bad):
            take = pa.array(bad, pa.int64())
            gone = [*table["output"].take(take).to_pylist(), *table["rejected_output"].take(take).to_pylist()]
            state.retiring.update(path for path in gone if path is not None and path in present)
            files.drop(rows[bad])
    state.retiring.intersection_update(present)
    result = Reconciled([], [], [], foreign=foreign_files(state, present, listing))
    table, _ = files.live(["id", "fingerprint", "first", "stop", "output", "rel"])
    skip = np.zeros(len(shards), dtype=bool)
    if not overwrite and table.num_rows and shards:
        found = pc.fill_null(pc.index_in(pa.array([s.output for s in shards], pa.string()),
                                         value_set=table["output"]), -1).to_numpy()
        at = pa.array(np.maximum(found, 0), pa.int64())
        skip = ((found >= 0)
                & pc.equal(table["id"].take(at), pa.array([s.id for s in shards], pa.string())).to_numpy(
                    zero_copy_only=False)
                & pc.equal(table["fingerprint"].take(at), pa.array([s.fingerprint for s in shards], pa.string()))
                .to_numpy(zero_copy_only=False)
                & (table["first"].to_numpy()[at.to_numpy()] == np.array([s.row_groups[0] for s in shards]))
                & (table["stop"].to_numpy()[at.to_numpy()] == np.array([s.row_groups[1] for s in shards])))
    for shard, skipped in zip(shards, skip.tolist()):
        (result.skipped if skipped else result.todo).append(shard)
    planned = pc.is_in(table["output"], value_set=pa.array([s.output for s in result.skipped], pa.string()))
    unplanned = pc.invert(planned).to_numpy(zero_copy_only=False)
    kept = np.zeros(table.num_rows, dtype=bool)
    if listed is not None and not (prune or overwrite) and table.num_rows:
        kept = unplanned & pc.invert(pc.is_in(table["rel"], value_set=pa.array(list(listed), pa.string()))).to_numpy(
            zero_copy_only=False)
        result.kept = set(table["output"].filter(pa.array(kept)).to_pylist())
    result.stale = sorted(table["output"].filter(pa.array(unplanned & ~kept)).to_pylist())
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
        self.planned = list(shards)  # in input order
        self._shards: dict[str, Shard] | None = None
        self._plan: pa.Table | None = None
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
    def shards(self) -> dict[str, Shard]:
        """The planned shards by id."""
        if self._shards is None:
            self._shards = {s.id: s for s in self.planned}
        return self._shards

    @property
    def complete(self) -> bool:
        """Every planned shard committed with its rows reconciled, and nothing else under the output
        but the kept predictions of vanished inputs."""
        return (self._planned_complete() and not self._not_current() and not self.state.retiring
                and not self.foreign)

    def finish(self) -> bool:
        """Compact the manifest; when the run is complete delete stale files and write `_SUCCESS` last."""
        self._settle_unconfirmed()
        self._retire(self._not_current())
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
        write_checkpoint(self.output, self.state.files, self._extras(), self._root(complete), self.generation,
                         self.check_lock)
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

    def _plan_table(self) -> pa.Table:
        """The planned shards as columns (what an entry must hold to describe one)."""
        if self._plan is None:
            shards = self.planned
            self._plan = pa.table({
                "id": pa.array([s.id for s in shards], pa.string()),
                "output": pa.array([s.output for s in shards], pa.string()),
                "fingerprint": pa.array([s.fingerprint for s in shards], pa.string()),
                "first": pa.array([s.row_groups[0] for s in shards], pa.int64()),
                "stop": pa.array([s.row_groups[1] for s in shards], pa.int64()),
                "error": pa.array([s.error is not None for s in shards], pa.bool_())})
        return self._plan

    def _not_current(self) -> list[str]:
        """Committed files that no planned shard describes (a vanished input's kept predictions aside)."""
        table, _ = self.state.files.live(["id", "output", "fingerprint", "first", "stop"])
        if not table.num_rows:
            return []
        plan = self._plan_table()
        found = pc.fill_null(pc.index_in(table["id"], value_set=plan["id"]), -1).to_numpy()
        if plan.num_rows:
            at = pa.array(np.maximum(found, 0), pa.int64())
            current = (found >= 0) & _same(table, plan.take(at), ("output", "fingerprint", "first", "stop"))
        else:  # nothing planned (every file held by a compaction): only kept predictions are current
            current = np.zeros(table.num_rows, dtype=bool)
        if self.kept:
            current |= (found < 0) & pc.is_in(table["output"], value_set=pa.array(sorted(self.kept), pa.string())) \
                .to_numpy(zero_copy_only=False)
        return table["output"].filter(pa.array(~current)).to_pylist()

    def _planned_complete(self) -> bool:
        plan = self._plan_table()
        if pc.any(plan["error"]).as_py():
            return False
        table, _ = self.state.files.live(["id", "output", "fingerprint", "first", "stop", "rows_in", "rows_out",
                                          "rows_rejected"])
        found = pc.fill_null(pc.index_in(plan["output"], value_set=table["output"]), -1).to_numpy()
        if (found < 0).any():
            return False
        held = table.take(pa.array(found, pa.int64()))
        rows = held["rows_in"].to_numpy() == held["rows_out"].to_numpy() + held["rows_rejected"].to_numpy()
        return bool((_same(held, plan, ("id", "fingerprint", "first", "stop")) & rows).all())

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

    def _extras(self) -> list[dict[str, Any]]:
        """The manifest's entries besides the committed ones: each planned shard not committed, failed
        (this run, or an earlier one, of the same input version) or pending."""
        table, _ = self.state.files.live(["id"])
        held = pc.is_in(self._plan_table()["id"], value_set=table["id"]).to_numpy(zero_copy_only=False)
        extras = []
        for shard, committed in zip(self.planned, held.tolist()):
            if committed:
                continue
            other = self.state.others.get(shard.id)
            extras.append(other if other is not None and other["fingerprint"] == shard.fingerprint
                          else shard_entry(shard))
        return extras

    def _root(self, complete: bool) -> dict[str, Any]:
        """The manifest's fields besides its entries."""
        return {
            "generation": self.generation,
            **self.header,
            "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "complete": complete,
            **committed_rows(self.state.files),
            "retiring": sorted(self.state.retiring),
        }


def _same(table: pa.Table, other: pa.Table, columns: Sequence[str]) -> np.ndarray:
    """Per row: `table` and `other` (as long) agree on every one of `columns`."""
    same = np.ones(table.num_rows, dtype=bool)
    for name in columns:
        same &= pc.fill_null(pc.equal(table[name], other[name]), False).to_numpy(zero_copy_only=False)
    return same


def remove_success(output: Location) -> None:
    """A run that will process shards removes a stale `_SUCCESS` first."""
    delete_file(output.fs, output.join(SUCCESS))


def output_listing(output: Location) -> dict[str, int]:
    """Relative path -> size of every file under the output (one listing)."""
    return {relative_to(output.path, info.path): info.size for info in existing_infos(output.fs, output.path)}
