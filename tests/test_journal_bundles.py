"""A bundle's commit records in one append-only journal file (`basis.record.CommitLog`, local outputs): a
record cut short is not a record, older runs' files of a record each still load beside them, and a mid-run
checkpoint that folds half a bundle's file keeps the file (deleting it only once it is sealed and every
record in it is folded), so a driver killed then loses and repeats no row. Runs are small (in the driver,
no Ray); the checkpoint interval is lowered.
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
from basis.record import CommitLog, write_commit
from basis.storage import resolve
from pipelines.commit import MANIFEST, SUCCESS, State, recorder
from pipelines.commit.journal import read_journal

FEATURES = 4
FILES = 12
BUNDLE = 4  # shards per bundle: shard_rows of 400 over files of 100 rows


def _job(tmp_path: Path) -> dict[str, object]:
    write_files(tmp_path / "in", [100] * FILES, features=FEATURES, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [FEATURES, 3, 1])
    return {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
            "shard_rows": 100 * BUNDLE, "progress": False}


def _journal(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "_journal").iterdir()) if (out / "_journal").exists() else []


def _complete(out: Path, tmp_path: Path) -> None:
    """Every input row once, in order; `verify` agrees (recomputing a sample); no journal left."""
    ids = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "in").glob("*.parquet"))])["id"]
    assert read_output(out)["id"].to_pylist() == ids.to_pylist()
    assert (out / SUCCESS).exists()
    report = pipelines.verify(str(out), sample=FILES, seed=1)
    assert report.ok and report.complete, report.problems
    assert not _journal(out)


def _entry(i: int) -> dict[str, str]:
    return {"id": f"f{i}:0-1", "output": f"part-{i}.parquet", "rel": f"f{i}", "fingerprint": "size=1"}


def test_a_bundle_file_holds_its_records_and_a_torn_last_one_is_not_a_record(tmp_path: Path) -> None:
    output = resolve(str(tmp_path / "out"))
    log = CommitLog(output, 3)
    for i in range(3):
        log.write(f"{i:032x}", _entry(i), "job")
    path = Path(log.path or "")
    assert [name for name, _ in commit_records(tmp_path / "out")] == [path.name] * 3  # one file, a line each
    journal = read_journal(output, after=2)
    assert sorted(journal.generations[3].commits) == [f"{i:032x}" for i in range(3)]
    assert journal.unsealed == {str(path)}  # not sealed yet: a mid-run checkpoint keeps it
    whole = path.read_bytes()
    with path.open("ab") as torn:  # a replica killed in the middle of its fourth record's write
        torn.write(json.dumps({"generation": 3, "token": "f" * 32, "job": "job", "entry": _entry(3)}).encode()[:-9])
    assert sorted(read_journal(output, after=2).generations[3].commits) == [f"{i:032x}" for i in range(3)]
    with path.open("ab") as torn:  # even a whole record without its newline: its write had not returned
        torn.write(b"}}")
    assert len(read_journal(output, after=2).generations[3].commits) == 3
    path.write_bytes(whole)
    log.seal()
    journal = read_journal(output, after=2)
    assert len(journal.generations[3].commits) == 3 and not journal.unsealed
    assert json.loads(path.read_bytes().splitlines()[-1]) == {"sealed": 3}
    assert read_journal(output, after=3).empty  # a generation the manifest holds is not read
    again = CommitLog(output, 3)  # another bundle of the same process: its own file
    again.write("e" * 32, _entry(9), "job")
    assert len({name for name, _ in commit_records(tmp_path / "out")}) == 2


def test_a_journal_of_both_layouts_loads_and_the_rerun_repeats_no_shard(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed before its end (here: its `finish` never runs) left its records in bundle files; half of
    them are turned into files of a record each (an older batch-infer's layout, or an object store's), one
    bundle file gets a torn last line. The next load holds every shard; the rerun runs none again."""
    job = _job(tmp_path)
    out = tmp_path / "out"

    def killed(self: recorder.Recorder) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(recorder.Recorder, "finish", killed)
    with pytest.raises(KeyboardInterrupt):
        pipelines.run(**job)
    monkeypatch.undo()
    bundles = [p for p in (out / "_journal").iterdir() if "-b-" in p.name]
    assert len(bundles) == FILES // BUNDLE and len(commit_records(out)) == FILES
    output = resolve(str(out))
    for path in bundles[: len(bundles) // 2]:  # these records as an older run's files, a record each
        for line in path.read_bytes().splitlines():
            record = json.loads(line)
            if "token" in record:
                write_commit(output, record["generation"], record["token"], record["entry"], record["job"])
        path.unlink()
    with bundles[-1].open("ab") as torn:
        torn.write(b'{"generation": 1, "token": "ab')
    names = _journal(out)
    assert any("-c-" in n for n in names) and any("-b-" in n for n in names)
    state = State.load(output)
    assert len(state.files) == FILES and not state.others
    again = pipelines.run(**job)
    assert again.status == "succeeded" and again.shards_skipped == FILES and again.shards_done == 0
    _complete(out, tmp_path)


def test_a_checkpoint_folds_half_a_bundle_file_and_deletes_it_only_once_sealed_and_folded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recorder, "CHECKPOINT_RECORDS", 3)  # not a multiple of BUNDLE: files folded in part
    job = _job(tmp_path)
    out = tmp_path / "out"
    seen: list[dict] = []
    real = recorder.Recorder.checkpoint

    def watched(self: recorder.Recorder) -> None:
        real(self)
        state = State.load(resolve(str(out)))  # as a rerun would see it now
        loaded = dict(state.files.items())
        assert all(loaded.get(path) == entry for path, entry in self.state.files.items())
        # more only where the replica, ahead of the driver, committed shards not confirmed yet
        assert len(loaded) - len(self.state.files) <= BUNDLE
        records = commit_records(out)
        seen.append({"confirmed": self.confirmed, "bundles": {n for n in _journal(out) if "-b-" in n},
                     "records": len(records), "held": len(state.files)})

    monkeypatch.setattr(recorder.Recorder, "checkpoint", watched)
    assert pipelines.run(**job).status == "succeeded"
    assert [m["confirmed"] for m in seen] == [3, 6, 9, 12][: len(seen)] and len(seen) >= 3
    for moment in seen:
        assert moment["confirmed"] <= moment["held"] <= moment["confirmed"] + BUNDLE
        # folded and sealed bundles' files are gone: the one in hand is left, and the one before it when its
        # replica had not sealed it yet (it seals after handing over its last result)
        assert len(moment["bundles"]) <= 2 and moment["records"] <= 2 * BUNDLE, moment
    half = [m for m in seen if m["confirmed"] % BUNDLE]  # a checkpoint in the middle of a bundle: its file stays
    assert half and all(m["bundles"] for m in half)
    assert any(a["bundles"] - b["bundles"] for a in half for b in seen if b["confirmed"] > a["confirmed"])
    _complete(out, tmp_path)


