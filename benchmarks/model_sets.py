"""A model set of 4 data-bound MLPs (64->16->1) in one run, against one model alone and 4 separate runs.

    python -m benchmarks.model_sets --rows 2000000 --repeats 5

Each run is what a replica does, in this process (no Ray): plan the job from
the footers, load the model(s), read, decode and stack every shard, run the
forward pass(es) and write and commit the output; its wall time from plan to
last commit is measured. "4 runs" is the sum of four such runs, one model each;
"set of 4" one run with `model: {m0: ..., m3: ...}`, each batch decoded once and
fed to all four. The arms alternate (one, set, four runs, one, ...) and the
median of `--repeats` is reported, wall and CPU seconds (all threads; the
steadier figure when the machine is shared). `--forward numpy`
runs the models on numpy (the driver lane's fp32 path) instead of torch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MODELS = 4
WIDTHS = (64, 16, 1)


def _make(root: Path, rows: int, files: int) -> tuple[list[Path], Path]:
    import torch
    from torch import nn

    models = []
    for index in range(MODELS):
        torch.manual_seed(index)
        model = nn.Sequential(nn.Linear(WIDTHS[0], WIDTHS[1]), nn.Sigmoid(), nn.Linear(WIDTHS[1], WIDTHS[2]),
                              nn.Sigmoid())
        torch.save(model.state_dict(), root / f"m{index}.pt")
        models.append(root / f"m{index}.pt")
    data = root / "in"
    data.mkdir()
    rng = np.random.default_rng(0)
    per_file = rows // files
    for i in range(files):
        values = rng.standard_normal((WIDTHS[0], per_file), dtype=np.float32)
        table = pa.table({"id": np.arange(i * per_file, (i + 1) * per_file),
                          **{f"f{j:02d}": values[j] for j in range(WIDTHS[0])}})
        pq.write_table(table, data / f"part-{i}.parquet", row_group_size=per_file // 4)
    return models, data


def _run(model: str | dict[str, str], data: Path, out: Path, *, numpy_forward: bool, cpus: float) -> tuple[float, float]:
    """(wall, CPU) seconds of one whole run in this process: plan, load, every shard read, predicted, written,
    committed. The CPU seconds (all threads) are the steadier figure on a shared machine."""
    import pipelines
    from basis.storage import absolute
    from workers.replica import Replica
    from workers.replica_job import ReplicaJob

    shutil.rmtree(out, ignore_errors=True)
    started, cpu = time.perf_counter(), time.process_time()
    plan = pipelines.plan(model=model, input=str(data), output=str(out))
    members = plan.model.members if isinstance(model, dict) else ()
    job = ReplicaJob(model=members[0][1].uri if members else absolute(str(model)), model_sha256=plan.model.sha256,
                     input=absolute(str(data)), output=absolute(str(out)), features=plan.columns.features,
                     passthrough=plan.columns.passthrough, list_column=False, width=WIDTHS[0],
                     prediction_column=plan.config.prediction_column or "", keep_features=False, cpus=cpus,
                     models=tuple((name, spec.uri, spec.sha256) for name, spec in members))
    replica = Replica(0, job, in_driver=True, numpy_forward=numpy_forward)
    rows = sum(replica.process(shard.to_task())["rows_out"] for shard in plan.todo)
    replica.close()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert rows == sum(s.rows_in for s in plan.todo)
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpus", type=float, default=2.0)
    parser.add_argument("--forward", choices=("torch", "numpy"), default="torch")
    args = parser.parse_args()
    numpy_forward = args.forward == "numpy"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models, data = _make(root, args.rows, args.files)
        out = root / "out"
        _run(str(models[0]), data, out, numpy_forward=numpy_forward, cpus=args.cpus)  # warm-up: imports, page cache
        arms: dict[str, list[tuple[float, float]]] = {"one model": [], f"set of {MODELS}": [], f"{MODELS} runs": []}
        for _ in range(args.repeats):
            arms["one model"].append(_run(str(models[0]), data, out, numpy_forward=numpy_forward, cpus=args.cpus))
            arms[f"set of {MODELS}"].append(_run({f"m{i}": str(m) for i, m in enumerate(models)}, data, out,
                                                 numpy_forward=numpy_forward, cpus=args.cpus))
            runs = [_run(str(m), data, out, numpy_forward=numpy_forward, cpus=args.cpus) for m in models]
            arms[f"{MODELS} runs"].append((sum(r[0] for r in runs), sum(r[1] for r in runs)))
            print({name: [round(t, 2) for t in times[-1]] for name, times in arms.items()}, flush=True)
        result: dict[str, object] = {"rows": args.rows, "cpus": args.cpus, "forward": args.forward,
                                     "repeats": args.repeats}
        for which, index in (("wall", 0), ("cpu", 1)):
            median = {name: statistics.median(t[index] for t in times) for name, times in arms.items()}
            result[f"median_{which}_seconds"] = {k: round(v, 3) for k, v in median.items()}
            result[f"{which}_set_vs_one"] = round(median[f"set of {MODELS}"] / median["one model"], 3)
            result[f"{which}_runs_vs_set"] = round(median[f"{MODELS} runs"] / median[f"set of {MODELS}"], 3)
        print(json.dumps(result))

if __name__ == "__main__":
    main()
