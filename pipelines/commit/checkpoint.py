"""Checkpointing an output's state into its manifest: the root `_manifest.json`, and its segments.

The driver folds what the journal recorded into the manifest at the end of a run (`Recorder.finish`),
and during it every so many records (`Recorder.checkpoint`), so that the journal of a long run stays
short and a killed run replays only what came after its last checkpoint. An
output of at most `segments.INLINE_MAX` entries gets a root with its entries inline (format 2, as before
segments). A larger one gets Parquet segments (`pipelines.commit.segments`), and only those whose key range
(rel, first row group) holds an entry that changed are rewritten; the others are named again as
they are. The order keeps every moment of a crash safe:

1. the new segments, under names no segment has had (the generation and a hash of the bytes);
2. the root, atomically: from here on it names the new segments;
3. the segments no root names any more (replaced ones, and those of a checkpoint killed before 2).

4. the journal records the root holds (the whole journal at the end of a run; in its middle, only the
   records it folded: the driver's up to the sequence the root names, and the commit records those
   confirmed: replicas keep writing theirs).

A driver killed before 2 leaves the old root, whose segments are all still there, and the journal
(cleared only after 2): nothing is lost, the next run checkpoints again. Killed after 2, the root is
whole; the journal's records are of a generation the root holds (ignored; a mid-run root names the
last driver record it holds, and a commit record of an entry it holds is recognised by its bytes), and
the segments left over are deleted by the next checkpoint. A mid-run root says `complete: false`, and
no `_SUCCESS` is written but at the end of a run.

    >>> _chunks(10, 4)
    [(0, 3), (3, 7), (7, 10)]
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from basis.storage import Location, write_bytes_atomic
from pipelines.commit.entries import PLANNING, Entries
from pipelines.commit.manifest import COMMITTED, FORMAT, FORMAT_SEGMENTS, MANIFEST
from pipelines.commit import segments
from pipelines.commit.segments import (
    delete_unreferenced,
    entries_table,
    read_segments,
    segment_files,
    sorted_table,
    write_segment,
)

_WRITE_THREADS = 4
# The last entries a checkpoint appends go to a small segment of their own: a run's lane replicas commit
# in input order, each with a bundle in flight, so the next mid-run checkpoint finds a few entries (up to
# a bundle per replica) just before the last key written, whose segment it must rewrite. Rewritten, the
# small one costs little; the whole tail read back and written again cost the driver 66-114 MiB and
# ~0.2 s per checkpoint at 100,000 files.
EDGE_ROWS = 1024


@dataclass
class Written:
    """What a checkpoint wrote: the root's segments, each with the table written into it or, for a segment
    kept as it was, its number in the old root (`refs` None: the entries went inline, as `inline`: made a
    table only by `rebased`, the end of a run never needs it)."""

    refs: list[dict[str, Any]] | None
    sources: list[pa.Table | int]
    inline: list[dict[str, Any]] | None = None


def write_checkpoint(output: Location, files: Entries, extras: Sequence[Mapping[str, Any]], root: dict[str, Any],
                     generation: int, check_lock: Callable[[], None]) -> Written:
    """Write the manifest of `files` (committed entries) and `extras` (the planned shards not committed:
    failed or pending), with the root's other fields in `root`."""
    total = len(files) + len(extras)
    if total <= segments.INLINE_MAX:
        entries = [{**entry, "status": COMMITTED} for entry in files.values()] + [dict(e) for e in extras]
        entries.sort(key=lambda e: (e["rel"], e["row_groups"][0], e["status"] != COMMITTED))
        check_lock()
        write_bytes_atomic(output.fs, output.join(MANIFEST),
                           json.dumps({"format": FORMAT, **root, "shards": entries}, separators=(",", ":")).encode())
        if files.refs or next(segment_files(output), None) is not None:
            delete_unreferenced(output, ())  # an output that shrank, or a killed checkpoint's segments
        return Written(None, [], entries)
    placed = _write_segments(output, files, extras, generation, check_lock)
    refs = [ref for ref, _ in placed]
    check_lock()
    write_bytes_atomic(output.fs, output.join(MANIFEST), json.dumps(
        {"format": FORMAT_SEGMENTS, **root, "shards": {"count": total, "segments": refs}},
        separators=(",", ":")).encode())
    delete_unreferenced(output, [ref["path"] for ref in refs])
    return Written(refs, [source for _, source in placed])


