"""Planning as columns (issue 15, "A million files"): an unchanged tick makes no record per input file or
shard, the columnar plan is the plan the per-file records give, and files of one schema share one schema
object. Small runs in the driver (no Ray); the manifest in segments (thresholds lowered)."""

from __future__ import annotations

import collections
import importlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import output_files, save_mlp, write_files

import pipelines
import pipelines.shards as shards_module
import pipelines.tables as tables_module
from pipelines.commit import segments
from pipelines.plan import make_shards

plan_module = importlib.import_module("pipelines.plan")  # `pipelines.plan` is also the API function

FEATURES = 4


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segments, "INLINE_MAX", 0)
    monkeypatch.setattr(segments, "SEGMENT_ROWS", 4)


def _job(tmp_path: Path, files: int = 12) -> dict[str, object]:
    write_files(tmp_path / "in", [300] * files, features=FEATURES, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [FEATURES, 3, 1])
    return {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
            "shard_rows": 200, "progress": False}


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """How many `Shard`, `InputFile` and `DataFile` records planning makes."""
    counts: collections.Counter[str] = collections.Counter()
    for module, name in [(shards_module, "Shard"), (shards_module, "InputFile"), (plan_module, "InputFile"),
                         (tables_module, "DataFile")]:
        original = getattr(module, name)

        def counting(*args: object, _original: type = original, _name: str = name, **kwargs: object) -> object:
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
    return counts


def test_an_unchanged_tick_makes_no_record_per_file_or_shard(tmp_path: Path, small_segments: None,
                                                              made: collections.Counter[str]) -> None:
    job = _job(tmp_path)
    first = pipelines.run(**job)
    assert first.status == "succeeded" and first.shards_done == 24  # 12 files of 3 row groups, 2 shards each
    made.clear()
    before = output_files(tmp_path / "out")
    tick = pipelines.run(**job)
    assert (tick.status, tick.shards_done, tick.shards_skipped, tick.shards_total) == ("succeeded", 0, 24, 24)
    # the listing, the committed spans and the shards stayed columns: one record, of the first file (whose
    # columns the manifest recorded), and no Shard
    assert made["Shard"] == 0 and made["InputFile"] == 1 and made["DataFile"] <= 2, made
    assert output_files(tmp_path / "out") == before  # and nothing was written

    # one input rewritten: records for that file's shards only, its footer read, the others still columns
    made.clear()
    path = tmp_path / "in" / "part-0005.parquet"
    pq.write_table(pq.read_table(path), path, row_group_size=150)  # new fingerprint, other row groups
    p = pipelines.plan(**{k: v for k, v in job.items() if k != "progress"})
    assert [s.id for s in p.todo] == ["part-0005.parquet:0-2"] and len(p.skipped) == 22
    assert made["Shard"] == 1 and made["InputFile"] == 2 and made["DataFile"] <= 3, made  # and the first file's
    assert [s.output for s in p.skipped][:2] == ["part-0000-00000.parquet", "part-0000-00002.parquet"]
    made.clear()
    again = pipelines.run(**job)
    assert (again.shards_done, again.shards_skipped) == (1, 22)
    assert made["Shard"] <= 2, made  # the run, its Recorder included, made one for the shard it ran: not 23


def test_the_columnar_plan_is_the_plan_of_the_per_file_records(tmp_path: Path, small_segments: None) -> None:
    """Files wholly committed (columns), partly committed, rewritten, new and unreadable: `make_shards` over
    the plan's `InputFiles` gives the shards it gives over the same files as a list of `InputFile`s."""
    job = _job(tmp_path, files=6)
    assert pipelines.run(**job).shards_done == 12
    (tmp_path / "out" / "part-0002-00002.parquet").unlink()  # a committed shard lost: runs again
    pq.write_table(pq.read_table(tmp_path / "in" / "part-0003.parquet"), tmp_path / "in" / "part-0003.parquet",
                   row_group_size=60)  # rewritten: split anew
    write_files(tmp_path / "in" / "new", [250], features=FEATURES, row_group_size=100, start=10_000)
    (tmp_path / "in" / "broken.parquet").write_bytes(b"not parquet")
    p = pipelines.plan(**{k: v for k, v in job.items() if k != "progress"})
    records = list(p.files)
    from_manifest = [f.rel for f in records if f.row_group_rows is None and f.committed]  # no footer read
    assert len(records) == 8 and from_manifest == [f"part-000{i}.parquet" for i in (0, 1, 2, 4, 5)]
    by_records = make_shards(records, 200, p.state.claims(pa.array([f.rel for f in records]), keep_vanished=True))
    assert list(p.shards) == list(by_records)
    assert [s.id for s in p.todo] == ["broken.parquet:0-0", "new/part-0000.parquet:0-2", "new/part-0000.parquet:2-3",
                                      "part-0002.parquet:2-3", "part-0003.parquet:0-4", "part-0003.parquet:4-5"]
    assert p.todo[0].error is not None and all(s.error is None for s in p.todo[1:])
    assert [s.id for s in p.shards] == [s.id for s in by_records]


def test_files_of_one_schema_share_one_schema_object(tmp_path: Path) -> None:
    job = _job(tmp_path, files=5)
    p = pipelines.plan(**{k: v for k, v in job.items() if k != "progress"})
    schemas = [f.schema for f in p.files]
    assert len(schemas) == 5 and all(s is schemas[0] for s in schemas)
