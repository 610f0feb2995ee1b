"""A replica's steady state, in this process: ``python -m benchmarks.steady``.

One `Replica` (as the Ray actor runs it: `cpus` decoding threads, pyarrow's pool
set to its CPUs, torch threads as it chooses) processes a workload's shards one
after another; the first ``--warm`` shards warm it up (model load, allocator,
caches) and are not counted. For the rest it reports the wall seconds and the
CPU seconds of this process (every thread: decode, torch, writer), per million
rows, which is the steady state `benchmarks.summary.steady_state` measures in a
`make bench` run, without Ray's start-up or scheduling around it. The limit's
rate per core is what `benchmarks.limit` measures single-threaded.

``--profile S`` sleeps S seconds first and prints the PID, for
`py-spy record -p PID --native` or `perf record -p PID`.

``--runnable`` samples every thread's state (/proc/self/task/*/stat, every 2 ms, the sampler itself
left out) during the measured shards and adds ``runnable``: the share of samples with 0, 1, 2 and 3+
threads running or ready to run. Under 2 (with 2 CPUs) is time the replica leaves a core idle,
whatever else the machine runs.

``--workload data-1x --scale 1`` runs `make bench`'s shard layout (1M-row shards of four
250k-row row groups, four batches each); ``data`` at 0.25 has one batch per row group.

Example:
    python -m benchmarks.steady --workload data --scale 0.25 --cpus 2
    python -m benchmarks.steady --workload data-1x --scale 1 --cpus 2
    python -m benchmarks.steady --workload compute --scale 0.25 --cpus 1 --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import threading
import time
from typing import Any

import workers  # noqa: F401 - first, as in a replica's process: its allocator settings precede pyarrow
from benchmarks.data import OUT, ensure, workloads


def _usage() -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


class Runnable:
    """Counts this process's threads in state R (running or runnable) every `interval` seconds."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.counts: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = str(threading.get_native_id())
        while not self._stop.wait(self.interval):
            running = 0
            for tid in os.listdir("/proc/self/task"):
                if tid == me:
                    continue
                try:
                    with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                        stat = f.read()
                except OSError:  # ended meanwhile
                    continue
                running += stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] == b"R"
            self.counts[min(running, 3)] = self.counts.get(min(running, 3), 0) + 1

    def __enter__(self) -> Runnable:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def shares(self) -> dict[str, float]:
        total = sum(self.counts.values()) or 1
        return {("3+" if k == 3 else str(k)): round(self.counts.get(k, 0) / total, 3) for k in range(4)}


def measure(workload: str = "data", scale: float = 0.25, cpus: float = 2.0, warm: int = 2,
            repeat: int = 1, options: dict[str, Any] | None = None, runnable: bool = False) -> dict[str, Any]:
    """Wall and CPU seconds per million rows of a replica's shards after `warm` shards (medians of `repeat`)."""
    import pyarrow as pa

    from basis.storage import resolve
    from pipelines.config import JobConfig
    from pipelines.prepare import prepare
    from workers.replica import Replica
    from workers.replica_job import ReplicaJob

    chosen = ensure(workloads(scale)[workload])
    out = OUT / "steady"
    shutil.rmtree(out, ignore_errors=True)
    cfg = {"model": str(chosen.model), "input": str(chosen.input), "output": str(out), **(options or {})}
    plan = prepare(JobConfig.from_dict(cfg))
    shards = [s.to_task() for s in plan.shards]
    job = ReplicaJob(model=str(chosen.model), model_sha256=plan.model.sha256, input=str(chosen.input),
                     output=str(out), features=plan.columns.features, passthrough=plan.columns.passthrough,
                     list_column=False, width=plan.columns.width, prediction_column="prediction",
                     keep_features=False, cpus=cpus, generation=1, invalid_rows=plan.config.invalid_rows,
                     batch_size=plan.config.batch_size)
    pa.set_cpu_count(max(1, int(cpus)))  # as the actor does in its own process
    replica = Replica(0, job, in_driver=True)
    resolve(str(out))
    for task in shards[:warm]:
        replica.process(task)
    walls, users, systems, faults, mains = [], [], [], [], []
    rows = sum(t["rows_in"] for t in shards[warm:])
    sampled = Runnable() if runnable else None  # the first repeat only (its CPU is counted in that one)
    for n in range(repeat):
        wall, before, main = time.perf_counter(), _usage(), time.thread_time()
        with sampled if sampled is not None and n == 0 else contextlib.nullcontext():
            for task in shards[warm:]:
                result = replica.process(task)
                if result["status"] != "committed":
                    raise RuntimeError(result)
        walls.append(time.perf_counter() - wall)
        mains.append(time.thread_time() - main)
        after = _usage()
        users.append(after[0] - before[0])
        systems.append(after[1] - before[1])
        faults.append(after[2] - before[2])
    replica.close()
    wall_s = statistics.median(walls)
    cpu_s = statistics.median(u + s for u, s in zip(users, systems))
    per_million = 1e6 / rows
    return {"workload": workload, "scale": scale, "cpus": cpus, "rows": rows, "shards": len(shards) - warm,
            "wall_s_per_million": round(wall_s * per_million, 4), "cpu_s_per_million": round(cpu_s * per_million, 4),
            "user_s_per_million": round(statistics.median(users) * per_million, 4),
            "sys_s_per_million": round(statistics.median(systems) * per_million, 4),
            "minor_faults_per_million": round(statistics.median(faults) * per_million),
            "main_thread_cpu_s_per_million": round(statistics.median(mains) * per_million, 4),
            "rows_per_second": round(rows / wall_s), "walls": [round(w, 3) for w in walls],
            **({"runnable": sampled.shares()} if sampled is not None else {})}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.steady", description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="data", choices=("data", "compute", "data-1x"))
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--cpus", type=float, default=2.0)
    parser.add_argument("--warm", type=int, default=2, help="shards run first and not counted")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--profile", type=float, default=0.0, help="sleep this long first (attach py-spy)")
    parser.add_argument("--runnable", action="store_true", help="sample how many threads run or wait to run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="job config keys")
    args = parser.parse_args(argv)
    options = {k: json.loads(v) if v[:1] in "0123456789[{tf" else v for k, v in (o.split("=", 1) for o in args.set)}
    if args.profile:
        print(f"pid {os.getpid()}", flush=True)
        time.sleep(args.profile)
    print(json.dumps(measure(args.workload, args.scale, args.cpus, args.warm, args.repeat, options,
                             runnable=args.runnable)))


if __name__ == "__main__":
    main()
