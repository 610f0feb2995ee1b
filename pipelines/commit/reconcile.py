"""Resume decisions: which planned shards an output already holds, which of its files are stale or foreign."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from basis.storage import is_hidden, is_temp
from pipelines.commit.manifest import COMMITTED
from pipelines.commit.state import REJECTED_DIR, State
from pipelines.plan import Shard

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
