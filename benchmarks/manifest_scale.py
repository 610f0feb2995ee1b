"""An unchanged cron tick over an output of a million committed files: planning time and driver memory.

    .venv/bin/python -m benchmarks.manifest_scale                 # 1,000,000 and 200,000 entries
    .venv/bin/python -m benchmarks.manifest_scale --quick         # 20,000 (a test runs it)

What is synthetic, and why: an input of a million real Parquet files (and an output of a million real
prediction files) takes longer to create than the measurement is worth. So the output's manifest is
generated directly (a root `_manifest.json` and its Parquet segments, exactly as a run writes them,
with `_SUCCESS`), and the two listings a tick makes are generated in the measured process, where the
real ones would be: the input's (`Source.files()`: `DataFiles` columns, as `ParquetSource` builds
them) and the output's (`output_files`: path and size of every file, columns). Everything else is the real
`pipelines.run`: the model inspected, `State.load` (root + segments), the lock, `reconcile`, claims,
spans, `make_shards`, and the check that nothing is to be done. Each size is measured in a fresh
process; the cost per file is the difference between two sizes (so the interpreter, pyarrow and the
model do not count), in CPU time and in peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent / ".data" / "manifest-scale"
FULL = (200_000, 1_000_000)
QUICK = (20_000,)


def _rel(i: int) -> str:
    return f"date=2024-{1 + i // 100_000:02d}-{1 + (i // 4_000) % 25:02d}/part-{i:07d}.parquet"


def _fingerprint(i: int) -> str:
    return f"size={4096 + i % 977};mtime_ns={1_700_000_000_000_000_000 + i * 1_000_003}"


def setup(files: int, root: Path = ROOT) -> Path:
    """An output of `files` committed entries (one shard each), its manifest in segments; cached."""
    import pyarrow.parquet as pq
    import torch

    import pipelines
    from pipelines.commit.segments import SCHEMA, write_segment
    from basis.storage import resolve

    where = root / f"files-{files}"
    if (where / "ready").exists():
        return where
    (where / "in").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [0], **{f"f{j}": pa.array([0.5], pa.float32()) for j in range(4)}}),
                   where / "in" / "real.parquet")
    torch.manual_seed(0)
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 1)).state_dict(), where / "m.pt")
    out = where / "out"
    plan = pipelines.plan(model=str(where / "m.pt"), input=str(where / "in"), output=str(out))
    header = plan.header
    header["columns"]["source"] = [_rel(0), _fingerprint(0)]  # as a run over the synthetic input resolved them
    base = header["source"]["base"]
    index = np.arange(files)
    rels = [_rel(i) for i in range(files)]
    outputs = [rel[: -len(".parquet")] + "-00000.parquet" for rel in rels]
    table = pa.table({
        "id": [f"{rel}:0-1" for rel in rels], "input": [f"{base}/{rel}" for rel in rels], "rel": rels,
        "fingerprint": [_fingerprint(i) for i in range(files)], "file_row_groups": np.ones(files, np.int64),
        "first": np.zeros(files, np.int64), "stop": np.ones(files, np.int64),
        "rows_in": np.full(files, 100, np.int64), "rows_out": np.full(files, 100, np.int64),
        "rows_rejected": np.zeros(files, np.int64), "output": outputs, "bytes": 2000 + index % 101,
        "sha256": [f"{i:064x}" for i in range(files)], "rejected_output": pa.nulls(files, pa.string()),
        "rejected_bytes": pa.nulls(files, pa.int64()), "rejected_sha256": pa.nulls(files, pa.string()),
        "status": ["committed"] * files, "attempts": np.ones(files, np.int64), "error": pa.nulls(files, pa.string()),
        "generation": np.ones(files, np.int64), "extra": pa.nulls(files, pa.string())}, schema=SCHEMA)
    from pipelines.commit import segments

    location = resolve(str(out))
    refs = [write_segment(location, table.slice(start, segments.SEGMENT_ROWS), 1)
            for start in range(0, files, segments.SEGMENT_ROWS)]
    root_record = {"format": "batch-infer/manifest/3", "generation": 1, **header, "updated_at": "2024-01-01T00:00:00",
                   "complete": True, "rows_in": 100 * files, "rows_out": 100 * files, "rows_rejected": 0,
                   "retiring": [], "shards": {"count": files, "segments": refs}}
    (out / "_manifest.json").write_text(json.dumps(root_record))
    (out / "_SUCCESS").write_bytes(b"")
    (where / "ready").write_text("")
    return where


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(where: Path, files: int) -> dict[str, float]:
    """One unchanged tick (`pipelines.run`) over the synthetic output, in this process."""
    import pipelines
    import pipelines.prepare as prepare
    from pipelines.commit import Listing
    from pipelines.tables import DataFiles
    from basis.storage import resolve
    from pipelines.tables.parquet import ParquetSource
    from workers.modelfile import inspect_model

    base = str(where / "in")
    manifest = where / "out" / "_manifest.json"
    shards = json.loads(manifest.read_text())["shards"]
    segments = shards["segments"] if isinstance(shards, dict) else []

    synthetic = [0.0]  # CPU seconds spent making the two synthetic listings (a real listing costs its own)

    class Listed(ParquetSource):  # the input listing of `files` files, as ParquetSource builds it (columns)
        def files(self, *, avoid: str | None = None) -> tuple[str, DataFiles]:
            start = time.process_time()
            rels = pa.array([_rel(i) for i in range(files)], pa.string())
            listed = DataFiles(None, rels, pa.array([_fingerprint(i) for i in range(files)], pa.string()),
                               prefix=f"{base}/")  # every path is base/rel, as ParquetSource finds them
            synthetic[0] += time.process_time() - start
            return base, listed

    def listing(output: object) -> Listing:  # the output listing: every prediction file with its size (columns)
        start = time.process_time()
        paths = [_rel(i)[: -len(".parquet")] + "-00000.parquet" for i in range(files)]
        sizes = [2000 + i % 101 for i in range(files)]
        paths += ["_SUCCESS", "_manifest.json", *(ref["path"] for ref in segments)]
        sizes += [0, manifest.stat().st_size, *(ref["bytes"] for ref in segments)]
        present = Listing(pa.array(paths, pa.string()), np.array(sizes, np.int64))
        del paths, sizes
        synthetic[0] += time.process_time() - start
        return present

    prepare.open_source = lambda cfg: Listed(resolve(base), base)  # type: ignore[assignment]
    prepare.output_files = listing  # type: ignore[assignment]
    inspect_model(str(where / "m.pt"))
    baseline = _status("VmRSS")
    cpu, wall = time.process_time(), time.perf_counter()
    report = pipelines.run(model=str(where / "m.pt"), input=base, output=str(where / "out"), progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert report.status == "succeeded" and report.shards_skipped == files and report.shards_done == 0, report
    assert json.loads(manifest.read_text())["updated_at"] == "2024-01-01T00:00:00"  # nothing was rewritten
    return {"files": files, "wall_s": wall, "cpu_s": cpu, "listing_cpu_s": synthetic[0],
            "baseline_rss": baseline, "peak_rss": _status("VmHWM"),
            "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run(sizes: tuple[int, ...], root: Path = ROOT) -> list[dict[str, float]]:
    results = []
    for files in sizes:
        setup(files, root)
        code = (f"import json, sys; from pathlib import Path; from benchmarks.manifest_scale import measure; "
                f"print(json.dumps(measure(Path({str(root / f'files-{files}')!r}), {files})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "PYTHONHASHSEED": "0"})
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 entries only")
    parser.add_argument("--sizes", type=int, nargs="*", help="entry counts (default 200,000 and 1,000,000)")
    args = parser.parse_args(argv)
    results = run(tuple(args.sizes) if args.sizes else QUICK if args.quick else FULL)
    mib = 1 << 20
    print(f"{'files':>10} {'wall s':>8} {'cpu s':>8} {'of which listing':>17} {'peak RSS MiB':>13} "
          f"{'over baseline MiB':>18}")
    for r in results:
        print(f"{r['files']:>10,} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['listing_cpu_s']:>17.2f} "
              f"{r['peak_rss'] / mib:>13,.0f} {(r['peak_rss'] - r['baseline_rss']) / mib:>18,.0f}")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        n = b["files"] - a["files"]
        print(f"per committed file (between {a['files']:,} and {b['files']:,}): "
              f"{(b['cpu_s'] - a['cpu_s']) / n * 1e6:.1f} us CPU ({(b['cpu_s'] - b['listing_cpu_s'] - a['cpu_s'] + a['listing_cpu_s']) / n * 1e6:.1f} "
              f"without making the synthetic listings), {(b['wall_s'] - a['wall_s']) / n * 1e6:.1f} us wall, "
              f"{(b['peak_rss'] - a['peak_rss']) / n:,.0f} bytes of peak RSS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
