"""The commit record's format: what a replica writes to the journal before it publishes a shard's files.

    OUTPUT/_journal/g000007-c-<token>.json     one shard's commit record

The driver reads these back (`pipelines.commit.journal`); both sides share this one
definition of where a record lives and what it holds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from basis.storage import Location, write_bytes_atomic

JOURNAL_DIR = "_journal"


def commit_path(output: Location, generation: int, token: str) -> str:
    """Where a replica writes the record of one commit attempt."""
    return output.join(f"{JOURNAL_DIR}/g{generation:06d}-c-{token}.json")


def write_commit(output: Location, generation: int, token: str, entry: Mapping[str, Any], job: str) -> None:
    """Record a shard's files (replica side), before they are published; `job` is the digest of the
    header of the run that made them."""
    record = {"generation": generation, "token": token, "job": job, "entry": dict(entry)}
    write_bytes_atomic(output.fs, commit_path(output, generation, token), json.dumps(record).encode())
