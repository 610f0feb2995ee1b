"""What a table's commits since the last run did to the rows that run scored.

A run records the snapshot it scored up to (`Source.record`). The next run follows the
table's commits from there (`follow`): an append adds files, scored next; a compaction
(Delta `dataChange: false`, e.g. OPTIMIZE; Iceberg `replace`) rewrites scored files into
new ones holding the same rows, so it scores nothing: the new files form a `Group` that
*covers* the replaced files, whose predictions are kept (the manifest records the group,
so later runs know). A commit that deleted or rewrote scored rows (delete, update, merge,
a new deletion vector or position-delete file) is named in `removed_by`, and the driver
refuses the run (exit 2) unless `prune` or `overwrite` (`check_removals`).

When the commits cannot be followed (expired snapshots, a cleaned-up log) the file lists
alone decide: a removed scored file is a removal, a new file is new (never a coverage).

    >>> g = follow([Commit("version 2 (OPTIMIZE)", removed=(("a", False), ("b", False)), added=(("c", False),))],
    ...            scored={"a", "b"})
    >>> [(sorted(x.files), sorted(x.covers)) for x in g.groups], g.removed_by
    ([(['c'], ['a', 'b'])], {})
    >>> follow([Commit("version 3 (DELETE)", removed=(("a", True),), added=(("d", True),))],
    ...        scored={"a"}).removed_by
    {'a': 'version 3 (DELETE)'}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Commit:
    """One commit (Delta version, Iceberg snapshot) after the recorded one, as far as its files go."""

    name: str  # e.g. "version 5 (DELETE)", "snapshot 8121 (replace)"
    removed: tuple[tuple[str, bool], ...] = ()  # (rel, data change) of each data file it removed
    added: tuple[tuple[str, bool], ...] = ()  # (rel, data change) of each data file it added
    row_deletes: bool = False  # it added row-level deletes (Iceberg delete files) to files it kept


@dataclass
class Group:
    """Live files that hold exactly the rows of scored files a compaction replaced (`covers`)."""

    files: dict[str, str | None]  # rel -> fingerprint (None until the listing gives it)
    covers: set[str]  # rels whose committed predictions stand for these files' rows

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Group:
        return cls(dict(record.get("files") or {}), set(record.get("covers") or ()))

    def record(self) -> dict[str, Any]:
        return {"files": dict(sorted(self.files.items())), "covers": sorted(self.covers)}


@dataclass
class Changes:
    groups: list[Group] = field(default_factory=list)
    removed_by: dict[str, str] = field(default_factory=dict)  # scored rel -> the commit that removed its rows
    row_changes: list[str] = field(default_factory=list)  # commits that deleted or rewrote rows
    followed: bool = True  # False: the commits could not be followed; the file lists decide


def follow(commits: Iterable[Commit], scored: set[str], groups: Sequence[Group] = (), *,
           partial: set[str] = frozenset()) -> Changes:  # type: ignore[assignment]
    """Replay `commits` over what the last run left: `scored` (rels whose committed predictions cover
    the whole file), `partial` (some of it) and its coverage `groups`."""
    live = set(scored)
    changes = Changes(groups=[Group(dict(g.files), set(g.covers)) for g in groups])

    def owner(rel: str) -> Group | None:
        return next((g for g in changes.groups if rel in g.files), None)

    def lose(rel: str, why: str) -> None:
        """`rel`'s rows were deleted or rewritten: its predictions (or its group's) no longer stand."""
        group = owner(rel)
        if group is not None:
            changes.groups.remove(group)
            for covered in group.covers:
                changes.removed_by.setdefault(covered, why)
        if rel in live or rel in partial:
            changes.removed_by.setdefault(rel, why)
        live.discard(rel)

    for commit in commits:
        rewrites = [rel for rel, data_change in commit.removed if data_change]
        for rel in rewrites:
            lose(rel, commit.name)
        if rewrites or commit.row_deletes:
            changes.row_changes.append(commit.name)
        sources = [rel for rel, data_change in commit.removed if not data_change]
        made = [rel for rel, data_change in commit.added if not data_change]
        if not sources:
            continue
        held = [rel for rel in sources if rel in live or owner(rel) is not None]
        if not held:
            continue  # only unscored rows were compacted: the new files are new
        if len(held) < len(sources) or any(rel in partial for rel in sources):
            for rel in sources:  # scored and unscored rows mixed in the new files: they cannot be told apart
                lose(rel, f"{commit.name}, which compacted scored and unscored rows together")
            changes.row_changes.append(commit.name)
            continue
        merged = Group({rel: None for rel in made}, set())
        for rel in sources:
            group = owner(rel)
            if group is not None:
                changes.groups.remove(group)
                merged.covers |= group.covers
                merged.files.update({f: fp for f, fp in group.files.items() if f not in sources})
            else:
                merged.covers.add(rel)
                live.discard(rel)
        for rel in sources:
            merged.files.pop(rel, None)
        if merged.files:
            changes.groups.append(merged)
        else:  # a compaction that wrote nothing: its rows were all deleted
            for rel in merged.covers:
                changes.removed_by.setdefault(rel, commit.name)
    return changes


def settle(changes: Changes, listed: Mapping[str, str]) -> tuple[set[str], set[str]]:
    """Check the groups against the current listing (rel -> fingerprint): a group holds while every
    file of it is live with the fingerprint it had; others break (their covered rows changed).

    Returns the rels of the files the groups hold (not scored) and the rels they cover.
    """
    files: set[str] = set()
    covers: set[str] = set()
    for group in list(changes.groups):
        if all(rel in listed and fp in (None, listed[rel]) for rel, fp in group.files.items()):
            group.files = {rel: listed[rel] for rel in group.files}
            files |= set(group.files)
            covers |= group.covers
            continue
        changes.groups.remove(group)
        gone = next(rel for rel, fp in group.files.items() if rel not in listed or fp not in (None, listed[rel]))
        for rel in group.covers:
            changes.removed_by.setdefault(rel, f"a later change to {gone!r} (it held their compacted rows)")
    return files, covers


def check_removals(source: Any, files: Mapping[str, Mapping[str, Any]], reconciled: Any, listed: Mapping[str, str],
                   *, prune: bool, overwrite: bool, output: str) -> None:
    """Settle the committed predictions of a table's removed or changed files after `reconcile`.

    `files`: the output's committed entries by path; `listed`: rel -> fingerprint of the table's live files
    (and of the files its compaction groups hold). Predictions that a live compaction group covers are
    kept (moved out of `reconciled.stale`). Without prune or overwrite, a scored file that left the table
    (`reconciled.kept`), or whose deleted rows changed (a new deletion vector or position-delete file: a
    new fingerprint), is exit 2 naming the table, its snapshot, the commit, and the two ways out.
    """
    from basis.errors import OutputConflictError

    covered = {path for path in [*reconciled.stale, *reconciled.kept] if files[path]["rel"] in source.covered}
    reconciled.stale = [path for path in reconciled.stale if path not in covered]
    reconciled.kept = (set(reconciled.kept) - covered) if not source.removal_rewrites_rows else set(reconciled.kept)
    if not source.removal_rewrites_rows:
        return
    removed = sorted({files[path]["rel"] for path in reconciled.kept - covered})
    changed = sorted({files[path]["rel"] for path in reconciled.stale
                      if files[path]["rel"] in listed and listed[files[path]["rel"]] != files[path]["fingerprint"]})
    reconciled.kept = covered
    if not (removed or changed) or prune or overwrite:
        return
    changes = source.changes
    by = changes.removed_by if changes is not None else {}
    first = (removed or changed)[0]
    commit = by.get(first) or (", ".join(changes.row_changes[:3]) if changes and changes.row_changes else None)
    record = source.snapshot_record()
    where = f"{source.name} ({', '.join(f'{k} {v}' for k, v in record.items() if k != 'table')})"
    what = []
    if removed:
        what.append(f"no longer holds {len(removed)} data file(s) whose rows {output!r} already scored")
    if changed:
        what.append(f"has new deleted rows in {len(changed)} data file(s) whose rows {output!r} already scored "
                    f"(a deletion vector or position-delete file)")
    followed = "" if changes is None or changes.followed else " (the commits since the last run could not be " \
                                                              "followed, so a compaction counts as a rewrite)"
    raise OutputConflictError(
        f"{where} {' and '.join(what)}, e.g. {first!r}"
        f"{f': {commit} deleted or rewrote them' if commit else ''}{followed}. Set prune to drop the predictions "
        f"of the removed rows (rows rewritten into other files are scored again), or overwrite to score the "
        f"table afresh")
