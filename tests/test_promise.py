"""Exit 0 and `_SUCCESS` keep their promise across histories: interrupt here, change the model or the
input there, rerun. Each test is one history a user met (issue 12, "The promise broken with exit 0").

Every history ends with `batch-infer verify`, and where it completes, with the predictions of one model
over what the output should hold.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TEST_REPLICA, cli, feature_table, read_output, reference, save_mlp, write_files
from journal_files import commit_records

import pipelines
from pipelines.commit import MANIFEST, SUCCESS

FEATURES = 16


def _files(tmp_path: Path, shards: int = 24) -> list[str]:
    """`shards` shards of 5,000 rows in 8 files, and two models of the same shape: m1.pt and m2.pt."""
    write_files(tmp_path / "in", [5000 * shards // 8] * 8, features=FEATURES, row_group_size=5000)
    for seed in (1, 2):
        save_mlp(tmp_path / f"m{seed}.pt", [FEATURES, 256, 256, 1], seed=seed)
    return ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--shard-rows", "5000"]


def _interrupted(args: list[str], out: Path) -> int:
    """`batch-infer run ARGS`, sent SIGTERM once its first shard's commit record is in the journal."""
    process = subprocess.Popen([sys.executable, "-m", "pipelines", "run", *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if commit_records(out):
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, (process.returncode, stderr[-2000:])  # it was cut short, work left undone
    assert not (out / SUCCESS).exists()
    return process.returncode


def _predicted_by(tmp_path: Path, model: str, *, column: str = "prediction") -> None:
    """The output holds every input row once, in order, each predicted by `model` (and nothing else)."""
    import torch

    torch_model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 256), torch.nn.Sigmoid(), torch.nn.Linear(256, 256),
                                      torch.nn.Sigmoid(), torch.nn.Linear(256, 1), torch.nn.Sigmoid())
    torch_model.load_state_dict(torch.load(tmp_path / model, weights_only=True))
    files = sorted((tmp_path / "in").rglob("*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in files])
    out = read_output(tmp_path / "out")
    assert out["id"].to_pylist() == table["id"].to_pylist()
    features = np.stack([table[f"f{j:02d}"].to_numpy() for j in range(FEATURES)], axis=1)
    np.testing.assert_allclose(out[column].to_numpy(), reference(torch_model, features)[:, 0], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "out" / SUCCESS).exists()
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["complete"] and manifest["model"]["uri"] == str(tmp_path / model)
    report = pipelines.verify(str(tmp_path / "out"), sample=20, seed=3)
    assert report.ok, report.problems


def _unchanged(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


# --- 1. journal records are tied to the model and settings that made them ---------------------------

def test_an_interrupted_run_then_another_model_is_refused_and_overwrite_replaces_its_work(tmp_path: Path) -> None:
    job, out = _files(tmp_path), tmp_path / "out"
    _interrupted(["--model", str(tmp_path / "m1.pt"), *job], out)  # no manifest yet: only the journal
    assert not (out / MANIFEST).exists()
    before = _unchanged(out)

    refused = cli("run", "--model", str(tmp_path / "m2.pt"), *job)
    assert refused.returncode == 2, refused.stderr
    assert "different model" in refused.stderr and "overwrite" in refused.stderr
    assert _unchanged(out) == before  # nothing written, nothing deleted

    replaced = cli("run", "--model", str(tmp_path / "m2.pt"), *job, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    _predicted_by(tmp_path, "m2.pt")  # none of m1's journalled files taken as m2's


def test_an_interrupted_overwrite_then_a_tick_with_the_old_model_is_refused(tmp_path: Path) -> None:
    job, out = _files(tmp_path), tmp_path / "out"
    first = cli("run", "--model", str(tmp_path / "m1.pt"), *job)
    assert first.returncode == 0, first.stderr
    _interrupted(["--model", str(tmp_path / "m2.pt"), *job, "--overwrite"], out)
    before = _unchanged(out)

    tick = cli("run", "--model", str(tmp_path / "m1.pt"), *job)  # cron's next tick, with the old config
    assert tick.returncode == 2, tick.stderr
    assert "different model" in tick.stderr and "interrupted" in tick.stderr
    assert _unchanged(out) == before

    resumed = cli("run", "--model", str(tmp_path / "m2.pt"), *job)  # the overwrite goes on where it stopped
    assert resumed.returncode == 0, resumed.stderr
    _predicted_by(tmp_path, "m2.pt")  # every m1 file replaced or deleted


@pytest.mark.parametrize("setting", [["--keep-features"], ["--prediction-column", "score"],
                                     ["--invalid-rows", "keep"], ["--output-activation", "none"]])
def test_an_interrupted_run_then_another_setting_is_refused(tmp_path: Path, setting: list[str]) -> None:
    job, out = _files(tmp_path, shards=16), tmp_path / "out"
    _interrupted(["--model", str(tmp_path / "m1.pt"), *job], out)
    refused = cli("run", "--model", str(tmp_path / "m1.pt"), *job, *setting)
    assert refused.returncode == 2, refused.stderr
    assert "different model or config" in refused.stderr
    resumed = cli("run", "--model", str(tmp_path / "m1.pt"), *job)  # the first config resumes as ever
    assert resumed.returncode == 0, resumed.stderr
    _predicted_by(tmp_path, "m1.pt")


# --- 2. an overwrite demotes every entry when it begins ------------------------------------------------

def _rot_pages(path: Path) -> tuple[bytes, object]:
    """Zero a Parquet file's data pages, keeping its footer, size and mtime (bit rot under an unchanged
    fingerprint): planning reads it fine, decoding fails. Returns the good bytes and the stat to put back."""
    good, stat = path.read_bytes(), path.stat()
    footer = len(good) - 8 - int.from_bytes(good[-8:-4], "little")
    path.write_bytes(good[:4] + b"\0" * (footer - 4) + good[footer:])
    import os

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return good, stat


def test_a_shard_failing_in_an_overwrite_run_keeps_no_entry_of_the_old_model(ray_shared: None, tmp_path: Path) -> None:
    import os

    write_files(tmp_path / "in", [300, 200, 100], features=4, row_group_size=100)
    for seed in (1, 2):
        save_mlp(tmp_path / f"m{seed}.pt", [4, 8, 1], seed=seed)
    job = {**TEST_REPLICA, "input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "shard_rows": 100,
           "progress": False}
    assert pipelines.run(model=str(tmp_path / "m1.pt"), **job).complete
    victim = tmp_path / "in" / "part-0001.parquet"
    good, stat = _rot_pages(victim)

    report = pipelines.run(model=str(tmp_path / "m2.pt"), overwrite=True, **job)
    assert report.status == "failed" and not report.complete
    assert {e["shard"] for e in report.errors} == {"part-0001.parquet:0-1", "part-0001.parquet:1-2"}
    out = tmp_path / "out"
    assert not (out / SUCCESS).exists()
    manifest = json.loads((out / MANIFEST).read_text())
    assert not manifest["complete"]
    statuses = {s["id"]: s["status"] for s in manifest["shards"]}
    assert statuses["part-0001.parquet:0-1"] == statuses["part-0001.parquet:1-2"] == "failed"
    assert "part-0001-00000.parquet" in manifest["retiring"]  # m1's file: on its way out, not m2's
    assert pipelines.verify(str(out)).ok

    again = pipelines.run(model=str(tmp_path / "m2.pt"), **job)  # not "nothing to do": m1's entry is gone
    assert again.status == "failed" and not again.complete and again.shards_failed == 2
    victim.write_bytes(good)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same fingerprint as m1 saw
    healed = pipelines.run(model=str(tmp_path / "m2.pt"), **job)
    assert healed.complete and healed.shards_done == 2
    table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "in").glob("*.parquet"))])
    model = save_mlp(tmp_path / "m2-again.pt", [4, 8, 1], seed=2)
    out_table = read_output(out)
    assert out_table["id"].to_pylist() == table["id"].to_pylist()
    features = np.stack([table[f"f{j:02d}"].to_numpy() for j in range(4)], axis=1)
    np.testing.assert_allclose(out_table["prediction"].to_numpy(), reference(model, features)[:, 0],
                               rtol=1e-5, atol=1e-6)
    assert pipelines.verify(str(out), sample=20).ok


