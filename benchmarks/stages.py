"""Where a replica's single-core seconds go: ``python -m benchmarks.stages``.

Runs the replica's own stages on one thread over the first file of a workload
(the same calls `Replica.process` makes, each timed on its own), then the
whole `Replica.process` of that file with `cpus_per_replica: 1` in this
process, each twice (the first pass warms the allocator and the caches; the
second is timed), and prints seconds per million rows:

- ``decode``: Parquet pages of the id and feature columns to Arrow (`iter_batches`);
- ``stack``: feature columns copied into the (features, rows) float32 buffer and
  checked for invalid rows in the same pass (`stack_checked`: each column added into
  a per-row sum right after its copy);
- ``forward``: the MLP in cache-sized chunks (`Forward.submit`, torch on one thread);
- ``write``: id + prediction encoded, snappy-compressed, hashed and written (`ShardWriter`);
- ``process``: the whole shard through `Replica.process` (one thread for
  decoding and torch; the overhead is ``process`` minus the stages' sum).

``decode + forward + write`` is the work no system can skip (the issue's
``limit``, per core); ``stack`` (with the check) is batch-infer's own, and the
gap between the stages' sum and ``process`` is the cost of the loop itself.

Example:
    python -m benchmarks.stages --workload data --scale 0.25
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from typing import Any

import numpy as np
import pyarrow as pa

from benchmarks.data import OUT, ensure, workloads


def profile(workload: str = "data", scale: float = 0.25) -> dict[str, Any]:
    """Seconds per million rows of each stage, single-threaded, on the workload's first file."""
    import torch

    from pipelines.config import JobConfig
    from pipelines.prepare import prepare
    from basis.storage import resolve
    from workers.device import Forward
    from workers.model import MLP, read_model
    from workers.reader import iter_batches, open_parquet
    from workers.stacking import stack_checked
    from workers.replica import Replica
    from workers.replica_job import ReplicaJob, default_batch_size
    from workers.writer import ShardWriter, output_schema, prediction_array, prediction_type

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    torch.set_num_threads(1)
    chosen = ensure(workloads(scale)[workload])
    out = OUT / "stages"
    shutil.rmtree(out, ignore_errors=True)
    plan = prepare(JobConfig.from_dict({"model": str(chosen.model), "input": str(chosen.input), "output": str(out),
                                         "cpus_per_replica": 1}))
    first = plan.shards[0].input
    shards = [s for s in plan.shards if s.input == first]
    rows = sum(s.rows_in for s in shards)
    features, columns = list(plan.columns.features), ["id", *plan.columns.features]
    width = len(features)
    batch_size = default_batch_size(width, on_gpu=False)
    _, _, layers = read_model(str(chosen.model))
    forward = Forward(MLP(layers, "sigmoid", "sigmoid", torch.device("cpu"), "fp32"), width, batch_size,
                      torch.device("cpu"))
    source = resolve(str(chosen.input))
    parquet = open_parquet(source, shards[0].to_task()["path"], first)
    groups = (0, parquet.metadata.num_row_groups)
    seconds = dict.fromkeys(("decode", "stack", "forward", "write"), 0.0)
    buffer = np.empty((width, batch_size), dtype=np.float32)
    prediction = pa.field("prediction", prediction_type(forward.outputs))
    schema = output_schema(parquet.schema_arrow, ["id"], [prediction])
    target = resolve(str(out))
    for _pass in ("warm-up", "timed"):  # a warm-up pass first (allocator, page cache, CPU caches); the second counts
        seconds = dict.fromkeys(seconds, 0.0)
        with ShardWriter(target, target.join("stages.parquet"), schema) as writer:
            batches = iter_batches(parquet, groups, columns, batch_size, first)
            while True:
                started = time.perf_counter()
                batch = next(batches, None)
                seconds["decode"] += time.perf_counter() - started
                if batch is None:
                    break
                started = time.perf_counter()
                matrix, _ = stack_checked(batch.data, features, False, width, buffer[:, : batch.data.num_rows])
                seconds["stack"] += time.perf_counter() - started
                started = time.perf_counter()
                result = forward.submit(matrix)()
                seconds["forward"] += time.perf_counter() - started
                started = time.perf_counter()
                writer.write(pa.RecordBatch.from_arrays([batch.data.column("id"), prediction_array(result)],
                                                        schema=schema))
                seconds["write"] += time.perf_counter() - started
                del batch, matrix, result
            started = time.perf_counter()
            writer.finish()
            seconds["write"] += time.perf_counter() - started
    job = ReplicaJob(model=str(chosen.model), model_sha256=plan.model.sha256, input=str(chosen.input),
                     output=str(out), features=plan.columns.features, passthrough=plan.columns.passthrough,
                     list_column=False, width=width, prediction_column="prediction", keep_features=False, cpus=1,
                     generation=1)
    replica = Replica(0, job, in_driver=True)
    replica.forward  # the model loaded: not part of the shard's time
    for _pass in ("warm-up", "timed"):
        started = time.perf_counter()
        for shard in shards:
            replica.process(shard.to_task())
        seconds["process"] = time.perf_counter() - started
    per_million = {stage: round(value / rows * 1e6, 3) for stage, value in seconds.items()}
    unskippable = per_million["decode"] + per_million["forward"] + per_million["write"]
    stages = sum(per_million[s] for s in ("decode", "stack", "forward", "write"))
    return {"workload": workload, "file": first, "rows": rows, "seconds_per_million_rows": per_million,
            "unskippable": round(unskippable, 3), "stages_sum": round(stages, 3),
            "loop_overhead": round(per_million["process"] - stages, 3),
            "process_vs_unskippable": round(unskippable / per_million["process"], 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stages", description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="data", choices=("data", "compute"))
    parser.add_argument("--scale", type=float, default=0.25, help="row-count factor of the workload's files")
    args = parser.parse_args(argv)
    result = profile(args.workload, args.scale)
    print(f"{result['workload']}: {result['rows']:,} rows of {result['file']}, one thread, s per million rows")
    for stage, value in result["seconds_per_million_rows"].items():
        print(f"  {stage:8s} {value:8.3f}")
    print(f"  unskippable (decode + forward + write) {result['unskippable']:.3f}; the stages {result['stages_sum']:.3f}; "
          f"loop overhead {result['loop_overhead']:.3f}; process reaches {result['process_vs_unskippable']:.2f}x "
          f"of the unskippable rate")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
