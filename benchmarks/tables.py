"""Table scale: batch-infer over N tiny Parquet files, N = 1,000 .. 100,000 (one shard per file).

Checks the commit-path claims: the driver's cost per committed shard is flat
(shards/s at 100,000 within 20% of 10,000), and a cron tick over unchanged
input reads no Parquet footer (under 10 s at 100,000 files).

Per N, each step its own ``python -m pipelines run --json`` process with the
product's defaults (no ``RAY_ADDRESS``; ``replicas`` and ``cpus_per_replica``
``auto``: on a machine of up to 4 CPUs the run is done in the driver lane with
every core (many tiny files: on a child replica process per CPU), elsewhere on a fresh embedded Ray; ``--set`` changes that, e.g.
``--set replicas=2 --set cpus_per_replica=1`` for two Ray replicas), from the
repository root:

1. full run into a fresh output: wall seconds, shards/s over the whole process
   and from the first committed file to ``_SUCCESS`` (steady state), the
   driver's peak RSS (``VmHWM``) and CPU seconds (polled every 20 ms, last
   value seen), the CPU seconds of the whole process tree (driver, embedded
   Ray, replicas: each descendant's last value seen, polled every 0.25 s, so
   what other processes on a busy machine take is not counted, and the last
   0.25 s of a process killed at the end may be) and so the CPU
   milliseconds per shard, the
   shards per call (bundles, from the run's timeline) and the share of the
   replicas' time between two calls (``call_gaps``: waiting on the driver, from
   the timeline too), the manifest's bytes
   (``_manifest.json`` and its segments under ``_manifest/``), files left in ``_journal/``;
2. the same command again (unchanged tick): wall seconds, shards done (0),
   manifest untouched, input files opened (0: no footer read, via inotify);
3. the same command after rewriting 1% of the input files: wall seconds,
   shards done (= files rewritten).

Inputs are cached under ``benchmarks/.data/tables-N/`` (``dNNNN/part-NNNNNN.parquet``,
100 files per directory, 100 rows in one row group: ``id`` int64 + ``f0``..``f7``
float32); file i is the same bytes for every N. Model: 8-16-1, sigmoid.

Example:
    python -m benchmarks.tables --sizes 1000
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks import processes, systems
from benchmarks.data import OUT, ROOT, SEED, _ensure_model
from benchmarks.opens import OpenWatch

ROWS_PER_FILE = 100
FILES_PER_DIR = 100
TOUCH_EVERY = 100  # the 1%-changed tick rewrites files 50, 150, 250, ...
FEATURES = tuple(f"f{i}" for i in range(8))
SCHEMA = pa.schema([("id", pa.int64())] + [(name, pa.float32()) for name in FEATURES])
WIDTHS = (8, 16, 1)
RUN_FLAGS: tuple[str, ...] = ()  # the product's defaults (`replicas`, `cpus_per_replica`: auto)
_MARKER = "_complete.json"
_POLL_S = 0.02
_TREE_POLL_S = 0.25
# the targets
RATIO_TARGET = 0.8  # shards/s at the largest N over shards/s at 10,000
COST_RATIO_TARGET = 1.2  # CPU per shard at the largest N over CPU per shard at 10,000 (flat within 20%)
TICK_TARGET_S = 3.0  # unchanged tick at 100,000 files (issue 15; issue 6 asked for 10 s)
SHARDS_PER_SECOND_TARGET = 2000.0  # whole run at 100,000 files (issue 15)
DRIVER_RSS_TARGET = 300 * 2**20  # driver peak RSS at 100,000 files (issue 15)
REFERENCE_N = 10_000
DEFAULT_SIZES = "1000,10000,100000"


@dataclass(frozen=True)
class Table:
    """N one-row-group files of ROWS_PER_FILE rows, and the model that fits them."""

    n: int

    @property
    def input(self) -> Path:
        return ROOT / f"tables-{self.n}"

    @property
    def model(self) -> Path:
        return ROOT / "models" / ("mlp-" + "-".join(map(str, WIDTHS)) + ".pt")

    def rel(self, index: int) -> str:
        return f"d{index // FILES_PER_DIR:04d}/part-{index:06d}.parquet"


def ensure(n: int) -> Table:
    """Generate the N input files (in parallel) and the model unless they are cached."""
    table = Table(n)
    _ensure_model(WIDTHS, table.model)
    params = {"files": n, "rows_per_file": ROWS_PER_FILE, "files_per_dir": FILES_PER_DIR, "seed": SEED, "version": 1}
    marker = table.input / _MARKER
    if marker.exists() and json.loads(marker.read_text()) == params:
        return table
    print(f"generating {n:,} files x {ROWS_PER_FILE} rows in {table.input} (once; cached)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    chunks = [range(first, min(first + FILES_PER_DIR, n)) for first in range(0, n, FILES_PER_DIR)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_write_files, [table] * len(chunks), chunks, chunksize=8))
    marker.write_text(json.dumps(params))
    print(f"generated in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return table


def touch(table: Table) -> int:
    """Rewrite 1% of the files with the same bytes (new mtime, so a new fingerprint); returns how many."""
    indices = range(TOUCH_EVERY // 2, table.n, TOUCH_EVERY)
    _write_files(table, indices)
    return len(indices)


def _write_files(table: Table, indices: range) -> None:
    for index in indices:
        path = table.input / table.rel(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([SEED, index])
        ids = np.arange(index * ROWS_PER_FILE, (index + 1) * ROWS_PER_FILE, dtype=np.int64)
        features = rng.standard_normal((len(FEATURES), ROWS_PER_FILE), dtype=np.float32)  # (features, rows)
        data = pa.Table.from_arrays([pa.array(ids), *map(pa.array, features)], schema=SCHEMA)
        tmp = path.with_name("." + path.name)
        pq.write_table(data, tmp, row_group_size=ROWS_PER_FILE, use_dictionary=False)
        tmp.replace(path)


def measure(n: int, sets: list[str]) -> dict[str, Any]:
    """The three runs for one N; ``problems`` lists every expectation that did not hold."""
    table = ensure(n)
    output = OUT / "tables" / f"n{n}"
    _retire(output)
    problems: list[str] = []

    full = _launch(table, output, sets, "full", first_output=True, timeline=True)
    _expect(problems, "full run", full["report"], done=n)
    manifest = output / "_manifest.json"
    before = manifest.stat()
    journal_left = _count_files(output / "_journal")
    if journal_left:
        problems.append(f"full run left {journal_left} file(s) in _journal/")
    written = len(systems.output_files(output))
    if written != n:
        problems.append(f"full run: {written:,} output files, expected {n:,}")

    unchanged = _launch(table, output, sets, "unchanged", watch=True)
    _expect(problems, "unchanged tick", unchanged["report"], done=0)
    after = manifest.stat()
    if (after.st_mtime_ns, after.st_size) != (before.st_mtime_ns, before.st_size):
        problems.append("unchanged tick rewrote _manifest.json")
    if unchanged["input_files_opened"]:
        problems.append(f"unchanged tick opened {unchanged['input_files_opened']} input file(s)")

    touched = touch(table)
    changed = _launch(table, output, sets, "changed", watch=True)
    _expect(problems, "1%-changed tick", changed["report"], done=touched)
    if changed["input_files_opened"] not in (None, touched):
        problems.append(f"1%-changed tick opened {changed['input_files_opened']} input file(s), {touched} changed")
    if _count_files(output / "_journal"):
        problems.append("1%-changed tick left file(s) in _journal/")

    seconds, first, success = full["seconds"], full["first_output_seconds"], full["success_seconds"]
    return {
        "metric": "tables",
        "files": n,
        "rows": n * ROWS_PER_FILE,
        "run_seconds": seconds,
        "shards_per_second": round(n / seconds, 1),
        # first committed file -> _SUCCESS (the run's last write): start-up, planning and process exit excluded
        "steady_shards_per_second": round((n - 1) / (success - first), 1) if success > first else None,
        "first_output_seconds": first,
        "success_seconds": success,
        "driver_peak_rss_bytes": full["driver_peak_rss_bytes"],
        "driver_cpu_seconds": full["driver_cpu_seconds"],
        "tree_cpu_seconds": full["tree_cpu_seconds"],
        "cpu_ms_per_shard": round(1000 * full["tree_cpu_seconds"] / n, 3),
        "kernel_cpu_ms_per_shard": round(1000 * full["kernel_cpu_seconds"] / n, 3),
        "shards_per_call": full["shards_per_call"],
        "call_gaps": full["call_gaps"],
        "path": _path(full["report"]),
        "manifest_bytes": before.st_size + _tree_bytes(output / "_manifest"),  # the root and its segments
        "journal_files_left": journal_left,
        "unchanged_tick_seconds": unchanged["seconds"],
        "unchanged_tick_shards_done": unchanged["report"].get("shards_done"),
        "unchanged_tick_input_files_opened": unchanged["input_files_opened"],
        "unchanged_tick_driver_peak_rss_bytes": unchanged["driver_peak_rss_bytes"],
        "unchanged_tick_driver_cpu_seconds": unchanged["driver_cpu_seconds"],
        "changed_files": touched,
        "changed_tick_seconds": changed["seconds"],
        "changed_tick_shards_done": changed["report"].get("shards_done"),
        "changed_tick_input_files_opened": changed["input_files_opened"],
        "changed_tick_driver_cpu_seconds": changed["driver_cpu_seconds"],
        "reports": {name: _brief(r["report"]) for name, r in [("full", full), ("unchanged", unchanged),
                                                              ("changed", changed)]},
        "problems": problems,
    }


def _tree_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 when it does not exist): a manifest's Parquet segments."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _launch(
    table: Table, output: Path, sets: list[str], step: str, *, first_output: bool = False, watch: bool = False,
    timeline: bool = False,
) -> dict[str, Any]:
    """One ``python -m pipelines run --json``; polls the driver's VmHWM and, if asked, the first output file."""
    base = output.with_name(f"{output.name}-{step}")  # base.log: its stderr; base.json: its report
    trace = base.with_suffix(".timeline.json")
    cmd = [sys.executable, "-m", "pipelines", "run", "--model", str(table.model), "--input", str(table.input),
           "--output", str(output), *RUN_FLAGS, "--json", *processes._set_flags(sets),
           *(["--timeline", str(trace)] if timeline else [])]
    base.parent.mkdir(parents=True, exist_ok=True)
    print(f"tables   {table.n:>7,} files: {step}", file=sys.stderr, flush=True)
    first = success = None
    peak, cpu = 0, 0.0
    watcher = OpenWatch(table.input) if watch else _NoWatch()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with watcher as opens, open(base.with_suffix(".log"), "w") as log, open(base.with_suffix(".json"), "w") as out:
        start = time.perf_counter()
        with subprocess.Popen(cmd, cwd=processes.REPO, env=processes._child_env(), stdout=out, stderr=log) as proc:
            tree, looked = _Tree(proc.pid), 0.0
            while proc.poll() is None:
                if time.perf_counter() - looked >= _TREE_POLL_S:
                    looked = time.perf_counter()
                    tree.look()
                hwm, used = _driver_usage(proc.pid)
                peak, cpu = max(peak, hwm), max(cpu, used)
                now = time.perf_counter() - start
                if first_output and first is None and systems.output_files(output):
                    first = now
                if first_output and success is None and (output / "_SUCCESS").exists():
                    success = now
                time.sleep(_POLL_S)
        seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the driver and the descendants it waited for
    waited = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    kernel = after.ru_stime - children.ru_stime  # of which in the kernel (file creation: see `RETIRED`)
    processes._check(proc.returncode, cmd, log.name)
    report = json.loads(base.with_suffix(".json").read_text())
    return {
        "seconds": round(seconds, 3),
        "first_output_seconds": round(first if first is not None else seconds, 3),  # None: between two polls
        "success_seconds": round(success if success is not None else seconds, 3),
        "driver_peak_rss_bytes": peak,
        "driver_cpu_seconds": round(cpu, 2),
        "tree_cpu_seconds": round(max(waited, tree.seconds), 2),
        "kernel_cpu_seconds": round(kernel, 2),
        **(_calls(trace) if timeline else {"shards_per_call": None, "call_gaps": None}),
        "input_files_opened": None if opens.files is None else len(opens.files),
        "report": report,
    }


