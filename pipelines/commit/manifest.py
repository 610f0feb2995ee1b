"""`_manifest.json`: the compacted record of an output's shards, read and checked.

The manifest is rewritten at the end of a run (`pipelines.commit.Recorder.finish`)
and every so many records during it (`Recorder.checkpoint`: a root that names
the last driver record it holds, `journal_folded`, never complete); it is the
truth about the output, with the journal's records applied (`pipelines.commit.State`). It holds its entries inline (`shards`, a
list: format 2) up to `pipelines.commit.segments.INLINE_MAX` of them; a larger
output's `shards` names Parquet segments under `_manifest/` that hold them
(format 3, `pipelines.commit.segments`). A manifest that is not JSON, not ours, or
whose entries a hand edit or another tool broke is refused with a message that
names the file and the entry (exit 2), never a traceback.

    >>> _entry_problem({"id": "a.parquet:0-1"})
    "has no 'input'"
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from basis.errors import OutputConflictError
from basis.storage import Location, read_bytes

FORMAT = "batch-infer/manifest/2"  # entries inline
FORMAT_SEGMENTS = "batch-infer/manifest/3"  # entries in Parquet segments (`pipelines.commit.segments`)
_READABLE_FORMATS = ("batch-infer/manifest/1", FORMAT, FORMAT_SEGMENTS)
MANIFEST = "_manifest.json"

COMMITTED, FAILED, PENDING = "committed", "failed", "pending"
SUPERSEDED = "superseded"  # in manifests of earlier versions: an entry on its way out (read as `retiring`)


def load_manifest(output: Location) -> dict[str, Any] | None:
    """The manifest of an output as last compacted, or None for a new output."""
    data = read_bytes(output.fs, output.join(MANIFEST))
    if data is None:
        return None
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise OutputConflictError(
            f"{output.display(output.join(MANIFEST))} is not valid JSON ({exc}); "
            f"fix it by hand (or restore it), or write to a new output"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") not in _READABLE_FORMATS:
        raise OutputConflictError(
            f"{output.display(output.join(MANIFEST))} is not a batch-infer manifest ({FORMAT}); "
            f"choose another output"
        )
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise OutputConflictError(
            f"{output.display(output.join(MANIFEST))} is malformed: {problem}; fix it by hand (or restore it), "
            f"or write to a new output"
        )
    return manifest


_ENTRY_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,), "input": (str,), "rel": (str,), "fingerprint": (str,), "output": (str,), "status": (str,),
    "rows_in": (int,), "rows_out": (int,), "rows_rejected": (int,),
}
_OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    "file_row_groups": (int,), "bytes": (int,), "sha256": (str,), "rejected_output": (str,),
    "rejected_bytes": (int,), "rejected_sha256": (str,), "attempts": (int,), "generation": (int,),
}


def _manifest_problem(manifest: Mapping[str, Any]) -> str | None:
    """What makes a manifest unusable (a hand edit, another tool), naming the entry; None when it is sound."""
    model = manifest.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("sha256"), str):
        return f"'model' is {_short_repr(model)}, not an object with the model's sha256"
    for key, kind in (("settings", dict), ("source", dict), ("columns", dict), ("config", dict)):
        if manifest.get(key) is not None and not isinstance(manifest[key], kind):
            return f"{key!r} is {_short_repr(manifest[key])}, not an object"
    if not isinstance(manifest.get("generation", 0), int):
        return f"'generation' is {_short_repr(manifest['generation'])}, not a number"
    retiring = manifest.get("retiring", [])
    if not isinstance(retiring, list) or not all(isinstance(p, str) for p in retiring):
        return f"'retiring' is {_short_repr(retiring)}, not a list of paths"
    shards = manifest.get("shards", [])
    if isinstance(shards, dict) and manifest.get("format") == FORMAT_SEGMENTS:
        return _segments_problem(shards)
    if not isinstance(shards, list):
        return f"'shards' is {_short_repr(shards)}, not a list"
    for index, entry in enumerate(shards):
        problem = _entry_problem(entry)
        if problem is not None:
            name = f" ({entry['id']})" if isinstance(entry, dict) and isinstance(entry.get("id"), str) else ""
            return f"shard entry {index}{name} {problem}"
    return None


_SEGMENT_PATH = re.compile(r"^_manifest/seg-\d{6,}-[0-9a-f]{12}\.parquet$")


def _segments_problem(shards: Mapping[str, Any]) -> str | None:
    segments = shards.get("segments")
    if not isinstance(segments, list):
        return f"'shards' has 'segments' {_short_repr(segments)}, not a list"
    for index, ref in enumerate(segments):
        if not (isinstance(ref, dict) and isinstance(ref.get("path"), str) and _SEGMENT_PATH.match(ref["path"])
                and type(ref.get("entries")) is int):
            return f"segment {index} is {_short_repr(ref)}, not {{path: _manifest/seg-....parquet, entries}}"
    if type(shards.get("count")) is not int or shards["count"] != sum(ref["entries"] for ref in segments):
        return f"'shards' has 'count' {_short_repr(shards.get('count'))}, not the sum of its segments' entries"
    return None


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"is {_short_repr(entry)}, not an object"
    for key, kinds in _ENTRY_FIELDS.items():
        if key not in entry:
            return f"has no {key!r}"
    for key, kinds in [*_ENTRY_FIELDS.items(), *_OPTIONAL_FIELDS.items()]:
        value = entry.get(key)
        if (key in _ENTRY_FIELDS or value is not None) and (not isinstance(value, kinds) or isinstance(value, bool)):
            return f"has {key!r} {_short_repr(value)}, not a {kinds[0].__name__}"
    bounds = entry.get("row_groups")
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(type(b) is int for b in bounds)
            and 0 <= bounds[0] <= bounds[1]):
        return f"has 'row_groups' {_short_repr(bounds)}, not [first, stop)"
    if entry["status"] not in (COMMITTED, FAILED, PENDING, SUPERSEDED):
        return f"has status {entry['status']!r}, not one of {COMMITTED}, {FAILED}, {PENDING}, {SUPERSEDED}"
    return None


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
