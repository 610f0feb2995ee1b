"""The output's committed state: `_manifest.json`, resume decisions and `_SUCCESS`.

Replicas put their files in place; the driver records them here. The manifest
is rewritten atomically as shards commit (at most once per `flush_seconds`),
so a crash loses at most the last few records, never a file's content: resume
redoes such shards under the same names with the same bytes.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import JobConfig
from pipelines.errors import OutputConflictError
from pipelines.plan import Columns, Shard
from pipelines.storage import Location, delete_file, read_bytes, write_bytes_atomic

FORMAT = "batch-infer/manifest/1"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
REJECTED_DIR = "_rejected"

COMMITTED, FAILED, PENDING = "committed", "failed", "pending"


def prediction_settings(cfg: JobConfig, columns: Columns) -> dict[str, Any]:
    """The config that changes what a shard's output holds (compared on resume)."""
    return {
        "features": list(columns.features),
        "passthrough": list(columns.passthrough),
        "keep_features": cfg.keep_features,
        "prediction_column": cfg.prediction_column,
        "activation": cfg.activation,
        "output_activation": cfg.output_activation,
        "precision": cfg.precision,
        "invalid_rows": cfg.invalid_rows,
    }


def load_manifest(output: Location) -> dict[str, Any] | None:
    """The committed manifest of an output, or None for a new output."""
    data = read_bytes(output.fs, output.join(MANIFEST))
    if data is None:
        return None
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise OutputConflictError(
            f"{output.display(output.join(MANIFEST))} is not valid JSON ({exc}); "
            f"fix or remove it, or run with overwrite to recompute everything"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise OutputConflictError(
            f"{output.display(output.join(MANIFEST))} is not a batch-infer manifest ({FORMAT}); "
            f"choose another output or run with overwrite"
        )
    return manifest


def check_compatible(previous: Mapping[str, Any], sha256: str, settings: Mapping[str, Any], where: str) -> None:
    """Refuse to mix outputs of different models or prediction settings (exit 2)."""
    problems = []
    if previous["model"]["sha256"] != sha256:
        problems.append(f"model sha256 {previous['model']['sha256'][:12]}... -> {sha256[:12]}...")
    old = previous.get("settings", {})
    for key, value in settings.items():
        if old.get(key) != value:
            problems.append(f"{key}: {old.get(key)!r} -> {value!r}")
    if problems:
        raise OutputConflictError(
            f"{where} holds predictions made with a different model or config ({'; '.join(problems)}); "
            f"set overwrite to recompute everything, or write to a new output"
        )


def reusable_spans(previous: Mapping[str, Any] | None) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """(rel, fingerprint) -> row-group spans an earlier run planned for that file."""
    spans: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for entry in (previous or {}).get("shards", []):
        key = (entry["rel"], entry["fingerprint"])
        spans.setdefault(key, []).append((entry["row_groups"][0], entry["row_groups"][1]))
    return spans


@dataclass
class Reconciled:
    """What a run has to do, given the plan and the output's committed state."""

    todo: list[Shard]
    skipped: list[Shard]
    kept: list[dict[str, Any]]  # committed entries of inputs no longer listed; left as they are
    previous: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> committed entry
    superseded: list[str] = field(default_factory=list)  # old output paths (relative) to delete at success


def reconcile(
    shards: Sequence[Shard], previous: Mapping[str, Any] | None, existing: Iterable[str], overwrite: bool
) -> Reconciled:
    """Split the plan into shards to run and shards already committed.

    A shard is skipped when the manifest records it committed, for the same
    input fingerprint and row groups, and its output file is still there.
    """
    present = set(existing)
    entries = list((previous or {}).get("shards", []))
    committed = {e["id"]: e for e in entries if e["status"] == COMMITTED and e["fingerprint"]}
    result = Reconciled([], [], [])
    planned_rels = {s.rel for s in shards}
    for shard in shards:
        entry = None if overwrite else committed.get(shard.id)
        if entry and entry["fingerprint"] == shard.fingerprint and entry["output"] in present:
            result.skipped.append(shard)
            result.previous[shard.id] = entry
        else:
            result.todo.append(shard)
    new_outputs = {s.output for s in shards}
    for e in entries:
        if e["rel"] not in planned_rels and not overwrite:
            if e["status"] == COMMITTED:
                result.kept.append(e)
            continue
        for path in (e.get("output"), e.get("rejected_output")):
            if path and path not in new_outputs and e["id"] not in result.previous:
                result.superseded.append(path)
    result.superseded.extend((previous or {}).get("superseded", []))
    result.superseded = sorted(set(result.superseded) - new_outputs)
    return result


class Manifest:
    """The manifest being written by this run."""

    def __init__(
        self,
        output: Location,
        *,
        model: Mapping[str, Any],
        config: Mapping[str, Any],
        settings: Mapping[str, Any],
        shards: Sequence[Shard],
        reconciled: Reconciled,
        flush_seconds: float = 1.0,
    ) -> None:
        self.output = output
        self.header = {"format": FORMAT, "model": dict(model), "config": dict(config), "settings": dict(settings)}
        self.flush_seconds = flush_seconds
        self._last_flush = 0.0
        self._dirty = False
        self.kept = reconciled.kept
        self.superseded = reconciled.superseded
        self.entries: dict[str, dict[str, Any]] = {}
        for shard in shards:
            old = reconciled.previous.get(shard.id)
            self.entries[shard.id] = dict(old) if old else _entry(shard)

    def record(self, shard_id: str, **fields: Any) -> None:
        """Update one shard's entry (status, rows, attempts, error) and flush when due."""
        self.entries[shard_id].update(fields)
        self._dirty = True
        self.flush()

    def flush(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or (self._dirty and now - self._last_flush >= self.flush_seconds):
            write_bytes_atomic(self.output.fs, self.output.join(MANIFEST), json.dumps(self.to_dict(), indent=1).encode())
            self._last_flush, self._dirty = now, False

    def to_dict(self) -> dict[str, Any]:
        shards = [*self.kept, *self.entries.values()]
        shards.sort(key=lambda e: (e["rel"], e["row_groups"][0]))
        done = [e for e in shards if e["status"] == COMMITTED]
        return {
            **self.header,
            "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "complete": self.complete,
            "rows_in": sum(e["rows_in"] for e in done),
            "rows_out": sum(e["rows_out"] for e in done),
            "rows_rejected": sum(e["rows_rejected"] for e in done),
            "superseded": self.superseded,
            "shards": shards,
        }

    @property
    def complete(self) -> bool:
        entries = [*self.kept, *self.entries.values()]
        return all(
            e["status"] == COMMITTED and e["rows_in"] == e["rows_out"] + e["rows_rejected"] for e in entries
        )

    def finish(self) -> bool:
        """Write the final manifest; on completion clean superseded files and write `_SUCCESS` last."""
        complete = self.complete
        if complete and self.superseded:
            live = {e[key] for e in [*self.kept, *self.entries.values()] for key in ("output", "rejected_output")}
            for rel in set(self.superseded) - live:
                delete_file(self.output.fs, self.output.join(rel))
            self.superseded = []
        self.flush(force=True)
        if complete:
            write_bytes_atomic(self.output.fs, self.output.join(SUCCESS), b"")
        return complete


def remove_success(output: Location) -> None:
    """A run that will process shards removes a stale `_SUCCESS` first."""
    delete_file(output.fs, output.join(SUCCESS))


def _entry(shard: Shard) -> dict[str, Any]:
    return {
        "id": shard.id,
        "input": shard.input,
        "rel": shard.rel,
        "fingerprint": shard.fingerprint,
        "row_groups": list(shard.row_groups),
        "rows_in": shard.rows_in,
        "rows_out": 0,
        "rows_rejected": 0,
        "output": shard.output,
        "rejected_output": None,
        "status": PENDING,
        "attempts": 0,
        "error": None,
    }
