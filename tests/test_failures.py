"""A replica process killed mid-run costs only the shards it held: they are retried elsewhere."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import TEST_REPLICA, read_output, save_mlp, write_files

import pipelines
from pipelines.commit import MANIFEST, SUCCESS

pytestmark = pytest.mark.usefixtures("ray_shared")


def _busy_replica_pids() -> list[int]:
    """Replica processes running a shard right now (Ray titles them `ray::Replica.process`),
    descended from this test process (the Ray it started), nothing else."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if not handle.read().startswith(b"ray::Replica.process"):
                    continue
        except OSError:
            continue
        pid = int(entry)
        while pid > 1:
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    pid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                break
            if pid == me:
                found.append(int(entry))
                break
    return found


def test_killed_replica_shards_are_retried(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [5000] * 8, features=16, row_group_size=500)
    save_mlp(tmp_path / "m.pt", [16, 256, 256, 1])
    out = tmp_path / "out"
    result: dict[str, object] = {}

    def job() -> None:
        result["report"] = pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(out),
                                         shard_rows=500, batch_size=100, progress=False, **TEST_REPLICA)

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 120
    killed = None
    while thread.is_alive() and time.monotonic() < deadline:
        pids = _busy_replica_pids()
        if pids and len(list(out.glob("*.parquet"))) >= 2:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed is not None, "the job ended before a replica could be killed; make it longer"
    report = result["report"]
    assert isinstance(report, pipelines.RunReport)
    assert report.status == "succeeded" and report.rows_out == 40_000 and (out / SUCCESS).exists()
    assert read_output(out)["id"].to_pylist() == list(range(40_000))  # every row exactly once, in order
    manifest = json.loads((out / MANIFEST).read_text())
    assert max(s["attempts"] for s in manifest["shards"]) >= 2  # the shards the dead replica held ran again
    assert all(s["status"] == "committed" for s in manifest["shards"])
