"""``python -m benchmarks.run``: batch-infer vs Ray Data, Daft, a plain loop and the machine's limit (issues 3, 8).

For each workload the systems run in turn on the same cached files (order rotated
every repetition), ``--reps`` times each; the median is reported. In-process
times start once Ray is connected, so they include actor start-up and model
loading but not ``ray.init``; Daft runs as a process of its own venv
(``benchmarks/peers.py``) and reports its in-process time the same way (after
``import daft``), after a tuning pass that keeps its fastest configuration.
``limit`` is ``benchmarks/limit.py``: the single-threaded work no system can
skip, divided by the cores. The small job is also run as whole processes
(``--reps`` times each), which is its row in the summary table. Then, as
separate processes (each as a user's `batch-infer run`: in the driver lane on a machine
of <= 4 CPUs without a GPU, else with a fresh embedded Ray): the memory check (batch-infer at
1x and 4x rows), the start-up time to the first committed shard, whole-process
times of one run per system for the other workloads, and the table-scale case
(``--tables``, see ``benchmarks/tables.py``; on by default only at ``--scale 1``).

stdout gets the tables and one JSON line per result; progress goes to stderr.

Example:
    python -m benchmarks.run --quick                  # = --scale 0.05 --reps 1: smoke run
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
from pathlib import Path
from typing import Any

from benchmarks import limit, peers, processes, summary, systems, tables
from benchmarks.data import OUT, Workload, ensure, workloads

SYSTEMS = ("batch-infer", "ray-data", "daft", "floor", "limit")
OWN_TIME = ("daft", "limit")  # arms whose details' "seconds" is their time (see _measure)
QUICK = {"scale": 0.05, "reps": 1}  # --quick: the smoke run (~5-7 min on 2 cores)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    jobs = workloads(args.scale)
    chosen = [ensure(jobs[name]) for name in args.workloads]
    bi_options = dict(map(systems.parse_option, args.set))
    notes: dict[str, str] = {}
    daft = _daft_python(args.systems, notes)
    names = [n for n in args.systems if n != "daft" or daft is not None]

    systems.connect_ray()
    try:
        runs = {w.name: _measure(w, names, args.reps, bi_options, daft, daft_tune=args.daft_tune) for w in chosen}
    finally:
        import ray

        ray.shutdown()
    results = [row for w in chosen for row in _summarise(w, runs[w.name])]
    _print_table(results)
    _warn_if_noisy([r for per_system in runs.values() for rs in per_system.values() for r in rs])
    print()
    for row in results:
        print(json.dumps(row))

    daft_options = {w.name: runs[w.name]["daft"][0]["details"]["options"] for w in chosen if runs[w.name].get("daft")}
    process_names = [n for n in names if n != "limit"]
    small = next((w for w in chosen if w.name == "small"), None)
    whole = processes.whole_process(small, process_names, args.reps, args.set, daft, daft_options) \
        if small and process_names else {}  # the limit alone has no whole process

    if "batch-infer" in args.systems and args.memory:
        processes.memory_check(ensure(jobs["data-1x"]), ensure(jobs["data"]), args.set)
    others = [w for w in chosen if w is not small]
    timings = []
    if args.process_times and others:
        timings = processes.process_times(others, process_names, args.set, daft, daft_options, args.reps)
        _print_cli_against_api(timings, runs)
    if "batch-infer" in args.systems and args.startup:
        startup = next((t for t in timings if t["system"] == "batch-infer"), None)
        startup = startup or next(iter(whole.get("batch-infer", [])), None)
        startup = startup or processes.launch(chosen[0], "batch-infer", args.set)
        print(
            f"\nstart-up: `batch-infer run` launch -> first committed shard: {startup['first_output_seconds']:.2f} s "
            f"({startup['workload']}; whole process {startup['seconds']:.2f} s)"
        )
        print(json.dumps({"metric": "startup", **startup}))
    if args.tables:
        tables.run_all(args.tables, args.set)

    # Last, so it closes the output: the issue-8 table.
    table = [_summary_row(w, runs[w.name], whole if w is small else None) for w in chosen]
    if daft is not None:
        notes["daft"] = _daft_note(chosen, runs)
    print("\n" + summary.render(table, notes))
    _warn_if_noisy([r for per_system in runs.values() for rs in per_system.values() for r in rs])
    for row in table:
        print(json.dumps(row))


def _print_cli_against_api(timings: list[dict[str, Any]], runs: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    """Issue 15's first target: `batch-infer run`'s whole process against the same job through the API with
    Ray already up (in-process medians), and the best peer's whole process against `batch-infer run`'s."""
    for workload in sorted({t["workload"] for t in timings}):
        whole = {t["system"]: t["seconds"] for t in timings if t["workload"] == workload}
        api = [r["seconds"] for r in runs.get(workload, {}).get("batch-infer", [])]
        if "batch-infer" not in whole or not api:
            continue
        cli, median = whole["batch-infer"], statistics.median(api)
        peers_ = {k: v for k, v in whole.items() if k != "batch-infer"}
        line = f"{workload}: batch-infer run {cli:.2f} s against the API's {median:.2f} s: " \
               f"{cli / median:.2f}x (target <= 1.1x)"
        if peers_:
            best = min(peers_, key=peers_.__getitem__)
            line += f"; best peer's whole process ({best}) {peers_[best]:.2f} s: {peers_[best] / cli:.2f}x faster"
        print(line)
        print(json.dumps({"metric": "cli_against_api", "workload": workload, "cli_seconds": cli,
                          "api_seconds": median, "ratio": round(cli / median, 3)}))


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
        help="comma-separated: batch-infer, ray-data, daft, floor (the plain loop), limit (default: all)",
    )
    parser.add_argument("--reps", type=int, default=None, help="repetitions per system and workload (default 3)")
    parser.add_argument("--scale", type=float, default=None, help="row-count factor, e.g. 0.05 (default 1)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: --scale 0.05 --reps 1 unless those are given"
    )
    parser.add_argument(
        "--daft-tune",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"try Daft's candidate configs ({', '.join(peers.DAFT_CANDIDATES)}) once per workload, keep the fastest",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra batch-infer config key (value parsed as JSON), e.g. --set replicas=2",
    )
    for flag, text in [
        ("process-times", "whole-process time per system (median of --reps runs)"),
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
    for key, value in QUICK.items():
        if getattr(args, key) is None:
            setattr(args, key, value if args.quick else {"scale": 1.0, "reps": 3}[key])
    if args.reps < 1 or args.scale <= 0:
        parser.error("--reps must be >= 1 and --scale > 0")
    if args.tables is None:
        args.tables = tables.parse_sizes(tables.DEFAULT_SIZES) if args.scale == 1.0 else []
    return args


def _daft_python(names: list[str], notes: dict[str, str]) -> Path | None:
    """The Daft venv's python, built on first use; None (and why, in ``notes``) if Daft cannot run."""
    if "daft" not in names:
        return None
    try:
        return peers.daft_python()
    except peers.PeerUnavailable as exc:
        print(f"Daft arm skipped: {exc}", file=sys.stderr, flush=True)
        notes["daft"] = f"not run: {str(exc).splitlines()[0]}"
        return None


