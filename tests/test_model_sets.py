"""Model sets: `model: {name: file, ...}` scored over the same features in one pass (issue 14, item 4)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, TEST_REPLICA, cli, read_output, reference, save_mlp
from test_pt2 import FEATURES, Tabular, expected, export, table, write

import pipelines
from basis.errors import ConfigError, ModelError, OutputConflictError
from pipelines.verifier import verify


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """A state_dict MLP, a second one, and a .pt2 program (LayerNorm, residual), all taking the same features."""
    root = tmp_path_factory.mktemp("set-models")
    made: dict[str, tuple[Path, torch.nn.Module]] = {}
    for name, seed in (("mlp", 1), ("mlp2", 2)):
        made[name] = (root / f"{name}.pt", save_mlp(root / f"{name}.pt", [FEATURES, 8, 1], seed=seed))
    program = Tabular(FEATURES, seed=3)
    made["program"] = (export(program, root / "program.pt2", FEATURES), program)
    made["narrow"] = (root / "narrow.pt", save_mlp(root / "narrow.pt", [FEATURES - 1, 4, 1]))
    return made


def _features(data: pa.Table) -> np.ndarray:
    return np.stack([data[f"f{j:02d}"].to_numpy() for j in range(FEATURES)], axis=1)


def _check_columns(out: pa.Table, data: pa.Table, models: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    """Each key's column is a plain torch forward of its model, the id column intact, no `prediction`."""
    assert out.column("id").to_pylist() == data.column("id").to_pylist()
    assert "prediction" not in out.column_names
    assert out.schema.field("champion").type == pa.float32() and out.schema.field("challenger").type == pa.float32()
    np.testing.assert_allclose(out.column("champion").to_numpy(), reference(models["mlp"][1], _features(data))[:, 0],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.column("challenger").to_numpy(), expected(models["program"][1], data),
                               rtol=1e-5, atol=1e-6)


def _set(models: dict[str, tuple[Path, torch.nn.Module]], **names: str) -> dict[str, str]:
    return {key: str(models[name][0]) for key, name in names.items()}


