"""Reading an output's `_journal/` in tests: the commit records of either layout (a file per record, or a
bundle's file of records, a line each; a line cut short is not a record)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def commit_records(out: Path) -> list[tuple[str, dict[str, Any]]]:
    """(file name, record) of every whole commit record in `out/_journal` (none when it is missing)."""
    found = []
    try:
        paths = sorted((out / "_journal").iterdir())
    except FileNotFoundError:  # not made yet, or cleared by a run that has just completed
        return []
    for path in paths:
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # deleted under us (a checkpoint)
            continue
        if "-c-" in path.name:
            lines = [data]
        elif "-b-" in path.name:
            lines = data.split(b"\n")[:-1]
        else:
            continue
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "token" in record:
                found.append((path.name, record))
    return found


def record_ids(out: Path) -> set[str]:
    """A name per whole commit record in `out/_journal`: its file's, and its token."""
    return {f"{name}:{record['token']}" for name, record in commit_records(out)}