# --- 3. a changed input is a changed job --------------------------------------------------------------

def test_narrowing_the_input_is_refused_unless_overwrite(tmp_path: Path) -> None:
    for day in (1, 2, 3):
        write_files(tmp_path / "in" / f"date={day}", [200], features=4, row_group_size=100, start=1000 * day)
    save_mlp(tmp_path / "m.pt", [4, 8, 1], seed=3)
    out = tmp_path / "out"
    common = ["--model", str(tmp_path / "m.pt"), "--output", str(out)]
    assert cli("run", *common, "--input", str(tmp_path / "in")).returncode == 0
    before = _unchanged(out)

    backfill = cli("run", *common, "--input", str(tmp_path / "in" / "date=2"))  # one day, against the whole
    assert backfill.returncode == 2, backfill.stderr
    assert "input" in backfill.stderr and "date=2" in backfill.stderr and "overwrite" in backfill.stderr
    assert _unchanged(out) == before  # every other day's predictions still there
    assert sorted(p.parent.name for p in out.rglob("*.parquet")) == ["date=1", "date=2", "date=3"]
    assert pipelines.verify(str(out)).ok

    replaced = cli("run", *common, "--input", str(tmp_path / "in" / "date=2"), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr  # asked for: the output now mirrors the new input
    assert read_output(out)["id"].to_pylist() == list(range(2000, 2200))
    assert pipelines.verify(str(out), sample=10).ok


# --- 4. predictions of vanished inputs are kept unless `prune` ------------------------------------------

def test_a_vanished_inputs_predictions_are_kept_unless_prune(ray_shared: None, tmp_path: Path) -> None:
    write_files(tmp_path / "in", [300, 200, 100], features=4, row_group_size=100)
    model = save_mlp(tmp_path / "m.pt", [4, 8, 1], seed=3)
    out = tmp_path / "out"
    job = {**TEST_REPLICA, "model": str(tmp_path / "m.pt"), "input": str(tmp_path / "in"), "output": str(out),
           "shard_rows": 100, "progress": False}
    assert pipelines.run(**job).complete
    expired = pq.read_table(tmp_path / "in" / "part-0002.parquet")
    (tmp_path / "in" / "part-0002.parquet").unlink()  # the feature table's retention took it
    (tmp_path / "in" / "part-0000.parquet").rename(tmp_path / "in" / "a.parquet")  # moved away, a name reused
    pq.write_table(feature_table(np.arange(900, 950), 4, seed=9), tmp_path / "in" / "part-0001.parquet")  # changed
    pq.write_table(feature_table(np.arange(950, 960), 4, seed=8), tmp_path / "in" / "part-0000.parq")  # same stem

    kept = pipelines.run(**job)
    assert kept.complete and kept.status == "succeeded", kept.errors  # every current input committed
    assert sorted(str(p.relative_to(out)) for p in out.glob("*.parquet")) == [
        "a-00000.parquet", "a-00001.parquet", "a-00002.parquet",
        "part-0000-00000-b46ea0e7.parquet",  # the new file never takes a kept file's name
        "part-0000-00000.parquet", "part-0000-00001.parquet", "part-0000-00002.parquet",  # kept
        "part-0001-00000.parquet",  # the changed file's new version replaced the old one's two files
        "part-0002-00000.parquet",  # kept
    ]
    manifest = json.loads((out / MANIFEST).read_text())
    assert {s["rel"] for s in manifest["shards"]} == {"a.parquet", "part-0000.parquet", "part-0000.parq",
                                                      "part-0001.parquet", "part-0002.parquet"}
    assert all(s["status"] == "committed" for s in manifest["shards"]) and manifest["complete"]
    assert pq.read_table(out / "part-0002-00000.parquet")["id"] == expired["id"]
    assert pipelines.verify(str(out), sample=20).ok
    assert pipelines.run(**job).shards_done == 0  # an unchanged tick: nothing to do, nothing deleted

    pruned = pipelines.run(**job, prune=True)
    assert pruned.complete and pruned.shards_done == 0
    assert sorted(str(p.relative_to(out)) for p in out.glob("*.parquet")) == [
        "a-00000.parquet", "a-00001.parquet", "a-00002.parquet", "part-0000-00000-b46ea0e7.parquet",
        "part-0001-00000.parquet"]
    table = pa.concat_tables([pq.read_table(tmp_path / "in" / name) for name in
                              ("a.parquet", "part-0000.parq", "part-0001.parquet")])
    got = read_output(out)
    assert got["id"] == table["id"]
    features = np.stack([table[f"f{j:02d}"].to_numpy() for j in range(4)], axis=1)
    np.testing.assert_allclose(got["prediction"].to_numpy(), reference(model, features)[:, 0], rtol=1e-5, atol=1e-6)
    assert pipelines.verify(str(out), sample=20).ok


def test_prune_is_a_switch(tmp_path: Path) -> None:
    result = cli("run", "--help")
    assert "--prune" in result.stdout and "--no-prune" in result.stdout
    assert pipelines.JobConfig.from_dict({"model": "m", "input": "i", "output": "o", "prune": "true"}).prune is True


# --- 5. no _SUCCESS beside files batch-infer did not write -------------------------------------------------

def test_an_output_holding_foreign_data_and_no_manifest_is_refused(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [200], features=4, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [4, 8, 1], seed=3)
    out = tmp_path / "out"
    write_files(out / "old", [50], features=4, row_group_size=100)  # an old dataset, a copy, a wrong path
    before = _unchanged(out)
    result = cli("run", "--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "in"), "--output", str(out))
    assert result.returncode == 2, result.stderr
    assert str(out / "old" / "part-0000.parquet") in result.stderr and "not written by batch-infer" in result.stderr
    assert _unchanged(out) == before  # nothing written: no manifest, no journal, no lock


def test_no_success_while_foreign_data_sits_beside_the_output(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [200, 100], features=4, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [4, 8, 1], seed=3)
    out = tmp_path / "out"
    job = ["--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "in"), "--output", str(out)]
    assert cli("run", *job).returncode == 0 and (out / SUCCESS).exists()
    foreign = out / "part-0002-00000.parquet"  # a copy dropped in, named like a shard a new input would get
    foreign.write_bytes((tmp_path / "in" / "part-0000.parquet").read_bytes())
    write_files(tmp_path / "in", [200, 100, 50], features=4, row_group_size=100)  # part-0002 appears upstream

    tick = cli("run", *job, "--json")
    assert tick.returncode == 1, tick.stderr
    report = json.loads(tick.stdout)
    assert not report["complete"] and str(foreign) in report["errors"][0]["error"]
    assert not (out / SUCCESS).exists() and not json.loads((out / MANIFEST).read_text())["complete"]
    assert foreign.read_bytes() == (tmp_path / "in" / "part-0000.parquet").read_bytes()  # never touched
    assert not pipelines.verify(str(out)).ok

    foreign.unlink()
    healed = cli("run", *job)
    assert healed.returncode == 0, healed.stderr
    assert (out / SUCCESS).exists() and read_output(out)["id"].to_pylist() == list(range(350))
    assert pipelines.verify(str(out), sample=10).ok


# --- 14. a malformed manifest is a clear exit 2 -------------------------------------------------------

@pytest.mark.parametrize("damage", ["no output", "row_groups", "not an object", "model", "shards"])
def test_a_malformed_manifest_is_a_clear_exit_2(tmp_path: Path, damage: str) -> None:
    write_files(tmp_path / "in", [200], features=4, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [4, 8, 1], seed=3)
    out = tmp_path / "out"
    job = ["--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "in"), "--output", str(out),
           "--shard-rows", "100"]
    assert cli("run", *job).returncode == 0
    manifest = json.loads((out / MANIFEST).read_text())
    if damage == "no output":
        del manifest["shards"][1]["output"]
    elif damage == "row_groups":
        manifest["shards"][1]["row_groups"] = "1-2"
    elif damage == "not an object":
        manifest["shards"][1] = ["part-0000.parquet:1-2"]
    elif damage == "model":
        manifest["model"] = "m.pt"
    else:
        manifest["shards"] = {"part-0000.parquet:0-1": {}}
    (out / MANIFEST).write_text(json.dumps(manifest))
    for command in (["run", *job], ["run", *job, "--overwrite"], ["verify", str(out)], ["status", str(out)]):
        result = cli(*command)
        assert result.returncode == 2, (command, result.stderr)
        assert "Traceback" not in result.stderr and str(out / MANIFEST) in result.stderr, result.stderr
        if damage in ("no output", "row_groups", "not an object"):
            assert "shard entry 1" in result.stderr and "part-0000.parquet:1-2" in result.stderr


def test_state_fail_compares_generations() -> None:
    from pipelines.commit import State

    entry = {"id": "a.parquet:0-1", "rel": "a.parquet", "fingerprint": "size=1;mtime_ns=1", "output": "a-00000.parquet",
             "row_groups": [0, 1], "rows_in": 5, "rows_out": 5, "rows_rejected": 0, "rejected_output": None,
             "bytes": 10, "sha256": "x", "status": "committed", "generation": 1}
    same_run = State()
    same_run.commit(entry)
    same_run.fail({**entry, "status": "failed", "generation": 1})  # another attempt of the run that committed it
    assert "a-00000.parquet" in same_run.files and not same_run.others
    later_run = State()
    later_run.commit(entry)
    later_run.fail({**entry, "status": "failed", "generation": 2})  # a later run was told not to trust it
    assert not later_run.files and later_run.retiring == {"a-00000.parquet"}
    assert later_run.others["a.parquet:0-1"]["status"] == "failed"
