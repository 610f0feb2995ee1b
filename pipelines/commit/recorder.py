"""The driver's side of a run's commit: the journal's records as results arrive, the manifest and `_SUCCESS`.

A long run checkpoints the journal into the manifest as it goes (`Recorder.checkpoint`): every
`CHECKPOINT_RECORDS` records the run journalled, or every `CHECKPOINT_SECONDS` when it journalled any,
whichever comes first. Only the segments that changed are rewritten, and only the journal records the
new root holds are deleted (a bundle's file once it is sealed and the root holds all its records), so
`_journal/` holds at most about `CHECKPOINT_RECORDS` records (plus the attempts in flight) and a driver
killed late replays only those. A mid-run root is never complete: it is written as a killed run would
leave its state, and `_SUCCESS` and a table's commit come only at the end (`finish`).
"""

from __future__ import annotations

import ctypes
import datetime as dt
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from basis.record import commit_path
from pipelines import interrupts
from pipelines.commit.checkpoint import committed_rows, rebased, write_checkpoint
from pipelines.commit.journal import SegmentWriter, bundles_of, clear_journal, read_journal
from pipelines.commit.manifest import FAILED
from pipelines.plan import Shard, planning_memory
from pipelines.shards import Shards
from basis.storage import Location, delete_file, write_bytes_atomic
from basis.listing import existing_infos, relative_to, sweep_temps

from pipelines.commit.state import _V1_DEFAULTS, REJECTED_DIR, SUCCESS, State, job_digest, shard_entry

if TYPE_CHECKING:
    from pipelines.tables.sink import Sink


logger = logging.getLogger(__name__)

# A mid-run checkpoint writes the new entries' segment(s) and the root and deletes the records it folded
# (~0.6 s of CPU per 20,000 records at 1M entries, most of it work the end of the run would do anyway;
# `python -m benchmarks.midrun_checkpoint`: no more CPU in all than folding once at the end). Every 20,000
# records keeps `_journal/` at ~20,000 small files and a killed run's replay at seconds. Tests lower them.
CHECKPOINT_RECORDS = 20_000
CHECKPOINT_SECONDS = 300.0
# From this many planned shards the driver's memory is its per-entry structures: its process keeps glibc's mmap
# threshold fixed (`fixed_mmap_threshold`). Fewer are big shards, whose forward passes (a replica in the driver
# lane) allocate MiB a batch that a raised threshold keeps off fresh mappings; and a caller's process is left be.
FIXED_MMAP_SHARDS = 2_000


