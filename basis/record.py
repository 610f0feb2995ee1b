"""The commit record's format: what a replica writes to the journal before it publishes a shard's files.

    OUTPUT/_journal/g000007-c-<token>.json     one shard's commit record (object stores; older runs)
    OUTPUT/_journal/g000007-b-<name>.jsonl     a bundle's commit records, one JSON line each, appended
                                               in commit order; a last line {"sealed": n} once the
                                               replica will append no more (local outputs)

A local output takes a bundle's records in one append-only file (`CommitLog`): a record is one
`write` of a whole line before the shard's files are published, as a record file was written
before; creating, renaming and deleting a file per shard cost most of a tiny shard's kernel time.
An object store cannot append, so there each record stays a file of its own. A record cut short
(its writer killed during the `write`) is the file's last line, and is not whole: its shard's
files were never published. The driver reads these back (`pipelines.commit.journal`); both sides
share this one definition of where a record lives and what it holds.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from typing import Any

from basis.storage import Location, open_new_local, unique_suffix, write_all, write_bytes_atomic

JOURNAL_DIR = "_journal"
SEALED = "sealed"  # the key of a bundle file's last line: no record follows


def commit_path(output: Location, generation: int, token: str) -> str:
    """Where a replica writes the record of one commit attempt in a file of its own."""
    return output.join(f"{JOURNAL_DIR}/g{generation:06d}-c-{token}.json")


def bundle_path(output: Location, generation: int, name: str) -> str:
    """Where a replica appends the records of one bundle's commits."""
    return output.join(f"{JOURNAL_DIR}/g{generation:06d}-b-{name}.jsonl")


def _record(generation: int, token: str, entry: Mapping[str, Any], job: str) -> dict[str, Any]:
    return {"generation": generation, "token": token, "job": job, "entry": dict(entry)}


def write_commit(output: Location, generation: int, token: str, entry: Mapping[str, Any], job: str) -> None:
    """Record a shard's files (replica side) in a file of their own, before they are published; `job` is
    the digest of the header of the run that made them."""
    record = _record(generation, token, entry, job)
    write_bytes_atomic(output.fs, commit_path(output, generation, token), json.dumps(record).encode())


class CommitLog:
    """One bundle's commit records (replica side): appended to one file on a local output, a file per
    record elsewhere. Used from one thread; `seal` when the bundle is done (nothing is appended after).

    A record is written whole by one `write` (retried for what a short write left) and is in the
    file when `write` returns: no later step of the replica can lose it. A write that fails leaves
    the file as it is and ends its use: the next record starts a new file, so a record never
    follows a broken one.
    """

    def __init__(self, output: Location, generation: int) -> None:
        self.output, self.generation = output, generation
        self.path: str | None = None
        self.records = 0
        self._fd: int | None = None

    def write(self, token: str, entry: Mapping[str, Any], job: str) -> None:
        if not self.output.is_local:  # no append on an object store
            write_commit(self.output, self.generation, token, entry, job)
            return
        line = memoryview((json.dumps(_record(self.generation, token, entry, job)) + "\n").encode())
        if self._fd is None:
            self.path = bundle_path(self.output, self.generation, unique_suffix())
            self._fd, self.records = open_new_local(self.path, append=True), 0
        try:
            write_all(self._fd, line, self.path or "")
        except BaseException:
            self._drop()  # a part of the line may be there: this file takes no more records
            raise
        self.records += 1

    def _drop(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def seal(self) -> None:
        """No more records in this file: its last line says so (the driver may then delete it once every
        record in it is folded into the manifest). Never raises: an unsealed file is only kept longer."""
        fd = self._fd
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(fd, (json.dumps({SEALED: self.records}) + "\n").encode())
        self._drop()