class _Tree:
    """CPU seconds of a process and all its descendants (an embedded Ray's daemons and workers, which its
    driver does not wait for), from each one's last value seen in /proc."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.cpu: dict[int, float] = {}  # pid -> CPU seconds last seen
        self._tick = os.sysconf("SC_CLK_TCK")

    def look(self) -> None:
        parents: dict[int, int] = {}
        used: dict[int, float] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = int(fields[1])
            used[int(entry)] = (int(fields[11]) + int(fields[12])) / self._tick
        tree, grew = {self.root}, True
        while grew:
            grew = False
            for pid, parent in parents.items():
                if parent in tree and pid not in tree:
                    tree.add(pid)
                    grew = True
        for pid in tree & used.keys():
            self.cpu[pid] = max(self.cpu.get(pid, 0.0), used[pid])

    @property
    def seconds(self) -> float:
        return sum(self.cpu.values())


def _calls(trace: Path) -> dict[str, float | None]:
    """From a run's timeline (each shard's span names its replica and call): the mean shards per replica call,
    and `call_gaps`, the share of the replicas' time spent between two calls, from the end of a call's last
    shard to the start of the next call's first (a replica waiting on the driver), over each replica's time
    from its first shard's start to its last one's end. None for both from a version before bundles."""
    spans = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    if not spans or any(e["args"].get("call") is None for e in spans):  # a version before bundles: not told
        return {"shards_per_call": None, "call_gaps": None}
    calls = collections.Counter((e["tid"], e["args"]["call"]) for e in spans)
    replicas: dict[Any, list[tuple[float, float, Any]]] = collections.defaultdict(list)
    for e in spans:
        replicas[e["tid"]].append((e["ts"], e["ts"] + e["dur"], e["args"]["call"]))
    gaps = wall = 0.0
    for shards in replicas.values():
        shards.sort()
        wall += max(end for _, end, _ in shards) - shards[0][0]
        gaps += sum(max(0.0, after[0] - before[1]) for before, after in zip(shards, shards[1:])
                    if after[2] != before[2])
    return {"shards_per_call": round(len(spans) / len(calls), 1),
            "call_gaps": round(gaps / wall, 3) if wall > 0 else None}


class _NoWatch:
    files: set[str] | None = None

    def __enter__(self) -> _NoWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _driver_usage(pid: int) -> tuple[int, float]:
    """The process's peak RSS so far (bytes, ``VmHWM``) and CPU seconds used; (0, 0.0) once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            hwm = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return hwm, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, ValueError, IndexError):
        return 0, 0.0