def rebased(output: Location, files: Entries, written: Written) -> Entries:
    """The entries as a load of the manifest `written` just wrote would hold them: every one in columns
    (none as a dict), the live ones committed, their segments those of the new root. A run goes on from
    it after a mid-run checkpoint, and the next checkpoint rewrites only what changed since this one."""
    if written.refs is None:
        assert written.inline is not None
        table = entries_table(written.inline)
        return Entries(table, alive=pc.equal(table["status"], COMMITTED).to_numpy(zero_copy_only=False), unique=True)
    tables, alive = [], []
    for ref, source in zip(written.refs, written.sources):
        if isinstance(source, int):  # untouched: every entry in it is live and committed
            start = int(files.starts[source])
            tables.append(files.base.slice(start, ref["entries"]).select(list(PLANNING)))
            alive.append(np.ones(ref["entries"], dtype=bool))
        else:
            tables.append(source.select(list(PLANNING)))
            alive.append(pc.equal(source["status"], COMMITTED).to_numpy(zero_copy_only=False))
    refs = written.refs
    where = output.display(output.join(MANIFEST))
    base = pa.concat_tables([table.cast(tables[0].schema) for table in tables]) if tables else None
    entries = Entries(base, alive=np.concatenate(alive) if alive else None, refs=refs,
                      full=lambda number: read_segments(output, [refs[number]], where)[0], unique=True)
    _keep_index(files, entries, written)
    return entries


def _keep_index(files: Entries, entries: Entries, written: Written) -> None:
    """A run that only appended segments (every old one kept, in place) keeps its lookup dict of output
    paths, extended by the new rows: rebuilding it costs ~0.7 s at a million entries, per checkpoint."""
    kept = files.refs is not None and len(files.refs) <= len(written.sources) and all(
        source == number for number, source in enumerate(written.sources[:len(files.refs)]))
    if kept:
        entries.keep_index_of(files)


