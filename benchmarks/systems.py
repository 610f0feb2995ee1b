"""The arms of the benchmark, each ``fn(model, input_dir, output_dir)``.

- ``batch-infer``: ``pipelines.run`` on the Ray connection already open.
- ``ray-data``: ``read_parquet -> map_batches(actor pool) -> write_parquet``,
  in the best configuration found for a 2-core machine (see README.md).
- ``ray-data-gpu`` (``make gpu-check`` only): the same pipeline with one GPU actor.
- ``floor``: one process, no Ray: ``iter_batches`` -> (features, rows) buffer
  -> torch forward on every core -> ``ParquetWriter``. Nothing can beat it by
  much on one machine; it bounds what the other two may hope for.

Ray Data and the floor share ``_load_layers`` / ``_forward``, so they differ
only in how work is orchestrated. Run one arm as its own process (whole-process
timing, tuning) with ``python -m benchmarks.systems ARM --model M --input DIR --output DIR``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.data import FEATURES

OUTPUT_SCHEMA = pa.schema([("id", pa.int64()), ("prediction", pa.float32())])


@dataclass(frozen=True)
class RayDataConfig:
    """Ray Data knobs; the defaults are the fastest setting found on the 2-CPU dev box.

    Logical CPUs must leave one whole CPU free: Ray Data's ``ListFiles`` step
    asks for ``num_cpus=1`` whatever ``read_parquet(num_cpus=...)`` says, so two
    1-CPU actors (or 2 x 0.75) on 2 CPUs wait forever. See README.md.
    """

    actors: int = 1
    actor_cpus: float = 1.0
    torch_threads: int = 2
    batch_size: int | None = None  # None: one batch per block, no re-batching copies
    batch_format: str = "pyarrow"  # or "numpy" (~10-20% slower here)
    read_cpus: float = 1.0
    write_cpus: float = 1.0


def _load_layers(model: Path) -> list[tuple[Any, Any]]:
    """[(weight (out, in), bias (out,) or None)] in state-dict order, loaded without pickle code."""
    import torch

    state = torch.load(model, map_location="cpu", weights_only=True)
    weights = [k for k in state if k.endswith("weight")]
    return [(state[k], state.get(k[: -len("weight")] + "bias")) for k in weights]


class _Stacker:
    """Copies feature columns into one reused (features, rows) float32 buffer.

    Reusing the buffer matters: a fresh 64 MiB array per batch is a fresh mmap,
    and its page faults cost as much as the copy itself.
    """

    def __init__(self) -> None:
        self.buf = np.empty((len(FEATURES), 0), dtype=np.float32)

    def __call__(self, columns: Any) -> np.ndarray:  # a RecordBatch, Table or dict of arrays
        rows = len(columns[FEATURES[0]])
        if self.buf.shape[1] < rows:
            self.buf = np.empty((len(FEATURES), rows), dtype=np.float32)
        x = self.buf[:, :rows]
        for i, name in enumerate(FEATURES):
            x[i] = np.asarray(columns[name])
        return x


def _forward(layers: list[tuple[Any, Any]], x: np.ndarray) -> np.ndarray:
    """Sigmoid MLP on a (features, rows) buffer; returns (rows,) float32.

    Rows go through in chunks whose widest activation is ~4 MiB, so it stays in
    cache: on the 2-core dev box that is 2.4x faster than whole 256k-row
    batches for 64-256-256-1 and ~1.3x for 64-16-1.
    """
    import torch

    widest = max(weight.shape[0] for weight, _ in layers)
    chunk = min(65_536, max(1_024, 4 * 2**20 // (4 * widest)))  # rows
    out = np.empty(x.shape[1], dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, x.shape[1], chunk):
            h = torch.from_numpy(x[:, start : start + chunk])  # strided view, no copy
            for weight, bias in layers:  # (out, in) @ (in, rows) -> (out, rows)
                h = torch.addmm(bias[:, None], weight, h) if bias is not None else weight @ h
                h.sigmoid_()
            out[start : start + chunk] = h[0].numpy()
    return out


def run_batch_infer(model: Path, input: Path, output: Path, **options: Any) -> dict[str, Any]:
    """The product, in-process; ``options`` are extra config keys (``replicas=2``).

    Its shard timeline (``--timeline``) is kept beside the output and split into
    start-up and steady state (``summary.steady_state``): the details' ``steady``.
    """
    import pipelines

    from benchmarks.summary import steady_state

    timeline = output.with_name(output.name + ".timeline.json")
    report = pipelines.run(model=str(model), input=str(input), output=str(output), overwrite=True,
                           timeline=str(timeline), **options)
    events = json.loads(timeline.read_text())["traceEvents"]
    spans = [{"replica": e["tid"], "start": e["ts"] / 1e6, "end": (e["ts"] + e["dur"]) / 1e6,
              "rows": e["args"]["rows_in"]} for e in events if e["ph"] == "X"]
    return {**report.to_dict(), "steady": steady_state(spans, report.seconds)}


def run_floor(model: Path, input: Path, output: Path, *, batch_size: int = 262_144) -> dict[str, Any]:
    """A plain single-process loop: the speed a hand-written script gets on this machine."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    layers, stack = _load_layers(model), _Stacker()
    output.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in input.glob("*.parquet") if not p.name.startswith((".", "_"))):
        with pq.ParquetWriter(output / path.name, OUTPUT_SCHEMA) as writer:
            for batch in pq.ParquetFile(path).iter_batches(batch_size, columns=["id", *FEATURES]):
                prediction = _forward(layers, stack(batch))
                writer.write_batch(pa.record_batch([batch.column("id"), pa.array(prediction)], OUTPUT_SCHEMA))
    return {}


