"""The commit journal: what was committed since `_manifest.json` was last written.

    OUTPUT/_journal/g000007-c-<token>.json     one shard's commit record, written by its replica
                                               BEFORE the shard's files are published (object stores)
    OUTPUT/_journal/g000007-b-<name>.jsonl     a bundle's commit records, a line each, appended by
                                               its replica the same way (local outputs; sealed by a
                                               last line once the replica appends no more)
    OUTPUT/_journal/g000007-d-00000012.json    the driver's records since its last flush
                                               (the run's header first, then confirmations,
                                               failures, retirements)

Recording a commit costs one small file (a line of a bundle's file), whatever the size of the output, so
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
their checksums and ignored. A bundle's file holds a record per line; a line
without its newline (a replica killed while writing it) is not a record, and
its shard was never published. A bundle's file is deleted in the middle of a
run only once it is sealed and every record in it is folded into the root.
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

from basis.record import JOURNAL_DIR, SEALED
from basis.storage import Location, delete_file, read_bytes, write_bytes_atomic

_NAME = re.compile(r"^g(\d{6,})-(?:([cd])-([0-9a-f]+)\.json|(b)-([0-9a-f]+)\.jsonl)$")
_READ_THREADS = 16
_TOKEN = b'"token": "'
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
    unsealed: set[str] = field(default_factory=set)  # bundle files read that a replica may still append to

    @property
    def empty(self) -> bool:
        return not self.generations


def read_journal(output: Location, after: int, skip: Container[str] = (),
                 folded: tuple[int, int] | None = None) -> Journal:
    """Every record of a generation after `after` (the manifest's), except commits whose token is in `skip`
    and, with `folded` (generation, sequence), that generation's driver records up to that sequence (a
    root written in the middle of that run holds them)."""
    journal = Journal()
    wanted = []
    for info in sorted(_listing(output), key=lambda i: i.path):  # segments sort by sequence within a generation
        named = _name(info)
        if named is None:
            continue
        generation, kind, name = named
        journal.files.append(info.path)
        journal.newest = max(journal.newest, generation)
        if kind == "c" and name in skip:
            continue
        if (folded is not None and kind == "d" and generation == folded[0]
                and name.isdigit() and int(name) <= folded[1]):
            continue
        if generation > after:
            wanted.append((generation, kind, info.path))
    for (generation, kind, path), data in zip(wanted, _read_all(output, [path for _, _, path in wanted])):
        if kind == "b":
            commits, sealed = bundle_records(data, skip)
            if not sealed:
                journal.unsealed.add(path)
            for record in commits:
                _add_commit(journal.generations.setdefault(generation, Generation()), record)
            continue
        record = _parse(data, kind)
        if record is None:
            continue  # a torn (or foreign) record: not ours to apply; its files, if any, are not committed
        records = journal.generations.setdefault(generation, Generation())
        if kind == "c":
            _add_commit(records, record)
        else:
            records.ops.extend(record["ops"])
    return journal


def _listing(output: Location) -> list[pafs.FileInfo]:
    """What the journal directory holds (nothing when there is none)."""
    try:
        return output.fs.get_file_info(pafs.FileSelector(output.join(JOURNAL_DIR), allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read_all(output: Location, paths: list[str]) -> list[bytes | None]:
    """Each file's bytes (None: gone), read side by side (journal files are small: the round trips dominate)."""
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        return list(pool.map(lambda path: read_bytes(output.fs, path), paths))


def _name(info: pafs.FileInfo) -> tuple[int, str, str] | None:
    """(generation, kind, token or sequence or name) of a journal file; None for anything else."""
    match = _NAME.match(posixpath.basename(info.path))
    if info.type != pafs.FileType.File or not match:
        return None
    return int(match.group(1)), match.group(2) or match.group(4), match.group(3) or match.group(5)


def _add_commit(records: Generation, record: dict[str, Any]) -> None:
    records.commits[record["token"]] = record["entry"]
    records.jobs[record["token"]] = record.get("job")  # None: a record older than job digests


