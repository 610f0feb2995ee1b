"""The compute-bound MLP (64-256-256-1, sigmoid) as a `.pt2` program against its state_dict, in process.

    python -m benchmarks.pt2 --rows 2000000 --repeats 3

Shards are run one after another on a `Replica` in this process (what the
driver lane does, without its one-shard row limit), so the figures are decode
+ forward + write of the same files, with no Ray. Three ways of running the
same weights: the state_dict on torch (`workers.device.Forward` over `MLP`),
the state_dict on numpy (the driver lane's fp32 path) and the `.pt2` program
on torch (`Forward` over `Program`). Runs are interleaved and the best of
`--repeats` is reported (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _make(root: Path, rows: int, files: int) -> tuple[Path, Path, Path]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Sigmoid(), nn.Linear(256, 256), nn.Sigmoid(), nn.Linear(256, 1),
                          nn.Sigmoid()).eval()
    torch.save(model.state_dict(), root / "mlp.pt")
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(8, 64),), dynamic_shapes={"input": {0: batch}})
    torch.export.save(program, root / "mlp.pt2")
    data = root / "in"
    data.mkdir()
    rng = np.random.default_rng(0)
    per_file = rows // files
    for i in range(files):
        values = rng.standard_normal((64, per_file), dtype=np.float32)
        table = pa.table({"id": np.arange(i * per_file, (i + 1) * per_file), **{f"f{j:02d}": values[j] for j in range(64)}})
        pq.write_table(table, data / f"part-{i}.parquet", row_group_size=per_file // 8)
    return root / "mlp.pt", root / "mlp.pt2", data


def _run(model: Path, data: Path, out: Path, *, numpy_forward: bool, cpus: float) -> float:
    """Rows per second of every shard of `data`, run in this process."""
    import pipelines
    from basis.storage import absolute
    from workers.replica import Replica
    from workers.replica_job import ReplicaJob

    shutil.rmtree(out, ignore_errors=True)
    plan = pipelines.plan(model=str(model), input=str(data), output=str(out))
    job = ReplicaJob(model=absolute(str(model)), model_sha256=plan.model.sha256, input=absolute(str(data)),
                     output=absolute(str(out)), features=plan.columns.features, passthrough=plan.columns.passthrough,
                     list_column=False, width=64, prediction_column="prediction", keep_features=False, cpus=cpus)
    replica = Replica(0, job, in_driver=True, numpy_forward=numpy_forward)
    replica.forward  # noqa: B018 - loaded before the clock starts (a run's start-up is not the point here)
    started = time.perf_counter()
    rows = sum(replica.process(shard.to_task())["rows_out"] for shard in plan.todo)
    seconds = time.perf_counter() - started
    replica.close()
    return rows / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        state_dict, program, data = _make(root, args.rows, args.files)
        ways = {"state_dict (torch)": (state_dict, False), "pt2 program (torch)": (program, False),
                "state_dict (numpy, driver lane)": (state_dict, True)}
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, (model, numpy_forward) in ways.items():
                rate = _run(model, data, root / "out", numpy_forward=numpy_forward, cpus=args.cpus)
                best[name] = max(best.get(name, 0.0), rate)
                print(f"{name}: {rate:,.0f} rows/s", flush=True)
        print(json.dumps({"rows": args.rows, "cpus": args.cpus, "best_rows_per_s": best,
                          "pt2_vs_state_dict_torch": best["pt2 program (torch)"] / best["state_dict (torch)"]}))


if __name__ == "__main__":
    main()
