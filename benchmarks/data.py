"""Benchmark inputs: Parquet feature files and MLP models, generated once and cached.

Everything lives under ``benchmarks/.data/`` (git-ignored) and is keyed by the
row counts, so ``--scale 0.05`` and a full run keep separate caches:

    .data/rows-2000000/all16/part-00.parquet .. part-15.parquet   data-bound (32M rows)
    .data/rows-2000000/first4/part-00.parquet .. part-03.parquet  hard links: compute-bound (8M)
    .data/rows-100000/small/part-00.parquet                        small job
    .data/models/mlp-64-16-1.pt, mlp-64-256-256-1.pt

``first4`` hard-links the first four ``all16`` files, so the compute-bound job
and the 1x memory run read the very same bytes as the data-bound job without
using more disk or page cache. Each file is a seeded function of its index, so
a regenerated cache is byte-for-byte the same data.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent / ".data"
OUT = ROOT / "out"  # benchmark outputs, replaced on every run
FEATURES = tuple(f"f{i:02d}" for i in range(64))
SCHEMA = pa.schema([("id", pa.int64())] + [(name, pa.float32()) for name in FEATURES])
SEED = 20_240_601
ROW_GROUPS_PER_FILE = 8
_MARKER = "_complete.json"  # written last; lists the parameters the files were made with


@dataclass(frozen=True)
class Workload:
    """One benchmark job: a model applied to a directory of Parquet files."""

    name: str
    description: str
    widths: tuple[int, ...]  # layer widths, input first: (64, 16, 1)
    input: Path  # directory of part-NN.parquet files
    rows: int
    root: Path = ROOT  # the cache the input lives in; models are kept under root/models

    @property
    def model(self) -> Path:
        return self.root / "models" / ("mlp-" + "-".join(map(str, self.widths)) + ".pt")

    @property
    def files(self) -> list[Path]:
        return sorted(p for p in self.input.glob("*.parquet") if not p.name.startswith((".", "_")))


def workloads(scale: float = 1.0, root: Path = ROOT) -> dict[str, Workload]:
    """The three issue-3 jobs plus ``data-1x`` (a quarter of ``data``) for the memory check.

    ``root`` is the cache directory (``make gpu-check`` smoke tests use a temporary one).

    Example:
        >>> workloads(0.05)["data"].rows
        1600000
    """
    big_file_rows = max(ROW_GROUPS_PER_FILE, round(2_000_000 * scale))
    small_rows = max(ROW_GROUPS_PER_FILE, round(100_000 * scale))
    big = root / f"rows-{big_file_rows}"
    small, mlp_small, mlp_big = root / f"rows-{small_rows}" / "small", (64, 16, 1), (64, 256, 256, 1)
    return {
        "data": Workload("data", "data-bound, MLP 64-16-1, 16 files", mlp_small, big / "all16", 16 * big_file_rows,
                         root),
        "compute": Workload(
            "compute", "compute-bound, MLP 64-256-256-1, 4 files", mlp_big, big / "first4", 4 * big_file_rows, root
        ),
        "small": Workload("small", "small job, MLP 64-16-1, 1 file", mlp_small, small, small_rows, root),
        "data-1x": Workload(
            "data-1x", "data-bound, MLP 64-16-1, 4 files", mlp_small, big / "first4", 4 * big_file_rows, root
        ),
    }


def ensure(workload: Workload, *, processes: int = 1) -> Workload:
    """Create the workload's model and input files unless they are already cached.

    ``processes`` > 1 writes that many files at once (same bytes: each file is a
    seeded function of its index); ``make gpu-check`` uses the machine's cores.
    """
    _ensure_model(workload.widths, workload.model)
    if workload.input.name == "first4":
        all16 = workload.input.parent / "all16"
        _ensure_files(all16, 16, workload.rows // 4, processes)
        _ensure_links(all16, workload.input, 4)
    else:
        files = 16 if workload.input.name == "all16" else 1
        _ensure_files(workload.input, files, workload.rows // files, processes)
    return workload


def _ensure_model(widths: tuple[int, ...], path: Path) -> None:
    if path.exists():
        return
    import torch  # only needed the first time; keeps `ensure` cheap to import
    from torch import nn

    torch.manual_seed(SEED)
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.Sigmoid()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name)
    torch.save(nn.Sequential(*layers).state_dict(), tmp)
    tmp.replace(path)


def _ensure_files(directory: Path, files: int, rows_per_file: int, processes: int = 1) -> None:
    params = {
        "files": files,
        "rows_per_file": rows_per_file,
        "seed": SEED,
        "row_groups": ROW_GROUPS_PER_FILE,
        "version": 2,
    }
    marker = directory / _MARKER
    if marker.exists() and json.loads(marker.read_text()) == params:
        return
    print(f"generating {files} x {rows_per_file:,} rows in {directory} (once; cached)", flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"part-{index:02d}.parquet" for index in range(files)]
    if processes > 1 and files > 1:
        # spawn, not fork: the caller may hold CUDA or Ray state that a forked child must not inherit
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(processes, files), mp_context=context) as pool:
            list(pool.map(_write_file, paths, range(files), [rows_per_file] * files))
    else:
        for index, path in enumerate(paths):
            _write_file(path, index, rows_per_file)
    marker.write_text(json.dumps(params))


def _write_file(path: Path, index: int, rows: int) -> None:
    """Write ``rows`` seeded rows one row group at a time (~64 MiB in memory at full scale)."""
    rng = np.random.default_rng([SEED, index])
    group_rows = -(-rows // ROW_GROUPS_PER_FILE)
    tmp = path.with_name("." + path.name)
    with pq.ParquetWriter(tmp, SCHEMA, use_dictionary=False) as writer:  # random floats: plain pages
        for start in range(0, rows, group_rows):
            n = min(group_rows, rows - start)
            ids = np.arange(index * rows + start, index * rows + start + n, dtype=np.int64)
            features = rng.standard_normal((len(FEATURES), n), dtype=np.float32)  # (features, rows)
            table = pa.Table.from_arrays([pa.array(ids), *map(pa.array, features)], schema=SCHEMA)
            writer.write_table(table, row_group_size=n)
    tmp.replace(path)


def _ensure_links(source: Path, directory: Path, files: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for src in sorted(source.glob("*.parquet"))[:files]:
        link = directory / src.name
        if link.exists() and os.path.samefile(link, src):
            continue
        link.unlink(missing_ok=True)
        os.link(src, link)
