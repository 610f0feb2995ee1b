"""The machine's limit for a workload: the work no system can skip, single-threaded, divided by the cores.

Per input file and row group, on one thread, each stage timed on its own:

1. **decode**: ``ParquetFile.read_row_group(i, columns=[id, features], use_threads=False)``
   (pyarrow, CPU and IO pools set to one thread; the file is in the page cache).
2. **forward**: the MLP on that row group in cache-sized chunks
   (``benchmarks.systems._forward``, ``torch.set_num_threads(1)``).
3. **write**: ``id`` + ``prediction`` to a snappy ``ParquetWriter``, dictionary
   encoding off (it pays for neither an increasing int64 nor random floats,
   and batch-infer's writer only dictionary-encodes string-like columns);
   the file's close (footer) is counted too.

Stacking the feature columns into a (features, rows) matrix is done between
decode and forward but is **not** timed: a system can avoid it or hide it.
Neither are start-up, model loading or the first (warm-up) forward.

``limit seconds = (decode + forward + write) / cores``: what a perfectly
parallel system with no overhead would take on this machine. It runs in a
process of its own, so the single-thread settings touch no other arm:

    python -m benchmarks.limit --model M --input DIR --output DIR [--cores N]

prints one JSON line: ``seconds`` (the limit), ``single_core_seconds`` per
stage, ``cores``, ``rows``. The output (one file per input file) is written
like the other arms' so its rows can be checked.

The arm (``run``) also measures how far the machine itself is from that
ideal: ``cores`` copies of the same loop start together, each over every
file (``concurrent``). Memory-bound work (decode copies each value several
times) may not go ``cores`` times as fast on ``cores`` cores of a VM;
``parallel.seconds`` (each copy's mean stage time / cores) is the limit with
every core busy, ``parallel.scaling`` the throughput that reaches against the
ideal's (1.0: perfect). ``seconds`` stays the ideal: the issue's target.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.data import FEATURES
from benchmarks.systems import OUTPUT_SCHEMA, _forward, _load_layers, _Stacker

STAGES = ("decode", "forward", "write")
_REPO = Path(__file__).resolve().parents[1]


def run(model: Path, input: Path, output: Path) -> dict[str, Any]:
    """The limit as a benchmark arm: ``measure`` in a process of its own (single-thread settings stay there)."""
    cmd = [sys.executable, "-m", "benchmarks.limit", "--model", str(model), "--input", str(input)]
    done = subprocess.run([*cmd, "--output", str(output)], cwd=_REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "parallel": concurrent(model, input, output, cores=result["cores"],
                                             single=result["single_core_seconds"]["total"])}


def concurrent(model: Path, input: Path, output: Path, *, cores: int, single: float) -> dict[str, Any]:
    """``cores`` copies of ``measure``'s loop at once, each over every file of ``input`` into a folder of its own
    under ``output`` (deleted after), released together once all have imported: each copy's stage seconds, the
    limit with every core busy (``seconds``) and its throughput against the ideal's (``scaling``)."""
    cmd = [sys.executable, "-m", "benchmarks.limit", "--model", str(model), "--input", str(input), "--cores", "1",
           "--wait"]
    copies = [subprocess.Popen([*cmd, "--output", str(output / f".copy-{i}")], cwd=_REPO, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for i in range(cores)]
    try:
        for copy in copies:  # each says it is ready: imports, model and warm-up done
            if copy.stdout is None or copy.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a concurrent limit copy did not start: {copy.communicate()[1][-2000:]}")
        for copy in copies:
            assert copy.stdin is not None
            copy.stdin.write("go\n")
            copy.stdin.flush()
        done = [copy.communicate() for copy in copies]
    finally:
        for copy in copies:
            if copy.poll() is None:
                copy.kill()
        for i in range(cores):
            shutil.rmtree(output / f".copy-{i}", ignore_errors=True)
    failed = [err for copy, (_, err) in zip(copies, done) if copy.returncode != 0]
    if failed:
        raise RuntimeError(f"a concurrent limit copy failed:\n{failed[0][-2000:]}")
    each = [json.loads(out.strip().splitlines()[-1])["single_core_seconds"] for out, _ in done]
    mean = sum(e["total"] for e in each) / cores
    return {"seconds": round(mean / cores, 3), "scaling": round(single / mean, 3), "copies": cores,
            "single_core_seconds_each": each}


def measure(model: Path, input: Path, output: Path, *, cores: int, wait: bool = False) -> dict[str, Any]:
    """Single-threaded seconds per stage over every row group of ``input``; see the module doc. With ``wait``,
    it prints ``ready`` once warmed up and starts when a line comes on stdin (``concurrent``)."""
    import torch

    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    layers, stack = _load_layers(model), _Stacker()
    _forward(layers, stack(pa.table({name: pa.array([0.0] * 8, pa.float32()) for name in FEATURES})))  # warm-up
    output.mkdir(parents=True, exist_ok=True)
    if wait:
        print("ready", flush=True)
        sys.stdin.readline()
    spent = dict.fromkeys(STAGES, 0.0)
    rows = 0
    files = sorted(p for p in input.glob("*.parquet") if not p.name.startswith((".", "_")))
    for path in files:
        source = pq.ParquetFile(path)
        writer = pq.ParquetWriter(output / path.name, OUTPUT_SCHEMA, compression="snappy", use_dictionary=False)
        for group in range(source.metadata.num_row_groups):
            t0 = time.perf_counter()
            table = source.read_row_group(group, columns=["id", *FEATURES], use_threads=False)
            t1 = time.perf_counter()
            x = stack(table)  # (features, rows) float32: not part of the limit
            t2 = time.perf_counter()
            prediction = _forward(layers, x)
            t3 = time.perf_counter()
            writer.write_table(pa.table([table.column("id"), pa.array(prediction)], schema=OUTPUT_SCHEMA))
            t4 = time.perf_counter()
            spent["decode"] += t1 - t0
            spent["forward"] += t3 - t2
            spent["write"] += t4 - t3
            rows += table.num_rows
        t0 = time.perf_counter()
        writer.close()
        spent["write"] += time.perf_counter() - t0
    single = sum(spent.values())
    return {
        "seconds": single / cores,
        "cores": cores,
        "rows": rows,
        "files": len(files),
        "single_core_seconds": {**{k: round(v, 3) for k, v in spent.items()}, "total": round(single, 3)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.limit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="divide by (default: every core)")
    parser.add_argument("--wait", action="store_true",
                        help="print 'ready' once warmed up and start on a line from stdin (copies run together)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.model, args.input, args.output, cores=args.cores, wait=args.wait)))


if __name__ == "__main__":
    main()
