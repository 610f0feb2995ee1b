"""A model set: several models scored over the same features in one pass (`model: {name: file, ...}`).

The driver plans with a `ModelSet` where it would hold one model's spec: it
has the same few attributes (`sha256`, `in_features`, `layers`, `to_dict`,
`check_categorical`). Its `sha256` is a digest of the names and each member's
sha256, so the commit path's job identity (`pipelines.commit.job_digest`)
changes when a model is added, removed or replaced, or a key renamed; the
manifest records each member's own sha256 beside it.

    >>> set_digest({"a": "0" * 64, "b": "1" * 64}) == set_digest({"b": "1" * 64, "a": "0" * 64})
    True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from basis.errors import ModelError

SET_FORMAT = "set"


def set_digest(shas: Mapping[str, str]) -> str:
    """The identity of a set: its {column: sha256}, order aside."""
    return hashlib.sha256(json.dumps(dict(sorted(shas.items()))).encode()).hexdigest()


@dataclass(frozen=True)
class ModelSet:
    """The specs of a model set's members, in config order: `((column, spec), ...)`."""

    members: tuple[tuple[str, Any], ...]  # (column, workers.modelfile.ModelSpec | ProgramSpec)

    format = SET_FORMAT

    @property
    def sha256(self) -> str:
        return set_digest({name: spec.sha256 for name, spec in self.members})

    @property
    def in_features(self) -> int:
        return int(self.members[0][1].in_features)

    @property
    def layers(self) -> tuple[tuple[int, int, bool], ...]:
        """Every member's layers, the first model's first: one row's forward work is the sum of the members'
        (`workers.modelfile.forward_share` reads the decode width off the first layer)."""
        return tuple(layer for _, spec in self.members for layer in spec.layers)

    @property
    def category_limits(self) -> tuple[int | None, ...]:
        """Per categorical column, the smallest embedding table any member indexes (a code must fit all)."""
        limits: list[int | None] = []
        for _, spec in self.members:
            for i, limit in enumerate(getattr(spec, "category_limits", ())):
                if i == len(limits):
                    limits.append(limit)
                elif limit is not None:
                    limits[i] = limit if limits[i] is None else min(limits[i], limit)  # type: ignore[type-var]
        return tuple(limits)

    def to_dict(self, uri: Callable[[str], str] | None = None) -> dict[str, Any]:
        """The manifest's `model` record: the set's digest, and each member's record (with `uri` applied to its
        file, when given) under its column name."""
        return {"sha256": self.sha256, "format": SET_FORMAT,
                "models": {name: {**spec.to_dict(), **({"uri": uri(spec.uri)} if uri else {})}
                           for name, spec in self.members}}

    def check_categorical(self, columns: Sequence[str]) -> None:
        for _, spec in self.members:
            spec.check_categorical(columns)


def inspect_set(models: Mapping[str, str], inspect: Callable[[str], Any]) -> ModelSet:
    """Each member's spec (`inspect(uri)`), checked to take the same input width (exit 2 naming them)."""
    members = tuple((name, inspect(uri)) for name, uri in models.items())
    widths = {name: spec.in_features for name, spec in members}
    if len(set(widths.values())) > 1:
        listed = ", ".join(f"{name!r} ({spec.uri}) takes {spec.in_features}" for name, spec in members)
        raise ModelError(f"the models of a set must take the same input features, but {listed}: every model of "
                         f"a set is given the same feature matrix; score the others in a run of their own")
    return ModelSet(members)


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two manifest `model` records (either may be one model or a set), in words."""
    def members(record: Mapping[str, Any]) -> dict[str, str] | None:
        if record.get("format") == SET_FORMAT:
            return {name: m.get("sha256", "?") for name, m in (record.get("models") or {}).items()}
        return None

    before, after = members(old), members(new)
    if before is None and after is None:
        return [f"model sha256 {old['sha256'][:12]}... -> {new['sha256'][:12]}..."]
    if before is None or after is None:
        one, many = ("one model", "a model set") if before is None else ("a model set", "one model")
        return [f"{one} -> {many} ({', '.join(after or before or {})})"]
    changes = [f"model {name!r} added" for name in after if name not in before]
    changes += [f"model {name!r} removed" for name in before if name not in after]
    changes += [f"model {name!r} sha256 {before[name][:12]}... -> {after[name][:12]}..."
                for name in after if name in before and before[name] != after[name]]
    return changes or ["model set changed"]
