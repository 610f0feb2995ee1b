"""Resume decisions: which planned shards an output already holds, which of its files are stale or foreign."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from basis.storage import Location, is_temp
from basis.listing import existing_infos, is_hidden
from pipelines.commit.entries import KeyIndex
from pipelines.commit.manifest import COMMITTED
from pipelines.commit.state import REJECTED_DIR, State
from pipelines.shards import Shard, Shards
from pipelines.tables.parquet import relatives

logger = logging.getLogger(__name__)


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
    listing = listing or Listing.of(present)
    table, _ = state.files.live(["output", "rejected_output"])
    candidates = listing.paths
    if table.num_rows:
        described = pc.or_(pc.is_in(candidates, value_set=table["output"]),
                           pc.is_in(candidates, value_set=table["rejected_output"].drop_null()))
        candidates = candidates.filter(pc.invert(described))
    return sorted(path for path in candidates.to_pylist() if is_data_file(path) and path not in state.retiring)


class Listing(Mapping[str, int]):
    """The files under an output (relative path -> size) as two columns, for questions about every entry at
    once; a mapping whose lookups are binary searches (no dict of a million paths).

        >>> listing = Listing.of({"b.parquet": 7, "_SUCCESS": 0})
        >>> listing["b.parquet"], "a.parquet" in listing, sorted(listing)
        (7, False, ['_SUCCESS', 'b.parquet'])
    """

    def __init__(self, paths: pa.Array, sizes: np.ndarray) -> None:
        self.paths = paths
        self.sizes = sizes
        self._index: KeyIndex | None = None
        self._lookups = 0

    @classmethod
    def of(cls, present: Mapping[str, int]) -> Listing:
        if isinstance(present, Listing):
            return present
        return cls(pa.array(list(present), pa.string()), pa.array(list(present.values()), pa.int64()).to_numpy())

    def __getitem__(self, path: str) -> int:
        self._lookups += 1
        if self._lookups <= _SCANS:  # a few lookups (`_SUCCESS`?): a scan each, no index of every path
            row: int | None = pc.index(self.paths, path).as_py()
            row = None if row is None or row < 0 else row
        else:
            if self._index is None:
                self._index = KeyIndex(self.paths)
            row = self._index.find(path)
        if row is None:
            raise KeyError(path)
        return int(self.sizes[row])

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self.get(path) is not None

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self.paths), 16_384):
            yield from self.paths.slice(start, 16_384).to_pylist()

    def __len__(self) -> int:
        return len(self.paths)

    def items(self) -> Iterator[tuple[str, int]]:  # type: ignore[override]
        """(path, size) of every file, in one pass (no lookup per path)."""
        for start in range(0, len(self.paths), 16_384):
            yield from zip(self.paths.slice(start, 16_384).to_pylist(), self.sizes[start:start + 16_384].tolist())

    def holding(self, paths: Iterable[str]) -> set[str]:
        """Those of `paths` that are listed (one pass, for many)."""
        paths = list(paths)
        if not paths:
            return set()
        held = pc.is_in(pa.array(paths, pa.string()), value_set=self.paths).to_numpy(zero_copy_only=False)
        return {path for path, there in zip(paths, held.tolist()) if there}

    def intact(self, table: pa.Table, path: str, size: str) -> np.ndarray:
        """Per row: its file (column `path`; null: none) is listed with the size recorded (`size`; null: any)."""
        if table[path].null_count == table.num_rows:
            return np.ones(table.num_rows, bool)
        found = pc.fill_null(pc.index_in(table[path], value_set=self.paths), -1).to_numpy()
        listed = self.sizes[np.maximum(found, 0)] if len(self.sizes) else np.zeros(len(found), np.int64)
        recorded = pc.fill_null(table[size], -1).to_numpy()
        none = table[path].is_null().to_numpy(zero_copy_only=False)
        return none | ((found >= 0) & ((recorded < 0) | (listed == recorded)))


def output_files(output: Location) -> Listing:
    """Every file under the output with its size (one listing), as columns."""
    infos = existing_infos(output.fs, output.path)
    base = output.path
    paths = pa.array([info.path for info in infos], pa.string())
    sizes = np.array([info.size for info in infos], np.int64)
    del infos
    return Listing(relatives(base, paths), sizes)


_CHUNK = 65_536
_SCANS = 8


@dataclass
class Reconciled:
    """What a run has to do, given the plan and the output's committed state."""

    todo: list[Shard]
    skipped: Sequence[Shard]  # a view of the plan's `Shards`: no record made per skipped shard
    stale: list[str]  # files of older input versions (or of vanished inputs, with prune): deleted when a run completes
    kept: set[str] = field(default_factory=set)  # files of vanished inputs, kept (without prune): still committed
    foreign: list[str] = field(default_factory=list)  # data files batch-infer did not write: no _SUCCESS beside them
    todo_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # `todo`'s places in the plan