def _expect(problems: list[str], step: str, report: dict[str, Any], *, done: int) -> None:
    if report.get("status") != "succeeded" or not report.get("complete"):
        problems.append(f"{step}: status {report.get('status')}, complete {report.get('complete')}")
    if report.get("shards_done") != done:
        problems.append(f"{step}: {report.get('shards_done')} shard(s) done, expected {done}")


def _path(report: dict[str, Any]) -> str:
    """Where the full run's shards ran: the driver lane, or how many Ray replicas."""
    nodes = [r.get("node") for r in report.get("replicas", [])]
    if nodes == ["driver"]:
        return "driver lane"
    if nodes and all(node == "driver" for node in nodes):
        return f"driver lane, {len(nodes)} child replica processes"
    return f"{len(nodes)} Ray replica(s)"


def _brief(report: dict[str, Any]) -> dict[str, Any]:
    keep = ("status", "shards_total", "shards_done", "shards_skipped", "shards_failed", "rows_out", "seconds",
            "startup_seconds", "complete")
    return {k: report.get(k) for k in keep} | {"replicas": len(report.get("replicas", []))}


def _count_files(directory: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(directory))


# An earlier output is moved here before a run and deleted once every size is measured. Deleting 100,000 files
# right before a run made that run's file creations slower: this machine's ext4 (no journal) scans the inodes
# deleted in the last minutes for every new one (`recently_deleted`), 15-350 us per file.
RETIRED = OUT / "tables" / ".retired"


