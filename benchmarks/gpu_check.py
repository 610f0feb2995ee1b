"""``python -m benchmarks.gpu_check`` (``make gpu-check``): batch-infer on one GPU machine (issue 8).

One command, under 8 minutes on one H100 (the default ``--budget`` is 450 s;
a first-time venv build is extra). It runs these parts in order, records each
whatever happens to the others (an exception becomes that part's ``error``),
and rewrites the JSON after every part and every throughput arm, so a run cut
short still leaves what it measured:

1. ``environment``: torch, CUDA, Ray and pyarrow versions, the GPU, the cores.
2. ``pytest_gpu``: ``pytest -m gpu`` in a subprocess (``tests/test_gpu.py``).
3. ``forward_check``: many batches through ``workers.device.Forward`` on real
   CUDA streams, delayed at random, against a float64 CPU reference (fp32 and
   bf16), and negative controls: each stream guard broken in turn must give
   wrong predictions (``benchmarks/forward_check.py``).
4. ``data``: the benchmark files of ``benchmarks/data.py``, written on every core.
5. ``machine``: pinned host-to-device bandwidth and single-core Parquet decode
   (``benchmarks/machine.py``), giving the limit
   ``min(H2D bytes/s / (4 * 64), cores * decode rows/s)`` rows/s.
6. ``throughput``: data-bound (64->16->1) and compute-bound (64->256->256->1)
   rows/s, each arm a fresh process (``python -m benchmarks.systems``): batch-infer
   with default ("auto") settings in fp32 and in bf16, batch-infer with all but
   one CPU given to the replica, and Ray Data with one GPU actor.
7. ``targets``: batch-infer (defaults, fp32) >= 0.5 x the limit and >= 2 x Ray Data,
   per workload.

rows/s = rows / seconds from ``pipelines.run`` (or Ray Data's first call) to its
return, Ray already started: actor start, CUDA init and model load included, as
in ``make bench``. ``replica_rows_per_second`` (rows / the replica's busy
seconds) shows the steady state.

``--quick`` is the CPU smoke mode (tiny sizes, ~1 minute on 2 cores): every
part runs end to end; what needs CUDA is marked ``not available`` and the
targets are not evaluated (Ray Data runs its GPU pipeline with 0 GPUs).
Exit status: 0 when every part ran and nothing was wrong (targets missed are
reported, not failed), 1 when a part failed or raised, 2 without CUDA outside
``--quick`` (the JSON says why).

Example:
    make gpu-check                                   # -> benchmarks/.data/gpu-check.json
    GPU_CHECK_OUT=/tmp/g.json make gpu-check
    python -m benchmarks.gpu_check --quick --output /tmp/g.json --data-dir /tmp/gpu-check-data
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import machine
from benchmarks.data import FEATURES, ROOT, Workload, ensure, workloads

REPO = Path(__file__).resolve().parent.parent
FORMAT = "batch-infer-gpu-check/1"
TARGET_LIMIT_FRACTION = 0.5  # of min(PCIe, cores x decode)
TARGET_VS_RAY_DATA = 2.0
ROW_BYTES = 4 * len(FEATURES)  # float32 features per row crossing PCIe
SYSTEMS = ("batch-infer", "ray-data-gpu")


@dataclass(frozen=True)
class Sizes:
    """How much each part does; FULL fits 8 minutes on one H100, QUICK ~1 minute on 2 CPU cores."""

    scale: float  # benchmarks.data scale: 1.0 = 32M rows data-bound, 8M compute-bound
    budget_s: float  # parts that would start after this are skipped
    pytest_s: float  # cap on `pytest -m gpu`
    arm_s: float  # cap on one throughput arm
    arm_min_s: float  # an arm is skipped with less time left
    forward_batches: int
    forward_capacity: int  # rows
    decode_rows: int  # rows decoded per pass for the single-core rate
    pytest_paths: tuple[str, ...]


FULL = Sizes(scale=1.0, budget_s=450, pytest_s=180, arm_s=120, arm_min_s=30, forward_batches=120,
             forward_capacity=32_768, decode_rows=4_000_000, pytest_paths=())
QUICK = Sizes(scale=0.005, budget_s=240, pytest_s=90, arm_s=90, arm_min_s=5, forward_batches=20,
              forward_capacity=2_048, decode_rows=100_000, pytest_paths=("tests/test_gpu.py",))


class Recorder:
    """The JSON result, rewritten (atomically) after every step."""

    def __init__(self, path: Path, mode: str, sizes: Sizes) -> None:
        self.path = path
        self.start = time.monotonic()
        self.deadline = self.start + sizes.budget_s
        self.result: dict[str, Any] = {
            "format": FORMAT, "mode": mode, "sizes": asdict(sizes),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "finished": None, "complete": False, "seconds": 0.0, "parts": {}, "limit": None, "targets": {},
        }

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> None:
        self.result["seconds"] = round(time.monotonic() - self.start, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name("." + self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        tmp.replace(self.path)

    def step(self, where: dict[str, Any], key: str, fn: Callable[[], dict[str, Any]], *,
             needs_s: float = 0.0, label: str = "") -> dict[str, Any]:
        """Run ``fn`` into ``where[key]``: its dict with ``status`` and ``seconds``, or the error it raised."""
        left = self.remaining()
        if left < needs_s:
            record: dict[str, Any] = {"status": "skipped",
                                      "reason": f"time budget: {max(0.0, left):.0f} s left, needs ~{needs_s:.0f} s"}
        else:
            where[key] = {"status": "running"}
            self.write()
            started = time.monotonic()
            try:
                record = fn()
                record.setdefault("status", "ok")
            except Exception as exc:  # recorded in the JSON and in the exit status, never dropped
                record = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()[-4000:]}
            record["seconds"] = round(time.monotonic() - started, 2)
        where[key] = record
        self.write()
        extra = str(record.get("error") or record.get("reason") or "")[:300]
        print(f"gpu-check: {label or key}: {record['status']} {extra}".rstrip(), file=sys.stderr, flush=True)
        return record


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.budget is not None:
        sizes = Sizes(**{**asdict(sizes), "budget_s": args.budget})
    rec = Recorder(args.output, "quick" if args.quick else "full", sizes)
    parts = rec.result["parts"]
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout 480 make gpu-check`: record, stop the children, exit
    try:
        env = rec.step(parts, "environment", _environment)
        cuda = bool(env.get("cuda_available"))
        if not cuda and not args.quick:
            env["status"] = "error"
            env["error"] = ("no CUDA device visible to torch (torch %s, built for CUDA %s): run `make gpu-check` on a "
                            "GPU machine with a CUDA build of torch, or `--quick` for the CPU smoke run"
                            % (env.get("torch"), env.get("torch_cuda")))
            rec.write()
            print(json.dumps(rec.result, indent=2, default=str))
            print(f"gpu-check: {env['error']}", file=sys.stderr)
            return 2
        rec.step(parts, "pytest_gpu", lambda: _pytest_gpu(sizes, min(sizes.pytest_s, rec.remaining())),
                 needs_s=30 if not args.quick else 0)
        rec.step(parts, "forward_check", lambda: _forward_check(sizes, cuda))
        jobs = workloads(sizes.scale, args.data_dir)
        chosen = {name: jobs[name] for name in ("data", "compute")}
        rec.step(parts, "data", lambda: _data(chosen))
        measured = rec.step(parts, "machine", lambda: _machine(chosen["data"], sizes, cuda))
        rec.result["limit"] = _limit(measured)
        rec.write()
        _throughput(rec, chosen, sizes, cuda, args.data_dir, quick=args.quick, systems=args.systems)
        rec.result["targets"] = _targets(rec.result, cuda)
        rec.result["complete"] = True
    except KeyboardInterrupt:
        rec.result["interrupted"] = True
        for record in [*parts.values(), *(r for arms in parts.get("throughput", {}).values() for r in arms.values())]:
            if record.get("status") == "running":
                record["status"] = "interrupted"
        rec.write()
        return 130
    finally:
        rec.result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        rec.write()
    print(json.dumps(rec.result, indent=2, default=str))
    _print_summary(rec.result, args.output)
    return 1 if _problems(rec.result) else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke mode: tiny sizes, GPU-only parts marked")
    parser.add_argument("--output", type=Path, default=Path(os.environ.get("GPU_CHECK_OUT") or ROOT / "gpu-check.json"),
                        help="JSON result path (default: $GPU_CHECK_OUT or benchmarks/.data/gpu-check.json)")
    parser.add_argument("--data-dir", type=Path, default=ROOT, help="benchmark data cache (default: benchmarks/.data)")
    parser.add_argument("--systems", type=_systems, default=SYSTEMS,
                        help="comma-separated throughput arms to run: batch-infer, ray-data-gpu (default: both)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which parts not yet started are skipped (default 450; quick 240)")
    return parser.parse_args(argv)


def _systems(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    return names


def _environment() -> dict[str, Any]:
    import pyarrow
    import ray
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "host": platform.node(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "ray": ray.__version__, "pyarrow": pyarrow.__version__,
        "cores": machine.cores(), "cpu_count": os.cpu_count(), "cuda_available": torch.cuda.is_available(),
    }
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpus=torch.cuda.device_count(), gpu=props.name, gpu_memory_bytes=props.total_memory,
                    gpu_capability=f"{props.major}.{props.minor}")
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,pcie.link.gen.current,pcie.link.width.current,memory.total"
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return info


def _pytest_gpu(sizes: Sizes, timeout: float) -> dict[str, Any]:
    """`pytest -m gpu`; per-test outcomes from its JUnit XML."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *sizes.pytest_paths]
        rc, out = _run(cmd, timeout)
        tests = _junit(junit) if junit.exists() else []
    counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "error", "skipped")}
    record: dict[str, Any] = {"command": " ".join(cmd[2:]), "returncode": rc, **counts, "tests": tests,
                              "output_tail": out[-3000:]}
    if rc == "timeout":
        record["status"] = "error"
        record["error"] = f"pytest timed out after {timeout:.0f} s"
    elif rc == 0 and counts["passed"] == 0:
        record["status"] = "not available"
        record["reason"] = "every gpu test skipped (no CUDA)"
    elif rc != 0 or counts["failed"] or counts["error"]:
        record["status"] = "failed"
    return record