def reconcile(state: State, shards: Sequence[Shard], present: Mapping[str, int], overwrite: bool, *,
              listed: pa.Array | Iterable[str] | None = None, prune: bool = False,
              foreign: list[str] | None = None) -> Reconciled:
    """Split the plan into shards to run and shards already committed; find stale files.

    `present` maps each file under the output to its size. A shard is skipped
    when its output file is described by a committed entry for the same input
    fingerprint and row groups, and the file is still there with the recorded
    size. An entry whose file was deleted or altered behind our back is dropped
    (what is left of it retires) and its shard runs again. Entries of inputs
    no longer `listed` (rels) are kept unless `prune` or `overwrite` is set.
    `foreign`: `foreign_files` of the state as loaded, when known (dropping an entry never makes its
    file foreign: a file still there retires).
    Every entry is looked at as columns (`Entries.live`): a million of them take a second or two.
    """
    files, listing = state.files, Listing.of(present)
    shards = shards if isinstance(shards, Shards) else Shards.of(list(shards))
    table, rows = files.live(["output", "bytes", "rejected_output", "rejected_bytes"])
    if table.num_rows:
        bad = np.flatnonzero(~(listing.intact(table, "output", "bytes")
                               & listing.intact(table, "rejected_output", "rejected_bytes")))
        if len(bad):
            take = pa.array(bad, pa.int64())
            gone = [*table["output"].take(take).to_pylist(), *table["rejected_output"].take(take).to_pylist()]
            state.retiring.update(listing.holding(path for path in gone if path is not None))
            files.drop(rows[bad])
    state.retiring.intersection_update(listing.holding(state.retiring))
    if foreign is None:
        foreign = foreign_files(state, present, listing)
    result = Reconciled([], shards.view(np.zeros(0, np.int64)), [], foreign=foreign)
    table, _ = files.live(["id", "fingerprint", "first", "stop", "output", "rel"])
    skip = np.zeros(len(shards), dtype=bool)
    outputs = shards.outputs()
    found = np.full(len(shards), -1, np.int64)  # per shard: the live entry of its output name
    if not overwrite and table.num_rows and len(shards):
        found = pc.fill_null(pc.index_in(outputs, value_set=table["output"]), -1).to_numpy().astype(np.int64)
        at = np.maximum(found, 0)
        skip = (found >= 0) & (table["first"].to_numpy()[at] == shards.first) & (table["stop"].to_numpy()[at] == shards.stop)
        skip &= _same_strings(table, shards, found)
    result.todo_rows = np.flatnonzero(~skip)
    result.todo = shards.objects(result.todo_rows)
    result.skipped = shards.view(np.flatnonzero(skip))
    unplanned = np.ones(table.num_rows, dtype=bool)  # no skipped shard holds it (live output names are unique)
    unplanned[found[skip]] = False
    kept = np.zeros(table.num_rows, dtype=bool)
    if listed is not None and not (prune or overwrite) and unplanned.any():
        listed = listed if isinstance(listed, (pa.Array, pa.ChunkedArray)) else pa.array(list(listed), pa.string())
        kept[unplanned] = pc.invert(pc.is_in(table["rel"].filter(pa.array(unplanned)), value_set=listed)).to_numpy(
            zero_copy_only=False)
        result.kept = set(table["output"].filter(pa.array(kept)).to_pylist())
    stale = unplanned & ~kept
    result.stale = sorted(table["output"].filter(pa.array(stale)).to_pylist()) if stale.any() else []
    return result


def _same_strings(table: pa.Table, shards: Shards, found: np.ndarray) -> np.ndarray:
    """Per shard: the entry at row `found` (of `table`; -1: none) has the shard's id and fingerprint.

    Compared a slice of the entries at a time, each with the shard that found it (live output names
    are unique, so one each): the table's chunked columns are never copied whole or taken from."""
    same = np.zeros(len(shards), bool)
    matched = np.flatnonzero(found >= 0)
    shard_of = np.full(table.num_rows, -1, np.int64)  # per entry: the shard whose output it is
    shard_of[found[matched]] = matched
    if np.count_nonzero(shard_of >= 0) < len(matched):  # two shards of one output name (hand-made): one by one
        for index in matched.tolist():
            row, shard = int(found[index]), shards[index]
            same[index] = table["id"][row].as_py() == shard.id and table["fingerprint"][row].as_py() == shard.fingerprint
        return same
    for start in range(0, table.num_rows, _CHUNK):
        which = shard_of[start:start + _CHUNK]
        has = which >= 0
        if not has.any():
            continue
        part, mask = shards.view(which[has]), pa.array(has)
        equal = pc.and_(pc.equal(table["id"].slice(start, len(which)).filter(mask), part.ids()),
                        pc.equal(table["fingerprint"].slice(start, len(which)).filter(mask), part.fingerprints()))
        same[which[has]] = pc.fill_null(equal, False).to_numpy(zero_copy_only=False) if isinstance(equal, pa.Array) \
            else np.concatenate([c.fill_null(False).to_numpy(zero_copy_only=False) for c in equal.chunks])
    return same


def _describes(entry: Mapping[str, Any], shard: Shard) -> bool:
    return (entry["id"] == shard.id and entry["fingerprint"] == shard.fingerprint
            and tuple(entry["row_groups"]) == shard.row_groups and entry["status"] == COMMITTED)
