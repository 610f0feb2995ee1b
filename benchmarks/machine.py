"""What this machine can do at most: pinned host-to-device bandwidth and single-core Parquet decode.

A GPU replica is fed no faster than the PCIe link moves its feature matrix,
nor faster than the machine's cores decode Parquet; `make gpu-check` states
its throughput as a fraction of the smaller of the two:

    limit rows/s = min(H2D bytes/s / (4 * features), cores * rows/s decoded by one core)

Example:
    >>> decode_rate([Path("part-00.parquet")], ["id", "f00"])["rows_per_second"]  # doctest: +SKIP
    5210000.0
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq


def cores() -> int:
    """CPUs this process may run on (the affinity mask, not the host's count)."""
    return len(os.sched_getaffinity(0))


def decode_rate(files: Sequence[Path], columns: Sequence[str], *, max_rows: int = 4_000_000,
                passes: int = 3) -> dict[str, Any]:
    """Rows/s that one thread decodes: ``columns`` of whole row groups, best of ``passes`` (page cache warm).

    Row groups are taken from ``files`` in order until ``max_rows`` rows; each is
    read with ``use_threads=False``, so exactly one core decodes.
    """
    groups: list[tuple[pq.ParquetFile, int]] = []
    rows = 0
    for path in files:
        parquet = pq.ParquetFile(path)
        for index in range(parquet.metadata.num_row_groups):
            if rows >= max_rows:
                break
            groups.append((parquet, index))
            rows += parquet.metadata.row_group(index).num_rows
    if not groups:
        raise ValueError("decode_rate needs at least one row group")
    best = float("inf")
    for attempt in range(passes + 1):  # the first pass only warms the page cache
        start = time.perf_counter()
        for parquet, index in groups:
            parquet.read_row_group(index, columns=list(columns), use_threads=False)
        if attempt:
            best = min(best, time.perf_counter() - start)
    return {"rows": rows, "columns": len(columns), "seconds": round(best, 4), "rows_per_second": rows / best}


def h2d_bandwidth(*, megabytes: int = 256, copies: int = 10) -> dict[str, Any]:
    """Pinned host-to-device (and device-to-host) copy bandwidth of GPU 0, in GB/s (1e9 bytes).

    Timed with CUDA events around ``copies`` back-to-back copies of one
    ``megabytes`` MiB pinned buffer, after three warm-up copies.
    """
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA"}
    size = megabytes << 20
    host = torch.empty(size // 4, dtype=torch.float32, pin_memory=True)
    device = torch.empty(size // 4, dtype=torch.float32, device="cuda")
    result: dict[str, Any] = {"bytes_per_copy": size, "copies": copies, "device": torch.cuda.get_device_name(0)}
    for name, dst, src in (("h2d", device, host), ("d2h", host, device)):
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(copies):
            dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        result[f"{name}_gb_per_s"] = round(size * copies / (start.elapsed_time(end) / 1e3) / 1e9, 2)
    del host, device
    torch.cuda.empty_cache()
    return result
