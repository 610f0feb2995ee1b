"""``python -m benchmarks.run``: batch-infer vs Ray Data vs the single-process floor (issue 3).

For each workload the systems run in turn on the same cached files (order rotated
every repetition), ``--reps`` times each; the median is reported. In-process
times start once Ray is connected, so they include actor start-up and model
loading but not ``ray.init``. Then, as separate processes (fresh embedded Ray
each): the memory check (batch-infer at 1x and 4x rows), the start-up time to
the first committed shard, whole-process times of one run per system, and the
table-scale case (``--tables``, see ``benchmarks/tables.py``; on by default
only at ``--scale 1``).

stdout gets a table and one JSON line per result; progress goes to stderr.

Example:
    python -m benchmarks.run --scale 0.05 --reps 1 --systems ray-data,floor
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time
from typing import Any

from benchmarks import processes, systems, tables
from benchmarks.data import OUT, Workload, ensure, workloads

SYSTEMS = ("batch-infer", "ray-data", "floor")


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    jobs = workloads(args.scale)
    chosen = [ensure(jobs[name]) for name in args.workloads]
    bi_options = dict(map(systems.parse_option, args.set))

    systems.connect_ray()
    try:
        runs = {w.name: _measure(w, args.systems, args.reps, bi_options) for w in chosen}
    finally:
        import ray

        ray.shutdown()
    results = [row for w in chosen for row in _summarise(w, runs[w.name])]
    _print_table(results)
    for row in results:
        print(json.dumps(row))

    if "batch-infer" in args.systems and args.memory:
        processes.memory_check(ensure(jobs["data-1x"]), ensure(jobs["data"]), args.set)
    timings = processes.process_times(chosen, args.systems, args.set) if args.process_times else []
    if "batch-infer" in args.systems and args.startup:
        startup = next((t for t in timings if t["system"] == "batch-infer"), None)
        startup = startup or processes.launch(chosen[0], "batch-infer", args.set)
        print(
            f"\nstart-up: `batch-infer run` launch -> first committed shard: {startup['first_output_seconds']:.2f} s "
            f"({startup['workload']}; whole process {startup['seconds']:.2f} s)"
        )
        print(json.dumps({"metric": "startup", **startup}))
    if args.tables:
        tables.run_all(args.tables, args.set)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workloads",
        type=_names(workloads()),
        default="data,compute,small",
        help="comma-separated: data, compute, small (default: all three)",
    )
    parser.add_argument(
        "--systems",
        type=_names(SYSTEMS),
        default=",".join(SYSTEMS),
        help="comma-separated: batch-infer, ray-data, floor (default: all three)",
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions per system and workload (median reported)")
    parser.add_argument("--scale", type=float, default=1.0, help="row-count factor, e.g. 0.05 for a smoke run")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra batch-infer config key (value parsed as JSON), e.g. --set replicas=2",
    )
    for flag, text in [
        ("process-times", "whole-process time of one run per system"),
        ("memory", "batch-infer replica peak RSS at 1x and 4x rows"),
        ("startup", "batch-infer CLI launch to first committed shard"),
    ]:
        parser.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=True, help=text)
    parser.add_argument(
        "--tables",
        type=tables.parse_sizes,
        default=None,
        metavar="N,N,...",
        help="table-scale case: file counts, e.g. 1000,10000,100000, or 'none' "
        "(default: 1000,10000,100000 at --scale 1, none otherwise)",
    )
    args = parser.parse_args(argv)
    if args.reps < 1 or args.scale <= 0:
        parser.error("--reps must be >= 1 and --scale > 0")
    if args.tables is None:
        args.tables = tables.parse_sizes(tables.DEFAULT_SIZES) if args.scale == 1.0 else []
    return args


def _names(allowed: Any) -> Any:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = sorted(set(names) - set(allowed))
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(allowed)}")
        return names

    return parse


def _measure(
    workload: Workload, names: list[str], reps: int, bi_options: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """{system: [{seconds, rows_out, details}] per repetition}, systems alternating."""
    arms = {
        "batch-infer": lambda m, i, o: systems.run_batch_infer(m, i, o, **bi_options),
        "ray-data": systems.run_ray_data,
        "floor": systems.run_floor,
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            output = OUT / workload.name / name
            shutil.rmtree(output, ignore_errors=True)
            gc.collect()
            time.sleep(1.0)  # let the previous arm's actors and files settle
            others, start = _others_cpu(), time.perf_counter()
            details = arms[name](workload.model, workload.input, output)
            seconds = time.perf_counter() - start
            noise = _others_cpu(others)
            rows_out = systems.count_rows(output)
            if rows_out != workload.rows:
                raise RuntimeError(f"{name} wrote {rows_out:,} rows for {workload.name}, expected {workload.rows:,}")
            runs[name].append(
                {"seconds": seconds, "rows_out": rows_out, "details": details, "other_cpu_seconds": noise}
            )
            print(
                f"{workload.name:8} {name:12} rep {rep + 1}/{reps}: {seconds:8.2f} s"
                f" (other processes: {noise:.1f} CPU-s)",
                file=sys.stderr,
                flush=True,
            )
    return runs


def _summarise(workload: Workload, runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    medians = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    rows = []
    for name, seconds in medians.items():
        median_run = min(runs[name], key=lambda r: abs(r["seconds"] - seconds))
        rows.append(
            {
                "metric": "throughput",
                "workload": workload.name,
                "description": workload.description,
                "system": name,
                "rows": workload.rows,
                "seconds": round(seconds, 3),
                "rows_per_second": round(workload.rows / seconds),
                # throughput ratios: > 1 means faster than the reference
                "vs_ray_data": round(medians["ray-data"] / seconds, 3) if "ray-data" in medians else None,
                "vs_floor": round(medians["floor"] / seconds, 3) if "floor" in medians else None,
                "runs_seconds": [round(r["seconds"], 3) for r in runs[name]],
                "other_cpu_seconds": [round(r["other_cpu_seconds"], 1) for r in runs[name]],
                "details": median_run["details"],
            }
        )
    return rows


def _print_table(results: list[dict[str, Any]]) -> None:
    print(
        f"\n{'workload':9} {'system':12} {'rows':>12} {'seconds':>9} {'rows/s':>12} {'vs Ray Data':>12} {'vs floor':>9}"
    )
    noisy = 0.0
    for r in results:
        print(
            f"{r['workload']:9} {r['system']:12} {r['rows']:>12,} {r['seconds']:>9.2f} "
            f"{r['rows_per_second']:>12,} {_ratio(r['vs_ray_data']):>12} {_ratio(r['vs_floor']):>9}"
        )
        shares = [c / max(s, 1e-3) for c, s in zip(r["other_cpu_seconds"], r["runs_seconds"], strict=True)]
        noisy = max(noisy, *shares)
    print("(medians; 'vs' columns are throughput ratios, > 1 = faster than the reference)")
    if noisy > 0.1:
        print(f"warning: other processes used up to {noisy:.0%} of a CPU during some runs; numbers may be noisy")
    print()


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _others_cpu(before: dict[int, int] | None = None) -> Any:
    """CPU ticks per pid outside this process tree (Ray's processes are our children);
    with ``before``, the CPU-seconds those processes used since then."""
    procs = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            procs[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime+stime
        except (OSError, ValueError, IndexError):
            continue
    ours, grew = {os.getpid()}, True
    while grew:
        new = {pid for pid, (ppid, _) in procs.items() if ppid in ours} - ours
        ours |= new
        grew = bool(new)
    ticks = {pid: cpu for pid, (_, cpu) in procs.items() if pid not in ours}
    if before is None:
        return ticks
    return sum(cpu - before.get(pid, 0) for pid, cpu in ticks.items()) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
