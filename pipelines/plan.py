"""Planning: input files -> shards, from Parquet footers only. Never touches Ray.

A shard is a run of whole row groups of one file, about `shard_rows` rows.
Its id and output name derive from the input path and its row groups, never
from scheduling, so a retried or resumed shard writes the same file.

A file whose fingerprint the output already holds, committed over all its row
groups, needs no footer: its shards are the committed ones. That keeps a cron
tick over an unchanged 100,000-file table to a listing and the manifest.

    >>> split_row_groups([400, 400, 400, 100], shard_rows=800)
    [(0, 2), (2, 4)]
    >>> output_name("date=2024-01-01/part-0.parquet", 2)
    'date=2024-01-01/part-0-00002.parquet'
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import re
from collections import ChainMap
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import JobConfig
from basis.errors import ConfigError, InputError
from basis.masks import decode as decode_mask
from basis.masks import deleted_between
from basis.storage import Location, read_parquet_footer
from basis.listing import is_hidden
from pipelines.shards import CommittedSpans, InputFile, InputFiles, Shard, Shards, Span
from pipelines.tables import DataFile, DataFiles, Source
from workers.lazy import spans_of
from workers.fit import (
    PARQUET_SUFFIXES,
    distinct_output_name,
    footer_error,
    is_float_list,
    misfit,
    output_name,
    short,
    split_row_groups,
)

__all__ = ["DEFAULT_SHARD_ROWS", "Columns", "CommittedSpans", "InputFile", "InputFiles", "Shard", "Shards", "Span",
           "check_file", "check_quarantine", "distinct_output_name", "make_shards", "output_name", "planning_memory",
           "read_schema", "resolve_failed", "settle_lazy",
           "resolve_columns", "scan_inputs", "scan_source", "split_row_groups"]

DEFAULT_SHARD_ROWS = 1_000_000
_FOOTER_THREADS = 16  # object stores: footer reads wait on the network
_LOCAL_FOOTER_THREADS = 4  # local disks: the work is CPU, more threads only contend for the GIL
_FOOTER_CHUNK = 64

Committed = Callable[[DataFiles], CommittedSpans]  # the listing -> the output's committed spans of its files


@dataclass(frozen=True)
class Columns:
    """Which columns are read, predicted from and written."""

    features: tuple[str, ...]
    passthrough: tuple[str, ...]
    list_column: bool  # features is one fixed_size_list column
    width: int  # number of model inputs
    prediction: str
    keep_features: bool
    categorical: tuple[str, ...] = ()  # integer columns fed to a .pt2 program's embeddings

    @property
    def read(self) -> list[str]:
        return list(dict.fromkeys(self.passthrough + self.features + self.categorical))

    @property
    def written(self) -> list[str]:
        kept = self.features if self.keep_features else ()
        return [*self.passthrough, *kept, *([self.prediction] if self.prediction else [])]


@contextlib.contextmanager
def planning_memory() -> Iterator[None]:
    """Planning's Arrow memory from jemalloc (or the system allocator), not the default mimalloc.

    Planning reads a manifest's segments, lists and compares columns of a million strings, and frees
    most of it again: mimalloc kept ~180 MiB of those freed buffers resident at a million entries (the
    driver's peak RSS 1.2 GiB, 0.97 GiB with jemalloc). Buffers return to the pool they came from, so
    the run that follows (a replica in the driver: `pipelines.lane`) allocates from mimalloc as before.
    """
    previous = pa.default_memory_pool()
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without jemalloc
        pool = pa.system_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(previous)
        pool.release_unused()  # what planning freed: no further allocation would ever return it


def make_shards(files: Sequence[InputFile], shard_rows: int, claims: Mapping[str, str] | None = None) -> Shards:
    """Shards for every file, in input order.

    A file's committed spans (same fingerprint, from the manifest) are kept as
    they are, so changing `shard_rows` never splits a file twice in different
    ways; only the row groups they do not cover are split anew. `claims` maps
    output names already taken to the input (rel) that holds them; a new shard
    never takes a name another input holds. Files planned from their committed
    spans alone (`InputFiles`: an unchanged tick's every file) become shards as
    columns, without a record per file.
    """
    files = files if isinstance(files, InputFiles) else InputFiles.of(list(files))
    taken: MutableMapping[str, str] = ChainMap({}, claims if claims is not None else {})  # this plan's, then the claims
    made: list[tuple[int, int, int, int, str, int]] = []  # (file, first, stop, rows, output, file's row groups)
    errors: dict[int, str] = {}  # position in `made` -> error
    for index in sorted(files.read):  # the files whose footers were read, one by one
        f = files.read[index]
        if f.error is not None or (f.row_group_rows is None and f.committed is None):
            errors[len(made)] = f.error or f"{f.uri}: footer not read"
            made.append((index, 0, 0, 0, _claim(taken, f.rel, 0), -1))
            continue
        total = f.row_groups
        for first, stop, rows, name in _spans(f, shard_rows):
            made.append((index, first, stop, rows, name or _claim(taken, f.rel, first), -1 if total is None else total))
    lazy = np.flatnonzero(files.lazy) if files.lazy is not None else np.zeros(0, np.int64)
    if len(lazy):  # one shard each, named as its first row group's (`settle_lazy`: no other input shares it)
        names = pc.binary_join_element_wise(
            pc.replace_substring_regex(files.listing.rel.take(pa.array(lazy)), _SUFFIX, ""), "-00000.parquet", "")
        lazy_shards = (lazy, np.zeros(len(lazy), np.int64), names, estimated_rows(files, lazy))
    committed = files.committed
    keep = files.planned_whole[committed.file] if len(committed.file) else np.zeros(0, bool)
    whole = committed if keep.all() else dataclasses.replace(
        committed, file=committed.file[keep], first=committed.first[keep], stop=committed.stop[keep],
        rows=committed.rows[keep], output=committed.output.filter(pa.array(keep)))
    last = np.r_[whole.file[1:] != whole.file[:-1], True] if len(whole.file) else np.zeros(0, bool)
    total = np.repeat(whole.stop[last], np.diff(np.r_[0, np.flatnonzero(last) + 1]))  # a file's last stop
    if len(lazy):
        file, zeros, names, estimate = lazy_shards
        whole = dataclasses.replace(whole, file=np.concatenate([whole.file, file]),
                                    first=np.concatenate([whole.first, zeros]),
                                    stop=np.concatenate([whole.stop, zeros]),
                                    rows=np.concatenate([whole.rows, estimate]),
                                    output=pa.concat_arrays([whole.output.cast(pa.string()), names]))
        total = np.concatenate([total, np.full(len(lazy), -1, np.int64)])
    unread = np.r_[np.zeros(len(whole.file) - len(lazy), bool), np.ones(len(lazy), bool)] if len(lazy) else None
    if not made and unread is None:
        return Shards(files, whole.file, whole.first, whole.stop, whole.rows, whole.output, total)
    if not made:
        order = np.argsort(whole.file, kind="stable")
        return Shards(files, whole.file[order], whole.first[order], whole.stop[order], whole.rows[order],
                      whole.output.take(pa.array(order)), total[order], lazy=unread[order], split_rows=shard_rows)
    columns = list(zip(*made))
    file = np.concatenate([whole.file, np.array(columns[0], np.int64)])
    order = np.argsort(file, kind="stable")  # input order; a file's shards in their order
    where = np.empty(len(order), np.int64)
    where[order] = np.arange(len(order))
    return Shards(files, file[order], np.concatenate([whole.first, np.array(columns[1], np.int64)])[order],
                  np.concatenate([whole.stop, np.array(columns[2], np.int64)])[order],
                  np.concatenate([whole.rows, np.array(columns[3], np.int64)])[order],
                  pa.concat_arrays([whole.output, pa.array(columns[4], pa.string())]).take(pa.array(order)),
                  np.concatenate([total, np.array(columns[5], np.int64)])[order],
                  {int(where[len(whole.file) + k]): error for k, error in errors.items()},
                  lazy=None if unread is None else np.r_[unread, np.zeros(len(made), bool)][order],
                  split_rows=shard_rows)


_SUFFIX = "(" + "|".join(re.escape(suffix) for suffix in PARQUET_SUFFIXES) + ")$"  # what `workers.fit.stem` cuts off
_HIDDEN_PART = r"(^|/)[_.]"  # a part `workers.fit.output_name` makes visible
_NAME_TAIL = r"-[0-9]{5}(-[0-9a-f]{8})?\.parquet$"  # an output name less its stem


def settle_lazy(files: InputFiles, claims: Mapping[str, str], location: Location, shard_rows: int) -> None:
    """Read the footers of the files planned lazily (`scan_source`'s `lazy_bytes`) whose output names
    another input might share: a stem two listed inputs share (`a.parquet`, `a.parq`), a hidden part,
    a stem that names the output `claims` hold for another input; and a file likely to hold several
    shards (`estimated_rows` of `shard_rows` or more: planned from its footer, as a big file is). The rest
    keep one shard each, whose replica names any further span `output_name(rel, first)` as `make_shards`
    would: no other name claims their stem."""
    if files.lazy is None or not files.lazy.any():
        return
    rels = files.listing.rel
    stems = pc.replace_substring_regex(rels, _SUFFIX, "")
    hidden = pc.match_substring_regex(rels, _HIDDEN_PART).to_numpy(zero_copy_only=False)
    eager = hidden.copy()
    if hidden.any():  # their stems as `output_name` makes them visible
        at = np.flatnonzero(hidden)
        visible = [output_name(rel, 0)[: -len("-00000.parquet")] for rel in rels.take(pa.array(at)).to_pylist()]
        stems = pc.replace_with_mask(stems, pa.array(hidden), pa.array(visible, pa.string()))
    order = pc.sort_indices(stems).to_numpy()
    ranked = stems.take(pa.array(order))
    same = pc.equal(ranked.slice(1), ranked.slice(0, len(ranked) - 1)).to_numpy(zero_copy_only=False)
    eager[order[1:][same]] = True
    eager[order[:-1][same]] = True
    names, holders = _claimed(claims)
    lazy = np.flatnonzero(files.lazy)
    if len(names):
        claimed = pc.replace_substring_regex(names, _NAME_TAIL, "")
        hit = lazy[pc.is_in(stems.take(pa.array(lazy)), value_set=claimed).to_numpy(zero_copy_only=False)]
        if len(hit):
            wanted = set(stems.take(pa.array(hit)).to_pylist())
            held: dict[str, set[str]] = {}
            for name_stem, holder in zip(claimed.to_pylist(), holders.to_pylist()):
                if name_stem in wanted:
                    held.setdefault(name_stem, set()).add(holder)
            for index, stem, rel in zip(hit.tolist(), stems.take(pa.array(hit)).to_pylist(),
                                        rels.take(pa.array(hit)).to_pylist()):
                eager[index] |= bool(held[stem] - {rel})
    eager[lazy[estimated_rows(files, lazy) >= shard_rows]] = True
    for index in lazy[eager[lazy]].tolist():
        files[index] = read_schema(files[index], location)


def estimated_rows(files: InputFiles, at: np.ndarray) -> np.ndarray:
    """Rows of the listed files `at` (int64), estimated from their sizes at the rows per byte of the files
    whose footers were read (0 where nothing tells): a lazy shard's `rows_in` until its replica counts them."""
    sizes = files.listing.sizes
    read = [(index, sum(f.row_group_rows)) for index, f in files.read.items() if f.row_group_rows is not None]
    if sizes is None or not read or not len(at):
        return np.zeros(len(at), np.int64)
    per_byte = sum(n for _, n in read) / max(1, pc.sum(sizes.take(pa.array([i for i, _ in read], pa.int64()))).as_py())
    return (sizes.take(pa.array(at, pa.int64())).to_numpy(zero_copy_only=False) * per_byte).astype(np.int64)


def resolve_failed(shards: Shards, shard: Shard, location: Location, columns: Columns) -> list[Shard]:
    """A lazy shard that failed before its replica planned its file (a replica that died, a storage error):
    its file's shards as the eager plan makes them, from its footer read now, to be recorded as failed;
    the shard itself when the file cannot be read or does not fit (the eager plan's one failed shard)."""
    f = read_schema(shards.files[int(shards.file[shard.at])], location)
    if check_file(f, columns) is not None or f.row_group_rows is None:
        return [dataclasses.replace(shard, rows_in=0)]
    rows = f.row_group_rows
    return shards.resolve(shard, spans_of(rows, shard_rows=shards.split_rows, rel=shard.rel, output=shard.output),
                          len(rows))


def _claimed(claims: Mapping[str, str]) -> tuple[pa.Array, pa.Array]:
    """The names `claims` hold and their holders, as columns (without a record per committed name)."""
    names: list[pa.Array] = []
    holders: list[pa.Array] = []
    for part in (claims.maps if isinstance(claims, ChainMap) else [claims]):
        table = getattr(part, "table", None)  # `pipelines.commit.entries.Claims`: its committed names' columns
        if table is not None:
            names.append(table["output"].combine_chunks() if table.num_rows else pa.array([], pa.string()))
            holders.append(table["rel"].combine_chunks() if table.num_rows else pa.array([], pa.string()))
            part = part.others
        names.append(pa.array(list(part), pa.string()))
        holders.append(pa.array(list(part.values()), pa.string()))
    return (pa.concat_arrays([n.cast(pa.string()) for n in names]),
            pa.concat_arrays([h.cast(pa.string()) for h in holders]))


def _spans(f: InputFile, shard_rows: int) -> list[tuple[int, int, int, str | None]]:
    """(first, stop, live rows, committed output name or None) covering every row group of `f` once."""
    committed = f.committed or ()
    if len(committed) > 1:
        committed = sorted(committed, key=lambda span: span.first)
    if f.row_group_rows is None:
        return [(c.first, c.stop, c.rows, c.output) for c in committed]
    rows = f.row_group_rows
    if not rows:
        return [(0, 0, 0, next((c.output for c in committed if (c.first, c.stop) == (0, 0)), None))]
    live = _live_rows(rows, f.deleted)
    spans: list[tuple[int, int, int, str | None]] = []
    cursor = 0
    for c in committed:
        if c.first < cursor or c.stop > len(rows) or c.first >= c.stop or live(c.first, c.stop) != c.rows:
            continue  # does not fit this footer: split anew
        if is_hidden(c.output):
            continue  # a hidden name (from before they were made visible): readers skip it, so redo it
        spans.extend(_split(rows, cursor, c.first, shard_rows, live))
        spans.append((c.first, c.stop, c.rows, c.output))
        cursor = c.stop
    spans.extend(_split(rows, cursor, len(rows), shard_rows, live))
    return spans


def _live_rows(rows: Sequence[int], deleted: bytes | None) -> Callable[[int, int], int]:
    """Live rows of row groups [first, stop): their rows less the file's deleted ones."""
    starts = [0]
    for count in rows:
        starts.append(starts[-1] + count)
    positions = decode_mask(deleted) if deleted is not None else None

    def live(first: int, stop: int) -> int:
        total = starts[stop] - starts[first]
        return total if positions is None else total - deleted_between(positions, starts[first], starts[stop])

    return live


def _split(rows: Sequence[int], first: int, stop: int, shard_rows: int,
           live: Callable[[int, int], int]) -> list[tuple[int, int, int, str | None]]:
    if first >= stop:
        return []
    return [(first + a, first + b, live(first + a, first + b), None)
            for a, b in split_row_groups(rows[first:stop], shard_rows)]


def _claim(taken: MutableMapping[str, str], rel: str, first: int) -> str:
    name = output_name(rel, first)
    if taken.setdefault(name, rel) != rel:
        name = distinct_output_name(rel, first)
        if taken.setdefault(name, rel) != rel:
            raise InputError(f"inputs {taken[name]!r} and {rel!r} map to the same output name {name!r}; rename one")
    return name


def scan_inputs(location: Location, committed: Committed | None = None, *,
                avoid: str | None = None) -> tuple[str, InputFiles]:
    """`scan_source` over the Parquet files, directory or glob at `location`."""
    from pipelines.tables.parquet import ParquetSource

    return scan_source(ParquetSource(location, location.uri), committed, avoid=avoid)


def scan_source(source: Source, committed: Committed | None = None, *,
                avoid: str | None = None, lazy_bytes: int = 0) -> tuple[str, InputFiles]:
    """List the input's live data files (`Source.files`) and read the footers that are needed (in
    parallel: footers are small reads).

    `committed` is given the listing and returns the output's committed spans of its files
    (`State.committed_spans`): a file they cover entirely is planned from them, its footer
    not read and no record made for it; the spans of a file held in part are reused where
    they fit its footer. `avoid`: the output's real path, which no input may reach through
    a symlink (`list_files`).

    `lazy_bytes`: a fresh local file (no committed span) of at most this many bytes, as the listing
    sizes it, is not opened at all (`InputFiles.lazy`): the replica that reads it whole plans it
    (`workers.lazy`), with the same checks, shards and names. A table's files (row counts, deleted
    rows) and an object store's are always read here.
    """
    location = source.location
    base, listing = source.files(avoid=avoid)
    known = committed(listing) if committed else CommittedSpans.none(len(listing))
    schemas: list[tuple[pq.ParquetSchema, pa.Schema]] = []  # distinct schemas: 100k files often share one

    def arrow_schema(parquet: pq.ParquetSchema) -> pa.Schema:
        for seen, schema in schemas:  # a C++ comparison, far cheaper than converting every footer's schema
            if parquet.equals(seen):
                return schema
        schema = parquet.to_arrow_schema().remove_metadata()
        schemas.append((parquet, schema))
        return schema

    def footer(index: int, data: DataFile) -> InputFile:
        rel, fingerprint = data.rel, data.fingerprint
        uri = location.display(data.path)
        reusable = known.partial.get(index)
        try:
            meta = read_parquet_footer(location.fs, data.path)
            schema = arrow_schema(meta.schema)
            rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
            return InputFile(data.path, rel, uri, fingerprint, error=footer_error(uri, exc))
        if data.rows is not None and sum(rows) != data.rows:
            return InputFile(data.path, rel, uri, fingerprint, error=(
                f"{uri}: the footer holds {sum(rows)} row(s) but the {source.format} table records {data.rows}"))
        return InputFile(data.path, rel, uri, fingerprint, rows, schema, committed=reusable, deleted=data.deleted)

    needed = ~known.whole  # not committed over all its row groups: its footer is read, unless planned lazily
    lazy = np.zeros(len(listing), bool)
    if lazy_bytes and location.is_local and listing.sizes is not None and listing.rows is None \
            and listing.deleted is None:
        lazy = needed & (listing.sizes.to_numpy(zero_copy_only=False) <= lazy_bytes)
        if known.partial:
            lazy[list(known.partial)] = False
        needed &= ~lazy
    needed = np.flatnonzero(needed)
    # Footers in chunks: one pool task per file costs more than the read itself on 100k small files.
    chunks = [needed[i:i + _FOOTER_CHUNK] for i in range(0, len(needed), _FOOTER_CHUNK)]
    threads = _LOCAL_FOOTER_THREADS if location.is_local else _FOOTER_THREADS
    read: dict[int, InputFile] = {}

    def footers(chunk: np.ndarray) -> list[InputFile]:
        return [footer(index, data) for index, data in zip(chunk.tolist(), listing.take(chunk))]

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(chunks)))) as pool:
        for chunk, files in zip(chunks, pool.map(footers, chunks)):
            read.update(zip(chunk.tolist(), files))
    return base, InputFiles(listing, display=location.display, committed=known, read=read,
                            lazy=lazy if lazy.any() else None)


