"""GPU path: replicas pinned with num_gpus, predictions equal to the CPU result. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_output, save_mlp, write_files

import pipelines

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.parametrize("precision, rtol", [("fp32", 1e-5), ("tf32", 5e-3), ("bf16", 3e-2), ("fp16", 5e-3)])
def test_gpu_matches_cpu(tmp_path: Path, ray_gpu: None, precision: str, rtol: float) -> None:
    write_files(tmp_path / "in", [20_000, 7_000], features=16, row_group_size=4096)
    save_mlp(tmp_path / "m.pt", [16, 64, 1], seed=4)
    job = {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "progress": False}
    gpu = pipelines.run(**job, output=str(tmp_path / "gpu"), gpus_per_replica=1, replicas=1, precision=precision)
    cpu = pipelines.run(**job, output=str(tmp_path / "cpu"), gpus_per_replica=0, replicas=1, cpus_per_replica=1)
    assert gpu.succeeded and cpu.succeeded
    assert gpu.replicas[0]["device"].startswith("cuda") and gpu.replicas[0]["gpu_ids"]
    a, b = read_output(tmp_path / "gpu"), read_output(tmp_path / "cpu")
    assert a["id"].equals(b["id"])
    np.testing.assert_allclose(a["prediction"].to_numpy(), b["prediction"].to_numpy(), rtol=rtol, atol=1e-3)
