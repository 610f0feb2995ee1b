"""The committed entries of an output, by output path: columns as loaded, dicts only for what changed.

At a million committed files a dict per entry costs gigabytes; `Entries` keeps the entries loaded from
the manifest as one Arrow table (`pipelines.commit.segments.SCHEMA`) with a mask of the rows still live, and
holds as dicts only the entries a run commits, fails or replaces. It is a `MutableMapping` (path ->
entry dict, built on demand), and hands the planner whole columns (`live`) for the work it does on
every entry at once (`pipelines.commit.reconcile`, `State.spans`, `State.claims`).

    >>> from pipelines.commit.segments import entries_table
    >>> e = {"id": "a:0-1", "input": "/in/a", "rel": "a", "fingerprint": "f", "row_groups": [0, 1],
    ...      "rows_in": 3, "rows_out": 3, "rows_rejected": 0, "output": "a-0.parquet", "status": "committed"}
    >>> files = Entries(entries_table([e]))
    >>> files["a-0.parquet"]["rows_out"], len(files)
    (3, 1)
    >>> files["b-0.parquet"] = {**e, "id": "b:0-1", "rel": "b", "output": "b-0.parquet"}
    >>> del files["a-0.parquet"]; sorted(files), files.changed_rows
    (['b-0.parquet'], 1)
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, ItemsView, Iterator, Mapping, MutableMapping, Sequence, ValuesView
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.commit.segments import SCHEMA, entries_table, table_entries

# The columns kept in memory for every committed entry (what planning asks of all of them); the others
# (input URI, sha256s, error, attempts) are read from an entry's segment when the entry itself is needed.
PLANNING = ("id", "rel", "fingerprint", "file_row_groups", "first", "stop", "rows_in", "rows_out", "rows_rejected",
            "output", "bytes", "rejected_output", "rejected_bytes", "generation")
_DICT_AFTER = 2_000  # one-at-a-time lookups answered by binary search; past this many, hashing is cheaper
_BATCH = 16_384


class KeyIndex:
    """Positions of the strings of an Arrow column, looked up one at a time without a dict of the whole
    column: a binary search over its sorted order, until so many lookups were made that hashing pays;
    then the keys' Python hashes, sorted (16 bytes a key: a dict of 100,000 paths held ~14 MiB of the
    driver), each lookup a search of them and the key compared at the positions its hash gives.

    >>> KeyIndex(pa.array(["b", "a", "c"])).find("c")
    2
    """

    def __init__(self, keys: pa.Array | pa.ChunkedArray) -> None:
        self.keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
        self._order: np.ndarray | None = None
        self._hashes: np.ndarray | None = None  # the keys' hashes, sorted (by hash, then position)
        self._at: np.ndarray | None = None  # the position of each of `_hashes`
        self._lookups = 0

    def find(self, key: str) -> int | None:
        """The last position holding `key` (None: nowhere)."""
        if self._hashes is None:
            self._lookups += 1
            if self._lookups > _DICT_AFTER:
                self._hash(0, np.zeros(0, np.int64), np.zeros(0, np.int64))
        if self._hashes is not None:
            assert self._at is not None
            h = hash(key)
            hashes, at = self._hashes, self._at
            i = int(np.searchsorted(hashes, h, "right")) - 1
            while i >= 0 and hashes[i] == h:  # the highest position first
                position = int(at[i])
                if self.keys[position].as_py() == key:
                    return position
                i -= 1
            return None
        if self._order is None:
            self._order = pc.sort_indices(self.keys).to_numpy()  # stable: equal keys keep their order
        keys, order = self.keys, self._order
        at = bisect.bisect_right(range(len(order)), key, key=lambda i: keys[int(order[i])].as_py())
        if at == 0:
            return None
        position = int(order[at - 1])  # the last of equal keys: the highest position among them
        return position if keys[position].as_py() == key else None

    def _hash(self, start: int, hashes: np.ndarray, at: np.ndarray) -> None:
        """The hashes of the keys from `start` on, added to `hashes` (those of the keys before, by position `at`)."""
        more = np.empty(len(self.keys) - start, np.int64)
        for first in range(start, len(self.keys), _BATCH):
            chunk = self.keys.slice(first, _BATCH).to_pylist()
            more[first - start:first - start + len(chunk)] = [hash(k) for k in chunk]
        hashes = np.concatenate([hashes, more])
        at = np.concatenate([at, np.arange(start, len(self.keys), dtype=np.int64)])
        order = np.argsort(hashes, kind="stable")  # equal hashes keep their positions' order
        self._hashes, self._at = hashes[order], at[order]

    def extended(self, keys: pa.Array | pa.ChunkedArray) -> KeyIndex:
        """The index of `keys`, whose first positions hold this index's keys unchanged: hashes already
        made are kept and the new keys' added (hashing them all again costs ~0.3 s a million)."""
        index = KeyIndex(keys)
        if self._hashes is not None:
            assert self._at is not None
            index._hash(len(self.keys), self._hashes, self._at)
            self._hashes = self._at = None  # this index is done with
        return index


