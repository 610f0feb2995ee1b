"""The manifest in Parquet segments (issue 15, "A million files"): it round-trips, only the segments that
changed are rewritten, an inline (older) manifest loads and a run that writes migrates it, and a driver
killed in the middle of a checkpoint loses nothing. Runs are small (in the driver, no Ray); the segment
thresholds are lowered so that a few files make several segments.
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
from journal_files import commit_records

import pipelines
from basis.errors import OutputConflictError
from basis.storage import resolve
from pipelines.commit import segments
from pipelines.commit import MANIFEST, SUCCESS, State
from pipelines.commit.segments import SEGMENT_DIR

FEATURES = 4


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segments, "INLINE_MAX", 0)
    monkeypatch.setattr(segments, "SEGMENT_ROWS", 2)


def _job(tmp_path: Path) -> dict[str, object]:
    write_files(tmp_path / "in", [300] * 5, features=FEATURES, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [FEATURES, 3, 1])
    return {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
            "shard_rows": 200, "progress": False}


def _root(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def _entries(out: Path) -> list[dict]:
    state = State.load(resolve(str(out)))
    return sorted([*state.files.values(), *state.others.values()], key=lambda e: e["id"])


def _rewrite(path: Path, seed: int) -> None:
    """A new version of an input file: same rows and ids, other feature values."""
    table = pq.read_table(path)
    table = table.set_column(2, "f00", pa.array([float(seed + i) for i in range(table.num_rows)], pa.float32()))
    pq.write_table(table, path, row_group_size=100)


def _complete(out: Path, tmp_path: Path) -> None:
    """Every input row once, in order, predicted by the model; `verify` agrees (recomputing a sample)."""
    ids = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "in").glob("*.parquet"))])["id"]
    assert read_output(out)["id"].to_pylist() == ids.to_pylist()
    assert (out / SUCCESS).exists()
    report = pipelines.verify(str(out), sample=10, seed=1)
    assert report.ok, report.problems
    named = {ref["path"] for ref in _root(out)["shards"]["segments"]}
    assert {f"{SEGMENT_DIR}/{p.name}" for p in (out / SEGMENT_DIR).iterdir()} == named  # none left over


def test_segments_round_trip_and_a_change_rewrites_only_its_segments(tmp_path: Path, small_segments: None) -> None:
    job = _job(tmp_path)
    out = tmp_path / "out"
    assert pipelines.run(**job).status == "succeeded"
    root = _root(out)
    assert root["format"] == "batch-infer/manifest/3" and root["complete"] and root["rows_out"] == 1500
    refs = root["shards"]["segments"]
    assert root["shards"]["count"] == 10 and len(refs) == 5 and sum(r["entries"] for r in refs) == 10
    # the segments are plain Parquet: any reader gets the entries, in input order
    table = pa.concat_tables([pq.read_table(out / ref["path"]) for ref in refs])
    assert table["id"].to_pylist() == [f"part-{i:04d}.parquet:{a}-{b}" for i in range(5) for a, b in ((0, 2), (2, 3))]
    loaded = _entries(out)
    assert [e["id"] for e in loaded] == sorted(table["id"].to_pylist())
    assert all(e["status"] == "committed" and len(e["sha256"]) == 64 and e["row_groups"][1] > e["row_groups"][0]
               for e in loaded)
    _complete(out, tmp_path)

    _rewrite(tmp_path / "in" / "part-0004.parquet", seed=7)  # its entries live in the last segment(s) only
    report = pipelines.run(**job)
    assert report.status == "succeeded" and report.shards_done == 2 and report.shards_skipped == 8
    after = _root(out)["shards"]["segments"]
    untouched = [ref["path"] for ref in refs if ref["last"][0] < "part-0004.parquet"]
    assert untouched and [ref["path"] for ref in after][:len(untouched)] == untouched
    assert [e for e in _entries(out) if e["rel"] != "part-0004.parquet"] == \
        [e for e in loaded if e["rel"] != "part-0004.parquet"]
    _complete(out, tmp_path)

    files = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert pipelines.run(**job).shards_skipped == 10
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == files  # an unchanged tick writes nothing


def test_an_inline_manifest_loads_and_a_run_that_writes_migrates_it(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job(tmp_path)
    out = tmp_path / "out"
    assert pipelines.run(**job).status == "succeeded"
    old = _root(out)
    assert old["format"] == "batch-infer/manifest/2" and len(old["shards"]) == 10  # small: inline, as before
    old["format"] = "batch-infer/manifest/1"  # as the oldest outputs hold it
    for entry in old["shards"]:
        del entry["generation"], entry["file_row_groups"]
    (out / MANIFEST).write_text(json.dumps(old))
    loaded = _entries(out)
    assert len(loaded) == 10 and all(e["status"] == "committed" for e in loaded)

    monkeypatch.setattr(segments, "INLINE_MAX", 4)
    monkeypatch.setattr(segments, "SEGMENT_ROWS", 3)
    assert pipelines.run(**job).shards_skipped == 10 and _root(out)["format"] == "batch-infer/manifest/1"  # no write
    _rewrite(tmp_path / "in" / "part-0001.parquet", seed=3)
    assert pipelines.run(**job).shards_done == 2
    root = _root(out)
    assert root["format"] == "batch-infer/manifest/3" and root["shards"]["count"] == 10
    kept = [e for e in _entries(out) if e["rel"] != "part-0001.parquet"]
    assert [(e["id"], e["sha256"], e["rows_out"]) for e in kept] == \
        [(e["id"], e["sha256"], e["rows_out"]) for e in loaded if e["rel"] != "part-0001.parquet"]
    _complete(out, tmp_path)

    monkeypatch.setattr(segments, "INLINE_MAX", 10_000)  # an output that fits inline again goes back to JSON
    _rewrite(tmp_path / "in" / "part-0002.parquet", seed=5)
    assert pipelines.run(**job).shards_done == 2
    assert _root(out)["format"] == "batch-infer/manifest/2" and not list((out / SEGMENT_DIR).glob("*"))


_KILLED = """
import os, signal, sys
import pipelines
from pipelines.commit import checkpoint, segments
segments.INLINE_MAX, segments.SEGMENT_ROWS = 0, 2
moment = sys.argv[1]
real = checkpoint.write_bytes_atomic

