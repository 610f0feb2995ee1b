"""Measurements that need a process of their own, each run as a user would (`batch-infer run`: the driver
lane on a machine of <= 4 CPUs without a GPU, else a fresh embedded Ray).

- ``memory_check``: batch-infer at 1x and 4x rows; replica and driver peak RSS.
- ``process_times``: whole-process runs per system and workload (the median of
  ``reps``), plus the time until its first output file appears (``batch-infer
  run``'s start-up).
- ``whole_process``: ``reps`` whole-process runs per system of one workload,
  systems alternating (the small job's row of the summary table).

Daft runs as ``daft_job.py`` under its own venv's python (``benchmarks/peers.py``)
with the options its tuning pass chose for the workload.

Children run from the repository root without ``RAY_ADDRESS``; their stderr goes
to a ``.log`` file next to their output directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import peers, systems
from benchmarks.data import OUT, Workload

REPO = Path(__file__).resolve().parents[1]


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"


def memory_check(small: Workload, big: Workload, sets: list[str]) -> None:
    """Replica peak RSS must not grow with input size: 4x rows within 1.2x memory."""
    measured = {}
    for workload in (small, big):
        output = OUT / "memory" / workload.name
        shutil.rmtree(output, ignore_errors=True)
        cmd = [sys.executable, "-m", "benchmarks.systems", "batch-infer", *_paths(workload, output), *_set_flags(sets)]
        print(f"memory   batch-infer {workload.rows:,} rows (own process)", file=sys.stderr, flush=True)
        with _child_log(output) as log:
            done = subprocess.run(
                cmd, cwd=REPO, env=_child_env(), stdout=subprocess.PIPE, stderr=log, text=True, check=False
            )
        _check(done.returncode, cmd, log.name)
        line = json.loads(done.stdout.strip().splitlines()[-1])
        peak = max(r["peak_rss_bytes"] for r in line["details"]["replicas"])
        measured[workload.name] = {
            "rows": workload.rows,
            "replica_peak_rss_bytes": peak,
            "driver_peak_rss_bytes": line["driver_peak_rss_bytes"],
            "driver_peak_rss_growth_bytes": line["driver_peak_rss_growth_bytes"],
        }
    one, four = measured[small.name], measured[big.name]
    ratio = four["replica_peak_rss_bytes"] / one["replica_peak_rss_bytes"]
    print(
        f"memory: max replica peak RSS {_mib(one['replica_peak_rss_bytes'])} at {one['rows']:,} rows, "
        f"{_mib(four['replica_peak_rss_bytes'])} at {four['rows']:,} rows: ratio {ratio:.2f} (target <= 1.2)"
    )
    print(
        f"memory: driver peak RSS {_mib(one['driver_peak_rss_bytes'])} at 1x, {_mib(four['driver_peak_rss_bytes'])} "
        f"at 4x; growth above its RSS just before pipelines.run: "
        f"{_mib(one['driver_peak_rss_growth_bytes'])} at 1x, {_mib(four['driver_peak_rss_growth_bytes'])} at 4x"
    )
    print(json.dumps({"metric": "memory", "1x": one, "4x": four, "replica_peak_rss_ratio": round(ratio, 3)}))


def process_times(
    chosen: list[Workload],
    names: list[str],
    sets: list[str],
    daft: Path | None = None,
    daft_options: dict[str, dict[str, Any]] | None = None,
    reps: int = 1,
) -> list[dict[str, Any]]:
    """``reps`` whole-process runs per system and workload, systems alternating (order rotated every
    repetition, as ``whole_process``): interpreter start, imports, Ray start, work, exit. Returns each
    system's median run per workload (one run of a busy 2-core box is off by up to 2x: issue 15's
    CLI-against-API figure was 0.93x in one ``make bench`` and 1.14x in the next)."""
    options = daft_options or {}
    runs = {w.name: whole_process(w, names, reps, sets, daft, options) for w in chosen}
    medians = [_median_run(ts) for per_system in runs.values() for ts in per_system.values() if ts]
    print(f"\nwhole-process times (median of {reps})\n{'workload':9} {'system':12} {'seconds':>9} "
          f"{'first output s':>15}  runs")
    for t in medians:
        every = ", ".join(f"{r['seconds']:.2f}" for r in runs[t["workload"]][t["system"]])
        print(f"{t['workload']:9} {t['system']:12} {t['seconds']:>9.2f} {t['first_output_seconds']:>15.2f}  {every}")
    for t in medians:
        print(json.dumps({"metric": "process", "median_of": reps, **t}))
    return medians


def _median_run(timings: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median time (the lower middle one of an even count)."""
    ordered = sorted(timings, key=lambda t: t["seconds"])
    return ordered[(len(ordered) - 1) // 2]


def whole_process(
    workload: Workload,
    names: list[str],
    reps: int,
    sets: list[str],
    daft: Path | None = None,
    daft_options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``reps`` whole-process runs per system, order rotated every repetition; one JSON line per run."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    options = (daft_options or {}).get(workload.name)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            timing = launch(workload, name, sets, daft, options)
            systems.check_ids(OUT / "process" / workload.name / name, workload.rows, name)
            runs[name].append(timing)
            print(json.dumps({"metric": "process", "rep": rep + 1, **timing}))
    return runs


def launch(
    workload: Workload,
    name: str,
    sets: list[str],
    daft: Path | None = None,
    daft_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one system as its own process; also note when its first output file appears."""
    output = OUT / "process" / workload.name / name
    shutil.rmtree(output, ignore_errors=True)
    if name == "batch-infer":
        cmd = [sys.executable, "-m", "pipelines", "run", *_paths(workload, output), "--overwrite", *_set_flags(sets)]
    elif name == "daft":
        if daft is None:
            raise ValueError("the Daft arm needs the Daft venv's python")
        options = [f"{key}={json.dumps(value)}" for key, value in (daft_options or {}).items()]
        cmd = [str(daft), str(peers.DAFT_JOB), *_paths(workload, output), *_set_flags(options)]
    else:
        cmd = [sys.executable, "-m", "benchmarks.systems", name, *_paths(workload, output)]
    print(f"process  {name:12} {workload.name}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    first = None
    with (
        _child_log(output) as log,
        subprocess.Popen(cmd, cwd=REPO, env=_child_env(), stdout=subprocess.DEVNULL, stderr=log) as proc,
    ):
        while proc.poll() is None:
            if first is None and systems.output_files(output):
                first = time.perf_counter() - start
            time.sleep(0.02)
    seconds = time.perf_counter() - start
    _check(proc.returncode, cmd, log.name)
    first = first if first is not None else seconds  # finished between two polls
    return {
        "workload": workload.name,
        "system": name,
        "rows": workload.rows,
        "seconds": round(seconds, 3),
        "first_output_seconds": round(first, 3),
    }


def _child_log(output: Path) -> Any:
    """A child's stderr goes to OUTPUT.log next to its output directory."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return open(output.with_name(output.name + ".log"), "w")


def _check(returncode: int, cmd: list[str], log: str) -> None:
    if returncode != 0:
        tail = "".join(Path(log).read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{' '.join(cmd)} exited {returncode}; stderr in {log}:\n{tail}")


def _paths(workload: Workload, output: Path) -> list[str]:
    return ["--model", str(workload.model), "--input", str(workload.input), "--output", str(output)]


def _set_flags(sets: list[str]) -> list[str]:
    return [arg for kv in sets for arg in ("--set", kv)]


def _child_env() -> dict[str, str]:
    """Children start their own embedded Ray: never inherit a cluster address."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