def _daft_note(chosen: list[Workload], runs: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Which Daft configuration won per workload, for the line under the table."""
    best = [
        f"{w.name}: {runs[w.name]['daft'][0]['details']['tuning']['best']}" for w in chosen if runs[w.name].get("daft")
    ]
    return f"native runner, daft {peers.DAFT_VERSION} in its own venv; best config " + "; ".join(best)


def _summary_row(
    workload: Workload, runs: dict[str, list[dict[str, Any]]], whole: dict[str, list[dict[str, Any]]] | None
) -> dict[str, Any]:
    """The workload's row of the summary table: in-process medians, or whole-process ones (small job)."""
    if whole is None:
        seconds = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items() if rs}
    else:
        seconds = {name: statistics.median(t["seconds"] for t in ts) for name, ts in whole.items() if ts}
    label = summary.workload_label(
        workload.description, workload.widths, workload.rows, len(workload.files), whole=whole is not None
    )
    steadies = [r["details"]["steady"] for r in runs.get("batch-infer", []) if whole is None and r["details"].get("steady")]
    steady = {key: statistics.median(s[key] for s in steadies) for key in ("rows_per_second", "start_up_seconds")} \
        if steadies else None
    parallels = [r["details"]["parallel"]["seconds"] for r in runs.get("limit", [])
                 if whole is None and r["details"].get("parallel")]
    parallel = statistics.median(parallels) if parallels else None
    paired = None
    if whole is None and runs.get("batch-infer") and len(runs.get("limit", [])) == len(runs["batch-infer"]):
        paired = summary.paired_ratio([r["details"].get("steady") for r in runs["batch-infer"]],
                                      [r["seconds"] for r in runs["limit"]], workload.rows)
    return {**summary.summarise_row(label, seconds, workload.rows, steady, parallel_limit=parallel, paired=paired),
            "name": workload.name}


def _names(allowed: Any) -> Any:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = sorted(set(names) - set(allowed))
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(allowed)}")
        return names

    return parse