class Recorder:
    """Records one run's outcomes: journal segments as shards finish, the manifest during the run
    (`checkpoint`) and at its end (`finish`).

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
        self.planned = shards if isinstance(shards, Shards) else list(shards)  # in input order; columns kept as such
        self._shards: dict[str, Shard] | None = None
        self._plan: pa.Table | None = None
        self.digest = job_digest(self.header)  # what this run's replicas write into their commit records
        self.kept = set(kept)  # files of vanished inputs that stay committed (no prune)
        self.foreign = list(foreign)  # data files batch-infer did not write: the output is not complete
        self.generation = state.next_generation
        self.segments = SegmentWriter(output, self.generation)
        self.check_lock = check_lock
        self.flush_seconds = flush_seconds
        self.sink = sink  # a table output: the run's files are committed into it (`pipelines.tables.sink`)
        self._last_flush = time.monotonic()
        self._confirmed: set[str] = set()  # tokens confirmed since the last checkpoint (whose records are there)
        self.confirmed = 0  # commits confirmed in this run
        self._records = 0  # records journalled since the last checkpoint
        self._last_checkpoint = time.monotonic()
        # earlier runs' records: the first checkpoint holds them (a bundle file that is not sealed stays to the
        # end: a replica of a killed run may still append to it)
        self._older = [path for path in state.journal.files if path not in state.journal.unsealed]
        self._held: set[str] = set()  # tokens folded by a checkpoint whose bundle file is still there
        self.checkpoints = 0
        if len(self.planned) >= FIXED_MMAP_SHARDS:
            fixed_mmap_threshold()

    def begin(self, *, overwrite: bool, stale: Sequence[str] = ()) -> None:
        """The run's first records, before any shard is dispatched: its header (and whether it overwrites,
        which demotes every earlier entry), then the entries it found stale (an older version of an input
        file): never reused, even when this run stops short."""
        self.state.begin(self.header, overwrite=overwrite)
        self.segments.add({"op": "begin", "header": self.header, "overwrite": overwrite})
        self._retire([path for path in stale if path in self.state.files])
        release_freed()  # what planning freed, before the run's results come

    def _retire(self, paths: Sequence[str]) -> None:
        """Entries never reused again: journalled, then their files go when a run completes."""
        if paths:
            self.segments.add({"op": "retire", "paths": list(paths)})
            for path in paths:
                self.state.retire(path)

    def committed(self, entry: Mapping[str, Any], token: str, attempts: int) -> None:
        self.state.commit({**entry, "attempts": attempts})
        self._confirmed.add(token)
        self.confirmed += 1
        self.segments.add({"op": "confirm", "token": token, "attempts": attempts})
        self._records += 1
        self.flush()
        self._maybe_checkpoint()

    def failed(self, shard: Shard, error: str, attempts: int) -> None:
        entry = {**shard_entry(shard), "attempts": attempts, "error": error, "generation": self.generation}
        self.state.fail(entry)
        self.segments.add({"op": "fail", "entry": {**entry, "status": FAILED}})
        self._records += 1
        self.flush()
        self._maybe_checkpoint()

    def flush(self, *, force: bool = False) -> None:
        if self.segments.buffer and (force or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.check_lock()
            self.segments.flush()
            self._last_flush = time.monotonic()

    def _maybe_checkpoint(self) -> None:
        if self._records >= CHECKPOINT_RECORDS or (
                self._records and time.monotonic() - self._last_checkpoint >= CHECKPOINT_SECONDS):
            self.checkpoint()

    def checkpoint(self) -> None:
        """Fold the journal into the manifest in the middle of the run (`pipelines.commit.checkpoint`'s order):
        the root holds every record journalled so far and names the last driver record it holds; then the
        records it holds are deleted: the driver's, the commit records they confirm, earlier runs'. Never
        complete, never `_SUCCESS`, no table commit; this run's generation and header, as a killed run's
        journal would give them."""
        self.flush(force=True)  # the root holds no more than the journal: every confirmation is written
        through, driver = self.segments.fold()
        root = {**self._root(False), "journal_folded": through}
        # Its Arrow buffers from jemalloc, released after: mimalloc kept what each checkpoint freed (the
        # driver +20 MiB per checkpoint, 10,000 files checkpointed every 2,000: run's growth 110 -> 44 MiB).
        with planning_memory():
            written = write_checkpoint(self.output, self.state.files, list(self.state.others.values()), root,
                                       self.generation, self.check_lock)
            self.state.files = rebased(self.output, self.state.files, written)
        self.check_lock()
        held = self._confirmed | self._held
        bundles = bundles_of(self.output, self.generation, held)
        done = [path for path, (tokens, sealed) in bundles.items() if sealed and tokens <= held]
        in_bundles = set().union(*(tokens for tokens, _ in bundles.values()))
        self._held = set().union(*(tokens & held for path, (tokens, sealed) in bundles.items()
                                   if not sealed or not tokens <= held))
        records = commit_path(self.output, self.generation, "")[: -len(".json")]  # + token + ".json"
        folded = [*self._older, *driver, *done,
                  *(f"{records}{token}.json" for token in self._confirmed if token not in in_bundles)]
        if folded:
            clear_journal(self.output, folded)
        self._older, self._records = [], 0
        self._confirmed = set()  # their records are gone (or `_held`): `_settle_unconfirmed` need not skip them
        self._last_checkpoint = time.monotonic()
        self.checkpoints += 1
        release_freed()  # the folded entries' dicts
        logger.debug("checkpointed %d journal record(s) into the manifest", len(folded))

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
        return self._complete(self._planned_complete(), self._not_current())

    def _complete(self, planned: bool, not_current: Sequence[str]) -> bool:
        """`complete`, given whether the planned shards are (`_planned_complete`) and what is not current."""
        return planned and not not_current and not self.state.retiring and not self.foreign

    def finish(self) -> bool:
        """Compact the manifest; when the run is complete delete stale files and write `_SUCCESS` last."""
        with planning_memory():  # as `checkpoint`: its Arrow buffers from jemalloc, released after
            return self._finish()

    def _finish(self) -> bool:
        release_freed()
        self._settle_unconfirmed()
        self._retire(self._not_current())  # none is left after: `complete` below need not look again
        planned = self._planned_complete()  # the same after: a planned shard's entry is current, never retired
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
        complete = self._complete(planned, not_current=())  # each part found once: retired, none is left
        extras = self._extras()
        # The planned shards' columns (~13 MiB at 100,000 shards) go before the output's listing comes
        # (`sweep_temps`: ~10 MiB more): the driver's peak is the larger of the two, not their sum.
        self._plan = None
        pa.default_memory_pool().release_unused()
        if complete:
            sweep_temps(self.output.fs, self.output.path)
        write_checkpoint(self.output, self.state.files, extras, self._root(complete), self.generation,
                         self.check_lock)
        clear_journal(self.output)
        if complete:
            interrupts.check()  # a signal swallowed while the manifest was written: no `_SUCCESS` (a rerun writes it)
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
        if self._plan is None and isinstance(self.planned, Shards):
            self._plan = self.planned.table()  # no `Shard` made per planned shard
        elif self._plan is None:
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
            current = (found >= 0) & _same(table, plan, ("output", "fingerprint", "first", "stop"), at=at)
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
        at = pa.array(found, pa.int64())
        out = pc.add(pc.take(table["rows_out"], at), pc.take(table["rows_rejected"], at))
        rows = pc.fill_null(pc.equal(pc.take(table["rows_in"], at), out), False).to_numpy()
        return bool((_same(plan, table, ("id", "fingerprint", "first", "stop"), at=at) & rows).all())

    def _settle_unconfirmed(self) -> None:
        """Commits of this run that nobody confirmed (killed attempts): the files decide."""
        confirmed = self._confirmed | self._held
        journal = read_journal(self.output, after=self.generation - 1, skip=confirmed)
        records = journal.generations.get(self.generation)
        if records is None:
            return
        for token, entry in records.commits.items():
            if token not in confirmed:
                trusted = records.jobs.get(token) == self.digest
                self.state.settle(self.output, {**_V1_DEFAULTS, **entry}, trusted=trusted)

    def _extras(self) -> list[dict[str, Any]]:
        """The manifest's entries besides the committed ones: each planned shard not committed, failed
        (this run, or an earlier one, of the same input version) or pending."""
        table, _ = self.state.files.live(["id"])
        held = pc.is_in(self._plan_table()["id"], value_set=table["id"]).to_numpy(zero_copy_only=False)
        extras = []
        for index in np.flatnonzero(~held).tolist():  # a `Shard` made only for a shard not committed
            shard = self.planned[index]
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


def release_freed() -> None:
    """Hands the C heap's free pages back to the system (glibc's `malloc_trim`; elsewhere a no-op).

    A run's results are unpickled on a thread per bundle, each with its own malloc arena, and their
    entries are freed at the next checkpoint: the pages stayed resident, scattered over the arenas
    (10,000 tiny files checkpointed every 2,000: the driver's RSS +13 MiB by the end, peak +13 MiB).
    Python's objects of more than 512 bytes (an entry's dict) and Arrow's system-pool buffers live
    there. Takes well under a millisecond.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 128 * 1024  # glibc's default, fixed