_KILLED = """
import os, signal, sys
import pipelines
from pipelines.commit import recorder
recorder.CHECKPOINT_RECORDS = int(sys.argv[2])
real = recorder.Recorder.checkpoint
def checkpoint(self):
    real(self)
    if self.checkpoints == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
recorder.Recorder.checkpoint = checkpoint
pipelines.run(model=sys.argv[1] + "/m.pt", input=sys.argv[1] + "/in", output=sys.argv[1] + "/out",
              shard_rows=int(sys.argv[4]), progress=False)
"""


@pytest.mark.parametrize("every,checkpoints", [(3, 1), (6, 1), (5, 2)])
def test_a_driver_killed_after_folding_half_a_bundle_file_loses_and_repeats_no_row(
        tmp_path: Path, every: int, checkpoints: int) -> None:
    _job(tmp_path)
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", _KILLED, str(tmp_path), str(every), str(checkpoints),
                             str(100 * BUNDLE)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -9, killed.stderr[-2000:]
    root = json.loads((out / MANIFEST).read_text())
    assert root["journal_folded"] >= 0 and not (out / SUCCESS).exists()
    assert any("-b-" in n for n in _journal(out))  # the bundle file folded in part is still there
    state = State.load(resolve(str(out)))
    assert len(state.files) >= every * checkpoints
    again = pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(out),
                          shard_rows=100 * BUNDLE, progress=False)
    assert again.status == "succeeded" and again.shards_skipped >= every * checkpoints
    assert again.shards_done + again.shards_skipped == FILES
    _complete(out, tmp_path)


