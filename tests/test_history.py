"""Exactly once under awkward histories: each finding of the "manifest is the truth" issue, as a user meets it.

Every test ends with `batch-infer verify`, the user's proof that the output is what its manifest says.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TEST_REPLICA, cli, feature_table, read_output, reference, save_mlp, write_files

import pipelines
from pipelines.commit import MANIFEST, SUCCESS

FLAGS = ["--replicas", "1", "--cpus-per-replica", "0.5"]


def _job(tmp_path: Path, rows: list[int], *, features: int = 4, row_group_size: int = 100) -> list[str]:
    write_files(tmp_path / "in", rows, features=features, row_group_size=row_group_size)
    save_mlp(tmp_path / "m.pt", [features, 8, 1], seed=3)
    return ["--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]


def _verified(out: Path, sample: int = 0) -> dict:
    result = cli("verify", str(out), "--json", "--sample", str(sample), "--seed", "7")
    report = json.loads(result.stdout)
    assert result.returncode == (0 if report["ok"] else 1)
    assert report["ok"], report["problems"]
    return report


def _expected(tmp_path: Path) -> tuple[list[int], np.ndarray]:
    """Ids and predictions a plain torch forward gives for the current inputs, in path order."""
    import torch

    files = sorted(p for p in (tmp_path / "in").rglob("*") if p.is_file())
    table = pa.concat_tables([pq.read_table(p) for p in files])
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 1), torch.nn.Sigmoid())
    model.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    features = np.stack([table[f"f{j:02d}"].to_numpy() for j in range(4)], axis=1)
    return table["id"].to_pylist(), reference(model, features)[:, 0]


def _same_stat(path: Path, data: bytes, stat: os.stat_result) -> None:
    """Rewrite a file with other bytes of the same length and put its mtime back: same fingerprint."""
    assert len(data) == stat.st_size
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_file_unreadable_once_is_committed_with_its_rows_once_readable_again(tmp_path: Path) -> None:
    job = _job(tmp_path, [300, 200])
    victim = tmp_path / "in" / "part-0001.parquet"
    good, stat = victim.read_bytes(), victim.stat()
    _same_stat(victim, b"\0" * len(good), stat)  # a truncated footer, a permission blip: unreadable this tick
    first = cli("run", *job, *FLAGS, "--shard-rows", "100")
    assert first.returncode == 1, first.stderr
    assert "part-0001.parquet" in first.stdout and not (tmp_path / "out" / SUCCESS).exists()
    _verified(tmp_path / "out")

    _same_stat(victim, good, stat)  # readable again, same size and mtime
    second = cli("run", *job, *FLAGS, "--shard-rows", "100")
    assert second.returncode == 0, second.stderr
    assert read_output(tmp_path / "out")["id"].to_pylist() == list(range(500))  # its 200 rows are there
    assert (tmp_path / "out" / SUCCESS).exists()
    _verified(tmp_path / "out", sample=20)


def test_inputs_differing_only_in_suffix_keep_their_own_outputs(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for i, name in enumerate(["a", "a.parq", "a.parquet"]):
        pq.write_table(feature_table(np.arange(i * 100, i * 100 + 100), 4, seed=i), tmp_path / "in" / name)
    save_mlp(tmp_path / "m.pt", [4, 8, 1], seed=3)
    job = ["--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    result = cli("run", *job, *FLAGS, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows_out"] == 300
    outputs = sorted(p.name for p in (tmp_path / "out").glob("*.parquet"))
    assert len(outputs) == 3 and "a-00000.parquet" in outputs
    assert sorted(read_output(tmp_path / "out")["id"].to_pylist()) == list(range(300))  # none overwritten
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert len({s["output"] for s in manifest["shards"]}) == 3
    _verified(tmp_path / "out", sample=10)
    assert cli("run", *job, *FLAGS).returncode == 0  # stable names: a rerun has nothing to do
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == outputs


def test_glob_star_stays_in_one_directory_and_double_star_recurses(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [100, 100], features=4, row_group_size=100)
    write_files(tmp_path / "in" / "sub", [50], features=4, row_group_size=100, start=1000)
    save_mlp(tmp_path / "m.pt", [4, 8, 1], seed=3)
    model = ["--model", str(tmp_path / "m.pt")]
    flat = cli("run", *model, "--input", str(tmp_path / "in" / "*.parquet"), "--output", str(tmp_path / "flat"),
               *FLAGS, "--json")
    assert flat.returncode == 0, flat.stderr
    assert json.loads(flat.stdout)["rows_out"] == 200 and not (tmp_path / "flat" / "sub").exists()
    deep = cli("run", *model, "--input", str(tmp_path / "in" / "**" / "*.parquet"), "--output", str(tmp_path / "deep"),
               *FLAGS, "--json")
    assert deep.returncode == 0, deep.stderr
    assert json.loads(deep.stdout)["rows_out"] == 250
    assert (tmp_path / "deep" / "sub" / "part-0000-00000.parquet").exists()
    literal = tmp_path / "data[1]"  # a path that exists is taken literally, glob characters and all
    shutil.copytree(tmp_path / "in" / "sub", literal)
    named = cli("run", *model, "--input", str(literal), "--output", str(tmp_path / "lit"), *FLAGS, "--json")
    assert named.returncode == 0, named.stderr
    assert json.loads(named.stdout)["rows_out"] == 50
    for out in ("flat", "deep", "lit"):
        _verified(tmp_path / out)


def test_a_refused_start_writes_nothing(tmp_path: Path) -> None:
    job = _job(tmp_path, [100])
    refused = cli("run", *job, "--cpus-per-replica", "64")
    assert refused.returncode == 2 and "can never be scheduled" in refused.stderr
    assert not (tmp_path / "out").exists()  # no manifest binding later runs, no lock, no directory
    begun = time.monotonic()
    no_gpu = cli("run", *job, "--gpus-per-replica", "1")  # a fixed cluster with no GPU: refused at once, no wait
    assert no_gpu.returncode == 2 and "1 GPU on one node, and no node has that" in no_gpu.stderr, no_gpu.stderr
    assert time.monotonic() - begun < 120 and not (tmp_path / "out").exists()
    ok = cli("run", *job, *FLAGS, "--precision", "bf16")  # other settings are free to start this output
    assert ok.returncode == 0, ok.stderr
    _verified(tmp_path / "out", sample=5)


def test_output_inside_a_symlinked_input_is_refused(tmp_path: Path) -> None:
    write_files(tmp_path / "real", [100], features=4, row_group_size=100)
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    save_mlp(tmp_path / "m.pt", [4, 8, 1])
    cases = ((tmp_path / "link", tmp_path / "real" / "preds"), (tmp_path / "real", tmp_path / "link" / "p"))
    for source, output in cases:
        result = cli("run", "--model", str(tmp_path / "m.pt"), "--input", str(source), "--output", str(output), *FLAGS)
        assert result.returncode == 2 and "overlaps" in result.stderr
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["part-0000.parquet"]


# --- the output mirrors the input: changed, renamed and vanished files (API, shared Ray) -------------

@pytest.fixture
def api(ray_shared: None, tmp_path: Path) -> dict[str, object]:
    write_files(tmp_path / "in", [300, 200, 100], features=4, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [4, 8, 1], seed=3)
    return {"model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
            "shard_rows": 100}


def _run(job: dict[str, object], **extra: object) -> pipelines.RunReport:
    return pipelines.run(**{**TEST_REPLICA, **job, **extra}, progress=False)


def _converged(tmp_path: Path) -> None:
    ids, want = _expected(tmp_path)
    out = read_output(tmp_path / "out")
    assert out["id"].to_pylist() == ids  # every current row exactly once, in input order
    np.testing.assert_allclose(out["prediction"].to_numpy(), want, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "out" / SUCCESS).exists()
    assert pipelines.verify(str(tmp_path / "out"), sample=10).problems == []


def test_with_prune_a_renamed_input_leaves_one_copy_and_a_vanished_input_none(api: dict[str, object],
                                                                               tmp_path: Path) -> None:
    assert _run(api).complete
    (tmp_path / "in" / "part-0001.parquet").rename(tmp_path / "in" / "part-0009.parquet")  # regenerated upstream
    (tmp_path / "in" / "part-0002.parquet").unlink()
    report = _run(api, prune=True)  # without prune, both vanished files' predictions are kept (test_promise)
    assert report.complete and report.shards_done == 2 and report.shards_skipped == 3
    assert not list((tmp_path / "out").glob("part-0001-*")) and not list((tmp_path / "out").glob("part-0002-*"))
    _converged(tmp_path)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert {s["rel"] for s in manifest["shards"]} == {"part-0000.parquet", "part-0009.parquet"}


def test_changed_input_with_fewer_row_groups_and_quarantine(api: dict[str, object], tmp_path: Path) -> None:
    assert _run(api).complete
    table = feature_table(np.arange(300, 350), 4, seed=11)
    f01 = table["f01"].to_numpy().copy()
    f01[3] = np.nan
    pq.write_table(table.set_column(3, "f01", pa.array(f01)), tmp_path / "in" / "part-0001.parquet", row_group_size=50)
    report = _run(api)
    assert report.complete and report.rows_rejected == 1
    assert not (tmp_path / "out" / "part-0001-00001.parquet").exists()  # the old version's second shard is gone
    assert (tmp_path / "out" / "_rejected" / "part-0001-00000.parquet").exists()
    assert pipelines.verify(str(tmp_path / "out"), sample=20).problems == []
    pq.write_table(feature_table(np.arange(300, 350), 4, seed=12), tmp_path / "in" / "part-0001.parquet")
    assert _run(api).complete
    assert not (tmp_path / "out" / "_rejected" / "part-0001-00000.parquet").exists()  # a stale quarantine goes too
    _converged(tmp_path)


# --- verify finds what does not hold ---------------------------------------------------------------

def test_verify_lists_each_thing_that_does_not_hold(api: dict[str, object], tmp_path: Path) -> None:
    assert _run(api).complete
    out = tmp_path / "out"
    assert pipelines.verify(str(out), sample=30, checksums=True).ok
    shutil.copy(out / "part-0000-00000.parquet", out / "extra.parquet")  # a file nobody listed
    (out / "part-0001-00001.parquet").unlink()  # a listed file gone
    victim = out / "part-0000-00001.parquet"  # a listed file holding other predictions
    table = pq.read_table(victim)
    pq.write_table(table.set_column(2, "prediction", pa.array(np.zeros(100, np.float32))), victim)
    (out / ".part-0000-00002.parquet.0123abcd.tmp").write_bytes(b"x")  # a dead attempt's temp file
    report = pipelines.verify(str(out), sample=300, checksums=True, seed=1)
    text = "\n".join(report.problems)
    assert not report.ok
    assert "extra.parquet: a data file no manifest entry describes" in text
    assert "part-0001-00001.parquet: listed as committed" in text and "missing" in text
    assert "part-0000-00001.parquet" in text  # its size, sha256 or recomputed rows: caught
    assert "temporary file" in text and "_SUCCESS is present" in text
    result = cli("verify", str(out))
    assert result.returncode == 1 and "extra.parquet" in result.stdout

    (out / "extra.parquet").unlink()  # batch-infer never deletes a file it did not write
    repaired = _run(api)  # the missing and the altered file are redone, the temp file swept
    assert repaired.complete and repaired.shards_done == 2
    _converged(tmp_path)
    assert not list(out.glob(".*.tmp"))