def _retire(output: Path) -> None:
    if output.exists():
        RETIRED.mkdir(parents=True, exist_ok=True)
        output.rename(RETIRED / f"{output.name}-{time.time_ns()}")


def run_all(sizes: list[int], sets: list[str]) -> list[dict[str, Any]]:
    """Measure every N (smallest first), then print the table, the JSON lines and the scaling lines."""
    try:
        results = [measure(n, sets) for n in sorted(sizes)]
    finally:
        shutil.rmtree(RETIRED, ignore_errors=True)
    _print(results)
    return results


def _print(results: list[dict[str, Any]]) -> None:
    mib = 2**20
    print(f"\ntable scale: one {ROWS_PER_FILE}-row file per shard, MLP 8-16-1, "
          f"{' '.join(RUN_FLAGS) or 'default replicas and CPUs'}")
    print(f"{'files':>8} {'run s':>8} {'shards/s':>9} {'steady/s':>9} {'driver MiB':>11} {'manifest MB':>12} "
          f"{'tick s':>7} {'1% tick s':>10} {'driver CPU s':>13} {'CPU ms/shard':>13} {'kernel':>7} {'shards/call':>12} "
          f"{'gaps':>6}")
    for r in results:
        steady = "-" if r["steady_shards_per_second"] is None else f"{r['steady_shards_per_second']:,.0f}"
        per_call = "-" if r["shards_per_call"] is None else f"{r['shards_per_call']:,.1f}"
        kernel = "-" if r.get("kernel_cpu_ms_per_shard") is None else f"{r['kernel_cpu_ms_per_shard']:.2f}"
        gaps = "-" if r.get("call_gaps") is None else f"{100 * r['call_gaps']:.1f}%"
        print(f"{r['files']:>8,} {r['run_seconds']:>8.2f} {r['shards_per_second']:>9,.0f} {steady:>9} "
              f"{r['driver_peak_rss_bytes'] / mib:>11,.0f} {r['manifest_bytes'] / 1e6:>12.2f} "
              f"{r['unchanged_tick_seconds']:>7.2f} {r['changed_tick_seconds']:>10.2f} "
              f"{r['driver_cpu_seconds']:>13.1f} {r['cpu_ms_per_shard']:>13.2f} {kernel:>7} {per_call:>12} {gaps:>6}")
    print("(shards/s: files / whole-process seconds; steady/s: from the first committed file to _SUCCESS; "
          "tick: same command, unchanged input; 1% tick: after rewriting 1% of the files; CPU ms/shard: the whole "
          "process tree's CPU (driver, Ray, replicas) per file, what a busy machine's other work does not inflate "
          "much; kernel: of which in the kernel, mostly creating files, which this machine's ext4 makes several "
          "times dearer for minutes after many files were deleted nearby; shards/call: shards per replica call; "
          "gaps: the replicas' time between two calls, waiting on the driver)")
    for r in results:
        print(f"{r['files']:,} files ran in: {r['path']}")
    for r in results:
        for problem in r["problems"]:
            print(f"PROBLEM at {r['files']:,} files: {problem}")
    for r in results:
        print(json.dumps(r))
    scaling = _scaling(results)
    if scaling:
        print(json.dumps(scaling))
    print()


