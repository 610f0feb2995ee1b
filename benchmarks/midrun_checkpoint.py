"""What checkpointing the journal during a run costs the driver, and what it saves: a first run's commit path
over N shards, with mid-run checkpoints every `CHECKPOINT_RECORDS` records and without (the whole journal
folded once, at the end, as before).

    .venv/bin/python -m benchmarks.midrun_checkpoint                   # 100,000 and 300,000 shards
    .venv/bin/python -m benchmarks.midrun_checkpoint --sizes 20000 --every 5000

Synthetic, and why: the driver's side of a commit does not depend on what a shard computed, so each
"shard" is its commit record written as a replica writes it (not measured) and handed to the real
`Recorder.committed` (measured: journal flushes, checkpoints, the final manifest). Each configuration runs in
a fresh process; reported: the driver's CPU for the commit path, the most journal files seen (sampled every
1,000 records), and peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADER = {"model": {"sha256": "0" * 64}, "config": {}, "settings": {}, "columns": {},
          "source": {"input": "/in", "base": "/in"}}


def _rel(i: int) -> str:
    return f"date=2024-{1 + i // 100_000:02d}-{1 + (i // 4_000) % 25:02d}/part-{i:07d}.parquet"


def measure(root: Path, total: int, every: int) -> dict[str, float]:
    from basis.record import JOURNAL_DIR, write_commit
    from basis.storage import resolve
    from pipelines.commit import State, recorder
    from pipelines.commit.checkpoint import write_checkpoint
    from pipelines.commit.journal import clear_journal

    recorder.CHECKPOINT_RECORDS = every
    recorder.CHECKPOINT_SECONDS = float("inf")
    output = resolve(str(root / "out"))
    state = State.load(output)
    rec = recorder.Recorder(output, state, header=HEADER, shards=[], check_lock=lambda: None)
    rec.begin(overwrite=False)
    journal = root / "out" / JOURNAL_DIR
    cpu, most = 0.0, 0
    for i in range(total):
        rel = _rel(i)
        entry = {"id": f"{rel}:0-1", "input": f"/in/{rel}", "rel": rel, "fingerprint": f"size={4096 + i % 977};"
                 f"mtime_ns={1_700_000_000_000_000_000 + i}", "file_row_groups": 1, "row_groups": [0, 1],
                 "rows_in": 100, "rows_out": 100, "rows_rejected": 0, "output": rel[:-8] + "-00000.parquet",
                 "bytes": 2000 + i % 101, "sha256": f"{i:064x}", "rejected_output": None, "rejected_bytes": None,
                 "rejected_sha256": None, "generation": rec.generation}
        token = f"{i:032x}"
        write_commit(output, rec.generation, token, entry, rec.digest)  # the replica's part
        start = time.process_time()
        rec.committed(entry, token, 1)
        cpu += time.process_time() - start
        if i % 1000 == 999:
            most = max(most, len(os.listdir(journal)))
    start = time.process_time()  # the end of the run: `Recorder.finish`'s manifest and journal
    write_checkpoint(output, rec.state.files, [], rec._root(True), rec.generation, lambda: None)
    clear_journal(output)
    final = time.process_time() - start
    hwm = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return {"shards": total, "every": every, "checkpoints": rec.checkpoints, "commit_cpu_s": cpu,
            "final_cpu_s": final, "most_journal_files": most, "peak_rss": hwm}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 300_000])
    parser.add_argument("--every", type=int, default=None, help="records between checkpoints (default: the Recorder's)")
    args = parser.parse_args(argv)
    from pipelines.commit.recorder import CHECKPOINT_RECORDS

    every = args.every or CHECKPOINT_RECORDS
    print(f"{'shards':>8} {'every':>11} {'checkpoints':>11} {'commit CPU s':>12} {'final CPU s':>11} "
          f"{'total us/shard':>14} {'most journal files':>18} {'peak RSS MiB':>12}")
    for total in args.sizes:
        for interval in (10**12, every):  # without mid-run checkpoints (as before), with
            root = Path(tempfile.mkdtemp(prefix="bi-ckpt-bench-"))
            try:
                code = (f"import json; from pathlib import Path; from benchmarks.midrun_checkpoint import measure; "
                        f"print(json.dumps(measure(Path({str(root)!r}), {total}, {interval})))")
                done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      cwd=Path(__file__).resolve().parent.parent)
                if done.returncode:
                    raise RuntimeError(done.stderr[-3000:])
                r = json.loads(done.stdout.strip().splitlines()[-1])
            finally:
                shutil.rmtree(root, ignore_errors=True)
            label = "end only" if interval == 10**12 else f"{interval:,}"
            print(f"{r['shards']:>8,} {label:>11} {r['checkpoints']:>11} {r['commit_cpu_s']:>12.2f} "
                  f"{r['final_cpu_s']:>11.2f} {(r['commit_cpu_s'] + r['final_cpu_s']) / total * 1e6:>14.1f} "
                  f"{r['most_journal_files']:>18,} {r['peak_rss'] / (1 << 20):>12,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