def read_schema(f: InputFile, location: Location) -> InputFile:
    """`f` with its footer read (for a file planned from the manifest whose schema is needed after all)."""
    if f.schema is not None or f.error is not None:
        return f
    try:
        meta = read_parquet_footer(location.fs, f.path)
    except Exception as exc:
        return dataclasses.replace(f, error=footer_error(f.uri, exc))
    rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return dataclasses.replace(f, row_group_rows=rows, schema=meta.schema.to_arrow_schema().remove_metadata())


def resolve_columns(schema: pa.Schema, cfg: JobConfig, width: int, source: str) -> Columns:
    """Resolve `features` and `passthrough` against one file's schema and the model's width."""
    names = schema.names
    categorical = tuple(cfg.categorical or ())
    passthrough_given = set(cfg.passthrough or ()) | set(categorical)  # never features, by default or by glob
    if cfg.features is None:
        features = [f.name for f in schema if pa.types.is_floating(f.type) and f.name not in passthrough_given]
        lists = [f.name for f in schema if is_float_list(f.type) and f.name not in passthrough_given]
        if not features and len(lists) == 1:
            features = lists
        if not features:
            raise InputError(
                f"no floating-point feature columns in {source} (columns: {', '.join(names)}); "
                f"name them with 'features'"
            )
    else:
        features = []
        for entry in cfg.features:
            if any(ch in entry for ch in "*?["):
                matched = [n for n in names if fnmatch.fnmatchcase(n, entry) and n not in passthrough_given]
                if not matched:
                    raise InputError(f"feature pattern {entry!r} matches no column in {source} (columns: {', '.join(names)})")
                features.extend(n for n in matched if n not in features)
            elif entry not in names:
                raise InputError(f"feature column {entry!r} not found in {source} (columns: {', '.join(names)})")
            else:
                features.append(entry)
    list_column = len(features) == 1 and is_float_list(schema.field(features[0]).type)
    found = schema.field(features[0]).type.list_size if list_column else len(features)
    if found != width:
        what = f"list column {features[0]!r} of size {found}" if list_column else f"{found} feature columns ({short(features)})"
        raise InputError(f"the model expects {width} input features, but {source} gives {what}")
    passthrough = list(cfg.passthrough) if cfg.passthrough is not None else [n for n in names if n not in features]
    missing = [n for n in passthrough if n not in names]
    if missing:
        raise InputError(f"passthrough column(s) {missing} not found in {source} (columns: {', '.join(names)})")
    written = passthrough + (features if cfg.keep_features else [])
    for name in cfg.models:
        if name in written:
            what = f"prediction_column {name!r}" if cfg.model_set is None else f"model set key {name!r} (its column)"
            raise ConfigError(
                f"{what} would overwrite an input column of the same name; "
                f"choose another name or leave that column out of passthrough"
            )
    for name in categorical:
        if name not in names or not pa.types.is_integer(schema.field(name).type):
            found = f"has type {schema.field(name).type}" if name in names else "is not there"
            raise InputError(f"categorical column {name!r} in {source} {found}; expected an integer column "
                             f"(columns: {', '.join(names)})")
    columns = Columns(tuple(features), tuple(passthrough), list_column, width, cfg.prediction_column or "",
                      cfg.keep_features, categorical)
    check_quarantine(columns, cfg.invalid_rows)
    return columns


