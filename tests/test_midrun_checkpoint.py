"""The journal checkpointed into the manifest during a run (issue 15, "A million files"): a long run folds
its journal into the root and segments as it goes, `_journal/` stays short, a mid-run root is never
complete, and a driver killed at any step of a mid-run checkpoint loses nothing and duplicates nothing.
Runs are small (in the driver, no Ray); the checkpoint interval and the segment thresholds are lowered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, read_output, save_mlp, write_files

import pipelines
from basis.storage import resolve
from pipelines.commit import MANIFEST, SUCCESS, State, entries, recorder, segments
from pipelines.commit.segments import SEGMENT_DIR

FEATURES = 4
FILES = 16
EVERY = 3  # records between checkpoints


def _job(tmp_path: Path) -> dict[str, object]:
    write_files(tmp_path / "in", [100] * FILES, features=FEATURES, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [FEATURES, 3, 1])
    return {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
            "shard_rows": 100, "progress": False}


def _root(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def _journal(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "_journal").iterdir()) if (out / "_journal").exists() else []


def _complete(out: Path, tmp_path: Path) -> None:
    """Every input row once, in order; `verify` agrees (recomputing a sample); nothing left over."""
    ids = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "in").glob("*.parquet"))])["id"]
    assert read_output(out)["id"].to_pylist() == ids.to_pylist()
    assert (out / SUCCESS).exists() and _root(out)["complete"] and "journal_folded" not in _root(out)
    report = pipelines.verify(str(out), sample=10, seed=1)
    assert report.ok, report.problems
    assert not _journal(out)
    if (out / SEGMENT_DIR).exists():
        named = {ref["path"] for ref in _root(out)["shards"]["segments"]}
        assert {f"{SEGMENT_DIR}/{p.name}" for p in (out / SEGMENT_DIR).iterdir()} == named


@pytest.mark.parametrize("layout", ["segments", "inline"])
def test_a_long_run_checkpoints_its_journal_as_it_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       layout: str) -> None:
    if layout == "segments":
        monkeypatch.setattr(segments, "INLINE_MAX", 0)
        monkeypatch.setattr(segments, "SEGMENT_ROWS", 4)
    if layout == "segments":
        monkeypatch.setattr(recorder, "CHECKPOINT_RECORDS", EVERY)
    else:  # by time: every record, when the interval is 0 s
        monkeypatch.setattr(recorder, "CHECKPOINT_RECORDS", 10**9)
        monkeypatch.setattr(recorder, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(entries, "_DICT_AFTER", 0)  # lookups by dict from the first (a checkpoint extends it)
    job = _job(tmp_path)
    out = tmp_path / "out"
    seen: list[dict] = []
    real = recorder.Recorder.checkpoint

    def watched(self: recorder.Recorder) -> None:  # the real checkpoint; what it left, looked at after each
        real(self)
        root = _root(out)
        state = State.load(resolve(str(out)))  # as `status`, `verify` or a rerun would see it now
        # the run goes on from the entries as a load of that root gives them, looked up alike
        assert sorted(self.state.files.items()) == sorted(state.files.items())
        assert all(self.state.files.get(path) == entry for path, entry in state.files.items())
        seen.append({"root": root, "journal": _journal(out), "held": len(state.files),
                     "confirmed": self.confirmed, "success": (out / SUCCESS).exists(),
                     "segments": [r["path"] for r in root["shards"]["segments"]] if layout == "segments" else None,
                     "verify": None if seen else pipelines.verify(str(out))})

    monkeypatch.setattr(recorder.Recorder, "checkpoint", watched)
    assert pipelines.run(**job).status == "succeeded"
    assert len(seen) >= (FILES // EVERY - 1 if layout == "segments" else FILES - 1)
    for moment in seen:
        root = moment["root"]
        assert root["complete"] is False and not moment["success"] and isinstance(root["journal_folded"], int)
        assert root["generation"] == 1 and root["rows_out"] == 100 * moment["confirmed"]
        assert moment["held"] == moment["confirmed"]  # the root with what is left of the journal: every commit
        # what is left: driver records written after the root, and commit records not yet confirmed
        assert len(moment["journal"]) <= EVERY + 2, moment["journal"]
    assert [m["root"]["rows_out"] for m in seen] == sorted({m["root"]["rows_out"] for m in seen})  # grew each time
    if layout == "segments":
        assert all(a["segments"] != b["segments"] for a, b in zip(seen, seen[1:]))
        assert set(seen[0]["segments"][:1]) <= set(seen[-1]["segments"])  # the first, full segment never rewritten
    first = seen[0]["verify"]
    assert first.ok and not first.complete and first.rows_out == 100 * seen[0]["confirmed"], first.problems
    status = subprocess.run([sys.executable, "-m", "pipelines", "status", str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0 and f"{FILES} committed" in status.stdout, status.stdout + status.stderr
    _complete(out, tmp_path)
    assert pipelines.run(**job).shards_skipped == FILES


_KILLED = """
import os, signal, sys
import pipelines
from pipelines.commit import checkpoint, recorder, segments
if sys.argv[2] == "segments":
    segments.INLINE_MAX, segments.SEGMENT_ROWS = 0, 4
