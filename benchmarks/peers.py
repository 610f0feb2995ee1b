"""Daft as a peer: its own venv (created on demand) and ``benchmarks/daft_job.py`` run in it.

Daft 0.7.26 pins pyarrow 25 while the project runs pyarrow 26, so Daft gets a
venv of its own under the benchmark data dir, built the first time it is needed
and reused while its marker matches ``DAFT_REQUIREMENTS``:

    benchmarks/.data/daft-venv/            python -m venv + pip install DAFT_REQUIREMENTS
    benchmarks/.data/daft-venv.log         pip's output of the last build

torch is pinned to the exact version of the project's constraints: that
version resolves to the local CPU wheel, where a looser spec pulls a multi-GB
CUDA build.

Example:
    python = daft_python()          # raises PeerUnavailable (with pip's tail) if it cannot be built
    run_daft(model, input, output, python=python, options={"torch_threads": 2})
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

from benchmarks.data import ROOT

DAFT_VERSION = "0.7.26"
DAFT_REQUIREMENTS = (f"daft=={DAFT_VERSION}", "torch==2.13.0", "numpy==2.4.6")
DAFT_VENV = ROOT / "daft-venv"
DAFT_JOB = Path(__file__).resolve().parent / "daft_job.py"
_MARKER = ".complete.json"  # written last: the requirements installed, build seconds, size


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (its venv could not be built); the message says why."""


def daft_python(*, build: bool = True) -> Path:
    """The Daft venv's interpreter, building the venv first if needed (~1-2 min, once).

    Raises:
        PeerUnavailable: the venv is missing and ``build`` is false, or pip failed
            (its output is in ``benchmarks/.data/daft-venv.log``).
    """
    python = DAFT_VENV / "bin" / "python"
    marker = DAFT_VENV / _MARKER
    if marker.exists() and json.loads(marker.read_text()).get("requirements") == list(DAFT_REQUIREMENTS):
        return python
    if not build:
        raise PeerUnavailable(f"no Daft venv at {DAFT_VENV} (run the benchmark with --daft to build it)")
    shutil.rmtree(DAFT_VENV, ignore_errors=True)  # a half-built or outdated venv
    log_path = DAFT_VENV.with_name(DAFT_VENV.name + ".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the Daft venv in {DAFT_VENV} ({' '.join(DAFT_REQUIREMENTS)}; once)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        steps = [
            [sys.executable, "-m", "venv", str(DAFT_VENV)],
            [str(python), "-m", "pip", "install", "--no-input", *DAFT_REQUIREMENTS],
        ]
        for cmd in steps:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode != 0:
                shutil.rmtree(DAFT_VENV, ignore_errors=True)
                tail = "".join(log_path.read_text().splitlines(keepends=True)[-5:]) if log_path.exists() else ""
                raise PeerUnavailable(f"could not build the Daft venv (see {log_path}):\n{tail}")
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in DAFT_VENV.rglob("*") if p.is_file() and not p.is_symlink())
    marker.write_text(json.dumps({"requirements": list(DAFT_REQUIREMENTS), "seconds": seconds, "bytes": size}))
    print(f"Daft venv built in {seconds:.0f} s, {size / 2**20:,.0f} MiB", file=sys.stderr, flush=True)
    return python


def venv_info() -> dict[str, Any]:
    """The marker of the built venv: requirements, build seconds, bytes ({} if none)."""
    marker = DAFT_VENV / _MARKER
    return json.loads(marker.read_text()) if marker.exists() else {}


def run_daft(
    model: Path, input: Path, output: Path, *, python: Path, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``daft_job.py`` in its venv, one process per run; returns its JSON line.

    The process's whole wall time is ``process_seconds``; ``seconds`` (from the
    job) excludes the interpreter and ``import daft``, as the Ray-based arms'
    in-process times exclude ``ray.init``.
    """
    sets = [arg for key, value in (options or {}).items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    cmd = [str(python), str(DAFT_JOB), "--model", str(model), "--input", str(input), "--output", str(output), *sets]
    output.parent.mkdir(parents=True, exist_ok=True)
    log_path = output.with_name(output.name + ".log")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VIRTUAL_ENV", "PYTHONHOME")}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    lines = done.stdout.strip().splitlines()
    # Daft 0.x may abort in interpreter shutdown (seen here: "PyGILState_Release ... runtime state:
    # finalizing", exit -6) after the job printed its result: the run itself was whole, so it counts.
    finished = bool(lines) and "runtime state: finalizing" in log_path.read_text()
    if done.returncode != 0 and not finished:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}; stderr in {log_path}:\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["process_seconds"] = wall
    if done.returncode != 0:
        result["exit_at_shutdown"] = done.returncode
        print(f"daft: exited {done.returncode} in interpreter shutdown after its result (kept; {log_path})",
              file=sys.stderr, flush=True)
    return result


# Daft's "best config": each candidate runs once per workload before the timed
# repetitions and the fastest (in-process seconds) is kept. One UDF instance with
# one torch thread is what Daft picks by itself; the others give the forward both
# cores (two threads, or two instances) or feed it bigger batches.
DAFT_CANDIDATES: dict[str, dict[str, Any]] = {
    "default": {},
    "torch_threads=2": {"torch_threads": 2},
    "max_concurrency=2": {"max_concurrency": 2},
    "batch_size=262144,torch_threads=2": {"batch_size": 262_144, "torch_threads": 2},
}


def tune_daft(
    model: Path, input: Path, output: Path, *, python: Path, candidates: dict[str, dict[str, Any]] = DAFT_CANDIDATES
) -> tuple[str, dict[str, float]]:
    """Run every candidate once into ``output``; return the fastest's name and every candidate's seconds."""
    tried = {}
    for name, options in candidates.items():
        shutil.rmtree(output, ignore_errors=True)
        tried[name] = run_daft(model, input, output, python=python, options=options)["seconds"]
        print(f"daft tuning {input.name:8} {name:36} {tried[name]:8.2f} s", file=sys.stderr, flush=True)
    shutil.rmtree(output, ignore_errors=True)
    return min(tried, key=tried.__getitem__), tried