def test_a_set_of_a_state_dict_and_a_program_on_the_driver_lane(
        tmp_path: Path, models: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    data = table(3000)
    chosen = _set(models, champion="mlp", challenger="program")
    report = pipelines.run(model=chosen, input=str(write(tmp_path / "in", data)), output=str(tmp_path / "out"),
                           progress=False)
    assert report.status == "succeeded" and report.rows_out == 3000
    assert [r["node"] for r in report.replicas] == ["driver"]
    _check_columns(read_output(tmp_path / "out"), data, models)
    record = json.loads((tmp_path / "out" / "_manifest.json").read_text())["model"]
    assert record["format"] == "set" and list(record["models"]) == ["champion", "challenger"]
    for key, path in chosen.items():  # each model's own sha256 and file
        assert record["models"][key]["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
        assert record["models"][key]["uri"] == path
    assert record["models"]["challenger"]["format"] == "pt2"
    status = cli("status", str(tmp_path / "out"))
    assert status.returncode == 0, status.stderr
    assert "champion: " in status.stdout and "challenger: " in status.stdout and "pt2 program" in status.stdout


def test_a_set_on_ray_replicas_and_verify_sample_recomputes_every_model(
        tmp_path: Path, ray_shared: None, models: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    data = table(2800, seed=4)
    report = pipelines.run(model=_set(models, champion="mlp", challenger="program"),
                           input=str(write(tmp_path / "in", data)), output=str(tmp_path / "out"), progress=False,
                           **TEST_REPLICA)
    assert report.status == "succeeded" and report.rows_out == 2800
    assert all(r["node"] != "driver" for r in report.replicas)
    _check_columns(read_output(tmp_path / "out"), data, models)
    checked = verify(str(tmp_path / "out"), sample=60, seed=2)
    assert checked.ok and checked.sampled > 0, checked.problems
    # One model's column corrupted in a copy: the recomputation of that model catches it.
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "out", copy)
    for path in sorted(p for p in copy.rglob("*.parquet") if not p.name.startswith("_")):
        stored = pq.read_table(path)
        index = stored.column_names.index("challenger")
        wrong = pa.array(stored.column("challenger").to_numpy() + 0.25, pa.float32())
        pq.write_table(stored.set_column(index, "challenger", wrong), path)
    broken = verify(str(copy), sample=60, seed=2)
    assert not broken.ok
    assert any("column 'challenger'" in p and "recomputed" in p for p in broken.problems), broken.problems
    assert not any("column 'champion'" in p for p in broken.problems)


def test_a_changed_set_is_refused_without_overwrite_and_accepted_with_it(
        tmp_path: Path, models: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    data = table(1000, seed=5)
    common = {"input": str(write(tmp_path / "in", data)), "output": str(tmp_path / "out"), "progress": False}
    assert pipelines.run(model=_set(models, champion="mlp", challenger="program"), **common).status == "succeeded"
    manifest = (tmp_path / "out" / "_manifest.json").read_text()
    for changed, words in [(_set(models, champion="mlp", challenger="mlp2"), "model 'challenger' sha256"),
                           (_set(models, champion="mlp"), "model 'challenger' removed"),
                           (_set(models, champion="mlp", challenger="program", other="mlp2"), "model 'other' added"),
                           (_set(models, best="mlp", challenger="program"), "model 'best' added"),
                           (str(models["mlp"][0]), "a model set -> one model")]:
        with pytest.raises(OutputConflictError, match=words):
            pipelines.run(model=changed, **common)
        assert (tmp_path / "out" / "_manifest.json").read_text() == manifest  # nothing written
    # The same set again: nothing to do. Another with overwrite: recomputed, new columns.
    again = pipelines.run(model=_set(models, challenger="program", champion="mlp"), **common)
    assert again.status == "succeeded" and again.rows_out == 0
    report = pipelines.run(model=_set(models, champion="mlp", challenger="mlp2"), overwrite=True, **common)
    assert report.status == "succeeded" and report.rows_out == 1000
    out = read_output(tmp_path / "out")
    np.testing.assert_allclose(out.column("challenger").to_numpy(), reference(models["mlp2"][1], _features(data))[:, 0],
                               rtol=1e-5, atol=1e-6)


def test_models_of_different_input_widths_are_refused_naming_them(
        tmp_path: Path, models: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    write(tmp_path / "in", table(100), files=1)
    with pytest.raises(ModelError, match=r"'a' \(.*mlp.pt\) takes 6, 'b' \(.*narrow.pt\) takes 5"):
        pipelines.run(model=_set(models, a="mlp", b="narrow"), input=str(tmp_path / "in"),
                      output=str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    result = cli("run", "--set", f"model={{a: {models['mlp'][0]}, b: {models['narrow'][0]}}}",
                 "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "'a'" in result.stderr and "'b'" in result.stderr, result.stderr


def test_prediction_column_and_clashing_keys_are_refused_with_a_set(
        tmp_path: Path, models: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    write(tmp_path / "in", table(100), files=1)
    with pytest.raises(ConfigError, match="rename the keys"):
        pipelines.plan(model=_set(models, a="mlp", b="program"), input=str(tmp_path / "in"),
                       output=str(tmp_path / "out"), prediction_column="p")
    with pytest.raises(ConfigError, match="model set key 'id'"):
        pipelines.plan(model=_set(models, id="mlp", b="program"), input=str(tmp_path / "in"),
                       output=str(tmp_path / "out"))


def test_a_set_of_state_dicts_runs_on_the_driver_lane_without_torch(
        tmp_path: Path, models: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    data = table(500, seed=6)
    write(tmp_path / "in", data, files=1)
    code = ("import sys, json, pipelines; r = pipelines.run(model=json.loads(sys.argv[1]), input=sys.argv[2], "
            "output=sys.argv[3], progress=False); print(r.status, r.rows_out, 'torch' in sys.modules)")
    chosen = json.dumps(_set(models, a="mlp", b="mlp2"))
    result = subprocess.run([sys.executable, "-c", code, chosen, str(tmp_path / "in"), str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["succeeded", "500", "False"]
    out = read_output(tmp_path / "out")
    for key, name in (("a", "mlp"), ("b", "mlp2")):
        np.testing.assert_allclose(out.column(key).to_numpy(), reference(models[name][1], _features(data))[:, 0],
                                   rtol=1e-5, atol=1e-6)