recorder.CHECKPOINT_RECORDS = 3
moment, calls = sys.argv[1], {"root": 0, "cleanup": 0, "journal": 0}
real_write, real_cleanup, real_clear = checkpoint.write_bytes_atomic, checkpoint.delete_unreferenced, recorder.clear_journal

def die(what):  # at the nth mid-run checkpoint
    calls[what] += 1
    if calls[what] == int(sys.argv[7]):
        os.kill(os.getpid(), signal.SIGKILL)

def write(fs, path, data):
    if moment == "before-root" and path.endswith("_manifest.json"):
        die("root")
    real_write(fs, path, data)

def cleanup(output, keep):
    if moment == "before-cleanup":
        die("cleanup")
    real_cleanup(output, keep)

def clear(output, paths=()):
    paths = list(paths)
    if moment == "half-journal" and paths:
        real_clear(output, paths[: len(paths) // 2])
        die("journal")
    if moment == "before-journal" and paths:
        die("journal")
    if moment == "commits-gone" and paths:  # the commit records deleted, the driver's (its `begin`) still there
        real_clear(output, [p for p in paths if "-c-" in p or "-b-" in p])
        die("journal")
    real_clear(output, paths)

checkpoint.write_bytes_atomic, checkpoint.delete_unreferenced, recorder.clear_journal = write, cleanup, clear
pipelines.run(model=sys.argv[3], input=sys.argv[4], output=sys.argv[5], shard_rows=100, progress=False,
              overwrite=sys.argv[6] == "overwrite")
"""


@pytest.mark.parametrize("moment, layout, mode, nth", [
    ("before-root", "segments", "first", 3), ("before-cleanup", "segments", "first", 3),
    ("before-journal", "segments", "first", 3), ("half-journal", "segments", "first", 3),
    ("before-root", "inline", "first", 3), ("half-journal", "inline", "first", 3),
    # the root holds the run's demotion of every earlier entry: the journal's `begin`, still there, is not replayed
    ("commits-gone", "segments", "overwrite", 1), ("before-root", "inline", "overwrite", 2),
])
def test_a_driver_killed_in_a_mid_run_checkpoint_loses_and_duplicates_nothing(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch,
                                                                              moment: str, layout: str,
                                                                              mode: str, nth: int) -> None:
    job = _job(tmp_path)
    out = tmp_path / "out"
    if mode == "overwrite":  # a complete output, recomputed from scratch by the killed run
        assert pipelines.run(**job).status == "succeeded"
    killed = subprocess.run([sys.executable, "-c", _KILLED, moment, layout, str(job["model"]), str(job["input"]),
                             str(out), mode, str(nth)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL, at that very moment
    assert not (out / SUCCESS).exists() and not _root(out)["complete"]
    assert _root(out)["journal_folded"] >= 0 and _journal(out)  # a checkpoint done; records left
    state = State.load(resolve(str(out)))
    held = len(state.files)
    # every commit of the killed run, from the root and the journal: n checkpoints' worth were confirmed
    assert nth * EVERY <= held < FILES and state.interrupted
    assert sum(e["rows_out"] for e in state.files.values()) == 100 * held

    if layout == "segments":
        monkeypatch.setattr(segments, "INLINE_MAX", 0)
        monkeypatch.setattr(segments, "SEGMENT_ROWS", 4)
    monkeypatch.setattr(recorder, "CHECKPOINT_RECORDS", EVERY)
    report = pipelines.run(**job)
    assert report.status == "succeeded" and report.shards_done == FILES - held and report.shards_skipped == held
    _complete(out, tmp_path)
    assert _root(out)["generation"] == (3 if mode == "overwrite" else 2)


def test_a_table_output_gets_one_commit_per_run_however_often_the_run_checkpoints(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_table_output import check_exactly_once, commits, job as table_job

    monkeypatch.setattr(recorder, "CHECKPOINT_RECORDS", 2)
    options = table_job(tmp_path, "delta")  # 7 shards
    mid_run: list[bool] = []
    real = recorder.Recorder.checkpoint

    def watched(self: recorder.Recorder) -> None:
        real(self)
        mid_run.append((tmp_path / "preds" / "_delta_log").exists())  # the table: not made, let alone committed

    monkeypatch.setattr(recorder.Recorder, "checkpoint", watched)
    assert pipelines.run(**options, progress=False).status == "succeeded"
    assert len(mid_run) == 3 and not any(mid_run)
    assert commits(tmp_path, options) == 1  # the run's one table commit, at its end
    check_exactly_once(tmp_path, options)
    assert pipelines.verify(str(tmp_path / "preds"), sample=5, seed=2).ok