class _Values(ValuesView):  # type: ignore[type-arg]
    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (entry for _, entry in self._mapping._entries())  # type: ignore[attr-defined]


class _Items(ItemsView):  # type: ignore[type-arg]
    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return self._mapping._entries()  # type: ignore[attr-defined, no-any-return]


class Entries(MutableMapping[str, dict[str, Any]]):
    """Committed entries by output path: an Arrow table as loaded (`base`), and dicts for changed ones."""

    def __init__(self, base: pa.Table | None = None, *, alive: np.ndarray | None = None,
                 refs: list[dict[str, Any]] | None = None, full: Callable[[int], pa.Table] | None = None,
                 unique: bool = False) -> None:
        self.base = base if base is not None else SCHEMA.empty_table()
        self.refs = refs  # the root's segments the base was read from, in order (None: the manifest held them inline)
        self.full = full  # segment number -> its whole table, when `base` holds only the `PLANNING` columns
        counts = [ref["entries"] for ref in refs or ()]
        self.starts = np.r_[0, np.cumsum(counts, dtype=np.int64)]  # each segment's first row in `base`
        self.segment = np.repeat(np.arange(len(counts), dtype=np.int32), counts) if refs else None
        self.alive = np.ones(self.base.num_rows, dtype=bool) if alive is None else alive  # committed, not replaced
        self.changed: dict[str, dict[str, Any]] = {}  # output path -> entry committed (or replaced) since loaded
        self._index: KeyIndex | None = None
        self._cached: tuple[int, pa.Table] | None = None
        outputs = self.base["output"].filter(pa.array(self.alive)) if not unique else []  # `unique`: a checkpoint's
        if len(outputs) and pc.count_distinct(outputs).as_py() < len(outputs):  # a hand-made manifest: last wins
            last = {path: row for row, path in enumerate(self.base["output"].to_pylist()) if self.alive[row]}
            self.alive[:] = False
            self.alive[list(last.values())] = True
        self._alive_count = int(self.alive.sum())
        self.dirty_segments = set(self.segment[~self.alive].tolist()) if self.segment is not None else set()

    def keep_index_of(self, older: Entries) -> None:
        """This base is `older`'s base with rows appended: take over `older`'s lookup index, extended."""
        if older._index is not None and self.base.num_rows:
            self._index = older._index.extended(self.base["output"])

    # --- the mapping ----------------------------------------------------------------------------------
    def _row(self, path: str) -> int | None:
        if not self._alive_count:
            return None
        if self._index is None:
            self._index = KeyIndex(self.base["output"])
        row = self._index.find(path)
        return row if row is not None and self.alive[row] else None

    def __getitem__(self, path: str) -> dict[str, Any]:
        entry = self.changed.get(path)
        if entry is not None:
            return entry
        row = self._row(path)
        if row is None:
            raise KeyError(path)
        return self._rows([row])[0]

    def _rows(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        """Base rows as whole entries (from their segments when `base` holds only some columns)."""
        if self.full is None:
            return table_entries(self.base.take(pa.array(rows, pa.int64())))
        assert self.segment is not None
        entries = []
        for row in rows:
            number = int(self.segment[row])
            entries.append(table_entries(self.segment_table(number).slice(row - int(self.starts[number]), 1))[0])
        return entries

    def segment_table(self, number: int) -> pa.Table:
        """A segment's whole table (the last one read is kept)."""
        if self.full is None:
            return self.base.slice(int(self.starts[number]), int(self.starts[number + 1] - self.starts[number]))
        if self._cached is None or self._cached[0] != number:
            self._cached = (number, self.full(number))
        return self._cached[1]

    def whole(self, first: int, stop: int) -> pa.Table:
        """The live base rows of segments [first, stop) with every column."""
        tables = []
        for number in range(first, stop):
            start, end = int(self.starts[number]), int(self.starts[number + 1])
            tables.append(self.segment_table(number).filter(pa.array(self.alive[start:end])))
        return pa.concat_tables(tables)

    def __setitem__(self, path: str, entry: dict[str, Any]) -> None:
        row = self._row(path) if path not in self.changed else None
        if row is not None:
            self._kill(row)
        self.changed[path] = entry

    def __delitem__(self, path: str) -> None:
        if self.changed.pop(path, None) is not None:
            return
        row = self._row(path)
        if row is None:
            raise KeyError(path)
        self._kill(row)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and (path in self.changed or self._row(path) is not None)

    def __len__(self) -> int:
        return self._alive_count + len(self.changed)

    def __iter__(self) -> Iterator[str]:
        if self._alive_count:
            outputs = self.base["output"]
            for start in range(0, self.base.num_rows, _BATCH):
                alive = self.alive[start:start + _BATCH]
                for path, live in zip(outputs.slice(start, _BATCH).to_pylist(), alive):
                    if live:
                        yield path
        yield from list(self.changed)

    def values(self) -> _Values:  # type: ignore[override]
        return _Values(self)

    def items(self) -> _Items:  # type: ignore[override]
        return _Items(self)

    def _entries(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if self._alive_count:
            pieces = (range(len(self.refs)) if self.full is not None and self.refs
                      else [None] * (1 if self.base.num_rows else 0))
            for number in pieces:
                start = 0 if number is None else int(self.starts[number])
                table = self.base if number is None else self.segment_table(number)
                alive = self.alive[start:start + table.num_rows]
                if alive.any():
                    for entry in table_entries(table.filter(pa.array(alive))):
                        yield entry["output"], entry
        yield from list(self.changed.items())

    def holding_rejected(self, path: str) -> dict[str, Any] | None:
        """The entry whose quarantine file is `path`, if any."""
        found = next((e for e in self.changed.values() if e.get("rejected_output") == path), None)
        if found is not None or not self._alive_count or self.base["rejected_output"].null_count == self.base.num_rows:
            return found
        hits = np.flatnonzero(pc.fill_null(pc.equal(self.base["rejected_output"], path), False).to_numpy(
            zero_copy_only=False) & self.alive)
        return self._rows([int(hits[0])])[0] if len(hits) else None

    def _kill(self, row: int) -> None:
        self.alive[row] = False
        self._alive_count -= 1

    # --- columns --------------------------------------------------------------------------------------
    @property
    def changed_rows(self) -> int:
        """Base rows no longer live (replaced or removed): what a checkpoint must rewrite."""
        return self.base.num_rows - self._alive_count

    def live(self, columns: Sequence[str]) -> tuple[pa.Table, np.ndarray]:
        """Every live entry's `columns` (base rows still live, then the changed entries), and for each row
        its base row (>= 0) or -1 - k for the k-th changed entry (`drop` takes them back)."""
        base = self.base.select(list(columns))
        rows = np.arange(self.base.num_rows, dtype=np.int64)
        if self._alive_count < self.base.num_rows:
            base = base.filter(pa.array(self.alive))
            rows = rows[self.alive]
        if not self.changed:
            return base, rows
        changed = entries_table(self.changed.values(), columns=columns)
        return (pa.concat_tables([base, changed]),
                np.concatenate([rows, -1 - np.arange(len(self.changed), dtype=np.int64)]))

    def drop(self, rows: np.ndarray) -> None:
        """Remove the entries at `rows` (as `live` numbers them)."""
        base = rows[rows >= 0]
        self.alive[base] = False
        self._alive_count = int(self.alive.sum())
        if (rows < 0).any():
            keys = list(self.changed)
            for k in (-1 - rows[rows < 0]).tolist():
                del self.changed[keys[k]]

    def column_sum(self, name: str) -> int:
        """The sum of an integer column over the live entries."""
        table, _ = self.live([name])
        return int(pc.sum(table[name]).as_py() or 0)


class Claims(Mapping[str, str]):
    """Output name -> the input (rel) holding it: the committed entries' columns, then a few others."""

    def __init__(self, table: pa.Table, others: dict[str, str]) -> None:
        self.table = table  # columns output, rel: one row per committed name
        self.others = others
        self._index: KeyIndex | None = None

    def __getitem__(self, name: str) -> str:
        if self.table.num_rows:
            if self._index is None:
                self._index = KeyIndex(self.table["output"])
            row = self._index.find(name)
            if row is not None:
                return str(self.table["rel"][row].as_py())
        return self.others[name]

    def __iter__(self) -> Iterator[str]:
        names = self.table["output"].to_pylist()
        yield from names
        held = set(names)
        yield from (name for name in self.others if name not in held)

    def __len__(self) -> int:
        return self.table.num_rows + len(self.others)  # an upper bound when a name is in both (never empty when not)
