"""What a plan is made of: input files, the spans an output already holds, shards; one record each
(`InputFile`, `Span`, `Shard`), and columns of many (`CommittedSpans`, `InputFiles`, `Shards`).

An unchanged tick over a million committed files plans every one of them, runs none, and needs a
record of none: the listing, the committed spans and the shards stay Arrow/numpy columns from the
Source's listing through `State.committed_spans` and `make_shards` to `reconcile`, and a `Shard` is
made only for a shard asked for (those to run; a few for messages). `InputFiles` holds an
`InputFile` only for a file whose footer was read (new, changed or partly committed files).

    >>> from pipelines.tables import DataFile, DataFiles
    >>> listing = DataFiles.of([DataFile("/in/a", "a", "v1"), DataFile("/in/b", "b", "v1")])
    >>> spans = CommittedSpans(np.array([True, False]), np.array([0]), np.array([0]), np.array([2]),
    ...                        np.array([7]), pa.array(["a-00000.parquet"]), {})
    >>> files = InputFiles(listing, committed=spans)
    >>> files[0].committed, files[1].committed
    ((Span(first=0, stop=2, rows=7, output='a-00000.parquet'),), None)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.tables import DataFiles, position

_BATCH = 16_384


@dataclass(frozen=True, slots=True)
class InputFile:
    """One input file as its footer describes it (or why it could not be read)."""

    path: str  # filesystem path
    rel: str  # path relative to the input base; mirrored under the output
    uri: str  # as shown to users
    fingerprint: str  # changes when the file is rewritten
    row_group_rows: tuple[int, ...] | None = None  # from the footer; None when it was not read
    schema: pa.Schema | None = None  # shared by every file of the same schema (`plan.scan_source`)
    error: str | None = None
    committed: tuple[Span, ...] | None = None  # the output's committed shards of this very file (no footer read)
    deleted: bytes | None = None  # the file's deleted rows (`basis.masks`): a table's row mask, never scored

    @property
    def row_groups(self) -> int | None:
        """Row groups in the file, from its footer or from the committed shards."""
        if self.row_group_rows is not None:
            return len(self.row_group_rows)
        return self.committed[-1].stop if self.committed else None


@dataclass(frozen=True, slots=True)
class Span:
    """Row groups [first, stop) of one file that an output already holds, and under which name."""

    first: int
    stop: int
    rows: int
    output: str


@dataclass(frozen=True, slots=True)
class Shard:
    """Whole row groups [first, stop) of one input file."""

    id: str
    input: str  # as shown to users
    path: str  # filesystem path of the input file
    rel: str
    fingerprint: str
    row_groups: tuple[int, int]
    rows_in: int
    output: str  # relative to the output root
    error: str | None = None  # known at planning: the file can't be read or doesn't fit
    file_row_groups: int | None = None  # row groups in the whole file (None: unknown, the file failed)
    deleted: bytes | None = None  # the file's deleted rows (`basis.masks`): dropped by the reader; not in rows_in
    # A small file planned without its footer (`InputFiles.lazy`): the shard_rows its replica splits it by
    # (`workers.lazy`); its row groups (0, 0) and an estimated rows_in stand until its result says what it held.
    lazy: int = 0  # (rows_in: estimated from the file's size, `plan.estimated_rows`)
    at: int = -1  # a lazy shard's position in its plan's `Shards` (`Shards.resolve`)

    def to_task(self) -> dict[str, object]:
        """The small record a replica needs (no Arrow, no tensors)."""
        task: dict[str, object] = {"id": self.id, "input": self.input, "path": self.path, "rel": self.rel,
                                   "fingerprint": self.fingerprint, "file_row_groups": self.file_row_groups,
                                   "row_groups": self.row_groups, "rows_in": self.rows_in, "output": self.output}
        if self.deleted is not None:
            task["deleted"] = self.deleted
        if self.lazy:
            task["lazy"] = self.lazy
        return task

    def failed(self, attempts: int, error: str) -> dict[str, Any]:
        """The result record of this shard when it did not run to a commit (as `Replica.process` returns one)."""
        return {"id": self.id, "status": "failed", "rows_in": self.rows_in, "rows_out": 0, "rows_rejected": 0,
                "output": self.output, "rejected_output": None, "attempts": attempts, "error": error}


@dataclass
class CommittedSpans:
    """The output's committed spans of each listed file (`State.committed_spans`), as columns.

    `whole` marks the files whose committed spans cover all their row groups: they are planned from
    these spans, without a footer. Their spans are the rows of `file`/`first`/`stop`/`rows`/`output`,
    sorted by (file, first). Files held only in part have their spans in `partial` (checked against
    the footer once it is read).
    """

    whole: np.ndarray  # bool per listed file
    file: np.ndarray  # int64 per span: the listed file
    first: np.ndarray  # int64
    stop: np.ndarray  # int64
    rows: np.ndarray  # int64: live rows
    output: pa.Array  # string
    partial: dict[int, tuple[Span, ...]]  # listed file -> its committed spans (files not in `whole`)

    @classmethod
    def none(cls, files: int) -> CommittedSpans:
        empty = np.zeros(0, np.int64)
        return cls(np.zeros(files, bool), empty, empty, empty, empty, pa.array([], pa.string()), {})

    def spans_of(self, index: int) -> tuple[Span, ...] | None:
        """The committed spans of listed file `index` (None: none)."""
        if not self.whole[index]:
            return self.partial.get(index)
        lo, hi = np.searchsorted(self.file, [index, index + 1])
        return tuple(map(Span, self.first[lo:hi].tolist(), self.stop[lo:hi].tolist(), self.rows[lo:hi].tolist(),
                         self.output[lo:hi].to_pylist()))


class InputFiles(Sequence[InputFile]):
    """The listed input files: an `InputFile` for each file whose footer was read (`read`), the others
    planned from their committed spans alone (`committed.whole`) or, small and fresh, from the listing
    alone (`lazy`: no footer read; its replica plans it), and made into an `InputFile` only when asked for."""

    def __init__(self, listing: DataFiles, *, display: Callable[[str], str] = str,
                 committed: CommittedSpans | None = None, read: dict[int, InputFile] | None = None,
                 uris: pa.Array | None = None, lazy: np.ndarray | None = None) -> None:
        self.listing = listing
        self.display = display  # filesystem path -> as shown to users
        self.committed = committed if committed is not None else CommittedSpans.none(len(listing))
        self.read = read if read is not None else {}
        self.uris = uris  # as shown to users, when not `display(path)`
        self.lazy = lazy  # bool per listed file: planned without its footer (None: none)

    @classmethod
    def of(cls, files: Sequence[InputFile]) -> InputFiles:
        """Files read one by one (tests, a few files)."""
        listing = DataFiles(pa.array([f.path for f in files], pa.string()), pa.array([f.rel for f in files], pa.string()),
                            pa.array([f.fingerprint for f in files], pa.string()),
                            deleted=pa.array([f.deleted for f in files], pa.binary()))
        return cls(listing, read=dict(enumerate(files)), uris=pa.array([f.uri for f in files], pa.string()))

    def __len__(self) -> int:
        return len(self.listing)

    @overload
    def __getitem__(self, index: int) -> InputFile: ...
    @overload
    def __getitem__(self, index: slice) -> list[InputFile]: ...

    def __getitem__(self, index: int | slice) -> InputFile | list[InputFile]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = position(index, len(self))
        found = self.read.get(index)
        if found is not None:
            return found
        listing = self.listing
        data = listing[index]
        return InputFile(data.path, data.rel, self.uri(index), data.fingerprint,
                         committed=self.committed.spans_of(index), deleted=data.deleted)

    def __setitem__(self, index: int, f: InputFile) -> None:
        self.read[index] = f
        if self.lazy is not None:
            self.lazy[index] = False  # its footer is read now

    def __iter__(self) -> Iterator[InputFile]:
        return (self[i] for i in range(len(self)))

    def uri(self, index: int) -> str:
        if self.uris is not None:
            return str(self.uris[index].as_py())
        return self.display(self.listing[index].path)

    def uris_of(self, indices: np.ndarray) -> list[str]:
        if self.uris is not None:
            return self.uris.take(pa.array(indices, pa.int64())).to_pylist()  # type: ignore[no-any-return]
        return list(map(self.display, self.listing.path_of(pa.array(indices, pa.int64())).to_pylist()))

    @property
    def planned_whole(self) -> np.ndarray:
        """Per file: planned from its committed spans alone (whole, and no footer read)."""
        whole = self.committed.whole
        if self.read and whole.any():
            whole = whole.copy()
            whole[list(self.read)] = False
        return whole


class Shards(Sequence[Shard]):
    """The plan's shards in input order, as columns; a `Shard` is made when one is asked for (and those
    made by `objects` are kept: each is the same object every time).

    Per shard: its input file (an index into `files`), row groups [first, stop), live rows, output name,
    the file's row groups (-1: unknown) and, for the few that fail at planning, an error.
    """

    def __init__(self, files: InputFiles, file: np.ndarray, first: np.ndarray, stop: np.ndarray,
                 rows: np.ndarray, output: pa.Array, total: np.ndarray, errors: dict[int, str] | None = None,
                 ids: pa.Array | None = None, lazy: np.ndarray | None = None, split_rows: int = 0) -> None:
        self.files = files
        self.file, self.first, self.stop = file.astype(np.int64), first.astype(np.int64), stop.astype(np.int64)
        self.rows, self.total = rows.astype(np.int64), total.astype(np.int64)
        self._output = output
        self.errors = errors if errors is not None else {}  # shard -> why it fails at planning
        self._ids = ids  # given, when not "<rel>:<first>-<stop>"
        self._made: dict[int, Shard] = {}
        self._renamed: dict[int, str] = {}
        self.lazy = lazy  # bool per shard: a lazy file's one shard, not resolved yet (None: none)
        self.split_rows = split_rows  # the shard_rows a lazy shard's replica splits its file by

    @classmethod
    def of(cls, shards: Sequence[Shard]) -> Shards:
        """Shards made one by one (tests, a few shards); the very objects are handed back."""
        listing = DataFiles(pa.array([s.path for s in shards], pa.string()), pa.array([s.rel for s in shards], pa.string()),
                            pa.array([s.fingerprint for s in shards], pa.string()),
                            deleted=pa.array([s.deleted for s in shards], pa.binary()))
        files = InputFiles(listing, uris=pa.array([s.input for s in shards], pa.string()))
        made = cls(files, np.arange(len(shards)), np.array([s.row_groups[0] for s in shards], np.int64),
                   np.array([s.row_groups[1] for s in shards], np.int64), np.array([s.rows_in for s in shards], np.int64),
                   pa.array([s.output for s in shards], pa.string()),
                   np.array([-1 if s.file_row_groups is None else s.file_row_groups for s in shards], np.int64),
                   {i: s.error for i, s in enumerate(shards) if s.error is not None},
                   pa.array([s.id for s in shards], pa.string()))
        made._made = dict(enumerate(shards))
        return made

    def __len__(self) -> int:
        return len(self.file)

    @overload
    def __getitem__(self, index: int) -> Shard: ...
    @overload
    def __getitem__(self, index: slice) -> list[Shard]: ...

    def __getitem__(self, index: int | slice) -> Shard | list[Shard]:
        if isinstance(index, slice):
            return self.objects(np.arange(len(self))[index], keep=False)
        index = position(index, len(self))
        return self.objects(np.array([index]), keep=False)[0]

    def __iter__(self) -> Iterator[Shard]:
        for start in range(0, len(self), _BATCH):
            yield from self.objects(np.arange(start, min(start + _BATCH, len(self))), keep=False)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Shards, list, tuple)):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Shards({len(self)} shard(s))"

    def objects(self, indices: np.ndarray, *, keep: bool = True) -> list[Shard]:
        """The shards at `indices` as `Shard`s; with `keep` they are kept, and handed out again as they are."""
        made: list[Shard | None] = [self._made.get(i) for i in indices.tolist()]
        missing = [k for k, shard in enumerate(made) if shard is None]
        if missing:
            at = indices[missing]
            files = self.file[at]
            take = pa.array(files, pa.int64())
            listing = self.files.listing
            rels = listing.rel.take(take).to_pylist()
            paths = listing.path_of(take).to_pylist()
            fingerprints = listing.fingerprint.take(take).to_pylist()
            deleted = listing.deleted.take(take).to_pylist() if listing.deleted is not None else [None] * len(at)
            ids = self._ids.take(pa.array(at, pa.int64())).to_pylist() if self._ids is not None else None
            outputs = self._output.take(pa.array(at, pa.int64())).to_pylist()
            if self.files.uris is not None:
                uris = self.files.uris.take(take).to_pylist()
            else:  # a local path is shown as it is: one string for both
                uris = list(map(self.files.display, paths))
            read = self.files.read
            for k, index in enumerate(files.tolist()):
                f = read.get(index)
                if f is not None:  # the strings its footer's record holds already, not copies
                    rels[k], paths[k], fingerprints[k], uris[k] = f.rel, f.path, f.fingerprint, f.uri
            if ids is None:
                ids = [f"{rel}:{first}-{stop}" for rel, first, stop in zip(rels, self.first[at].tolist(),
                                                                            self.stop[at].tolist())]
            lazy = self.lazy[at].tolist() if self.lazy is not None else [False] * len(at)
            for k, i, shard_id, rel, first, stop, rows, total, out, path, fp, uri, gone, unread in zip(
                    missing, at.tolist(), ids, rels, self.first[at].tolist(), self.stop[at].tolist(),
                    self.rows[at].tolist(), self.total[at].tolist(), outputs, paths, fingerprints, uris, deleted, lazy):
                error = self.errors.get(i)
                shard = Shard(shard_id, uri, path, rel, fp, (first, stop), rows, self._renamed.get(i, out), error,
                              None if total < 0 else total, None if error is not None else gone,
                              *((self.split_rows, i) if unread else ()))
                made[k] = shard
                if keep:
                    self._made[i] = shard
        return made  # type: ignore[return-value]

    def view(self, indices: np.ndarray) -> ShardsView:
        """The shards at `indices` (a view: nothing is copied)."""
        return ShardsView(self, indices)

    def release(self) -> None:
        """Forget the `Shard`s made so far (a run's, once they are handed to its replicas): one asked for
        again is made again, the same shard (renamed as it was) but another object."""
        self._made.clear()

    def resolve(self, shard: Shard, spans: Sequence[tuple[int, int, int, str]], total: int) -> list[Shard]:
        """A lazy shard (`Shard.lazy`) as its replica found its file: `spans` (first, stop, live rows, output),
        the file's row groups `total`. The first span takes the shard's place (its output name is the
        shard's), any others are added after the plan's shards. Returns the spans' shards."""
        at = shard.at
        if self.lazy is None or not self.lazy[at] or not spans or spans[0][3] != shard.output:
            raise ValueError(f"{shard.id}: not a lazy shard of this plan, or spans {spans!r} do not start with it")
        self.lazy[at] = False
        self._made.pop(at, None)
        (self.first[at], self.stop[at], self.rows[at], _), self.total[at] = spans[0], total
        indices = [at]
        if len(spans) > 1:  # a file of more rows than a shard: rare, so the columns are copied
            more = len(spans) - 1
            indices += range(len(self), len(self) + more)
            self.file = np.append(self.file, np.full(more, self.file[at]))
            self.first = np.append(self.first, [s[0] for s in spans[1:]])
            self.stop = np.append(self.stop, [s[1] for s in spans[1:]])
            self.rows = np.append(self.rows, [s[2] for s in spans[1:]])
            self.total = np.append(self.total, np.full(more, total))
            self.lazy = np.append(self.lazy, np.zeros(more, bool))
            self._output = pa.concat_arrays([self._output, pa.array([s[3] for s in spans[1:]], pa.string())])
        return [replace(shard, id=f"{shard.rel}:{first}-{stop}", row_groups=(first, stop), rows_in=rows,
                        output=output if first else shard.output, file_row_groups=total, lazy=0, at=-1)
                for first, stop, rows, output in spans]  # the shard's own strings, not copies

    def rename(self, index: int, shard: Shard) -> None:
        """Shard `index` is now `shard` (the same shard under the output name the sink gives it)."""
        self._made[index] = shard
        self._renamed[index] = shard.output

    # --- columns ------------------------------------------------------------------------------------
    def ids(self) -> pa.Array:
        """Each shard's id, `<rel>:<first>-<stop>`."""
        if self._ids is not None:
            return self._ids
        rels = self.files.listing.rel.take(pa.array(self.file, pa.int64()))
        head = pc.binary_join_element_wise(rels, pa.array(self.first).cast(pa.string()), ":")
        return pc.binary_join_element_wise(head, pa.array(self.stop).cast(pa.string()), "-")

    def outputs(self) -> pa.Array:
        """Each shard's output name."""
        if not self._renamed:
            return self._output
        at = np.fromiter(self._renamed, np.int64, len(self._renamed))
        mask = np.zeros(len(self), bool)
        mask[at] = True
        return pc.replace_with_mask(self._output, pa.array(mask),
                                    pa.array([self._renamed[i] for i in np.sort(at).tolist()], pa.string()))

    def fingerprints(self) -> pa.Array:
        return self.files.listing.fingerprint.take(pa.array(self.file, pa.int64()))

    def failing(self) -> np.ndarray:
        """Per shard: it fails at planning (an `error`)."""
        failing = np.zeros(len(self), bool)
        failing[list(self.errors)] = True
        return failing

    def table(self) -> pa.Table:
        """What an entry must hold to describe each shard: id, output, fingerprint, first, stop, and
        whether it failed at planning (error)."""
        return pa.table({"id": self.ids(), "output": self.outputs(), "fingerprint": self.fingerprints(),
                         "first": pa.array(self.first), "stop": pa.array(self.stop),
                         "error": pa.array(self.failing())})


class ShardsView(Shards):
    """Some of a `Shards`' shards, in their order (`Shards.view`)."""

    def __init__(self, parent: Shards, indices: np.ndarray) -> None:  # noqa: super().__init__ not called: a view
        self.parent, self.at = parent, np.asarray(indices, np.int64)
        self.files = parent.files
        self.file, self.first, self.stop = parent.file[self.at], parent.first[self.at], parent.stop[self.at]
        self.rows, self.total = parent.rows[self.at], parent.total[self.at]
        self._ids = None
        self.lazy = None if parent.lazy is None else parent.lazy[self.at]

    @property
    def errors(self) -> dict[int, str]:  # type: ignore[override]
        if not self.parent.errors:
            return {}
        at = np.flatnonzero(np.isin(self.at, np.fromiter(self.parent.errors, np.int64)))
        return {k: self.parent.errors[int(self.at[k])] for k in at.tolist()}

    def objects(self, indices: np.ndarray, *, keep: bool = True) -> list[Shard]:
        return self.parent.objects(self.at[indices], keep=keep)

    def view(self, indices: np.ndarray) -> ShardsView:
        return ShardsView(self.parent, self.at[indices])

    def rename(self, index: int, shard: Shard) -> None:
        self.parent.rename(int(self.at[index]), shard)

    def ids(self) -> pa.Array:
        if self.parent._ids is not None:
            return self.parent._ids.take(pa.array(self.at, pa.int64()))
        return Shards.ids(self)

    def outputs(self) -> pa.Array:
        return self.parent.outputs().take(pa.array(self.at, pa.int64()))