def _measure(
    workload: Workload,
    names: list[str],
    reps: int,
    bi_options: dict[str, Any],
    daft: Path | None,
    *,
    daft_tune: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """{system: [{seconds, rows_out, details}] per repetition}, systems alternating.

    The arms in ``OWN_TIME`` report their own ``seconds``: Daft its
    in-process time (its interpreter and ``import daft`` are outside, as
    ``ray.init`` is for the others), the limit its computed bound.
    """
    daft_options: dict[str, Any] = {}
    tuning = None
    if "daft" in names and daft is not None:
        if daft_tune:
            best, tried = peers.tune_daft(workload.model, workload.input, OUT / workload.name / "daft", python=daft)
            daft_options, tuning = peers.DAFT_CANDIDATES[best], {"best": best, "seconds": tried}
        else:
            tuning = {"best": "default", "seconds": {}}
    arms = {
        "batch-infer": lambda m, i, o: systems.run_batch_infer(m, i, o, **bi_options),
        "ray-data": systems.run_ray_data,
        "daft": lambda m, i, o: {
            **peers.run_daft(m, i, o, python=daft, options=daft_options),  # type: ignore[arg-type]
            "options": daft_options,
            "tuning": tuning,
        },
        "floor": systems.run_floor,
        "limit": limit.run,
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for rep in range(reps):
        for name in _order(names, rep):
            output = OUT / workload.name / name
            shutil.rmtree(output, ignore_errors=True)
            gc.collect()
            os.sync()  # the previous arm's output reaches the disk now, not during this arm's run
            time.sleep(1.0)  # let the previous arm's actors and files settle
            others, start = _others_cpu(), time.perf_counter()
            try:
                details = arms[name](workload.model, workload.input, output)
            except RuntimeError as exc:  # Daft's process crashed once here (SIGSEGV in its runner): one rerun
                if name != "daft":
                    raise
                print(f"{workload.name:8} {name:12} rep {rep + 1}/{reps}: crashed ({str(exc).splitlines()[0][-80:]});"
                      " running it again", file=sys.stderr, flush=True)
                shutil.rmtree(output, ignore_errors=True)
                others, start = _others_cpu(), time.perf_counter()
                details = arms[name](workload.model, workload.input, output)
            wall = time.perf_counter() - start
            noise = _others_cpu(others)
            systems.check_ids(output, workload.rows, name)
            seconds = details["seconds"] if name in OWN_TIME else wall
            runs[name].append(
                {
                    "seconds": seconds,
                    "wall_seconds": wall,
                    "rows_out": workload.rows,
                    "details": details,
                    "other_cpu_seconds": noise,
                }
            )
            print(
                f"{workload.name:8} {name:12} rep {rep + 1}/{reps}: {seconds:8.2f} s"
                f" (other processes: {noise:.1f} CPU-s)",
                file=sys.stderr,
                flush=True,
            )
    return runs


def _order(names: list[str], rep: int) -> list[str]:
    """Repetition `rep`'s order: the systems rotated by one per repetition, the limit right after batch-infer
    (their ratio is the issue's target, and this machine's speed drifts within minutes: `summary.paired_ratio`).

    >>> [_order(["batch-infer", "ray-data", "daft", "limit"], rep) for rep in range(3)]
    [['batch-infer', 'limit', 'ray-data', 'daft'], ['ray-data', 'daft', 'batch-infer', 'limit'], ['daft', 'batch-infer', 'limit', 'ray-data']]
    """
    turn = rep % len(names)
    order = names[turn:] + names[:turn]
    if "limit" in order and "batch-infer" in order:
        order.remove("limit")
        order.insert(order.index("batch-infer") + 1, "limit")
    return order


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
                "runs_wall_seconds": [round(r["wall_seconds"], 3) for r in runs[name]],
                "other_cpu_seconds": [round(r["other_cpu_seconds"], 1) for r in runs[name]],
                "details": median_run["details"],
            }
        )
    return rows


def _print_table(results: list[dict[str, Any]]) -> None:
    print(
        f"\n{'workload':9} {'system':12} {'rows':>12} {'seconds':>9} {'rows/s':>12} {'vs Ray Data':>12} {'vs floor':>9}"
    )
    for r in results:
        print(
            f"{r['workload']:9} {r['system']:12} {r['rows']:>12,} {r['seconds']:>9.2f} "
            f"{r['rows_per_second']:>12,} {_ratio(r['vs_ray_data']):>12} {_ratio(r['vs_floor']):>9}"
        )
    print("(medians; 'vs' columns are throughput ratios, > 1 = faster than the reference)")


def _warn_if_noisy(runs: list[dict[str, Any]]) -> None:
    """One line when other processes used > 10% of a CPU during any in-process run (over its wall time)."""
    noisy = max((r["other_cpu_seconds"] / max(r["wall_seconds"], 1e-3) for r in runs), default=0.0)
    if noisy > 0.1:
        print(f"warning: other processes used up to {noisy:.0%} of a CPU during some runs; numbers may be noisy")


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
