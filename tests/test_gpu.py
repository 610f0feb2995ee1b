"""GPU path: replicas pinned with num_gpus, predictions equal to the CPU result. Skipped without CUDA."""

from __future__ import annotations

import functools
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


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_forward_on_cuda_streams_matches_plain_torch(precision: str) -> None:
    """Many batches through the real copy and compute streams, each delayed at random (issue 8)."""
    from benchmarks import forward_check
    from workers.device import Forward
    from workers.model import MLP

    cuda = torch.device("cuda")
    widths = (64, 32, 1)
    layers = forward_check.make_layers(widths, seed=2)
    forward = Forward(MLP(layers, "sigmoid", "sigmoid", cuda, precision), widths[0], 16_384, cuda)
    result = forward_check.check(forward, layers, precision, batches=80, capacity=16_384, seed=2,
                                 before_submit=forward_check.stream_delays(forward, seed=2))
    assert result["ok"], result


def test_an_upload_is_not_reused_while_the_compute_stream_may_read_it() -> None:
    """`record_stream`: once the forward is queued and the upload dropped, the next upload gets other memory.

    Control first: a block freed on the copy stream without the mark is handed out again at once.
    """
    from workers.device import CudaStreams

    cuda = torch.device("cuda")
    host = torch.ones(1 << 20, dtype=torch.float32, pin_memory=True)  # 4 MiB
    total = torch.zeros((), device=cuda)  # before the streams: their constructor waits for this
    streams = CudaStreams(cuda)
    with torch.cuda.stream(streams.copy):
        unmarked = torch.empty(host.shape, dtype=host.dtype, device=cuda)
        pointer = unmarked.data_ptr()
        del unmarked
        again = torch.empty(host.shape, dtype=host.dtype, device=cuda)
    if again.data_ptr() != pointer:
        pytest.skip("the caching allocator did not reuse a freed block at once; nothing to compare")
    del again
    with torch.cuda.stream(streams.compute_stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s: the forward below cannot have run yet
    features, uploaded = streams.upload(host)
    pointer = features.data_ptr()

    def accumulate(x: torch.Tensor) -> None:
        total.add_(x.sum())  # on the compute stream, after the upload's event

    work = functools.partial(accumulate, features)
    streams.compute(work, uploaded)
    del work, features  # the forward's last reference: freed now, in use on the compute stream
    with torch.cuda.stream(streams.copy):
        next_upload = torch.empty(host.shape, dtype=host.dtype, device=cuda)
    assert next_upload.data_ptr() != pointer
    torch.cuda.synchronize()
    assert total.item() == host.numel()