REASON_COLUMN = "reason"  # the column quarantined rows carry under `_rejected/`, beside the columns read


def check_quarantine(columns: Columns, invalid_rows: str) -> None:
    """Refuse (ConfigError) an input column named like the quarantine's `reason` column: a `_rejected/`
    file would hold two fields of that name, which readers refuse.

    Example:
        >>> check_quarantine(Columns(("x",), ("reason",), False, 1, "prediction", False), "keep")
    """
    if invalid_rows == "quarantine" and REASON_COLUMN in columns.read:
        kind = "feature" if REASON_COLUMN in columns.features else "passthrough"
        raise ConfigError(
            f"the {kind} column {REASON_COLUMN!r} would collide with the {REASON_COLUMN!r} column that "
            f"quarantined rows carry in _rejected/ (invalid_rows: quarantine); "
            + ("leave it out of passthrough, " if kind == "passthrough" else "rename it, ")
            + "or set invalid_rows to fail or keep"
        )


def check_file(f: InputFile, columns: Columns) -> str | None:
    """Why this file can't be processed with these columns, or None when it fits (`workers.fit.misfit`:
    a replica that plans a small file itself checks it alike)."""
    if f.error is not None:
        return f.error
    if f.schema is None:
        return None if f.committed else f"{f.uri}: no schema"
    return misfit(f.schema, f.uri, columns.read, columns.features, columns.list_column, columns.width,
                  columns.categorical)