def _junit(path: Path) -> list[dict[str, Any]]:
    tests = []
    for case in ET.parse(path).iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or "")[:500]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    return tests


def _forward_check(sizes: Sizes, cuda: bool) -> dict[str, Any]:
    """Forward on CUDA streams vs a float64 reference; on CPU (quick mode) its synchronous path."""
    import torch

    from benchmarks import forward_check
    from workers.device import Forward
    from workers.model import MLP

    device = torch.device("cuda" if cuda else "cpu")
    widths = (64, 32, 1)  # the stream guards do not depend on the model; a small one keeps the reference cheap
    record: dict[str, Any] = {"device": str(device), "widths": list(widths)}
    for seed, precision in enumerate(("fp32", "bf16")):
        layers = forward_check.make_layers(widths, seed=seed)
        forward = Forward(MLP(layers, "sigmoid", "sigmoid", device, precision), widths[0], sizes.forward_capacity,
                          device)
        delays = forward_check.stream_delays(forward, seed=seed) if cuda else None
        record[precision] = forward_check.check(forward, layers, precision, batches=sizes.forward_batches,
                                                capacity=sizes.forward_capacity, seed=seed, before_submit=delays)
    ok = record["fp32"]["ok"] and record["bf16"]["ok"]
    if cuda:
        record["negative_controls"] = forward_check.negative_controls(capacity=sizes.forward_capacity)
        record["controls_detected"] = all(c["detected"] for c in record["negative_controls"].values())
        if not record["controls_detected"]:
            record["warning"] = ("a broken guard went unnoticed: on this machine the check cannot see that race, "
                                 "so a pass says less about it")
        del forward
        torch.cuda.empty_cache()  # the throughput arms run in other processes on the same GPU
    else:
        record["negative_controls"] = "not available: no CUDA (tests/test_device.py covers them with fake streams)"
        record["streams"] = "not available: no CUDA, only the synchronous CPU path ran"
    record["status"] = "ok" if ok else "failed"
    return record


