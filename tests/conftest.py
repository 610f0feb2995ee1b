"""Shared fixtures: one local Ray per test module, tiny tables and models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# Replicas in tests reserve half a CPU: two fit on a 2-core machine with room for Ray itself.
TEST_REPLICA = {"replicas": 2, "cpus_per_replica": 0.5}


@pytest.fixture(scope="module")
def ray_shared() -> Iterator[None]:
    """One embedded Ray per test module (Ray's `ray_start_regular_shared`)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


def golden_model(path: Path) -> Path:
    """The seed network 2 -> 3 -> 1, no biases, sigmoid after each layer."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 3, bias=False), torch.nn.Sigmoid(),
                                torch.nn.Linear(3, 1, bias=False), torch.nn.Sigmoid())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.8, 0.2], [0.4, 0.9], [0.3, 0.1]]))
        model[2].weight.copy_(torch.tensor([[0.3, 0.5, 0.9]]))
    torch.save(model.state_dict(), path)
    return path


def mlp(sizes: Sequence[int], *, bias: bool = True, seed: int = 0, output: str = "sigmoid") -> torch.nn.Sequential:
    """A deterministic MLP: Linear layers with sigmoid between them."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(n_in, n_out, bias=bias))
        last = i == len(sizes) - 2
        if not last:
            layers.append(torch.nn.Sigmoid())
        elif output == "sigmoid":
            layers.append(torch.nn.Sigmoid())
        elif output == "softmax":
            layers.append(torch.nn.Softmax(dim=-1))
    return torch.nn.Sequential(*layers)


def save_mlp(path: Path, sizes: Sequence[int], **kwargs: object) -> torch.nn.Sequential:
    model = mlp(sizes, **kwargs)  # type: ignore[arg-type]
    torch.save(model.state_dict(), path)
    return model


def reference(model: torch.nn.Sequential, features: np.ndarray) -> np.ndarray:
    """A plain torch forward: (rows, k) float32."""
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).numpy()


def feature_table(ids: np.ndarray, features: int, seed: int) -> pa.Table:
    """id (int64), name (string), f00.. (float32)."""
    rng = np.random.default_rng(seed)
    columns: dict[str, pa.Array] = {"id": pa.array(ids.astype(np.int64)),
                                    "name": pa.array([f"row-{i}" for i in ids], pa.string())}
    values = rng.standard_normal((len(ids), features)).astype(np.float32)
    for j in range(features):
        columns[f"f{j:02d}"] = pa.array(values[:, j])
    return pa.table(columns)


def write_files(root: Path, rows_per_file: Sequence[int], features: int, *, row_group_size: int,
                seed: int = 0, start: int = 0) -> list[Path]:
    """Several Parquet files with consecutive ids; returns their paths in order."""
    root.mkdir(parents=True, exist_ok=True)
    paths, next_id = [], start
    for i, rows in enumerate(rows_per_file):
        table = feature_table(np.arange(next_id, next_id + rows), features, seed + i)
        path = root / f"part-{i:04d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
        next_id += rows
    return paths


def read_output(root: Path) -> pa.Table:
    """Every output file, sorted by path, skipping `_`/`.` names (as pyarrow datasets do)."""
    files = sorted(p for p in root.rglob("*.parquet")
                   if not any(part.startswith(("_", ".")) for part in p.relative_to(root).parts))
    return pa.concat_tables([pq.read_table(p) for p in files]) if files else pa.table({})


def output_files(root: Path) -> dict[str, float]:
    """Relative path -> mtime of every file under root (to prove a rerun wrote nothing)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run `python -m pipelines ...` the way a user runs `batch-infer ...`."""
    return subprocess.run([sys.executable, "-m", "pipelines", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)


def lane_children(parent: int) -> list[int]:
    """The driver lane's child replica processes (`workers.lane_child`) of the process `parent`, alive."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"workers.lane_child" in (entry / "cmdline").read_bytes():
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group a test started (a `ray start` and the daemons it started share it),
    then SIGKILL what is left. Never anything else: no `ray stop`, no kill by name.

    A `ray start --head --block` given SIGTERM takes ~20 s to wind its GCS and monitor down (measured
    here, Ray 2.60); nothing a test checks needs that, so it gets 3 s before SIGKILL."""
    group = process.pid  # start_new_session: the group id is the leader's pid
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            process.poll()  # reap the leader: a zombie still answers killpg(group, 0)
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                process.wait(timeout=5)
                return
            time.sleep(0.2)


def fake_autoscaler_config(address: str, worker_types: dict[str, Any]) -> dict[str, Any]:
    """An autoscaling config for Ray's `fake_multinode` provider: a head of 0 CPUs and `worker_types`,
    at most 3 workers, scaled up at once and down after 6 s idle (nodes are processes on this machine)."""
    return {
        "cluster_name": "fake-gpus",
        "max_workers": 3,
        "upscaling_speed": 10.0,
        "idle_timeout_minutes": 0.1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": address},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                                 **worker_types},
        "head_node_type": "ray.head.default",
        **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                               "setup_commands", "head_setup_commands", "worker_setup_commands",
                               "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }
