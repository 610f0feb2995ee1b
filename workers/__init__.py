"""batch-infer's actor side: model loading and the `Replica` actor (read -> forward -> write).

Torch is imported lazily: a replica process starts decoding its first shard
while torch and the model load in the background.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

# Arrow's allocator (mimalloc) returns freed memory to the system 10 ms after it is freed, by
# default. A replica frees each decoded row group and allocates the next one moments later, so
# every row group was decoded into fresh pages the kernel had to fault in and zero (2 MiB huge
# pages: ~10% of a data-bound replica's CPU). Kept, the memory is reused: the replica's peak
# memory is unchanged (it is bounded by the decode budget), it just is not handed back between
# shards. mimalloc reads this once, when Arrow loads: set here, before anything imports
# pyarrow in the process; an environment that sets it already keeps its own value.
_ALLOCATOR = {"MIMALLOC_PURGE_DELAY": "-1"}
if "pyarrow" not in sys.modules:  # a replica's process (the driver has Arrow loaded by now)
    for _name, _value in _ALLOCATOR.items():
        os.environ.setdefault(_name, _value)

from workers.replica import Replica, ReplicaJob  # noqa: E402 - after the allocator settings

__all__ = ["MLP", "ModelSpec", "Replica", "ReplicaJob", "inspect_model", "read_model"]

_LAZY = {"MLP": "workers.model", "ModelSpec": "workers.model", "inspect_model": "workers.model",
         "read_model": "workers.model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