def bundle_records(data: bytes | None, skip: Container[str] = ()) -> tuple[list[dict[str, Any]], bool]:
    """The whole commit records of a bundle's file, but those whose token is in `skip` (not parsed), and
    whether it is sealed. A line not ended by its newline (its writer killed while writing it), or not a
    whole record, is skipped.

        >>> bundle_records(b'{"token": "a1", "entry": {"id": "x", "output": "o", "rel": "r", "fingerprint": "f"}}\\n'
        ...                b'{"token": "b2", "en')
        ([{'token': 'a1', 'entry': {'id': 'x', 'output': 'o', 'rel': 'r', 'fingerprint': 'f'}}], False)
    """
    if not data:
        return [], False
    lines = data.split(b"\n")
    records, sealed = [], False
    for line in lines[:-1]:  # the last piece: empty, or a line cut short
        if skip:  # `write_commit`'s records begin {"generation": G, "token": "<hex>"
            start = line.find(_TOKEN) + len(_TOKEN)
            if start >= len(_TOKEN) and line[start:start + 64].split(b'"', 1)[0].decode("ascii", "replace") in skip:
                continue
        record = _parse(line, "c")
        if record is not None and record["token"] not in skip:
            records.append(record)
        elif line.startswith(b'{"' + SEALED.encode()):
            sealed = True
    return records, sealed


def bundles_of(output: Location, generation: int, held: Container[str] = ()) -> dict[str, tuple[set[str], bool]]:
    """Per bundle file of `generation` in the journal: the tokens of its whole records and whether it is
    sealed (a mid-run checkpoint deletes the sealed files whose records it folded). A record whose token
    is in `held` (the root holds its entry) is known by its token, not parsed (a checkpoint at 100,000
    files parsed ~20,000 records it had folded: ~0.15 s of the driver each)."""
    paths = [info.path for info in _listing(output) if (named := _name(info)) and named[:2] == (generation, "b")]
    found = {}
    for path, data in zip(paths, _read_all(output, paths)):
        found[path] = _bundle_tokens(data, held)
    return found


def _bundle_tokens(data: bytes | None, held: Container[str]) -> tuple[set[str], bool]:
    """`bundle_records`' tokens and whether sealed; a line whose token is `held` is not parsed.

        >>> tokens, sealed = _bundle_tokens(b'{"generation": 1, "token": "a1", "entry": {}}\\n'
        ...     b'{"token": "b2", "entry": {"id": "x", "output": "o", "rel": "r", "fingerprint": "f"}}\\n'
        ...     b'{"token": "c3", "entry": {"id": "x", "output": "o", "rel": "r", "fingerprint": "f"}}', {"a1"})
        >>> sorted(tokens), sealed
        (['a1', 'b2'], False)
    """
    if not data:
        return set(), False
    tokens, sealed = set(), False
    for line in data.split(b"\n")[:-1]:  # the last piece: empty, or a line cut short
        start = line.find(_TOKEN) + len(_TOKEN)
        if start >= len(_TOKEN):  # `write_commit`'s records begin {"generation": G, "token": "<hex>"
            token = line[start:start + 64].split(b'"', 1)[0].decode("ascii", "replace")
            if token in held:
                tokens.add(token)
                continue
        record = _parse(line, "c")
        if record is not None:
            tokens.add(record["token"])
        elif line.startswith(b'{"' + SEALED.encode()):
            sealed = True
    return tokens, sealed


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
        ops = ", ".join([_op_json(op) for op in self.buffer])
        write_bytes_atomic(self.output.fs, path, f'{{"generation": {self.generation:d}, "ops": [{ops}]}}'.encode())
        self.sequence += 1
        self.buffer = []
        self.written.append(path)

    def fold(self) -> tuple[int, list[str]]:
        """After a flush: the last sequence written (-1: none), and the files written since the last fold
        (a mid-run checkpoint holds them now)."""
        written, self.written = self.written, []
        return self.sequence - 1, written


def _op_json(op: dict[str, Any]) -> str:
    """`json.dumps(op)`; a confirmation (most of a run's records) formatted directly (half the CPU).

        >>> _op_json({"op": "confirm", "token": "a1", "attempts": 2}) == json.dumps({"op": "confirm", "token": "a1",
        ...                                                                          "attempts": 2})
        True
    """
    if (len(op) == 3 and op.get("op") == "confirm" and type(op.get("token")) is str
            and type(op.get("attempts")) is int and list(op) == _CONFIRM_KEYS):
        return _CONFIRM % (_encode_string(op["token"]), op["attempts"])
    return json.dumps(op)


_CONFIRM_KEYS = ["op", "token", "attempts"]
_CONFIRM = '{"op": "confirm", "token": %s, "attempts": %d}'
_encode_string = json.encoder.encode_basestring_ascii  # as `json.dumps` writes a string


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
    return (posixpath.basename(info.path) for info in _listing(output))