def _data(chosen: dict[str, Workload]) -> dict[str, Any]:
    processes = max(1, min(16, machine.cores()))
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
        for workload in chosen.values():
            ensure(workload, processes=processes)
    return {name: {"rows": w.rows, "files": len(w.files), "input": str(w.input), "model": str(w.model),
                   "bytes": sum(p.stat().st_size for p in w.files)} for name, w in chosen.items()}


def _machine(workload: Workload, sizes: Sizes, cuda: bool) -> dict[str, Any]:
    record: dict[str, Any] = {"cores": machine.cores()}
    decode = machine.decode_rate(workload.files, ["id", *FEATURES], max_rows=sizes.decode_rows)
    record["decode_one_core"] = decode
    if cuda:
        record["pcie"] = machine.h2d_bandwidth()
    else:
        record["pcie"] = {"status": "not available", "reason": "no CUDA"}
    return record


def _limit(measured: dict[str, Any]) -> dict[str, Any] | None:
    """min(PCIe, cores x decode) in rows/s, from whatever the machine part measured."""
    if measured.get("status") != "ok":
        return None
    cores, decode = measured["cores"], measured["decode_one_core"]["rows_per_second"]
    bounds = {"decode_rows_per_second": cores * decode}
    pcie = measured["pcie"].get("h2d_gb_per_s")
    if pcie:
        bounds["pcie_rows_per_second"] = pcie * 1e9 / ROW_BYTES
    basis = min(bounds, key=lambda k: bounds[k])
    return {**{k: round(v) for k, v in bounds.items()}, "rows_per_second": round(bounds[basis]),
            "bound_by": basis.removesuffix("_rows_per_second"), "row_bytes": ROW_BYTES, "cores": cores}