def test_a_record_whose_write_fails_ends_its_file_and_says_where(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed append (no space) raises naming the journal file, and leaves at most a line cut short there:
    the bundle's next record starts a file of its own, so no record ever follows a broken one."""
    import errno

    from basis import record

    output = resolve(str(tmp_path / "out"))
    log = CommitLog(output, 1)
    log.write("a" * 24, _entry(0), "job")
    first = log.path
    real = os.write

    def short_then_full(fd: int, data: bytes) -> int:
        if len(data) > 40:
            return real(fd, bytes(data[:40]))  # a short write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record.os, "write", short_then_full)
    with pytest.raises(OSError, match="No space left") as info:
        log.write("b" * 24, _entry(1), "job")
    assert info.value.filename == first
    monkeypatch.undo()
    log.write("c" * 24, _entry(2), "job")
    log.seal()
    assert log.path != first
    journal = read_journal(output, after=0)
    assert sorted(journal.generations[1].commits) == ["a" * 24, "c" * 24]
    assert journal.unsealed == {first}  # kept to the end of the run, its one whole record read



def test_the_drivers_journal_file_is_its_records_as_json_and_a_checkpoint_reads_folded_tokens_unparsed(
        tmp_path: Path) -> None:
    """The driver writes its confirmations formatted directly: the file is byte for byte what `json.dumps`
    wrote. A checkpoint learns a bundle file's tokens without parsing the records the root holds already
    (`bundles_of`'s `held`), and still parses the others: a broken record is not counted."""
    from pipelines.commit.journal import SegmentWriter, bundles_of

    output = resolve(str(tmp_path / "out"))
    writer = SegmentWriter(output, 3)
    ops = [{"op": "begin", "header": {"model": {"sha256": "s"}}, "overwrite": False},
           {"op": "confirm", "token": "t\u00e9\"1", "attempts": 1}, {"op": "confirm", "attempts": 2, "token": "t2"},
           {"op": "fail", "entry": {"id": "a:0-1", "error": "boom"}}, {"op": "confirm", "token": "t3", "attempts": 3}]
    for op in ops:
        writer.add(op)
    writer.flush()
    (written,) = writer.fold()[1]
    assert Path(written).read_bytes() == json.dumps({"generation": 3, "ops": ops}).encode()

    log = CommitLog(output, 3)
    tokens = [letter * 64 for letter in "abc"]
    for token in tokens:
        log.write(token, {"id": f"{token[0]}:0-1", "output": f"{token[0]}-0.parquet", "rel": token[0],
                          "fingerprint": "f"}, "digest")
    log.seal()
    (path, (found, sealed)), = bundles_of(output, 3).items()
    assert found == set(tokens) and sealed
    with open(path, "ab") as file:  # a broken record (not JSON) after the seal
        file.write(b'{"generation": 3, "token": "' + b"d" * 64 + b'", "entry": {"id": \n')
    assert bundles_of(output, 3, held={tokens[0], tokens[1]}) == {path: (set(tokens), True)}
    assert bundles_of(output, 3) == {path: (set(tokens), True)}
