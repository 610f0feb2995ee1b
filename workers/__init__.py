"""batch-infer's actor side: model loading and the `Replica` actor (read -> forward -> write).

Torch is imported lazily: a replica process starts decoding its first shard
while torch and the model load in the background.
"""

from __future__ import annotations

import contextlib
import ctypes
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
# Likewise glibc's malloc (torch's and numpy's memory) maps each block above a threshold fresh
# and unmaps it on free: a 64->256->256->1 forward pass allocates two 4 MiB activations per
# 4096-row chunk, 28,000 page faults per million rows (4% of its CPU). Below 32 MiB, blocks
# now come from the heap and are reused.
_ALLOCATOR = {"MIMALLOC_PURGE_DELAY": "-1"}
_MALLOPT = ((-3, 32 << 20), (-1, 256 << 20))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (free heap kept)
if "pyarrow" not in sys.modules:  # a replica's process (the driver has Arrow loaded by now)
    for _name, _value in _ALLOCATOR.items():
        os.environ.setdefault(_name, _value)
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        with contextlib.suppress(Exception):  # not glibc (musl has no mallopt): its defaults stay
            for _option, _value in _MALLOPT:
                ctypes.CDLL("libc.so.6").mallopt(_option, _value)

from workers.replica import Replica  # noqa: E402 - after the allocator settings
from workers.replica_job import ReplicaJob  # noqa: E402 - after the allocator settings

__all__ = ["MLP", "ModelSpec", "Replica", "ReplicaJob", "inspect_model", "read_model"]

_LAZY = {"MLP": "workers.model", "ModelSpec": "workers.model", "inspect_model": "workers.model",
         "read_model": "workers.model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