def _arms(cuda: bool, cores: int, quick: bool) -> list[tuple[str, str, dict[str, Any], tuple[str, ...]]]:
    """(system, label, options, workloads), in the order they run: what the targets need first.

    Quick mode runs each arm on one workload only: a fresh Ray per arm costs
    ~10 s on a 2-core machine, and the smoke run only has to show that each works.
    """
    both = ("data", "compute")
    arms: list[tuple[str, str, dict[str, Any], tuple[str, ...]]] = [
        ("batch-infer", "auto-fp32", {}, ("data",) if quick else both),
        ("ray-data-gpu", "fp32", {} if cuda else {"actor_gpus": 0}, ("data",) if quick else both),
        ("batch-infer", "auto-bf16", {"precision": "bf16"}, ("compute",) if quick else both),
    ]
    if cores > 2 and not quick:
        arms.append(("batch-infer", "all-cpus-fp32", {"cpus_per_replica": cores - 1}, both))
    return arms


def _throughput(rec: Recorder, chosen: dict[str, Workload], sizes: Sizes, cuda: bool, root: Path, *,
                quick: bool, systems: tuple[str, ...]) -> None:
    table: dict[str, dict[str, Any]] = {name: {} for name in chosen}
    rec.result["parts"]["throughput"] = table
    try:
        importlib.import_module("ray.data")  # the `bench` extra; `make gpu-check` installs it
        ray_data: str | None = None
    except ImportError as exc:
        ray_data = f"not available: ray[data] is not installed ({exc}); `make gpu-check` installs it"
    limit = rec.result.get("limit") or {}
    for system, label, options, names in _arms(cuda, machine.cores(), quick):
        for name in names:
            workload, key = chosen[name], f"{system} {label}"
            if system not in systems:
                table[name][key] = {"status": "skipped", "reason": "not selected (--systems)"}
                rec.write()
                continue
            if system == "ray-data-gpu" and ray_data:
                table[name][key] = {"status": "not available", "reason": ray_data}
                rec.write()
                continue
            record = rec.step(table[name], key, lambda: _arm(workload, system, options, sizes, rec, root),
                              needs_s=sizes.arm_min_s, label=f"{name} {key}")
            if record["status"] == "ok":
                record["options"] = options
                if not cuda:
                    record["note"] = "no CUDA: ran on the CPU" + (" (0 GPUs)" if system == "ray-data-gpu" else "")
                if limit.get("rows_per_second"):
                    record["fraction_of_limit"] = round(record["rows_per_second"] / limit["rows_per_second"], 3)
                rec.write()


