"""`batch-infer verify OUTPUT`: prove an output is what its manifest says it is.

Checks, against storage, everything "the manifest is the truth" promises:

- every data file under the output (quarantine files included) is described
  by an entry of the manifest + journal, or is on its way out (`retiring`);
- every described file exists, with the recorded size and, by its footer, the
  recorded number of rows (with `checksums=True` also the recorded sha256);
- each input file the output holds shards of, when it is still there unchanged,
  is covered row group by row group (beside `_SUCCESS`; without it, row groups
  not committed yet are a note), and its rows add up: `rows_in` from its
  footer == `rows_out + rows_rejected`;
- `_SUCCESS` only beside a complete output: every entry committed, nothing
  superseded, failed or pending, no journal, no temporary files, and no input
  file listed now, older than `_SUCCESS`, without a committed shard.

- a table output (Delta, Iceberg): the table's current data files are exactly
  the manifest's committed ones (beside `_SUCCESS`; before it, committed files
  the table does not hold yet are a note), each with the recorded rows; data
  files under the table that no version references now are not looked at.

With `sample=N` it also re-reads N random committed rows from the input,
recomputes them with the recorded model and compares with the stored
predictions and passthrough values. Predictions match within the recorded
precision's tolerance plus what rounding can do to the magnitudes the
computation went through (`pipelines.rounding`: un-normalised features make
large terms that cancel, and two correct kernels then differ by more than a
fixed tolerance would allow). An output file the sample cannot read is a
problem (a rerun trusts output files by their size); an input that changed or
cannot be read is a note.
It reads footers and the sample, not whole files.

    >>> report = verify("preds/", sample=100)  # doctest: +SKIP
    >>> report.ok, report.problems
    (True, [])
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import random
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.commit import COMMITTED, SUCCESS, State, file_sha256, is_data_file
from basis.errors import ConfigError
from basis.record import JOURNAL_DIR
from pipelines.rounding import rounding_scale, tolerance
from basis.storage import Location, is_temp, read_parquet_footer, resolve
from basis.listing import existing_infos, list_files, relative_to

_THREADS = 16
# Absolute and relative tolerance per precision for recomputed predictions, on top of what rounding
# can do to the magnitudes the computation went through (`pipelines.rounding`).
_TOLERANCE = {"fp32": (1e-5, 1e-5), "tf32": (2e-3, 2e-3), "bf16": (2e-2, 2e-2), "fp16": (2e-3, 2e-3)}


@dataclasses.dataclass
class VerifyReport:
    """What `verify` checked and what does not hold. `ok` is True when `problems` is empty."""

    output: str
    ok: bool
    problems: list[str]
    notes: list[str]
    files_checked: int
    rows_on_disk: int
    rows_out: int
    inputs_checked: int
    sampled: int
    complete: bool  # _SUCCESS is present

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        state = "complete (_SUCCESS)" if self.complete else "incomplete (no _SUCCESS)"
        head = (f"{self.output}: {'OK' if self.ok else 'PROBLEMS'}, {state}; {self.files_checked} file(s), "
                f"{self.rows_on_disk:,} rows on disk, {self.inputs_checked} input file(s) re-checked, "
                f"{self.sampled} row(s) recomputed")
        lines = [head] + [f"  problem: {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verify(output: str, *, sample: int = 0, checksums: bool = False, seed: int | None = None,
           catalog: Mapping[str, str] | None = None) -> VerifyReport:
    """Check an output against its manifest (and `sample` recomputed rows); raises ConfigError for a
    path that holds no batch-infer output.

    `output` is the output directory, a Delta table's path, an Iceberg table's location, or with
    `catalog` (PyIceberg catalog properties) an Iceberg table's `namespace.table`.

    Example:
        >>> verify("preds/").ok  # doctest: +SKIP
        True
    """
    from pipelines.tables.sink import reopen_sink

    sink = None
    if catalog is not None:
        sink = reopen_sink({"output_format": "iceberg", "output": output}, output, catalog)
        location = sink.location
    else:
        location = resolve(output)
    state = State.load(location)
    if not state.found:
        raise ConfigError(f"no batch-infer manifest at {location.uri!r} (nothing has been committed there)")
    if sink is None:
        sink = reopen_sink(state.header.get("config") or {}, output, None)  # not location.uri: redacted keys
    check = _Check(location, state)
    if sink.is_table:
        check.check_table(sink.name, sink.format, sink.files())
    check.files(checksums)
    check.inputs()
    check.success()
    if sample > 0:
        check.sample(sample, random.Random(seed))
    return VerifyReport(location.uri, not check.problems, check.problems, check.notes, check.files_checked,
                        check.rows_on_disk, check.rows_out, check.inputs_checked, check.sampled, check.complete)


class _Check:
    def __init__(self, output: Location, state: State) -> None:
        self.output = output
        self.state = state
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.files_checked = self.rows_on_disk = self.inputs_checked = self.sampled = 0
        self.on_disk = {relative_to(output.path, info.path): info for info in existing_infos(output.fs, output.path)}
        self.complete = SUCCESS in self.on_disk
        self.rows_out = state.files.column_sum("rows_out")  # committed entries, as columns
        self.table_files: dict[str, Any] | None = None  # a table output's current files (path -> OutputFile)

    def _pending(self, paths: list[str], what: str, next_run: str) -> None:
        """Files a stopped run left for the next complete one: a note, or a problem beside `_SUCCESS`."""
        if paths and self.complete:
            self.problems.append(f"{len(paths)} {what}, e.g. {paths[0]}, but _SUCCESS says the output is complete")
        elif paths:
            self.notes.append(f"{len(paths)} {what}; the next complete run {next_run}")

    def check_table(self, name: str, fmt: str, files: Mapping[str, Any]) -> None:
        """A table output: its current files are the manifest's committed ones, with their rows."""
        self.table_files = dict(files)
        committed = {e["output"]: e for e in self.state.files.values() if e["status"] == COMMITTED}
        extra = sorted(set(files) - set(committed))
        for path in (p for p in extra if p not in self.state.retiring):
            self.problems.append(f"{path}: in the {fmt} table {name}, but no committed manifest entry describes it")
        retired = [p for p in extra if p in self.state.retiring]  # replaced or pruned by a run that stopped short
        self._pending(retired, f"retired file(s) are still in the {fmt} table {name}", "takes them out")
        missing = sorted(set(committed) - set(files))
        self._pending(missing, f"committed file(s) are not in the {fmt} table {name}", "commits them")
        for path in sorted(set(files) & set(committed)):
            rows = files[path].rows
            if rows >= 0 and rows != committed[path]["rows_out"]:
                self.problems.append(f"{path}: the {fmt} table records {rows} rows, the manifest "
                                     f"{committed[path]['rows_out']} (shard {committed[path]['id']})")

    def files(self, checksums: bool) -> None:
        """Every data file described; every described file as recorded."""
        described: dict[str, tuple[dict[str, Any], str]] = {}
        for entry in self.state.files.values():
            described[entry["output"]] = (entry, "out")
            if entry.get("rejected_output"):
                described[entry["rejected_output"]] = (entry, "rejected")
        for path in sorted(self.on_disk):
            if self.table_files is not None and path not in self.table_files:
                continue  # a table's: a file of an older version (or of no version), left for its maintenance
            if is_data_file(path) and path not in described and path not in self.state.retiring:
                self.problems.append(f"{path}: a data file no manifest entry describes")
        todo = []
        for path, (entry, kind) in sorted(described.items()):
            info = self.on_disk.get(path)
            if info is None:
                self.problems.append(f"{path}: listed as {entry['status']} for shard {entry['id']}, but missing")
                continue
            size = entry.get("bytes" if kind == "out" else "rejected_bytes")
            if size is not None and info.size != size:
                self.problems.append(f"{path}: {info.size} bytes, the manifest recorded {size}")
                continue
            todo.append((path, entry, kind))
        with ThreadPoolExecutor(max_workers=_THREADS) as pool:
            rows = list(pool.map(lambda item: self._rows(item[0]), todo))
        for (path, entry, kind), found in zip(todo, rows):
            self.files_checked += 1
            want = entry["rows_out"] if kind == "out" else entry["rows_rejected"]
            if isinstance(found, str):
                self.problems.append(f"{path}: {found}")
            elif found != want:
                self.problems.append(f"{path}: holds {found} rows, the manifest says {want} (shard {entry['id']})")
            elif kind == "out" and entry["status"] == COMMITTED:
                self.rows_on_disk += found
        if checksums:
            self._checksums(todo)
        if self.rows_on_disk != self.rows_out and not any("rows" in p for p in self.problems):
            self.problems.append(f"{self.rows_on_disk} rows on disk, the manifest says rows_out={self.rows_out}")

    def _rows(self, path: str) -> int | str:
        try:
            return int(read_parquet_footer(self.output.fs, self.output.join(path)).num_rows)
        except Exception as exc:  # a file that is not Parquet (any more)
            return f"unreadable Parquet footer ({exc})"

    def _checksums(self, todo: Sequence[tuple[str, dict[str, Any], str]]) -> None:
        with ThreadPoolExecutor(max_workers=4) as pool:
            found = list(pool.map(lambda item: file_sha256(self.output, item[0]), todo))
        for (path, entry, kind), sha in zip(todo, found):
            want = entry.get("sha256" if kind == "out" else "rejected_sha256")
            if want is not None and sha != want:
                self.problems.append(f"{path}: sha256 {str(sha)[:12]}... differs from the recorded {want[:12]}...")

    def inputs(self) -> None:
        """Each unchanged input file is covered, row group by row group, and its rows add up; beside
        `_SUCCESS`, every input file listed now that is older than `_SUCCESS` has committed shards."""
        source_info = self.state.header.get("source") or {}
        uri = source_info.get("input") or (self.state.header.get("config") or {}).get("input")
        if not uri:
            self.notes.append("the manifest does not say where its input is; input accounting not checked")
            return
        if source_info.get("format") in ("delta", "iceberg"):  # its files come from the table, not a listing
            self.notes.append(f"the input is a {source_info['format']} table; input accounting against the "
                              f"table's files is not checked yet")
            return
        source = resolve(uri)
        base = source_info.get("base") or source.path
        by_file: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for entry in self.state.files.values():
            if entry["status"] == COMMITTED:
                by_file.setdefault((entry["rel"], entry["fingerprint"]), []).append(entry)
        unfinished: dict[tuple[str, str], list[tuple[int, int]]] = {}  # failed or pending row groups
        for entry in self.state.others.values():
            unfinished.setdefault((entry["rel"], entry["fingerprint"]), []).append(tuple(entry["row_groups"]))
        changed = vanished = 0

        def look(key: tuple[str, str]) -> tuple[str, Any]:
            path = posixpath.join(base, key[0])
            info = source.fs.get_file_info(path)
            if info.type.name != "File":
                return "vanished", None
            if f"size={info.size};mtime_ns={info.mtime_ns}" != key[1]:
                return "changed", None
            try:
                meta = read_parquet_footer(source.fs, path)
            except Exception as exc:
                return "unreadable", exc
            return "ok", [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]

        keys = sorted(by_file)
        with ThreadPoolExecutor(max_workers=_THREADS) as pool:
            looked = list(pool.map(look, keys))
        for key, (status, found) in zip(keys, looked):
            if status in ("changed", "vanished"):
                changed += status == "changed"
                vanished += status == "vanished"
                continue
            if status == "unreadable":
                self.notes.append(f"input {key[0]} cannot be re-read now ({found}); its accounting not re-checked")
                continue
            self.inputs_checked += 1
            self._covers(key[0], found, sorted(by_file[key], key=lambda e: e["row_groups"][0]),
                         unfinished.get(key, []))
        if changed:
            self.notes.append(f"{changed} input file(s) changed since they were committed; the next run "
                              f"replaces their predictions")
        if vanished:
            self.notes.append(f"{vanished} input file(s) vanished since they were committed; their predictions "
                              f"are kept (a run with prune deletes them)")
        if self.complete:
            self._listed(source, {rel for rel, _ in by_file} | {rel for rel, _ in unfinished})

    def _listed(self, source: Location, known: set[str]) -> None:
        """Beside `_SUCCESS`: input files listed now that no entry names. One older than `_SUCCESS`
        (by its mtime, and locally its ctime, which a move into the input sets) was there when the run
        completed, so `_SUCCESS` claims rows it does not hold; a newer one is for the next run."""
        try:
            base, infos = list_files(source)
        except Exception as exc:  # an input that can't be listed now: say so, precisely
            self.notes.append(f"the input {source.uri} cannot be listed now ({exc}); files with no shard "
                              f"not looked for")
            return
        success_ns = self.on_disk[SUCCESS].mtime_ns or 0
        missing, newer = [], 0
        for info in infos:
            rel = relative_to(base, info.path)
            if rel in known:
                continue
            if _added_ns(source, info) < success_ns:
                missing.append(rel)
            else:
                newer += 1
        for rel in missing[:10]:
            self.problems.append(f"input {rel} has no committed shard, but _SUCCESS says the output is complete "
                                 f"(the input listed unchanged since before _SUCCESS)")
        if len(missing) > 10:
            self.problems.append(f"... and {len(missing) - 10} more input file(s) with no committed shard")
        if newer:
            self.notes.append(f"{newer} input file(s) added since _SUCCESS; the next run processes them")

    def _covers(self, rel: str, rows: list[int], entries: list[dict[str, Any]],
                unfinished: Sequence[tuple[int, int]]) -> None:
        cursor = 0
        gaps = []
        for entry in entries:
            first, stop = entry["row_groups"]
            if first != cursor and not (first == stop == cursor):
                gaps.append((cursor, first))
            want = sum(rows[first:stop])
            if entry["rows_in"] != want:
                self.problems.append(f"shard {entry['id']}: rows_in={entry['rows_in']}, but the input's footer "
                                     f"has {want} rows in row groups [{first}, {stop})")
            if entry["rows_in"] != entry["rows_out"] + entry["rows_rejected"]:
                self.problems.append(f"shard {entry['id']}: rows_in={entry['rows_in']} != rows_out="
                                     f"{entry['rows_out']} + rows_rejected={entry['rows_rejected']}")
            cursor = max(cursor, stop)
        if cursor != len(rows):
            gaps.append((cursor, len(rows)))
        for first, stop in gaps:
            if self.complete:
                self.problems.append(f"input {rel}: row groups [{first}, {stop}) are in no committed shard")
            elif not _covered(first, stop, unfinished):  # an incomplete output: a run was interrupted
                self.notes.append(f"input {rel}: row groups [{first}, {stop}) are not committed yet")

    def success(self) -> None:
        """`_SUCCESS` only beside a complete output."""
        if not self.complete:
            return
        why = []
        entries = [*self.state.files.values(), *self.state.others.values()]
        for status in ("superseded", "failed", "pending"):
            count = sum(e["status"] == status for e in entries)
            if count:
                why.append(f"{count} {status} shard(s)")
        if self.state.retiring:
            why.append(f"{len(self.state.retiring)} file(s) waiting to be deleted")
        if any(p.startswith(JOURNAL_DIR + "/") for p in self.on_disk):
            why.append("an uncompacted journal")
        temps = [p for p in self.on_disk if is_temp(p)]
        if temps:
            why.append(f"{len(temps)} temporary file(s) of dead attempts (e.g. {temps[0]})")
        if why:
            self.problems.append("_SUCCESS is present, but the output is not complete: " + ", ".join(why))

    def sample(self, count: int, rng: random.Random) -> None:
        """Recompute `count` random committed rows from the input and compare."""
        entries = [e for e in self.state.files.values() if e["status"] == COMMITTED and e["rows_out"] > 0]
        if not entries:
            self.notes.append("no committed rows to sample")
            return
        import torch

        from workers.model import load_model

        header = self.state.header
        settings = header.get("settings") or {}
        record = header["model"]
        members = list((record.get("models") or {}).items()) if record.get("format") == "set" else \
            [(settings.get("prediction_column") or "prediction", record)]
        models = []  # (column, model, its weights for the rounding bound or None)
        limits: list[int | None] = []
        for column, member in members:  # every model of a set is recomputed
            try:
                spec, mlp = load_model(member["uri"], activation=settings.get("activation", "sigmoid"),
                                       output_activation=settings.get("output_activation", "sigmoid"),
                                       device=torch.device("cpu"), precision=settings.get("precision", "fp32"))
            except Exception as exc:
                self.problems.append(f"cannot load the recorded model to recompute the sample: {exc}")
                return
            if spec.sha256 != member["sha256"]:
                self.problems.append(f"the model file {member['uri']} changed since the run "
                                     f"(sha256 {spec.sha256[:12]}...); the sample cannot be recomputed")
                return
            # An MLP's layers bound what rounding can do (`pipelines.rounding`); a program's cannot be read
            # off its graph, so its sample is held to the fixed tolerance alone.
            arrays = [(w.float().cpu().numpy(), None if b is None else b.float().cpu().numpy())
                      for w, b in mlp.layers] if hasattr(mlp, "layers") else None
            models.append((column, mlp, arrays))
            for i, limit in enumerate(getattr(spec, "category_limits", ())):  # a code must fit every model
                if i == len(limits):
                    limits.append(limit)
                elif limit is not None:
                    limits[i] = limit if limits[i] is None else min(limit, limits[i])  # type: ignore[type-var]
        precision = settings.get("precision", "fp32")
        if precision not in _TOLERANCE:
            precision = "fp32"
        columns = {**(header.get("columns") or {}), "category_limits": tuple(limits)}
        picks: dict[str, list[int]] = {}
        for entry in rng.choices(entries, weights=[e["rows_out"] for e in entries], k=count):
            picks.setdefault(entry["output"], []).append(rng.randrange(entry["rows_out"]))
        source_info = header.get("source") or {}
        source = resolve(source_info.get("input") or header["config"]["input"])
        for path, rows in sorted(picks.items()):
            entry = self.state.files[path]
            try:
                self._sample_shard(entry, sorted(set(rows)), source, source_info.get("base") or source.path,
                                   settings, columns, models, precision)
            except _InputUnavailable as exc:  # an input that changed or can't be read: say so, precisely
                self.notes.append(f"shard {entry['id']}: sample not recomputed ({exc})")
            except Exception as exc:  # the output file itself can't be read: its rows are lost to readers
                self.problems.append(f"{entry['output']}: cannot be read ({type(exc).__name__}: {exc}); "
                                     f"a rerun trusts it by its size: delete it and rerun to recompute shard "
                                     f"{entry['id']}")

    def _sample_shard(self, entry: Mapping[str, Any], rows: list[int], source: Location, base: str,
                      settings: Mapping[str, Any], columns: Mapping[str, Any],
                      models: list[tuple[str, Any, list[tuple[np.ndarray, np.ndarray | None]] | None]],
                      precision: str) -> None:
        import torch

        from workers.categorical import category_codes
        from workers.reader import feature_matrix, invalid_rows

        features = list(settings["features"])
        passthrough = list(settings["passthrough"])
        categorical = list(settings.get("categorical") or ())
        list_column = bool(columns.get("list_column", False))
        width = int(columns.get("width") or len(features))
        try:
            info = source.fs.get_file_info(posixpath.join(base, entry["rel"]))
            if f"size={info.size};mtime_ns={info.mtime_ns}" != entry["fingerprint"]:
                raise _InputUnavailable("its input changed since it was committed")
            with source.fs.open_input_file(posixpath.join(base, entry["rel"])) as handle:
                table = pq.ParquetFile(handle).read_row_groups(
                    list(range(*entry["row_groups"])),
                    columns=list(dict.fromkeys(passthrough + features + categorical)))
        except _InputUnavailable:
            raise
        except Exception as exc:
            raise _InputUnavailable(f"its input cannot be read now: {exc}") from exc
        batch = table.combine_chunks().to_batches()[0] if table.num_rows else None
        matrix = feature_matrix(batch, features, list_column, width) \
            if batch is not None else np.zeros((0, width), np.float32)
        codes, wrong, _ = category_codes(batch, categorical, columns["category_limits"]) \
            if categorical and batch is not None else (np.zeros((len(matrix), 0), np.int64), None, [])
        keep = np.ones(table.num_rows, dtype=bool)
        if settings.get("invalid_rows") != "keep":
            bad = invalid_rows(matrix)
            if bad is not None:
                keep = ~bad
            if wrong is not None:
                keep &= ~wrong
        kept = np.flatnonzero(keep)[rows]  # output row i is the i-th input row that was not quarantined
        with self.output.fs.open_input_file(self.output.join(entry["output"])) as handle:
            stored = pq.ParquetFile(handle).read(columns=[*passthrough, *(column for column, _, _ in models)])
        x = torch.from_numpy(np.ascontiguousarray(matrix[kept]))
        for column, mlp, arrays in models:
            with torch.inference_mode():
                want = (mlp(x, torch.from_numpy(codes[kept])) if categorical else mlp(x)).numpy()
            got = stored.column(column).take(pa.array(rows)).to_pylist()
            got_array = np.asarray(got, dtype=np.float32).reshape(len(rows), -1)
            # Two correct forwards (the run's device and kernels, this CPU's) differ by their summation
            # order: within a few unit roundoffs of the magnitudes summed, which un-normalised features make
            # far larger than the prediction itself.
            scale = 0.0 if arrays is None else rounding_scale(arrays, matrix[kept], settings.get("activation", "sigmoid"),
                                                              settings.get("output_activation", "sigmoid"))
            atol, rtol = _TOLERANCE[precision]
            allowed = atol + rtol * np.abs(want.astype(np.float64)) + tolerance(scale, precision)
            with np.errstate(invalid="ignore"):
                close = (np.abs(got_array.astype(np.float64) - want) <= allowed) | (np.isnan(got_array) & np.isnan(want))
            label = f" column {column!r}" if len(models) > 1 else ""
            for i, row in enumerate(rows):
                if not close[i].all():
                    self.problems.append(f"{entry['output']} row {row}{label}: stored prediction {got_array[i].tolist()} "
                                         f"!= recomputed {want[i].tolist()} (input {entry['rel']} row "
                                         f"{int(kept[i])} of shard {entry['id']})")
        for name in passthrough:
            if stored.column(name).take(pa.array(rows)) != table.column(name).take(pa.array(kept)):
                self.problems.append(f"{entry['output']}: passthrough column {name!r} differs from the input "
                                     f"in the sampled rows")
        self.sampled += len(rows)


class _InputUnavailable(Exception):
    """The input side of a sample can't be recomputed now (changed, unreadable): a note, not a problem."""


def _covered(first: int, stop: int, spans: Sequence[tuple[int, int]]) -> bool:
    """Whether the row groups [first, stop) lie within the union of `spans`."""
    cursor = first
    for a, b in sorted(spans):
        if a > cursor:
            break
        cursor = max(cursor, b)
    return cursor >= stop


def _added_ns(source: Location, info: Any) -> int:
    """When a listed input file got where it is: its mtime, and for local files also its ctime."""
    added = info.mtime_ns or 0
    if source.is_local:
        try:
            added = max(added, os.stat(info.path).st_ctime_ns)
        except OSError:
            pass
    return added