def _scaling(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The issue's two figures: throughput ratio largest N / 10,000 and the unchanged tick at the largest N."""
    by_n = {r["files"]: r for r in results}
    largest = by_n[max(by_n)]
    reference = by_n.get(REFERENCE_N) or by_n[min(by_n)]
    line: dict[str, Any] = {"metric": "tables_scaling", "largest_files": largest["files"],
                            "unchanged_tick_seconds": largest["unchanged_tick_seconds"]}
    print(f"unchanged tick at {largest['files']:,} files: {largest['unchanged_tick_seconds']:.2f} s "
          f"(target < {TICK_TARGET_S:.0f} s at 100,000), input files opened: "
          f"{_unknown(largest['unchanged_tick_input_files_opened'])} (target 0)")
    if largest.get("driver_peak_rss_bytes"):
        print(f"at {largest['files']:,} files: {largest['shards_per_second']:,.0f} shards/s for the whole run "
              f"(target >= {SHARDS_PER_SECOND_TARGET:,.0f} at 100,000), driver peak RSS "
              f"{largest['driver_peak_rss_bytes'] / 2**20:,.0f} MiB (target <= {DRIVER_RSS_TARGET / 2**20:,.0f} MiB)")
    if largest is reference:
        print("throughput ratio: needs two sizes (e.g. --sizes 10000,100000)")
        return line
    ratios = {}
    for key, label in [("shards_per_second", "whole run"), ("steady_shards_per_second", "steady")]:
        if largest[key] and reference[key]:
            ratios[key] = round(largest[key] / reference[key], 3)
            print(f"shards/s {label}: {largest['files']:,} files / {reference['files']:,} files = {ratios[key]:.2f} "
                  f"(target >= {RATIO_TARGET})")
    if largest.get("cpu_ms_per_shard") and reference.get("cpu_ms_per_shard"):  # per-shard cost flat: within 20%
        ratios["cpu_ms_per_shard"] = round(largest["cpu_ms_per_shard"] / reference["cpu_ms_per_shard"], 3)
        print(f"CPU ms per shard: {largest['files']:,} files / {reference['files']:,} files = "
              f"{ratios['cpu_ms_per_shard']:.2f} (target <= {COST_RATIO_TARGET:.2f})")
    return line | {"reference_files": reference["files"], "ratio": ratios}


def _unknown(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,}"


def parse_sizes(text: str) -> list[int]:
    """``"1000,10000"`` -> ``[1000, 10000]``; ``"none"`` or ``""`` -> ``[]``."""
    if text.strip().lower() in ("", "none", "off"):
        return []
    sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    if any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError("sizes must be positive file counts")
    return sorted(set(sizes))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=DEFAULT_SIZES,
                        help=f"comma-separated file counts (default: {DEFAULT_SIZES})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra batch-infer config key, passed as `--set KEY=VALUE` to every run")
    parser.add_argument("--generate-only", action="store_true", help="only create the cached inputs")
    args = parser.parse_args(argv)
    if args.generate_only:
        for n in args.sizes:
            ensure(n)
        return
    results = run_all(args.sizes, args.set)
    if any(r["problems"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