class _Predictor:
    """Ray Data callable class: one model per actor, loaded once."""

    def __init__(self, model: Path, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.layers, self.stack = _load_layers(model), _Stacker()

    def __call__(self, batch: Any) -> Any:
        prediction = _forward(self.layers, self.stack(batch))
        if isinstance(batch, pa.Table):
            return pa.table({"id": batch.column("id"), "prediction": prediction})
        return {"id": batch["id"], "prediction": prediction}


def run_ray_data(model: Path, input: Path, output: Path, config: RayDataConfig = RayDataConfig()) -> dict[str, Any]:
    """Ray Data's idiomatic batch inference; needs ``ray.init`` first (and ray[data])."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ds = ray.data.read_parquet(str(input), num_cpus=config.read_cpus)  # files hold id + features only
    ds = ds.map_batches(
        _Predictor,
        fn_constructor_args=(model, config.torch_threads),
        batch_size=config.batch_size,
        batch_format=config.batch_format,
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=config.actor_cpus,
    )
    ds.write_parquet(str(output), ray_remote_args={"num_cpus": config.write_cpus})
    return asdict(config)


@dataclass(frozen=True)
class GpuRayDataConfig:
    """Ray Data on GPUs (``make gpu-check``): one actor per GPU, read and write tasks on the other CPUs.

    The pool holds every GPU; each actor also reserves ``actor_cpus`` for its
    stacking and copies. ``batch_size=None`` hands the actor whole blocks (~128 MiB).
    """

    actors: int = 1
    actor_gpus: float = 1.0
    actor_cpus: float = 1.0
    batch_size: int | None = None
    read_cpus: float = 1.0
    write_cpus: float = 1.0
    precision: str = "fp32"


class _GpuPredictor:
    """Ray Data callable class on one GPU: features stacked on the CPU, one copy to the device per batch."""

    def __init__(self, model: Path, precision: str) -> None:
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
                      "fp16": torch.float16}[precision]
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        self.layers = [(w.to(self.device, self.dtype), None if b is None else b.to(self.device, self.dtype)[:, None])
                       for w, b in _load_layers(model)]
        self.stack = _Stacker()

    def __call__(self, batch: Any) -> Any:
        import torch

        with torch.inference_mode():
            h = torch.from_numpy(self.stack(batch)).to(self.device, self.dtype)  # (features, rows)
            for weight, bias in self.layers:
                h = torch.addmm(bias, weight, h) if bias is not None else weight @ h
                h.sigmoid_()
            prediction = h[0].float().cpu().numpy()  # waits for the device
        if isinstance(batch, pa.Table):
            return pa.table({"id": batch.column("id"), "prediction": prediction})
        return {"id": batch["id"], "prediction": prediction}


def run_ray_data_gpu(model: Path, input: Path, output: Path,
                     config: GpuRayDataConfig = GpuRayDataConfig()) -> dict[str, Any]:
    """Ray Data batch inference with a GPU actor pool; needs ``ray.init`` first (and ray[data])."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ds = ray.data.read_parquet(str(input), num_cpus=config.read_cpus)
    ds = ds.map_batches(
        _GpuPredictor,
        fn_constructor_args=(model, config.precision),
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_gpus=config.actor_gpus,
        num_cpus=config.actor_cpus,
    )
    ds.write_parquet(str(output), ray_remote_args={"num_cpus": config.write_cpus})
    return asdict(config)


def output_files(output: Path) -> list[Path]:
    """Committed Parquet files under ``output``: no part of the path starts with ``.`` or ``_``."""
    if not output.exists():
        return []
    files = output.rglob("*.parquet")
    return [p for p in files if not any(part.startswith((".", "_")) for part in p.relative_to(output).parts)]


def count_rows(output: Path) -> int:
    """Rows in the committed Parquet files under ``output`` (footers only)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in output_files(output))


def check_ids(output: Path, rows: int, system: str) -> None:
    """Every input id exactly once in the output: the inputs hold ids 0..rows-1 (``data.py``).

    Checks the count, min, max and sum of the ``id`` column (cheap; not a full
    permutation proof, but no dropped, duplicated or shifted rows get past it).
    """
    import pyarrow.compute as pc

    count, low, high, total = 0, None, None, 0
    for path in output_files(output):
        ids = pq.read_table(path, columns=["id"]).column("id")
        if len(ids) == 0:
            continue
        bounds = pc.min_max(ids).as_py()
        count += len(ids)
        total += pc.sum(ids).as_py()
        low = bounds["min"] if low is None else min(low, bounds["min"])
        high = bounds["max"] if high is None else max(high, bounds["max"])
    if (count, low, high, total) != (rows, 0, rows - 1, rows * (rows - 1) // 2):
        raise RuntimeError(
            f"{system} wrote {count:,} rows with ids {low}..{high} (sum {total}) under {output}; "
            f"expected ids 0..{rows - 1} once each"
        )


def connect_ray() -> None:
    """The one Ray connection per benchmark process: a fresh local instance."""
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)


def main(argv: list[str] | None = None) -> None:
    """One arm in this process; prints one JSON line (the arm's details and driver peak-RSS growth)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.systems", description=main.__doc__)
    parser.add_argument("arm", choices=["batch-infer", "ray-data", "ray-data-gpu", "floor"])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument(
        "--set",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="batch-infer config key, or a RayDataConfig field for ray-data (value parsed as JSON)",
    )
    args = parser.parse_args(argv)
    options = dict(map(parse_option, args.options))
    if args.arm != "floor":
        connect_ray()
    if args.arm == "batch-infer":
        importlib.import_module("pipelines")  # imports are not the growth we look for
    before = _reset_peak_rss()
    start = time.perf_counter()
    try:
        if args.arm == "batch-infer":
            details = run_batch_infer(args.model, args.input, args.output, **options)
        elif args.arm == "ray-data":
            details = run_ray_data(args.model, args.input, args.output, RayDataConfig(**options))
        elif args.arm == "ray-data-gpu":
            details = run_ray_data_gpu(args.model, args.input, args.output, GpuRayDataConfig(**options))
        else:
            details = run_floor(args.model, args.input, args.output, **options)
        seconds = time.perf_counter() - start
    finally:
        if args.arm != "floor":
            import ray

            ray.shutdown()
    peak = _status_bytes("VmHWM")
    print(
        json.dumps(
            {
                "arm": args.arm,
                "seconds": seconds,
                "driver_peak_rss_bytes": peak,
                "driver_peak_rss_growth_bytes": peak - before,
                "details": details,
            }
        )
    )


def _reset_peak_rss() -> int:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0) and return it in bytes.

    Not ``getrusage``: its ``ru_maxrss`` survives fork+exec, so a child of a
    1.5 GiB benchmark process starts with a 1.5 GiB "peak".
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def parse_option(pair: str) -> tuple[str, Any]:
    """``"replicas=2"`` -> ``("replicas", 2)``: the value is JSON if it parses, else a string."""
    key, sep, text = pair.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
    try:
        return key.replace("-", "_"), json.loads(text)
    except json.JSONDecodeError:
        return key.replace("-", "_"), text


if __name__ == "__main__":
    main()
