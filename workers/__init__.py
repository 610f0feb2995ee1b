"""batch-infer's actor side: model loading and the `Replica` actor (read -> forward -> write).

Torch is imported lazily: a replica process starts decoding its first shard
while torch and the model load in the background.
"""

from __future__ import annotations

import importlib
from typing import Any

from workers.replica import Replica, ReplicaJob

__all__ = ["MLP", "ModelSpec", "Replica", "ReplicaJob", "inspect_model", "read_model"]

_LAZY = {"MLP": "workers.model", "ModelSpec": "workers.model", "inspect_model": "workers.model",
         "read_model": "workers.model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