def fixed_mmap_threshold() -> None:
    """Blocks of 128 KiB or more come from their own mappings from here on (the driver's process: glibc's
    default threshold, kept fixed), returned whole when freed (`mallopt(M_MMAP_THRESHOLD)`; elsewhere a no-op).
    For the rest of the process: glibc cannot go back to adjusting it.

    Left to itself glibc raises the threshold (up to 32 MiB) each time such a block is freed: planning's
    and each checkpoint's big temporaries (lists and dict tables of 20,000 entries, segments' bytes) then
    came from the heap, between the run's long-lived objects, and stayed resident as holes
    `release_freed` cannot hand back (100,000 tiny files: the heap's free space 15 -> 65 MiB over the run,
    the driver's peak RSS ~30 MiB higher).
    """
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only (musl has none)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def _same(table: pa.Table, other: pa.Table, columns: Sequence[str], *, at: pa.Array | None = None) -> np.ndarray:
    """Per row: `table` and `other` (as long; with `at`, its rows at `at`) agree on every one of `columns`
    (taken a column at a time: at 100,000 shards the plan's columns taken whole held ~13 MiB more)."""
    same = np.ones(table.num_rows, dtype=bool)
    for name in columns:
        theirs = other[name] if at is None else pc.take(other[name], at)
        same &= pc.fill_null(pc.equal(table[name], theirs), False).to_numpy(zero_copy_only=False)
    return same


def remove_success(output: Location) -> None:
    """A run that will process shards removes a stale `_SUCCESS` first."""
    delete_file(output.fs, output.join(SUCCESS))


def output_listing(output: Location) -> dict[str, int]:
    """Relative path -> size of every file under the output (one listing)."""
    return {relative_to(output.path, info.path): info.size for info in existing_infos(output.fs, output.path)}
