"""Daft as a peer: ``read_parquet -> class UDF (the torch MLP) -> write_parquet`` on Daft's native runner.

Runs in Daft's own venv (``daft`` 0.7.26 pins pyarrow 25), which
``benchmarks.peers.daft_python()`` creates under ``benchmarks/.data/daft-venv``:

    benchmarks/.data/daft-venv/bin/python benchmarks/daft_job.py --model M --input DIR --output DIR [--set KEY=VALUE]

and prints one JSON line: ``seconds`` (building the plan, running it and
writing the output; ``import daft`` and the interpreter are outside it, as
``ray.init`` is for the Ray-based systems), ``setup_seconds`` (this module's
imports, ``import daft`` among them) and the settings used. The UDF shares ``_load_layers`` / ``_Stacker`` / ``_forward``
with Ray Data and the floor (``benchmarks/systems.py``), so the peers differ
only in orchestration.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time

_STARTED = time.perf_counter()  # imports below are part of the set-up time

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

_REPO = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, _REPO)  # `python benchmarks/daft_job.py` puts only benchmarks/ on the path
# UDF processes (use_process) unpickle the class, which refers to benchmarks.systems.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("DO_NOT_TRACK", "1")  # Daft's import/run telemetry: no network from a benchmark

from benchmarks.data import FEATURES  # noqa: E402  (after the path set-up)
from benchmarks.systems import _forward, _load_layers, _Stacker, parse_option  # noqa: E402


@dataclass(frozen=True)
class DaftConfig:
    """Daft knobs; the defaults are the fastest setting found on the 2-CPU dev box (README.md)."""

    udf: str = "cls"  # "cls": @daft.cls + @daft.method.batch; "func": @daft.func.batch (stateless)
    batch_size: int | None = None  # rows per UDF call; None: Daft's morsels as they come
    max_concurrency: int | None = None  # cls instances (Daft picks when None)
    use_process: bool | None = None  # cls/func in separate processes (Daft picks when None)
    cpus: float | None = None  # CPUs per UDF instance
    torch_threads: int = 1  # torch.set_num_threads in each UDF instance
    native_threads: int | None = None  # set_runner_native(num_threads); None: every core
    morsel_size: int | None = None  # set_execution_config(default_morsel_size); Daft's default 131072
    scan_split: bool | None = None  # set_execution_config(enable_scan_task_split_and_merge)


class _Predictor:
    """The model, loaded once per instance; one stacking buffer per calling thread."""

    def __init__(self, model: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.layers = _load_layers(Path(model))
        self.local = threading.local()

    def predict(self, *columns: Any) -> Any:  # 64 daft.Series, one per feature
        stack = getattr(self.local, "stack", None) or _Stacker()
        self.local.stack = stack
        arrays = {name: series.to_arrow() for name, series in zip(FEATURES, columns, strict=True)}
        return _forward(self.layers, stack(arrays))


def _cls_with(method: Any) -> type:
    """``_Predictor`` with ``predict`` decorated by ``method`` (settings known only at run time)."""

    class Predictor(_Predictor):
        predict = method(_Predictor.predict)

    return Predictor


_MODELS: dict[tuple[str, int], _Predictor] = {}  # per process: `func` UDFs hold no state of their own
_MODELS_LOCK = threading.Lock()


def _predict(model: str, threads: int, *columns: Any) -> Any:
    """The stateless (``udf=func``) variant: the model is loaded by the process's first call."""
    with _MODELS_LOCK:
        predictor = _MODELS.get((model, threads)) or _Predictor(model, threads)
        _MODELS[(model, threads)] = predictor
    return predictor.predict(*columns)


def build(model: Path, input: Path, output: Path, config: DaftConfig) -> Any:
    """The Daft plan, ready to run: ``.write_parquet`` happens in ``run``."""
    import daft
    from daft import DataType

    execution = {"default_morsel_size": config.morsel_size, "enable_scan_task_split_and_merge": config.scan_split}
    if any(v is not None for v in execution.values()):
        daft.set_execution_config(**{k: v for k, v in execution.items() if v is not None})
    df = daft.read_parquet(str(input / "*.parquet"))
    features = [daft.col(name) for name in FEATURES]
    if config.udf == "cls":
        method = daft.method.batch(return_dtype=DataType.float32(), batch_size=config.batch_size)
        wrapped = daft.cls(
            _cls_with(method),
            cpus=config.cpus,
            use_process=config.use_process,
            max_concurrency=config.max_concurrency,
        )
        prediction = wrapped(str(model), config.torch_threads).predict(*features)
    elif config.udf == "func":
        udf = daft.func.batch(
            return_dtype=DataType.float32(),
            batch_size=config.batch_size,
            cpus=config.cpus,
            use_process=config.use_process,
        )(_predict)
        prediction = udf(str(model), config.torch_threads, *features)  # scalars pass through as they are
    else:
        raise SystemExit(f"udf must be 'cls' or 'func', got {config.udf!r}")
    return df.select("id", prediction.alias("prediction"))


def run(model: Path, input: Path, output: Path, config: DaftConfig = DaftConfig()) -> dict[str, Any]:
    """Plan, run and write; returns seconds and the settings."""
    import daft

    daft.set_runner_native(num_threads=config.native_threads)
    cpu, start = _cpu_seconds(), time.perf_counter()
    build(model, input, output, config).write_parquet(str(output), compression="snappy")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_seconds": _cpu_seconds() - cpu, "config": asdict(config)}


def _cpu_seconds() -> float:
    """User + system CPU of this process and its waited-for children (UDF processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None, started: float = _STARTED) -> None:
    parser = argparse.ArgumentParser(prog="daft_job.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument(
        "--set", dest="options", action="append", default=[], metavar="KEY=VALUE", help="a DaftConfig field"
    )
    args = parser.parse_args(argv)
    options = dict(map(parse_option, args.options))
    unknown = sorted(set(options) - {f.name for f in fields(DaftConfig)})
    if unknown:
        raise SystemExit(f"unknown Daft settings {unknown}; choose from {[f.name for f in fields(DaftConfig)]}")
    import daft

    setup = time.perf_counter() - started
    result = run(args.model, args.input, args.output, DaftConfig(**options))
    print(json.dumps({"system": "daft", "daft_version": daft.__version__, "setup_seconds": setup, **result}))


if __name__ == "__main__":
    # Run as benchmarks.daft_job, not __main__: UDFs are then pickled by reference and
    # imported (PYTHONPATH above) where Daft runs them, instead of being copied by value.
    from benchmarks.daft_job import main as _main

    _main(started=_STARTED)
