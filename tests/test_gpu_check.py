"""`make gpu-check` on a machine without a GPU: its `--quick` smoke mode end to end, and its bookkeeping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from benchmarks import gpu_check


@pytest.mark.timeout(240)
def test_quick_mode_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    """Every part runs or says why not; GPU-only parts are 'not available'; exit 0 (~40 s on 2 cores).

    Ray Data's arm is left out here (~30 s more; `make gpu-check --quick` runs it); CUDA is hidden so
    a GPU machine runs the same CPU smoke run.
    """
    out = tmp_path / "gpu-check.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--quick", "--systems", "batch-infer",
           "--output", str(out), "--data-dir", str(tmp_path / "data")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=220,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result  # the JSON is also printed
    assert result["mode"] == "quick" and result["complete"] and result["finished"]
    parts = result["parts"]
    assert parts["environment"]["status"] == "ok" and parts["environment"]["cuda_available"] is False
    assert parts["pytest_gpu"]["status"] == "not available" and parts["pytest_gpu"]["skipped"] >= 1
    assert parts["forward_check"]["status"] == "ok" and parts["forward_check"]["fp32"]["ok"]
    assert parts["forward_check"]["negative_controls"].startswith("not available")
    assert parts["machine"]["pcie"]["status"] == "not available"
    assert parts["machine"]["decode_one_core"]["rows_per_second"] > 0
    assert result["limit"]["bound_by"] == "decode" and result["limit"]["rows_per_second"] > 0
    throughput = parts["throughput"]
    for workload, arm in (("data", "batch-infer auto-fp32"), ("compute", "batch-infer auto-bf16")):
        record = throughput[workload][arm]
        assert record["status"] == "ok", record
        assert record["rows"] == parts["data"][workload]["rows"] and record["rows_per_second"] > 0
        assert record["replicas"] and record["fraction_of_limit"] > 0
    assert throughput["data"]["ray-data-gpu fp32"]["status"] == "skipped"
    target = result["targets"]["data"]
    assert target["fraction_of_limit"]["value"] > 0 and target["fraction_of_limit"]["met"] is None
    assert target["evaluated"].startswith("no")


def test_a_part_that_raises_is_recorded_and_the_rest_go_on(tmp_path: Path) -> None:
    rec = gpu_check.Recorder(tmp_path / "g.json", "quick", gpu_check.QUICK)
    parts = rec.result["parts"]

    def broken() -> dict[str, object]:
        raise RuntimeError("no luck")

    rec.step(parts, "first", broken)
    rec.step(parts, "second", lambda: {"value": 1})
    rec.deadline = 0.0  # out of time
    rec.step(parts, "third", lambda: {"value": 2}, needs_s=10)
    written = json.loads((tmp_path / "g.json").read_text())["parts"]
    assert written["first"]["status"] == "error" and "RuntimeError: no luck" in written["first"]["error"]
    assert written["second"] == {"value": 1, "status": "ok", "seconds": written["second"]["seconds"]}
    assert written["third"]["status"] == "skipped" and "time budget" in written["third"]["reason"]
    assert gpu_check._problems(rec.result) == ["first"]


def test_limit_is_the_smaller_of_pcie_and_cores_times_decode() -> None:
    measured = {"status": "ok", "cores": 16, "decode_one_core": {"rows_per_second": 5e6},
                "pcie": {"h2d_gb_per_s": 12.8}}
    limit = gpu_check._limit(measured)
    assert limit is not None
    assert limit["pcie_rows_per_second"] == 50_000_000  # 12.8e9 B/s / (4 B x 64 features)
    assert limit["decode_rows_per_second"] == 80_000_000
    assert limit["bound_by"] == "pcie" and limit["rows_per_second"] == 50_000_000
    result = {"limit": limit, "parts": {"throughput": {"data": {
        "batch-infer auto-fp32": {"status": "ok", "rows_per_second": 30_000_000},
        "ray-data-gpu fp32": {"status": "ok", "rows_per_second": 20_000_000},
    }}}}
    target = gpu_check._targets(result, cuda=True)["data"]
    assert target["fraction_of_limit"] == {"value": 0.6, "target": 0.5, "met": True}
    assert target["vs_ray_data"] == {"value": 1.5, "target": 2.0, "met": False}