def _arm(workload: Workload, system: str, options: dict[str, Any], sizes: Sizes, rec: Recorder,
         root: Path) -> dict[str, Any]:
    from benchmarks.systems import count_rows

    output = root / "out" / "gpu-check" / workload.name / system
    shutil.rmtree(output, ignore_errors=True)
    sets = dict(options) if system != "batch-infer" else {"progress": False, **options}
    cmd = [sys.executable, "-m", "benchmarks.systems", system, "--model", str(workload.model),
           "--input", str(workload.input), "--output", str(output)]
    cmd += [arg for key, value in sets.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    timeout = min(sizes.arm_s, rec.remaining())
    try:
        rc, out = _run(cmd, timeout)
        if rc == "timeout":
            raise TimeoutError(f"{system} on {workload.name} did not finish in {timeout:.0f} s")
        lines = [line for line in out.splitlines() if line.startswith('{"arm"')]
        if rc != 0 or not lines:
            raise RuntimeError(f"{system} exited {rc}: {out[-2000:]}")
        arm = json.loads(lines[-1])
        rows = count_rows(output)
    finally:
        shutil.rmtree(output, ignore_errors=True)
    if rows != workload.rows:
        raise RuntimeError(f"{system} wrote {rows:,} rows, expected {workload.rows:,}")
    # run_seconds: the run itself (Ray already up); the step's own `seconds` include the process and ray.init
    record: dict[str, Any] = {"rows": rows, "run_seconds": round(arm["seconds"], 3),
                              "rows_per_second": round(rows / arm["seconds"])}
    details = arm.get("details") or {}
    if system == "batch-infer":
        replicas = details.get("replicas") or []
        busy = max((r.get("busy_seconds") or 0.0 for r in replicas), default=0.0)
        record.update(startup_seconds=details.get("startup_seconds"),
                      replica_rows_per_second=round(rows / busy) if busy else None,
                      replicas=[{k: r.get(k) for k in ("device", "gpu_ids", "batch_size", "rows", "busy_seconds",
                                                       "peak_rss_bytes")} for r in replicas])
    else:
        record["config"] = details
    return record


def _targets(result: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """Per workload: batch-infer (defaults, fp32) vs the limit and vs Ray Data on the same GPU."""
    limit = (result.get("limit") or {}).get("rows_per_second")
    targets: dict[str, Any] = {}
    for name, arms in result["parts"].get("throughput", {}).items():
        ours, peer = arms.get("batch-infer auto-fp32", {}), arms.get("ray-data-gpu fp32", {})
        rate = ours.get("rows_per_second") if ours.get("status") == "ok" else None
        peer_rate = peer.get("rows_per_second") if peer.get("status") == "ok" else None
        fraction = round(rate / limit, 3) if rate and limit else None
        ratio = round(rate / peer_rate, 3) if rate and peer_rate else None
        targets[name] = {
            "rows_per_second": rate,
            "fraction_of_limit": {"value": fraction, "target": TARGET_LIMIT_FRACTION,
                                  "met": None if fraction is None or not cuda else fraction >= TARGET_LIMIT_FRACTION},
            "vs_ray_data": {"value": ratio, "target": TARGET_VS_RAY_DATA,
                            "met": None if ratio is None or not cuda else ratio >= TARGET_VS_RAY_DATA},
        }
        if not cuda:
            targets[name]["evaluated"] = "no: no CUDA, the values are CPU smoke numbers"
    return targets


def _problems(result: dict[str, Any]) -> list[str]:
    """Parts (and arms) that failed or raised."""
    found = []
    for name, part in result["parts"].items():
        if name == "throughput":
            found += [f"{name} {w} {a}" for w, arms in part.items() for a, r in arms.items()
                      if r.get("status") in ("failed", "error")]
        elif part.get("status") in ("failed", "error"):
            found.append(name)
    return found


def _print_summary(result: dict[str, Any], path: Path) -> None:
    lines = [f"\ngpu-check ({result['mode']}, {result['seconds']:.0f} s) -> {path}"]
    for name, part in result["parts"].items():
        if name != "throughput":
            note = part.get("error") or part.get("reason") or part.get("warning") or ""
            lines.append(f"  {name:14} {part.get('status')} {str(note)[:200]}".rstrip())
            continue
        for workload, arms in part.items():
            for arm, r in arms.items():
                rate = f"{r['rows_per_second']:>13,} rows/s" if r.get("status") == "ok" else f"{r.get('status'):>20}"
                share = f"  {r['fraction_of_limit']:.2f}x limit" if "fraction_of_limit" in r else ""
                lines.append(f"  {workload:8} {arm:28} {rate}{share}")
    limit = result.get("limit")
    if limit:
        lines.append(f"  limit {limit['rows_per_second']:,} rows/s (bound by {limit['bound_by']})")
    for workload, t in result.get("targets", {}).items():
        for key in ("fraction_of_limit", "vs_ray_data"):
            lines.append(f"  target {workload:8} {key:18} {t[key]['value']} (>= {t[key]['target']}): {t[key]['met']}")
    problems = _problems(result)
    lines.append("  problems: " + (", ".join(problems) if problems else "none"))
    print("\n".join(lines), file=sys.stderr)


def _run(cmd: list[str], timeout: float) -> tuple[int | str, str]:
    """Run ``cmd`` in its own process group from the repository root; (returncode or "timeout", output)."""
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        try:
            rc: int | str = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            _stop_group(process)
            rc = "timeout"
        except BaseException:  # interrupted (Ctrl-C, or SIGTERM from `timeout`): take the child's group along
            _stop_group(process)
            raise
        log.seek(0)
        return rc, log.read()


def _stop_group(process: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL, the process group this check started (the arm and its Ray); nothing else."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)  # start_new_session: the group id is the leader's pid
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            process.poll()  # reap the leader: a zombie still counts as a member of the group
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


if __name__ == "__main__":
    sys.exit(main())