def _write_segments(output: Location, files: Entries, extras: Sequence[Mapping[str, Any]], generation: int,
                    check_lock: Callable[[], None]) -> list[tuple[dict[str, Any], pa.Table | int]]:
    """The segments of the new manifest, in order: the old ones no change touched (with their number), and
    new ones for the key ranges that changed (with the table written)."""
    # The new entries in manifest order, then as one table: every run's and the tail's share of it is a
    # slice (no copy per run), and no entry is copied to say it is committed (at 100,000 files, 20,000
    # entries a checkpoint: the copies held ~25 MiB of the driver, the tables' ~20 MiB more).
    pool = [*files.changed.values(), *extras]
    committed = len(files.changed)
    order = sorted(range(len(pool)), key=lambda i: _order_key(pool[i], i < committed))
    ordered = [pool[i] for i in order]
    new = entries_table(ordered, status=[COMMITTED if i < committed else pool[i]["status"] for i in order])
    del pool, order
    refs = list(files.refs or ())
    if not refs:  # the entries were inline (or there were none): every segment is new
        base = files.base.filter(pa.array(files.alive)) if files.changed_rows else files.base
        return _write_runs(output, [pa.concat_tables([base, new])], generation, check_lock, edge=True)
    dirty = np.zeros(len(refs), dtype=bool)
    assert files.segment is not None
    dirty[sorted(files.dirty_segments)] = True  # held entries not committed when loaded
    dirty[np.unique(files.segment[~files.alive])] = True  # replaced or removed since
    firsts = [tuple(ref["first"]) for ref in refs]
    last = tuple(refs[-1]["last"])
    keys = [(entry["rel"], entry["row_groups"][0]) for entry in ordered]  # in order: each target a slice
    del ordered
    # An entry goes to the segment whose range holds its key (or the gap after it); past the last key, to a
    # new segment when the last one is full enough, or when enough entries go there (append-only inputs, a
    # long run's checkpoints: no segment rewritten at all).
    tail = len(keys) - bisect.bisect_right(keys, last)
    append = (refs[-1]["entries"] >= segments.SEGMENT_ROWS // 2 or tail >= segments.SEGMENT_ROWS // 4) \
        and not dirty[-1]
    target = np.array([len(refs) if append and key > last else max(0, bisect.bisect_right(firsts, key) - 1)
                       for key in keys], dtype=np.int64)
    del keys
    dirty[np.unique(target[target < len(refs)])] = True
    runs: list[tuple[int, int]] = []  # [first, stop) of consecutive dirty segments
    for index in np.flatnonzero(dirty).tolist():
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    tables = []
    for first, stop in runs:  # `target` never decreases: each run's new entries are a slice of `new`
        start, end = np.searchsorted(target, [first, stop]).tolist()
        tables.append(pa.concat_tables([files.whole(first, stop), new.slice(start, end - start)]))
    start = int(np.searchsorted(target, len(refs)))
    tail = new.slice(start, new.num_rows - start)
    written = _write_runs(output, [*tables, tail], generation, check_lock, keep_empty=True, edge=True)
    by_run = iter(written[:len(runs)])
    result: list[tuple[dict[str, Any], pa.Table | int]] = []
    run_starts = {first: stop for first, stop in runs}
    index = 0
    while index < len(refs):
        if index in run_starts:
            result.extend(next(by_run))
            index = run_starts[index]
        else:
            result.append((refs[index], index))
            index += 1
    result.extend(written[len(runs)])
    return result


def _write_runs(output: Location, tables: list[pa.Table], generation: int, check_lock: Callable[[], None], *,
                keep_empty: bool = False, edge: bool = False) -> Any:
    """Each table sorted and cut into segments of at most `segments.SEGMENT_ROWS` entries, written in parallel.
    With `edge`, the last table's last `EDGE_ROWS` entries go to a segment of their own (see there).
    Returns each table's segments as (ref, the piece written) (a list per table with `keep_empty`, else one
    flat list)."""
    pieces: list[tuple[int, pa.Table]] = []
    for number, table in enumerate(tables):
        table = sorted_table(table)
        rows = table.num_rows
        cut = rows - EDGE_ROWS if edge and number == len(tables) - 1 and rows > 2 * EDGE_ROWS else rows
        for start, stop in [*_chunks(cut, segments.SEGMENT_ROWS), *([(cut, rows)] if cut < rows else [])]:
            pieces.append((number, table.slice(start, stop - start)))
    check_lock()
    with ThreadPoolExecutor(max_workers=_WRITE_THREADS) as pool:
        refs = list(pool.map(lambda piece: write_segment(output, piece[1], generation), pieces))
    grouped: list[list[tuple[dict[str, Any], pa.Table]]] = [[] for _ in tables]
    for (number, piece), ref in zip(pieces, refs):
        grouped[number].append((ref, piece))
    return grouped if keep_empty else [ref for group in grouped for ref in group]


def _order_key(entry: Mapping[str, Any], committed: bool) -> tuple[str, int, bool]:
    """An entry's place in the manifest (as `segments.sorted_table` orders them: strings by their UTF-8 bytes,
    which is the order of their code points; at a key, committed first)."""
    return entry["rel"], entry["row_groups"][0], not committed and entry["status"] != COMMITTED


def _chunks(rows: int, most: int) -> list[tuple[int, int]]:
    """[start, stop) of `rows` cut into the fewest pieces of at most `most`, as even as can be."""
    if rows == 0:
        return []
    count = -(-rows // most)
    bounds = [round(rows * i / count) for i in range(count + 1)]
    return list(zip(bounds, bounds[1:]))


def committed_rows(files: Entries) -> dict[str, int]:
    """The root's row counts over the committed entries (the loaded ones as columns, the changed as dicts)."""
    names = ("rows_in", "rows_out", "rows_rejected")
    base = files.base.select(list(names))
    if files.changed_rows:
        base = base.filter(pa.array(files.alive))
    counts = {name: int(pc.sum(base[name]).as_py() or 0) for name in names}
    for entry in files.changed.values():
        for name in names:
            counts[name] += entry.get(name) or 0
    return counts
