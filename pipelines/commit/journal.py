"""The commit journal: what was committed since `_manifest.json` was last written.

    OUTPUT/_journal/g000007-c-<token>.json     one shard's commit record, written by its replica
                                               BEFORE the shard's files are published
    OUTPUT/_journal/g000007-d-00000012.json    the driver's records since its last flush
                                               (the run's header first, then confirmations,
                                               failures, retirements)

Recording a commit costs one small file, whatever the size of the output, so
the driver's cost per shard stays flat from 1k to 100k shards; the manifest is
rewritten at the end of a run and checkpointed during it every so many records
(`pipelines.commit.recorder.CHECKPOINT_RECORDS`), not once per flush. Every
record carries the generation of the run that wrote it; records of generations
the manifest already holds are ignored, so a crash between writing the
manifest and clearing the journal is harmless. A root written in the middle of
run G holds G's driver records up to one sequence number (its `journal_folded`):
G's later driver records, and every commit record still there, still apply (a
commit record the root already holds is recognised by its bytes, and ignored).

Every record is tied to the job that made it: a run's first driver record
holds its header (model sha256, prediction settings, input), written before
any shard is dispatched, and each commit record carries the digest of that
header (`pipelines.commit.job_digest`). A commit of another model or config is
never taken as this output's.

Because a replica writes its record (rows, size and sha256 of each file) before
it publishes, no committed file can ever be missing from manifest + journal:
a record whose files were not (or only partly) published is recognised by
their checksums and ignored.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Container, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from basis.record import JOURNAL_DIR
from basis.storage import Location, delete_file, read_bytes, write_bytes_atomic

_NAME = re.compile(r"^g(\d{6,})-([cd])-([0-9a-f]+)\.json$")
_READ_THREADS = 16
_DELETE_CHUNK = 512


@dataclass
class Generation:
    """The records of one run (one generation)."""

    commits: dict[str, dict[str, Any]] = field(default_factory=dict)  # token -> shard entry
    jobs: dict[str, str | None] = field(default_factory=dict)  # token -> digest of the job that made it
    ops: list[dict[str, Any]] = field(default_factory=list)  # driver records, in flush order


@dataclass
class Journal:
    """The records found in an output's journal, newer than its manifest, by generation."""

    generations: dict[int, Generation] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # every journal file seen (any generation)
    newest: int = 0  # the highest generation seen (any)

    @property
    def empty(self) -> bool:
        return not self.generations


def read_journal(output: Location, after: int, skip: Container[str] = (),
                 folded: tuple[int, int] | None = None) -> Journal:
    """Every record of a generation after `after` (the manifest's), except commits whose token is in `skip`
    and, with `folded` (generation, sequence), that generation's driver records up to that sequence (a
    root written in the middle of that run holds them)."""
    journal = Journal()
    try:
        infos = output.fs.get_file_info(pafs.FileSelector(output.join(JOURNAL_DIR), allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return journal
    wanted = []
    for info in sorted(infos, key=lambda i: i.path):  # segments sort by sequence within a generation
        match = _NAME.match(posixpath.basename(info.path))
        if info.type != pafs.FileType.File or not match:
            continue
        journal.files.append(info.path)
        generation = int(match.group(1))
        journal.newest = max(journal.newest, generation)
        kind = match.group(2)
        if kind == "c" and match.group(3) in skip:
            continue
        if (folded is not None and kind == "d" and generation == folded[0]
                and match.group(3).isdigit() and int(match.group(3)) <= folded[1]):
            continue
        if generation > after:
            wanted.append((generation, match.group(2), info.path))
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        texts = list(pool.map(lambda item: read_bytes(output.fs, item[2]), wanted))
    for (generation, kind, _), data in zip(wanted, texts):
        record = _parse(data, kind)
        if record is None:
            continue  # a torn (or foreign) record: not ours to apply; its files, if any, are not committed
        records = journal.generations.setdefault(generation, Generation())
        if kind == "c":
            records.commits[record["token"]] = record["entry"]
            records.jobs[record["token"]] = record.get("job")  # None: a record older than job digests
        else:
            records.ops.extend(record["ops"])
    return journal


def _parse(data: bytes | None, kind: str) -> dict[str, Any] | None:
    if not data:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    if kind == "c":
        entry = record.get("entry")
        whole = isinstance(record.get("token"), str) and isinstance(entry, dict) and all(
            isinstance(entry.get(key), str) for key in ("id", "output", "rel", "fingerprint"))
    else:
        ops = record.get("ops")
        whole = isinstance(ops, list) and all(isinstance(op, dict) and isinstance(op.get("op"), str) for op in ops)
    return record if whole else None


class SegmentWriter:
    """The driver's side of the journal: buffered records, written one file per flush."""

    def __init__(self, output: Location, generation: int) -> None:
        self.output = output
        self.generation = generation
        self.sequence = 0
        self.buffer: list[dict[str, Any]] = []
        self.written: list[str] = []  # the files written since `fold` last took them

    def add(self, op: dict[str, Any]) -> None:
        self.buffer.append(op)

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.output.join(f"{JOURNAL_DIR}/g{self.generation:06d}-d-{self.sequence:08d}.json")
        write_bytes_atomic(self.output.fs, path, json.dumps({"generation": self.generation, "ops": self.buffer}).encode())
        self.sequence += 1
        self.buffer = []
        self.written.append(path)

    def fold(self) -> tuple[int, list[str]]:
        """After a flush: the last sequence written (-1: none), and the files written since the last fold
        (a mid-run checkpoint holds them now)."""
        written, self.written = self.written, []
        return self.sequence - 1, written


def clear_journal(output: Location, paths: Iterable[str] = ()) -> None:
    """Delete journal files the manifest now holds (the whole directory when `paths` is empty)."""
    paths = list(paths)
    if not paths:
        try:
            output.fs.delete_dir(output.join(JOURNAL_DIR))
        except (FileNotFoundError, OSError):
            pass
        return
    def delete(chunk: list[str]) -> None:
        for path in chunk:
            delete_file(output.fs, path)

    step = max(1, min(_DELETE_CHUNK, -(-len(paths) // _READ_THREADS)))  # a future per file costs more than a delete
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        list(pool.map(delete, [paths[i:i + step] for i in range(0, len(paths), step)]))


def journal_names(output: Location) -> Iterator[str]:
    """Base names of the files in the journal directory (for tests and `verify`)."""
    try:
        infos = output.fs.get_file_info(pafs.FileSelector(output.join(JOURNAL_DIR), allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return iter(())
    return (posixpath.basename(info.path) for info in infos)