def write_root(fs, path, data):
    if moment == "before-root" and path.endswith("_manifest.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(fs, path, data)

def cleanup(*args):
    os.kill(os.getpid(), signal.SIGKILL)

checkpoint.write_bytes_atomic = write_root
if moment == "before-cleanup":
    checkpoint.delete_unreferenced = cleanup
pipelines.run(model=sys.argv[2], input=sys.argv[3], output=sys.argv[4], shard_rows=200, progress=False)
"""


@pytest.mark.parametrize("moment", ["before-root", "before-cleanup"])
def test_a_driver_killed_in_the_middle_of_a_checkpoint_loses_nothing(tmp_path: Path, small_segments: None,
                                                                    moment: str) -> None:
    job = _job(tmp_path)
    out = tmp_path / "out"
    assert pipelines.run(**job).status == "succeeded"
    before, entries = _root(out), _entries(out)
    _rewrite(tmp_path / "in" / "part-0000.parquet", seed=11)
    _rewrite(tmp_path / "in" / "part-0003.parquet", seed=13)
    killed = subprocess.run([sys.executable, "-c", _KILLED, moment, str(job["model"]), str(job["input"]), str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL, at that very moment
    assert not (out / SUCCESS).exists()
    written = {f"{SEGMENT_DIR}/{p.name}" for p in (out / SEGMENT_DIR).iterdir()}
    if moment == "before-root":  # the old root, every segment it names, and the journal: the run's commits
        assert _root(out) == before and written > {ref["path"] for ref in before["shards"]["segments"]}
        assert commit_records(out)
    else:  # the new root is whole; the segments it replaced are still there, the journal too (ignored)
        assert _root(out)["generation"] == before["generation"] + 1
        assert written > {ref["path"] for ref in _root(out)["shards"]["segments"]}
    state = State.load(resolve(str(out)))  # as the next run, verify or status see it
    held = {e["id"]: e for e in state.files.values()}
    assert len(held) == 10
    assert all(held[e["id"]] == e for e in entries if e["rel"] not in ("part-0000.parquet", "part-0003.parquet"))
    assert all(held[e["id"]]["sha256"] != e["sha256"] for e in entries  # the killed run's commits are not lost
               if e["rel"] in ("part-0000.parquet", "part-0003.parquet"))

    report = pipelines.run(**job)
    assert report.status == "succeeded" and report.shards_done == 0 and report.shards_skipped == 10
    _complete(out, tmp_path)
    assert not (out / "_journal").exists() or not list((out / "_journal").iterdir())


def test_a_missing_or_broken_segment_is_refused_naming_it(tmp_path: Path, small_segments: None) -> None:
    job = _job(tmp_path)
    out = tmp_path / "out"
    pipelines.run(**job)
    ref = _root(out)["shards"]["segments"][1]
    segment = out / ref["path"]
    data = segment.read_bytes()
    segment.write_bytes(b"not parquet")
    with pytest.raises(OutputConflictError, match=ref["path"].split("/")[-1]):
        State.load(resolve(str(out)))
    segment.unlink()
    with pytest.raises(OutputConflictError, match="missing"):
        pipelines.run(**job)
    segment.write_bytes(data)
    status = subprocess.run([sys.executable, "-m", "pipelines", "status", str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0 and "10 committed" in status.stdout, status.stdout + status.stderr


def test_the_benchmark_quick_mode_plans_an_unchanged_tick_from_segments(tmp_path: Path) -> None:
    from benchmarks.manifest_scale import QUICK, run

    (result,) = run(QUICK, root=tmp_path)  # asserts that every file was skipped and nothing rewritten
    assert result["files"] == QUICK[0] and result["peak_rss"] > result["baseline_rss"] > 0


def test_an_index_extended_by_appended_keys_finds_old_and_new_ones_with_its_dict_or_without() -> None:
    from pipelines.commit.entries import _DICT_AFTER, KeyIndex

    old_keys = [f"d{i % 7}/part-{i:06d}.parquet" for i in range(3_000)]
    new_keys = [*old_keys, "d9/part-999999.parquet", old_keys[5]]  # a new key, and an old one committed again
    for lookups in (1, _DICT_AFTER + 1):  # binary search only, then a dict built
        old = KeyIndex(pa.array(old_keys))
        for key in old_keys[:lookups]:
            assert old.find(key) == old_keys.index(key)
        index = old.extended(pa.array(new_keys))
        assert index.find("d9/part-999999.parquet") == 3_000
        assert index.find(old_keys[5]) == 3_001  # the last position holding a key, as before
        assert index.find(old_keys[6]) == 6 and index.find("d0/nowhere.parquet") is None


def test_a_mid_run_checkpoint_appends_its_tail_though_a_few_stragglers_dirty_the_last_segment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two lane replicas commit in input order, each with a bundle in flight, so a mid-run checkpoint finds
    a few entries (the other replica's bundle) inside the last segment's key range, and the rest after it.
    The stragglers rewrite the last segment, which holds only the last `EDGE_ROWS` entries written; the tail
    is appended as segments of its own (the last segment held the whole tail of the checkpoint before, read
    back and written again for a few stragglers: the driver +66-114 MiB per checkpoint at 100,000 files)."""
    from pipelines.commit import checkpoint
    from pipelines.commit.checkpoint import rebased, write_checkpoint
    from pipelines.commit.entries import Entries

    monkeypatch.setattr(segments, "INLINE_MAX", 0)
    monkeypatch.setattr(segments, "SEGMENT_ROWS", 16)
    monkeypatch.setattr(checkpoint, "EDGE_ROWS", 4)
    output = resolve(str(tmp_path / "out"))

    def entry(i: int) -> dict:
        return {"id": f"r{i:03d}:0-1", "input": f"/in/r{i:03d}", "rel": f"r{i:03d}", "fingerprint": "f",
                "file_row_groups": 1, "row_groups": [0, 1], "rows_in": 1, "rows_out": 1, "rows_rejected": 0,
                "output": f"r{i:03d}-00000.parquet", "bytes": 10, "sha256": "0" * 64, "status": "committed",
                "attempts": 1, "error": None, "generation": 1}

    files = Entries()
    for i in [*range(15), *range(18, 20)]:  # 15-17: in flight on the other replica
        files[entry(i)["output"]] = entry(i)
    first = write_checkpoint(output, files, [], {"generation": 1}, 1, lambda: None)
    files = rebased(output, files, first)
    assert first.refs is not None
    old_last = tuple(first.refs[-1]["last"])
    for i in [15, 16, 17, *range(20, 40)]:
        files[entry(i)["output"]] = entry(i)
    second = write_checkpoint(output, files, [], {"generation": 1}, 1, lambda: None)
    assert second.refs is not None
    kept = [ref["path"] for ref in first.refs[:-1]]
    assert [ref["path"] for ref in second.refs[:len(kept)]] == kept  # only the last segment rewritten
    assert first.refs[-1]["entries"] == 4  # the edge: r013, r014, r018, r019
    rewritten = second.refs[len(kept)]
    assert tuple(rewritten["last"]) == old_last and rewritten["entries"] == 4 + 3  # the stragglers joined it
    tail = second.refs[len(kept) + 1:]
    assert [ref["entries"] for ref in tail] == [16, 4] and tuple(tail[0]["first"]) == ("r020", 0)
    table = pa.concat_tables([pq.read_table(tmp_path / "out" / ref["path"]) for ref in second.refs])
    assert table["rel"].to_pylist() == [f"r{i:03d}" for i in range(40)]  # each entry once, in key order


def test_a_checkpoint_of_entries_come_out_of_order_writes_them_in_manifest_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint orders its new entries once, as dicts, and hands each rewritten range and the tail a
    slice of them (no copy per range): entries committed out of key order, into several old segments and
    past the last key, non-ASCII names (ordered by their UTF-8 bytes, as Arrow sorts), and a failed entry
    beside a committed one of the same key come out as sorting every entry in Arrow would place them,
    each once, and load back the same."""
    from pipelines.commit import checkpoint
    from pipelines.commit.checkpoint import rebased, write_checkpoint
    from pipelines.commit.entries import Entries
    from pipelines.commit.segments import entries_table, sorted_table

    monkeypatch.setattr(segments, "INLINE_MAX", 0)
    monkeypatch.setattr(segments, "SEGMENT_ROWS", 8)
    monkeypatch.setattr(checkpoint, "EDGE_ROWS", 2)
    output = resolve(str(tmp_path / "out"))
    names = ["a", "b", "c", "z", "\u00e9", "\u4e2d", "\U0001f600", "Z", "a\u00e9", "ab"]

    def entry(name: str, i: int, status: str = "committed") -> dict:
        return {"id": f"{name}/{i:02d}:0-1", "input": f"/in/{name}/{i:02d}", "rel": f"{name}/{i:02d}",
                "fingerprint": "f", "file_row_groups": 1, "row_groups": [0, 1], "rows_in": 1, "rows_out": 1,
                "rows_rejected": 0, "output": f"{name}/{i:02d}-0.parquet", "bytes": 10, "sha256": "0" * 64,
                "status": status, "attempts": 1, "error": None if status == "committed" else "boom",
                "generation": 1}

    files = Entries()
    for name in names[:4]:
        for i in range(0, 12, 2):
            files[entry(name, i)["output"]] = entry(name, i)
    first = write_checkpoint(output, files, [], {"generation": 1}, 1, lambda: None)
    files = rebased(output, files, first)
    assert first.refs is not None and len(first.refs) >= 3
    later = [entry(name, i) for name in reversed(names) for i in range(11, 0, -2)]  # odd keys, last first
    later += [entry("b", 2), entry("c", 4)]  # replaced (committed again)
    for e in later:
        files[e["output"]] = e
    extras = [{**entry(name, i, status), "output": f"{name}/{i:02d}-1.parquet"}  # keys of committed entries
              for name, i, status in (("b", 3, "failed"), ("\u00e9", 5, "pending"))]
    expected = sorted_table(entries_table([*({**e, "status": "committed"} for e in files.values()), *extras]))
    committed = {e["output"]: e for e in files.values()}
    second = write_checkpoint(output, files, extras, {"generation": 1}, 1, lambda: None)
    assert second.refs is not None
    table = pa.concat_tables([pq.read_table(tmp_path / "out" / ref["path"]) for ref in second.refs])
    assert table.select(segments.SCHEMA.names).equals(expected.select(segments.SCHEMA.names))
    assert table["status"].to_pylist().count("committed") == len(committed) == 4 * 6 + 10 * 6
    assert table["rel"].to_pylist()[:3] == ["Z/01", "Z/03", "Z/05"]  # byte order: "Z" before "a"
    state = rebased(output, files, second)
    fields = ("id", "input", "rel", "row_groups", "rows_out", "output", "sha256", "generation")
    assert {path: {k: state[path][k] for k in fields} for path in state} == \
        {path: {k: e[k] for k in fields} for path, e in committed.items()}  # loads back the same, each once
