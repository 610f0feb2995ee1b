"""An output's committed state: its manifest with its journal applied (`State`), and a job's identity."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import JobConfig
from basis.errors import OutputConflictError
from pipelines.commit.entries import PLANNING, Claims, Entries
from pipelines.commit.journal import Journal, read_journal
from pipelines.commit.manifest import COMMITTED, FAILED, MANIFEST, PENDING, SUPERSEDED, load_manifest
from pipelines.commit.segments import SCHEMA, entries_table, read_segments, table_entries
from pipelines.plan import Columns, Shard
from pipelines.shards import CommittedSpans, Span
from pipelines.tables import DataFiles
from basis.storage import (
    Location,
    )


logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
REJECTED_DIR = "_rejected"

SpanMap = dict[tuple[str, str], tuple[Span, ...]]  # (rel, fingerprint) -> committed spans of that file


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
    def next_generation(self) -> int:
        """The generation of the next run's records: after the manifest's and every journal record's."""
        return max(self.generation, self.journal.newest) + 1

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
        folded = manifest.get("journal_folded") if manifest is not None else None
        if type(folded) is int:  # a root written in the middle of its run: that run's later records apply
            state.journal = read_journal(output, after=state.generation - 1, folded=(state.generation, folded))
            state.interrupted = True
        else:
            state.journal = read_journal(output, after=state.generation)
        state.found = state.found or bool(state.journal.files)
        state._apply(output, state.journal)
        return state

    def _apply(self, output: Location, journal: Journal) -> None:
        for generation in sorted(journal.generations):
            records = journal.generations[generation]
            # the digest of the run that wrote this generation, from its header record (a mid-run root's own)
            job = self.digest if generation == self.generation else None
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

    def committed_spans(self, listing: DataFiles) -> CommittedSpans:
        """For each listed file (same rel and fingerprint), the committed spans, as columns: those of the
        files they cover entirely (such a file needs no footer to be planned) and, apart, every
        committed span of the other files (checked against the file's footer when it is read).

        Listed rels are unique (a listing names each file once): an entry is matched by its rel, then
        its fingerprint compared, with no string built per file.
        """
        count = len(listing)
        table, _ = self.files.live(["rel", "fingerprint", "first", "stop", "file_row_groups", "rows_in", "output"])
        if not count or not table.num_rows:
            return CommittedSpans.none(count)
        found = pc.fill_null(pc.index_in(table["rel"], value_set=listing.rel), -1).to_numpy().astype(np.int64)
        listed = found >= 0
        rows = np.flatnonzero(listed)
        if len(rows):  # the same fingerprint too (the entries' column filtered chunk by chunk: never copied whole)
            key = found[rows]
            same = pc.equal(table["fingerprint"].filter(pa.array(listed)), listing.fingerprint.take(pa.array(key)))
            same = _bools(same)
            rows, key = rows[same], key[same]
        if not len(rows):
            return CommittedSpans.none(count)
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
        whole = np.zeros(count, bool)
        whole[key[starts[covered]]] = True
        spans_whole = np.repeat(covered, ends - starts)  # per span: its file is covered whole
        rows_in = table["rows_in"].to_numpy()
        at = rows[spans_whole]
        if len(at) and (np.diff(at) > 0).all():  # in the entries' order (as a run writes them): a filter
            chosen = np.zeros(table.num_rows, bool)
            chosen[at] = True
            outputs = table["output"].filter(pa.array(chosen)).combine_chunks()
        else:
            outputs = table["output"].combine_chunks().take(pa.array(at, pa.int64()))
        spans = CommittedSpans(whole, key[spans_whole], first[spans_whole], stop[spans_whole], rows_in[at],
                               _array(outputs), {})
        for start, end in zip(starts[~covered].tolist(), ends[~covered].tolist()):
            part = rows[start:end]
            outputs = table["output"].take(pa.array(part, pa.int64())).to_pylist()
            spans.partial[int(key[start])] = tuple(map(Span, first[start:end].tolist(), stop[start:end].tolist(),
                                                       rows_in[part].tolist(), outputs))
        return spans

    def spans(self, listed: Iterable[tuple[str, str]]) -> tuple[SpanMap, SpanMap]:
        """`committed_spans` keyed by the (rel, fingerprint) pairs given: the committed spans of the files
        they cover entirely, and of the other files every committed span."""
        rounds: list[list[tuple[str, str]]] = []  # each round names a rel once (`committed_spans` matches by rel)
        seen: dict[str, int] = {}
        for pair in dict.fromkeys(listed):
            number = seen[pair[0]] = seen.get(pair[0], -1) + 1
            if number == len(rounds):
                rounds.append([])
            rounds[number].append(pair)
        whole: SpanMap = {}
        partial: SpanMap = {}
        for pairs in rounds:
            rels = pa.array([rel for rel, _ in pairs], pa.string())
            found = self.committed_spans(DataFiles(rels, rels, pa.array([fp for _, fp in pairs], pa.string())))
            whole.update({pairs[i]: found.spans_of(i) for i in np.flatnonzero(found.whole).tolist()})
            partial.update({pairs[i]: spans for i, spans in found.partial.items()})
        return whole, partial

    def fingerprints(self) -> list[tuple[str, str]]:
        """The (rel, fingerprint) of every committed entry."""
        table, _ = self.files.live(["rel", "fingerprint"])
        return list(zip(table["rel"].to_pylist(), table["fingerprint"].to_pylist()))

    def claims(self, listed: pa.Array, *, keep_vanished: bool, covered: Iterable[str] = ()) -> Mapping[str, str]:
        """Output names held by inputs that are still listed (`listed` rels, and those a compaction
        `covered`) and, with `keep_vanished`, by the kept predictions of inputs that vanished (a new input
        never takes their names). Without it a vanished input's names are free: its files go when the
        run completes."""
        if covered:
            listed = pa.concat_arrays([listed, pa.array(sorted(covered), pa.string())])
        table, _ = self.files.live(["output", "rel"])
        if not keep_vanished and table.num_rows:
            table = table.filter(pc.is_in(table["rel"], value_set=listed))
        others = {}
        entries = list(self.others.values())
        if entries:
            held = pc.is_in(pa.array([e["rel"] for e in entries], pa.string()), value_set=listed)
            for entry, still in zip(entries, held.to_pylist()):
                if still:
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


def _bools(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean column as numpy (nulls false)."""
    return pc.fill_null(values, False).to_numpy(zero_copy_only=False).astype(bool)


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    return values


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
